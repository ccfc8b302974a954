//! Client against the scripted mock server: normal exchanges and every
//! hostile input the issue lists. Each hostile case must end in the right
//! typed error within its deadline (F-08-style bad input on the QMP side,
//! F-19 stall, F-27 EOF).

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::mock::{MockConn, MockServer};
use crate::*;

const SHORT: Duration = Duration::from_millis(300);
/// Upper bound for "quickly": generous for a loaded 2-core machine.
const QUICK: Duration = Duration::from_secs(3);

struct Setup {
    _dir: tempfile::TempDir,
    server: MockServer,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server = MockServer::bind(dir.path().join("qmp.sock")).unwrap();
    Setup { _dir: dir, server }
}

/// Connect a client while the mock performs the handshake; return both.
async fn pair_with(opts: ConnectOptions) -> (Setup, Qmp, Events, MockConn) {
    let s = setup();
    let path = s.server.path().to_path_buf();
    let (client, conn) = tokio::join!(Qmp::connect_with(&path, &opts), async {
        let mut conn = s.server.accept().await.unwrap();
        conn.handshake().await.unwrap();
        conn
    });
    let (qmp, events) = client.unwrap();
    (s, qmp, events, conn)
}

async fn pair() -> (Setup, Qmp, Events, MockConn) {
    pair_with(ConnectOptions::default()).await
}

/// Await `fut`, failing the test if it takes longer than `limit`.
async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .expect("operation exceeded its bound")
}

#[tokio::test]
async fn connect_reads_greeting_and_negotiates() {
    let (_s, qmp, _events, mut conn) = pair().await;
    assert_eq!(qmp.greeting().version.qemu.major, 10);
    assert_eq!(qmp.greeting().capabilities, vec!["oob".to_string()]);
    let q = qmp.clone();
    let task = tokio::spawn(async move { q.query_status().await });
    let cmd = conn.expect("query-status").await.unwrap();
    assert_eq!(cmd.arguments, Value::Null);
    conn.reply(&cmd, json!({"running": true, "status": "running"}))
        .await
        .unwrap();
    let st = task.await.unwrap().unwrap();
    assert!(st.running);
    assert_eq!(st.status, RunState::Running);
}

#[tokio::test]
async fn command_error_keeps_class_and_desc_and_is_permanent() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let q = qmp.clone();
    let task = tokio::spawn(async move { q.blockdev_del("nope").await });
    let cmd = conn.expect("blockdev-del").await.unwrap();
    assert_eq!(cmd.arguments, json!({"node-name": "nope"}));
    conn.reply_error(
        &cmd,
        "GenericError",
        "Failed to find node with node-name='nope'",
    )
    .await
    .unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    assert!(!err.is_retryable());
    assert_eq!(err.qemu_class(), Some("GenericError"));
    assert_eq!(
        err.qemu_desc(),
        Some("Failed to find node with node-name='nope'")
    );
    assert!(err.to_string().contains("blockdev-del"), "{err}");
}

#[tokio::test]
async fn concurrent_commands_matched_by_id_out_of_order() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let q = qmp.clone();
        tasks.push(tokio::spawn(async move {
            q.human_monitor_command(&format!("echo {i}")).await
        }));
    }
    let mut cmds = Vec::new();
    for _ in 0..5 {
        cmds.push(conn.expect("human-monitor-command").await.unwrap());
    }
    for cmd in cmds.iter().rev() {
        let line = cmd.arguments["command-line"].as_str().unwrap();
        conn.reply(&cmd.clone(), json!(format!("out of {line}")))
            .await
            .unwrap();
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), format!("out of echo {i}"));
    }
    assert_eq!(qmp.stats().orphan_replies, 0);
}

/// Replies with wrong, unknown or missing ids are discarded (counted); the
/// command waiting for its real reply hits its deadline, and the connection
/// keeps working.
#[tokio::test]
async fn wrong_ids_are_discarded_and_command_times_out() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let q = qmp.with_timeout(SHORT);
    let task = tokio::spawn(async move { q.query_status().await });
    let cmd = conn.expect("query-status").await.unwrap();
    conn.send(&json!({"return": {}, "id": 999_999}))
        .await
        .unwrap();
    conn.send(&json!({"return": {}, "id": "text"}))
        .await
        .unwrap();
    conn.send(&json!({"return": {}})).await.unwrap();
    conn.send(&json!({"error": {"class": "GenericError", "desc": "x"}}))
        .await
        .unwrap();
    let started = Instant::now();
    let err = within(QUICK, task).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::CommandTimeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < SHORT + QUICK);
    assert_eq!(qmp.stats().orphan_replies, 4);
    // The late real reply is an orphan too, and the connection still works.
    conn.reply(&cmd, json!({"running": false, "status": "paused"}))
        .await
        .unwrap();
    let q = qmp.clone();
    let task = tokio::spawn(async move { q.stop().await });
    let cmd = conn.expect("stop").await.unwrap();
    conn.reply(&cmd, json!({})).await.unwrap();
    within(QUICK, task).await.unwrap().unwrap();
    assert_eq!(qmp.stats().orphan_replies, 5);
}

/// The reply never comes: the command fails at its deadline (F-19).
#[tokio::test]
async fn reply_never_comes_hits_deadline() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let q = qmp.with_timeout(SHORT);
    let started = Instant::now();
    let (res, cmd) = tokio::join!(q.cont(), conn.expect("cont"));
    cmd.unwrap();
    let err = res.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, Error::CommandTimeout { ref command, timeout }
        if command == "cont" && timeout == SHORT),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(elapsed >= SHORT && elapsed < SHORT + QUICK, "{elapsed:?}");
    assert!(!qmp.is_closed());
}

/// A peer that trickles a reply one byte at a time never holds a command
/// past its deadline.
#[tokio::test]
async fn trickled_reply_still_bounded_by_deadline() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let q = qmp.with_timeout(SHORT);
    let trickle = async {
        let cmd = conn.expect("query-status").await.unwrap();
        let line = format!(
            "{{\"return\":{{\"running\":true,\"status\":\"running\"}},\"id\":{}}}\n",
            cmd.id
        );
        for b in line.bytes() {
            if conn.send_raw(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let res = tokio::select! {
        r = q.query_status() => r,
        () = trickle => panic!("trickle finished before the deadline"),
    };
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
}

async fn hostile_line_fails_pending(bytes: &[u8], opts: ConnectOptions) -> Error {
    let (_s, qmp, mut events, mut conn) = pair_with(opts).await;
    let q = qmp.with_timeout(Duration::from_secs(20));
    let task = tokio::spawn(async move { q.query_block().await });
    conn.expect("query-block").await.unwrap();
    // The client may close the socket before taking it all.
    let _ = conn.send_raw(bytes).await;
    let started = Instant::now();
    let err = within(QUICK, task).await.unwrap().unwrap_err();
    assert!(started.elapsed() < QUICK);
    // Later commands fail at once with the same cause; events end.
    let again = within(QUICK, qmp.query_status()).await.unwrap_err();
    assert_eq!(again.kind(), err.kind());
    assert!(qmp.is_closed());
    assert_eq!(within(QUICK, events.recv()).await, None);
    err
}

#[tokio::test]
async fn oversized_line_is_protocol_error() {
    let opts = ConnectOptions {
        limits: Limits {
            max_line_bytes: 64 * 1024,
            ..Limits::default()
        },
        ..ConnectOptions::default()
    };
    // 1 MiB without a newline: the client must stop at 64 KiB.
    let err = hostile_line_fails_pending(&vec![b'a'; 1024 * 1024], opts).await;
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert!(!err.is_retryable());
    assert!(
        matches!(err.connection_cause(), Error::LineTooLong { limit } if *limit == 64 * 1024),
        "{err:?}"
    );
}

#[tokio::test]
async fn deep_json_is_protocol_error_not_stack_overflow() {
    let mut line = vec![b'['; 100_000];
    line.push(b'\n');
    let err = hostile_line_fails_pending(&line, ConnectOptions::default()).await;
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert!(
        matches!(
            err.connection_cause(),
            Error::TooDeep {
                limit: DEFAULT_MAX_DEPTH
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_utf8_is_protocol_error() {
    let err = hostile_line_fails_pending(
        b"{\"return\": \"\xff\xfe\x00\", \"id\": 2}\n",
        ConnectOptions::default(),
    )
    .await;
    assert!(
        matches!(
            err.connection_cause(),
            Error::InvalidUtf8 { valid_up_to: 12 }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_json_and_non_objects_are_protocol_errors() {
    let err = hostile_line_fails_pending(b"{\"return\": \n", ConnectOptions::default()).await;
    assert!(
        matches!(err.connection_cause(), Error::InvalidJson { .. }),
        "{err:?}"
    );
    let err = hostile_line_fails_pending(b"[1,2]\n", ConnectOptions::default()).await;
    assert!(
        matches!(err.connection_cause(), Error::NotAnObject { .. }),
        "{err:?}"
    );
}

/// EOF while three commands wait: all fail quickly with a retryable
/// Disconnected error (F-27), and so does every later command.
#[tokio::test]
async fn eof_mid_command_fails_all_pending_retryable() {
    let (_s, qmp, mut events, mut conn) = pair().await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let q = qmp.with_timeout(Duration::from_secs(30));
        tasks.push(tokio::spawn(async move { q.query_jobs().await }));
    }
    for _ in 0..3 {
        conn.expect("query-jobs").await.unwrap();
    }
    drop(conn);
    let started = Instant::now();
    for t in tasks {
        let err = within(QUICK, t).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Disconnected, "{err:?}");
        assert!(err.is_retryable());
        assert!(matches!(err.connection_cause(), Error::Eof), "{err:?}");
    }
    assert!(started.elapsed() < QUICK);
    let err = within(QUICK, qmp.query_jobs()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(within(QUICK, events.recv()).await, None);
}

#[tokio::test]
async fn eof_mid_line_is_retryable() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let task = tokio::spawn({
        let q = qmp.clone();
        async move { q.query_status().await }
    });
    let cmd = conn.expect("query-status").await.unwrap();
    conn.send_raw(format!("{{\"return\": {{}}, \"id\": {}", cmd.id).as_bytes())
        .await
        .unwrap();
    drop(conn);
    let err = within(QUICK, task).await.unwrap().unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        matches!(err.connection_cause(), Error::EofMidLine { .. }),
        "{err:?}"
    );
}

/// 20 000 events arrive while a reply is pending and nobody reads events:
/// the reply still arrives, the queue stays bounded and reports the gap.
#[tokio::test]
async fn event_flood_does_not_block_reply() {
    let opts = ConnectOptions {
        event_queue_events: 100,
        ..ConnectOptions::default()
    };
    let (_s, qmp, mut events, mut conn) = pair_with(opts).await;
    let q = qmp.with_timeout(Duration::from_secs(20));
    let task = tokio::spawn(async move { q.query_status().await });
    let cmd = conn.expect("query-status").await.unwrap();
    let started = Instant::now();
    let mut flood = Vec::new();
    for n in 0..20_000 {
        flood.extend_from_slice(
            format!("{{\"event\":\"X_FLOOD\",\"data\":{{\"n\":{n}}}}}\r\n").as_bytes(),
        );
    }
    conn.send_raw(&flood).await.unwrap();
    conn.reply(&cmd, json!({"running": true, "status": "running"}))
        .await
        .unwrap();
    let st = within(QUICK * 3, task).await.unwrap().unwrap();
    assert!(st.running);
    eprintln!("20k-event flood + reply: {:?}", started.elapsed());
    assert_eq!(qmp.stats().events, 20_000);
    // Oldest dropped: a gap notice, then the newest 100 in order.
    assert_eq!(events.recv().await, Some(Delivery::Missed(19_900)));
    for n in 19_900..20_000 {
        let e = events.next_event().await.unwrap();
        assert_eq!(e.data["n"], json!(n));
    }
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn unknown_events_and_messages_are_kept_not_errors() {
    let (_s, qmp, mut events, mut conn) = pair().await;
    conn.event("X_FUTURE_EVENT", json!({"deep": {"x": [1, 2]}}))
        .await
        .unwrap();
    conn.send(&json!({"event": "NO_DATA"})).await.unwrap();
    conn.send(&json!({"totally": "unknown"})).await.unwrap();
    conn.send_raw(b"\r\n   \n").await.unwrap();
    conn.event("BLOCK_EXPORT_DELETED", json!({"id": "exp0"}))
        .await
        .unwrap();
    let e = within(QUICK, events.next_event()).await.unwrap();
    assert_eq!(e.name, "X_FUTURE_EVENT");
    assert_eq!(e.data, json!({"deep": {"x": [1, 2]}}));
    assert_eq!(e.kind(), EventKind::Other);
    assert_eq!(e.timestamp.unwrap().seconds, 1_700_000_000);
    let e = within(QUICK, events.next_event()).await.unwrap();
    assert_eq!((e.name.as_str(), &e.data), ("NO_DATA", &Value::Null));
    let e = within(QUICK, events.next_event()).await.unwrap();
    assert_eq!(
        e.kind(),
        EventKind::BlockExportDeleted { id: "exp0".into() }
    );
    assert_eq!(qmp.stats().unknown_messages, 1);
    // Unknown enum values in a typed reply are kept.
    let (st, cmd) = tokio::join!(qmp.query_status(), async {
        let cmd = conn.expect("query-status").await.unwrap();
        conn.reply(
            &cmd,
            json!({"running": false, "status": "x-hibernate", "extra": 1}),
        )
        .await
        .unwrap();
    });
    let () = cmd;
    let st = st.unwrap();
    assert_eq!(st.status, RunState::Other("x-hibernate".into()));
    assert_eq!(st.other["extra"], json!(1));
}

#[tokio::test]
async fn reply_of_wrong_shape_is_decode_error() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let (res, ()) = tokio::join!(qmp.query_block(), async {
        let cmd = conn.expect("query-block").await.unwrap();
        conn.reply(&cmd, json!({"not": "a list"})).await.unwrap();
    });
    let err = res.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(matches!(err, Error::DecodeReply { ref command, .. } if command == "query-block"));
}

#[tokio::test]
async fn connect_errors_are_typed_and_bounded() {
    let s = setup();
    // No socket at all: Connect, retryable.
    let missing = s.server.path().with_file_name("missing.sock");
    let err = Qmp::connect(&missing, SHORT).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_retryable());

    // Accepts but never greets: ConnectTimeout at the greeting step.
    let path = s.server.path().to_path_buf();
    let started = Instant::now();
    let (res, _conn) = tokio::join!(Qmp::connect(&path, SHORT), s.server.accept());
    let err = res.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ConnectTimeout {
                step: "greeting",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < SHORT + QUICK);

    // Greets but never answers qmp_capabilities.
    let (res, _conn) = tokio::join!(Qmp::connect(&path, SHORT), async {
        let mut c = s.server.accept().await.unwrap();
        c.greet().await.unwrap();
        c
    });
    let err = res.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ConnectTimeout {
                step: "qmp_capabilities",
                ..
            }
        ),
        "{err:?}"
    );

    // Something else than a greeting.
    let (res, ()) = tokio::join!(Qmp::connect(&path, QUICK), async {
        let mut c = s.server.accept().await.unwrap();
        c.send(&json!({"return": {}})).await.unwrap();
    });
    let err = res.unwrap_err();
    assert!(matches!(err, Error::Greeting { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Protocol);

    // EOF before the greeting.
    let (res, ()) = tokio::join!(Qmp::connect(&path, QUICK), async {
        drop(s.server.accept().await.unwrap());
    });
    let err = res.unwrap_err();
    assert!(matches!(err, Error::GreetingEof), "{err:?}");
    assert!(err.is_retryable());

    // Refused capabilities: QEMU's error is kept.
    let (res, ()) = tokio::join!(Qmp::connect(&path, QUICK), async {
        let mut c = s.server.accept().await.unwrap();
        c.greet().await.unwrap();
        let cmd = c.expect("qmp_capabilities").await.unwrap();
        c.reply_error(&cmd, "CommandNotFound", "nope")
            .await
            .unwrap();
    });
    let err = res.unwrap_err();
    assert_eq!(err.qemu_class(), Some("CommandNotFound"));
}

/// A caller that stops waiting removes its waiter: the late reply is an
/// orphan, not delivered to anyone else.
#[tokio::test]
async fn cancelled_caller_leaves_no_waiter() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let q = qmp.clone();
    let task = tokio::spawn(async move { q.query_status().await });
    let cmd = conn.expect("query-status").await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    conn.reply(&cmd, json!({"running": true, "status": "running"}))
        .await
        .unwrap();
    let (res, ()) = tokio::join!(qmp.query_status(), async {
        let cmd = conn.expect("query-status").await.unwrap();
        conn.reply(&cmd, json!({"running": false, "status": "paused"}))
            .await
            .unwrap();
    });
    assert_eq!(res.unwrap().status, RunState::Paused);
    assert_eq!(qmp.stats().orphan_replies, 1);
}

#[tokio::test]
async fn shutdown_and_drop_close_the_socket() {
    let (_s, qmp, mut events, mut conn) = pair().await;
    let q = qmp.clone();
    let task = tokio::spawn(async move { q.query_status().await });
    conn.expect("query-status").await.unwrap();
    qmp.shutdown();
    let err = within(QUICK, task).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(within(QUICK, events.recv()).await, None);
    assert_eq!(within(QUICK, conn.recv_command()).await.unwrap(), None);

    let (_s, qmp, _events, mut conn) = pair().await;
    let clone = qmp.clone();
    drop(qmp);
    drop(clone);
    assert_eq!(within(QUICK, conn.recv_command()).await.unwrap(), None);
}

#[tokio::test]
async fn arguments_must_be_an_object() {
    let (_s, qmp, _events, _conn) = pair().await;
    let err = qmp.execute_value("stop", json!([1])).await.unwrap_err();
    assert!(matches!(err, Error::EncodeArguments { .. }), "{err:?}");
}

/// block-export-del + wait: the event arrives (possibly before the reply).
#[tokio::test]
async fn export_del_wait_sees_event() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let (res, ()) = tokio::join!(
        qmp.block_export_del_wait("exp0", ExportRemoveMode::Hard, Duration::from_secs(5)),
        async {
            let cmd = conn.expect("block-export-del").await.unwrap();
            assert_eq!(cmd.arguments, json!({"id": "exp0", "mode": "hard"}));
            conn.event("BLOCK_EXPORT_DELETED", json!({"id": "other"}))
                .await
                .unwrap();
            conn.event("BLOCK_EXPORT_DELETED", json!({"id": "exp0"}))
                .await
                .unwrap();
            conn.reply(&cmd, json!({})).await.unwrap();
            let q = conn.expect("query-block-exports").await.unwrap();
            conn.reply(
                &q,
                json!([{"type":"nbd","id":"exp0","node-name":"n","shutting-down":true}]),
            )
            .await
            .unwrap();
        }
    );
    res.unwrap();
}

/// The event is lost (e.g. queue overflow): the query poll still finds the
/// export gone. And an export that never goes away is a WaitTimeout.
#[tokio::test]
async fn export_del_wait_polls_and_times_out() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let (res, ()) = tokio::join!(
        qmp.block_export_del_wait("exp0", ExportRemoveMode::Safe, Duration::from_secs(5)),
        async {
            let cmd = conn.expect("block-export-del").await.unwrap();
            conn.reply(&cmd, json!({})).await.unwrap();
            let q = conn.expect("query-block-exports").await.unwrap();
            conn.reply(&q, json!([{"id":"exp0","shutting-down":true}]))
                .await
                .unwrap();
            let q = conn.expect("query-block-exports").await.unwrap();
            conn.reply(&q, json!([])).await.unwrap();
        }
    );
    res.unwrap();

    let started = Instant::now();
    let server = async {
        let cmd = conn.expect("block-export-del").await.unwrap();
        conn.reply(&cmd, json!({})).await.unwrap();
        while let Ok(Some(q)) = conn.recv_command().await {
            conn.reply(&q, json!([{"id":"exp0","shutting-down":true}]))
                .await
                .unwrap();
        }
    };
    let res = tokio::select! {
        r = qmp.block_export_del_wait("exp0", ExportRemoveMode::Safe, Duration::from_millis(800)) => r,
        () = server => panic!("server ended"),
    };
    let err = res.unwrap_err();
    assert!(matches!(err, Error::WaitTimeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_millis(800) + QUICK);
}

/// snapshot-save job: wait for conclusion, dismiss, surface the job error.
#[tokio::test]
async fn job_wait_dismisses_and_reports_failure() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let client = async {
        qmp.snapshot_save("j1", "t", "drv-d0", &["drv-d0"]).await?;
        qmp.wait_job_and_dismiss("j1", Duration::from_secs(5)).await
    };
    let server = async {
        let cmd = conn.expect("snapshot-save").await.unwrap();
        assert_eq!(
            cmd.arguments,
            json!({"job-id":"j1","tag":"t","vmstate":"drv-d0","devices":["drv-d0"]})
        );
        conn.reply(&cmd, json!({})).await.unwrap();
        let q = conn.expect("query-jobs").await.unwrap();
        conn.reply(
            &q,
            json!([{"id":"j1","type":"snapshot-save","status":"running",
                               "current-progress":0,"total-progress":1}]),
        )
        .await
        .unwrap();
        conn.event("JOB_STATUS_CHANGE", json!({"id":"j1","status":"concluded"}))
            .await
            .unwrap();
        let q = conn.expect("query-jobs").await.unwrap();
        conn.reply(&q, json!([{"id":"j1","type":"snapshot-save","status":"concluded",
                               "current-progress":1,"total-progress":1,
                               "error":"Device 'drv-d0' is writable but does not support snapshots"}]))
            .await
            .unwrap();
        let d = conn.expect("job-dismiss").await.unwrap();
        assert_eq!(d.arguments, json!({"id":"j1"}));
        conn.reply(&d, json!({})).await.unwrap();
    };
    let (res, ()) = tokio::join!(client, server);
    let err = res.unwrap_err();
    assert!(
        matches!(err, Error::JobFailed { ref id, ref job_type, .. } if id == "j1" && job_type == "snapshot-save"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Failed);
}

#[tokio::test]
async fn job_vanished_is_reported() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let (res, ()) = tokio::join!(qmp.wait_job("gone", Duration::from_secs(5)), async {
        let q = conn.expect("query-jobs").await.unwrap();
        conn.reply(&q, json!([])).await.unwrap();
    });
    assert!(matches!(res, Err(Error::JobVanished { .. })), "{res:?}");
}

/// The exact wire form of the helpers the backup job uses.
#[tokio::test]
async fn helper_wire_format() {
    let (_s, qmp, _events, mut conn) = pair().await;
    let client = async {
        qmp.nbd_server_start_unix("/t/nbd.sock", Some(1)).await?;
        qmp.block_export_add(&NbdExport::new("e", "access-d0").name("d0"))
            .await?;
        qmp.qom_set(
            "/machine/peripheral/d0/virtio-backend",
            "drive",
            json!("cbw-d0"),
        )
        .await?;
        qmp.transaction(&[
            TransactionAction::bitmap_add(
                "drv-d0",
                "tmp",
                BitmapAddOptions {
                    disabled: Some(true),
                    ..Default::default()
                },
            ),
            TransactionAction::bitmap_merge("drv-d0", "tmp", &["track".into()]),
            TransactionAction::bitmap_clear("drv-d0", "track"),
        ])
        .await?;
        qmp.set_action(&SetAction {
            shutdown: Some(ShutdownAction::Pause),
            ..Default::default()
        })
        .await?;
        qmp.execute_value("query-named-block-nodes", json!({"flat": true}))
            .await
    };
    let server = async {
        let mut seen = Vec::new();
        for _ in 0..6 {
            let cmd = conn.recv_command().await.unwrap().unwrap();
            seen.push((cmd.name.clone(), cmd.arguments.clone()));
            conn.reply(&cmd, json!([])).await.unwrap();
        }
        seen
    };
    let (res, seen) = tokio::join!(client, server);
    res.unwrap();
    assert_eq!(
        seen[0],
        (
            "nbd-server-start".into(),
            json!({"addr":{"type":"unix","data":{"path":"/t/nbd.sock"}},"max-connections":1})
        )
    );
    assert_eq!(
        seen[1].1,
        json!({"type":"nbd","id":"e","node-name":"access-d0","name":"d0","writable":false})
    );
    assert_eq!(
        seen[2].1,
        json!({"path":"/machine/peripheral/d0/virtio-backend","property":"drive","value":"cbw-d0"})
    );
    assert_eq!(seen[3].1["actions"].as_array().unwrap().len(), 3);
    assert_eq!(seen[4].1, json!({"shutdown":"pause"}));
}

/// While the socket is jammed (peer not reading), a command whose caller
/// gives up before it is written is never sent, and a command being written
/// is written whole: the peer never sees half a line.
#[tokio::test]
async fn abandoned_command_is_not_sent_and_lines_stay_whole() {
    let (_s, qmp, _events, mut conn) = pair().await;
    // ~900 KiB: more than a unix socket buffers, less than the mock's limit.
    let big = "x".repeat(900 * 1024);
    let (slow, fast) = (
        qmp.with_timeout(Duration::from_millis(300)),
        qmp.with_timeout(Duration::from_millis(200)),
    );
    let (jam, queued) = tokio::join!(slow.human_monitor_command(&big), fast.cont());
    assert!(matches!(jam, Err(Error::CommandTimeout { .. })), "{jam:?}");
    assert!(
        matches!(queued, Err(Error::CommandTimeout { .. })),
        "{queued:?}"
    );
    // Now read: the big command arrives whole, `cont` never does.
    let first = within(QUICK, conn.recv_command()).await.unwrap().unwrap();
    assert_eq!(first.name, "human-monitor-command");
    assert_eq!(
        first.arguments["command-line"].as_str().unwrap().len(),
        big.len()
    );
    let (res, ()) = tokio::join!(qmp.query_status(), async {
        let next = conn.recv_command().await.unwrap().unwrap();
        assert_eq!(next.name, "query-status", "the abandoned cont was sent");
        conn.reply(&next, json!({"running": false, "status": "paused"}))
            .await
            .unwrap();
    });
    res.unwrap();
}

//! Tests against the scripted fake agent ([`crate::fake`]) over a real unix
//! socket: the happy path, and every hostile input of F-08 (i)-(viii) plus
//! F-01, F-02, F-03, F-05, F-06 and the guard's drop/cancel paths. Each
//! checks the typed error, that it came within its deadline, and (for
//! freezes) that the thaw was still attempted and the fake ends `thawed`.

use std::time::{Duration, Instant};

use crate::fake::{FakeQga, Fault};
use crate::{
    thaw_blocking, wait_for_drop_thaws, Config, Error, ErrorKind, FreezeGuard, FreezeScope,
    FsFreezeStatus, GuestAgent, GuestExec,
};

fn fast() -> Config {
    Config {
        connect_timeout: Duration::from_millis(800),
        command_timeout: Duration::from_millis(800),
        freeze_timeout: Duration::from_millis(500),
        thaw_attempt_timeout: Duration::from_millis(500),
        thaw_deadline: Duration::from_secs(4),
        drop_wait: Duration::from_secs(3),
        ..Config::default()
    }
}

async fn connect(fake: &FakeQga) -> GuestAgent {
    GuestAgent::connect(fake.socket_path(), fast())
        .await
        .unwrap()
}

/// Peak resident set size of this process (VmHWM), in bytes. Peak, not
/// current: large buffers are unmapped when freed, so only the high-water
/// mark shows what a reply cost.
fn peak_rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// `{"return": [0,0,…], "id": <id>}` of about 1 MiB: as a JSON tree this
/// would take ~16-32 MiB.
fn dense_reply(id: &str) -> Vec<u8> {
    let mut line = b"{\"return\": [".to_vec();
    while line.len() < (1 << 20) - 64 {
        line.extend_from_slice(b"0,");
    }
    line.extend_from_slice(format!("0], \"id\": {id}}}\n").as_bytes());
    line
}

#[tokio::test]
async fn commands_round_trip_against_the_fake() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    agent.ping().await.unwrap();
    let info = agent.info().await.unwrap();
    assert_eq!(info.version, "fake-10.0");
    assert!(info.is_enabled("guest-fsfreeze-freeze"));
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
    let fs = agent.get_fsinfo().await.unwrap();
    assert_eq!(fs.len(), 2);
    assert_eq!(fs[1].mountpoint, "/data");
    assert_eq!(fs[1].disk[0].dev.as_deref(), Some("/dev/vdb"));

    let out = agent
        .exec_wait(
            &GuestExec::new("/bin/echo", ["hello", "world"]),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    assert!(out.success());
    assert_eq!(out.stdout, b"hello world\n");

    let h = agent.file_open("/tmp/x", "w").await.unwrap();
    assert_eq!(agent.file_write(h, b"payload\x00\xff").await.unwrap(), 9);
    agent.file_close(h).await.unwrap();
    let h = agent.file_open("/tmp/x", "r").await.unwrap();
    let chunk = agent.file_read(h, 1 << 20).await.unwrap();
    assert_eq!(chunk.data, b"payload\x00\xff");
    assert!(chunk.eof);
    agent.file_close(h).await.unwrap();

    let err = agent.file_open("/nope", "r").await.unwrap_err();
    assert!(
        matches!(err, Error::Agent { ref class, .. } if class == "GenericError"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    // An agent error leaves the connection usable.
    agent.ping().await.unwrap();
    assert_eq!(fake.connections(), 1);

    agent
        .shutdown(crate::ShutdownMode::Powerdown)
        .await
        .unwrap();
    assert_eq!(fake.count("guest-shutdown"), 1);
}

#[tokio::test]
async fn sync_discards_stale_replies_partial_lines_and_old_sentinels() {
    let fake = FakeQga::start().unwrap();
    // What an earlier client could have left behind: replies, an old sync
    // reply with its own sentinel, and a partial line.
    fake.push_prelude(
        &b"{\"return\": \"frozen\"}\n\xff{\"return\": 77, \"id\": \"old\"}\n{\"return\": {\"version\": \"x\", \"supp"[..],
    );
    let mut agent = connect(&fake).await;
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
}

#[tokio::test]
async fn f01_missing_socket_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = GuestAgent::connect(dir.path().join("none.sock"), fast())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Temporary);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn f01_silent_agent_fails_sync_within_the_deadline() {
    // A socket that accepts but never answers (QGA not running in the guest).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let start = Instant::now();
    let err = GuestAgent::connect(&path, fast()).await.unwrap_err();
    assert!(matches!(err, Error::SyncTimeout { .. }), "{err}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn f08_i_oversized_line_is_capped_with_bounded_memory() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    fake.push_fault(
        "guest-info",
        Fault::Stream {
            byte: b'a',
            total: 64 << 20,
        },
    );
    let before = peak_rss_bytes();
    let start = Instant::now();
    let err = agent.info().await.unwrap_err();
    assert!(
        matches!(err, Error::ReplyTooLarge { limit, .. } if limit == 1 << 20),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_millis(800));
    let grew = peak_rss_bytes().saturating_sub(before);
    assert!(grew < 16 << 20, "RSS grew by {grew} bytes");
    // The connection is resynced (here: reconnected, as the fake is still
    // busy streaming to the old one) before the next command.
    drop(agent);
    let mut agent = connect(&fake).await;
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn f08_i_dense_replies_do_not_amplify_memory() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    let before = peak_rss_bytes();
    // An unsolicited dense reply is skipped without building it.
    fake.push_fault("guest-ping", Fault::Before(dense_reply("\"someone-else\"")));
    agent.ping().await.unwrap();
    // Our own dense reply of the wrong shape fails at its first element.
    fake.push_fault("guest-get-fsinfo", Fault::Reply(dense_reply("@ID@")));
    let err = agent.get_fsinfo().await.unwrap_err();
    assert!(matches!(err, Error::UnexpectedReturn { .. }), "{err}");
    let grew = peak_rss_bytes().saturating_sub(before);
    assert!(grew < 8 << 20, "peak RSS grew by {grew} bytes");
}

#[tokio::test]
async fn f08_ii_deep_nesting_is_rejected_before_parsing() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    fake.push_fault("guest-ping", Fault::Reply(vec![b'['; 100_000]));
    let err = agent.ping().await.unwrap_err();
    assert!(
        matches!(err, Error::ReplyTooDeep { limit: 32, .. }),
        "{err}"
    );
    // With a newline, too (the whole line present at once).
    let mut deep = vec![b'['; 100_000];
    deep.push(b'\n');
    fake.push_fault("guest-ping", Fault::Reply(deep));
    let err = agent.ping().await.unwrap_err();
    assert!(matches!(err, Error::ReplyTooDeep { .. }), "{err}");
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn f08_iii_wrong_sync_id_is_not_accepted() {
    let fake = FakeQga::start().unwrap();
    // Right value, wrong id; then wrong value, right id.
    fake.push_fault(
        "guest-sync-delimited",
        Fault::Reply(b"\xff{\"return\": @SYNC@, \"id\": \"someone-else\"}\n\xff{\"return\": 12345, \"id\": @ID@}\n".to_vec()),
    );
    let start = Instant::now();
    let err = GuestAgent::connect(fake.socket_path(), fast())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SyncTimeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // A clean retry syncs.
    connect(&fake).await.ping().await.unwrap();
}

#[tokio::test]
async fn f08_iv_replayed_old_reply_is_never_taken_for_ours() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    // The thaw's reply is preceded by a replay of the freeze reply: dropped.
    assert_eq!(agent.fsfreeze_freeze().await.unwrap(), 2);
    fake.push_fault("guest-fsfreeze-thaw", Fault::ReplayBefore);
    assert_eq!(agent.fsfreeze_thaw().await.unwrap(), 2);
    // Only a replay, no real reply: a typed timeout, not the stale value.
    agent.ping().await.unwrap();
    fake.push_fault("guest-fsfreeze-status", Fault::ReplayInstead);
    let err = agent.fsfreeze_status().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
}

#[tokio::test]
async fn f08_v_trickle_hits_the_whole_reply_deadline() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    fake.push_fault("guest-ping", Fault::Trickle(Duration::from_millis(200)));
    let start = Instant::now();
    let err = agent.ping().await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Temporary);
    // Deadline 800 ms for the whole reply, although bytes keep arriving.
    assert!(took < Duration::from_millis(1200), "{took:?}");
}

#[tokio::test]
async fn f08_v_one_byte_per_second() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    fake.push_fault("guest-info", Fault::Trickle(Duration::from_secs(1)));
    let start = Instant::now();
    let err = agent.info().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_millis(1200));
}

#[tokio::test]
async fn f08_vi_every_return_is_type_checked() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    fake.push_fault(
        "guest-fsfreeze-freeze",
        Fault::Reply(b"{\"return\": -5, \"id\": @ID@}\n".to_vec()),
    );
    let err = agent.fsfreeze_freeze().await.unwrap_err();
    assert!(matches!(err, Error::UnexpectedReturn { .. }), "{err}");
    fake.push_fault(
        "guest-fsfreeze-thaw",
        Fault::Reply(b"{\"return\": \"frozen\", \"id\": @ID@}\n".to_vec()),
    );
    let err = agent.fsfreeze_thaw().await.unwrap_err();
    assert!(matches!(err, Error::UnexpectedReturn { .. }), "{err}");
    fake.push_fault(
        "guest-fsfreeze-status",
        Fault::Reply(b"{\"return\": \"thawing\", \"id\": @ID@}\n".to_vec()),
    );
    let err = agent.fsfreeze_status().await.unwrap_err();
    assert!(matches!(err, Error::UnexpectedReturn { .. }), "{err}");
    fake.push_fault(
        "guest-ping",
        Fault::Reply(b"{\"return\": 1, \"id\": @ID@}\n".to_vec()),
    );
    assert!(matches!(
        agent.ping().await,
        Err(Error::UnexpectedReturn { .. })
    ));
    fake.push_fault(
        "guest-exec",
        Fault::Reply(b"{\"return\": {\"pid\": -1}, \"id\": @ID@}\n".to_vec()),
    );
    assert!(matches!(
        agent
            .exec(&GuestExec::new("/bin/true", Vec::<String>::new()))
            .await,
        Err(Error::UnexpectedReturn { .. })
    ));
    fake.push_fault(
        "guest-exec-status",
        Fault::Reply(
            b"{\"return\": {\"exited\": true, \"out-data\": \"!!not base64\"}, \"id\": @ID@}\n"
                .to_vec(),
        ),
    );
    assert!(matches!(
        agent.exec_status(1).await,
        Err(Error::InvalidBase64 { .. })
    ));
    // A type error does not desync the connection.
    agent.ping().await.unwrap();
    assert_eq!(fake.connections(), 1);
}

#[tokio::test]
async fn f08_vi_guard_thaws_after_a_nonsense_freeze_reply() {
    let fake = FakeQga::start().unwrap();
    let agent = connect(&fake).await;
    // The fake did not freeze (the fault replaces the command), but the guard
    // cannot know that: it must thaw anyway.
    fake.push_fault(
        "guest-fsfreeze-freeze",
        Fault::Reply(b"{\"return\": -5, \"id\": @ID@}\n".to_vec()),
    );
    let err = FreezeGuard::freeze(agent, FreezeScope::All)
        .await
        .unwrap_err();
    match &err {
        Error::FreezeFailed { source, thaw_error } => {
            assert!(
                matches!(**source, Error::UnexpectedReturn { .. }),
                "{source}"
            );
            assert!(thaw_error.is_none(), "{thaw_error:?}");
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(fake.count("guest-fsfreeze-thaw"), 1);
}

#[tokio::test]
async fn f08_vi_guard_retries_a_nonsense_thaw_reply() {
    let fake = FakeQga::start().unwrap();
    let guard = connect(&fake).await.freeze(FreezeScope::All).await.unwrap();
    assert!(fake.is_frozen());
    fake.push_fault(
        "guest-fsfreeze-thaw",
        Fault::Reply(b"{\"return\": \"frozen\", \"id\": @ID@}\n".to_vec()),
    );
    let report = guard.thaw().await.unwrap();
    assert_eq!(report.attempts, 2);
    assert!(!fake.is_frozen());
}

#[tokio::test]
async fn f08_vii_invalid_utf8_nul_and_stray_sentinels() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    fake.push_fault(
        "guest-ping",
        Fault::Reply(b"{\"return\": {}, \"id\": @ID@, \"x\": \"\xc3\x28\"}\n".to_vec()),
    );
    assert!(matches!(agent.ping().await, Err(Error::InvalidUtf8 { .. })));
    fake.push_fault(
        "guest-ping",
        Fault::Reply(b"{\"return\": {},\0 \"id\": @ID@}\n".to_vec()),
    );
    assert!(matches!(agent.ping().await, Err(Error::InvalidJson { .. })));
    // A sentinel mid-reply resets the line; the fragment after it is junk.
    fake.push_fault(
        "guest-ping",
        Fault::Reply(b"{\"return\": {}, \xff\"id\": @ID@}\n".to_vec()),
    );
    assert!(matches!(agent.ping().await, Err(Error::InvalidJson { .. })));
    // A sentinel before a whole reply is legitimate (it only resets).
    fake.push_fault(
        "guest-ping",
        Fault::Reply(b"\xff\xff{\"return\": {}, \"id\": @ID@}\n".to_vec()),
    );
    agent.ping().await.unwrap();
    // Hostile text in an agent error is sanitized.
    fake.push_fault(
        "guest-ping",
        Fault::Reply(
            b"{\"error\": {\"class\": \"Generic\\u001b[2J\", \"desc\": \"x\"}, \"id\": @ID@}\n"
                .to_vec(),
        ),
    );
    let err = agent.ping().await.unwrap_err();
    assert!(!err.to_string().contains('\u{1b}'), "{err}");
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn f08_viii_floods_end_in_typed_errors() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    // Well-formed replies that are not ours.
    fake.push_fault(
        "guest-ping",
        Fault::Flood {
            line: br#"{"return": {}, "id": "not-yours"}"#.to_vec(),
            count: 10_000,
        },
    );
    let start = Instant::now();
    assert!(matches!(
        agent.ping().await,
        Err(Error::UnsolicitedFlood { limit: 16, .. })
    ));
    assert!(start.elapsed() < Duration::from_millis(800));
    drop(agent);

    // Blank lines: the junk budget (1 MiB) ends it.
    let mut agent = connect(&fake).await;
    fake.push_fault(
        "guest-ping",
        Fault::Flood {
            line: Vec::new(),
            count: 2 << 20,
        },
    );
    assert!(matches!(
        agent.ping().await,
        Err(Error::UnsolicitedFlood { .. })
    ));
    drop(agent);

    // Garbage lines: the first one is an error.
    let mut agent = connect(&fake).await;
    fake.push_fault(
        "guest-ping",
        Fault::Flood {
            line: b"garbage".to_vec(),
            count: 1000,
        },
    );
    assert!(matches!(agent.ping().await, Err(Error::InvalidJson { .. })));
    drop(agent);

    // Afterwards a fresh connection syncs past whatever is left.
    connect(&fake).await.ping().await.unwrap();
}

#[tokio::test]
async fn abandoned_command_forces_a_resync_on_the_same_connection() {
    let fake = FakeQga::start().unwrap();
    let mut agent = connect(&fake).await;
    // The reply comes after our deadline.
    fake.push_fault("guest-info", Fault::Stall(Duration::from_millis(1200)));
    assert!(matches!(agent.info().await, Err(Error::Timeout { .. })));
    // The late reply must not be taken as the status reply.
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
    // Cancelling a command future mid-exchange has the same effect.
    fake.push_fault("guest-info", Fault::Stall(Duration::from_millis(300)));
    tokio::time::timeout(Duration::from_millis(50), agent.info())
        .await
        .unwrap_err();
    agent.ping().await.unwrap();
    assert_eq!(fake.count("guest-sync-delimited"), 3);
    assert_eq!(fake.connections(), 1);
}

#[tokio::test]
async fn guard_freezes_and_thaws_with_a_measured_window() {
    let fake = FakeQga::start().unwrap();
    let mut guard = connect(&fake).await.freeze(FreezeScope::All).await.unwrap();
    assert_eq!(guard.frozen_filesystems(), 2);
    assert!(fake.is_frozen());
    assert_eq!(guard.status().await.unwrap(), FsFreezeStatus::Frozen);
    let report = guard.thaw().await.unwrap();
    assert_eq!(report.thawed_filesystems, 2);
    assert_eq!(report.attempts, 1);
    let window = report.freeze_window.unwrap();
    assert!(
        window > Duration::ZERO && window < Duration::from_secs(1),
        "{window:?}"
    );
    assert!(!fake.is_frozen());
}

#[tokio::test]
async fn f02_hanging_freeze_times_out_resyncs_and_thaws() {
    let fake = FakeQga::start().unwrap();
    let agent = connect(&fake).await;
    // The freeze applies, then the agent hangs 1.5 s (a freeze hook).
    fake.push_fault(
        "guest-fsfreeze-freeze",
        Fault::Stall(Duration::from_millis(1500)),
    );
    let start = Instant::now();
    let err = agent.freeze(FreezeScope::All).await.unwrap_err();
    match &err {
        Error::FreezeFailed { source, thaw_error } => {
            assert!(matches!(**source, Error::Timeout { .. }), "{source}");
            assert!(thaw_error.is_none(), "{thaw_error:?}");
        }
        other => panic!("unexpected {other}"),
    }
    // Thawed as soon as the agent came back, well within the thaw deadline.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(!fake.is_frozen());
    // It reconnected (new connection, new sync id) after the timeout, and
    // the late freeze reply leaked there and was discarded by the sync.
    assert!(fake.connections() >= 2);
}

#[tokio::test]
async fn f02_agent_hung_past_the_final_deadline_reports_loudly() {
    let fake = FakeQga::start().unwrap();
    let agent = GuestAgent::connect(
        fake.socket_path(),
        Config {
            thaw_deadline: Duration::from_secs(2),
            ..fast()
        },
    )
    .await
    .unwrap();
    fake.push_fault(
        "guest-fsfreeze-freeze",
        Fault::Stall(Duration::from_secs(6)),
    );
    let start = Instant::now();
    let err = agent.freeze(FreezeScope::All).await.unwrap_err();
    let took = start.elapsed();
    match &err {
        Error::FreezeFailed {
            thaw_error: Some(thaw),
            ..
        } => assert!(matches!(**thaw, Error::ThawFailed { .. }), "{thaw}"),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("may still be frozen"), "{err}");
    // freeze deadline 0.5 s + thaw deadline 2 s (+ one attempt's slack).
    assert!(took < Duration::from_millis(3500), "{took:?}");
}

#[tokio::test]
async fn f03_eof_mid_freeze_reconnects_and_thaws() {
    let fake = FakeQga::start().unwrap();
    let agent = connect(&fake).await;
    fake.push_fault("guest-fsfreeze-freeze", Fault::CloseAfterApply);
    let err = agent.freeze(FreezeScope::All).await.unwrap_err();
    match &err {
        Error::FreezeFailed { source, thaw_error } => {
            assert!(matches!(**source, Error::Eof { .. }), "{source}");
            assert!(thaw_error.is_none());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!fake.is_frozen());
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn f03_eof_during_thaw_is_retried() {
    let fake = FakeQga::start().unwrap();
    let guard = connect(&fake).await.freeze(FreezeScope::All).await.unwrap();
    // The first thaw is swallowed (not applied, no answer); the second is
    // applied but the connection drops before the reply. The guard keeps
    // going until the status says thawed.
    fake.push_fault("guest-fsfreeze-thaw", Fault::Reply(Vec::new()));
    fake.push_fault("guest-fsfreeze-thaw", Fault::CloseAfterApply);
    let report = guard.thaw().await.unwrap();
    assert_eq!(report.attempts, 3, "{report:?}");
    assert_eq!(fake.count("guest-fsfreeze-thaw"), 3);
    assert!(!fake.is_frozen());
}

#[tokio::test]
async fn f05_someone_elses_freeze_is_left_alone() {
    let fake = FakeQga::start().unwrap();
    fake.set_frozen(true);
    let err = connect(&fake)
        .await
        .freeze(FreezeScope::All)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyFrozen), "{err}");
    assert!(fake.is_frozen());
    assert_eq!(fake.count("guest-fsfreeze-freeze"), 0);
    assert_eq!(fake.count("guest-fsfreeze-thaw"), 0);
}

#[tokio::test]
async fn f06_freeze_list_of_unknown_mountpoints_is_a_failure_that_still_thaws() {
    let fake = FakeQga::start().unwrap();
    let scope = FreezeScope::Mountpoints(vec!["/no/such/mount".into()]);
    let err = connect(&fake).await.freeze(scope).await.unwrap_err();
    match &err {
        Error::FreezeFailed { source, thaw_error } => {
            assert!(matches!(**source, Error::NoFilesystemFrozen), "{source}");
            assert!(thaw_error.is_none());
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(fake.count("guest-fsfreeze-thaw"), 1);

    let scope = FreezeScope::Mountpoints(vec!["/data".into()]);
    let guard = connect(&fake).await.freeze(scope).await.unwrap();
    assert_eq!(guard.frozen_filesystems(), 1);
    guard.thaw().await.unwrap();
}

#[tokio::test]
async fn f06_agent_error_on_freeze_still_thaws() {
    let fake = FakeQga::start().unwrap();
    fake.push_fault(
        "guest-fsfreeze-freeze",
        Fault::Reply(
            br#"{"error": {"class": "GenericError", "desc": "failed to freeze /x"}, "id": @ID@}"#
                .iter()
                .chain(b"\n")
                .copied()
                .collect(),
        ),
    );
    let err = connect(&fake)
        .await
        .freeze(FreezeScope::All)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FreezeFailed { source, thaw_error: None } if matches!(**source, Error::Agent { .. })),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert_eq!(fake.count("guest-fsfreeze-thaw"), 1);
}

#[tokio::test]
async fn dropped_guard_thaws_before_drop_returns() {
    let fake = FakeQga::start().unwrap();
    let guard = connect(&fake).await.freeze(FreezeScope::All).await.unwrap();
    assert!(fake.is_frozen());
    drop(guard);
    assert!(!fake.is_frozen());
}

#[test]
fn dropped_guard_thaws_on_a_runtime_that_is_shutting_down() {
    let fake = FakeQga::start().unwrap();
    let path = fake.socket_path().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _guard = GuestAgent::connect(&path, fast())
            .await
            .unwrap()
            .freeze(FreezeScope::All)
            .await
            .unwrap();
        tx.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    // Drive the runtime until the freeze is in place, then shut it down
    // with the task (and its guard) still alive.
    rt.block_on(async {
        while rx.try_recv().is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(fake.is_frozen());
    drop(rt);
    assert!(wait_for_drop_thaws(Duration::from_secs(5)));
    assert!(!fake.is_frozen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_task_thaws_through_the_guard() {
    let fake = FakeQga::start().unwrap();
    let path = fake.socket_path().to_path_buf();
    let task = tokio::spawn(async move {
        let _guard = GuestAgent::connect(&path, fast())
            .await
            .unwrap()
            .freeze(FreezeScope::All)
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    assert!(fake.wait_until(Duration::from_secs(3), FakeQga::is_frozen));
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(fake.wait_until(Duration::from_secs(3), |f| !f.is_frozen()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_aborted_while_the_freeze_is_in_flight_still_thaws() {
    let fake = FakeQga::start().unwrap();
    let path = fake.socket_path().to_path_buf();
    fake.push_fault(
        "guest-fsfreeze-freeze",
        Fault::Stall(Duration::from_millis(400)),
    );
    let task = tokio::spawn(async move {
        let agent = GuestAgent::connect(&path, fast()).await.unwrap();
        let _ = agent.freeze(FreezeScope::All).await;
    });
    assert!(
        fake.wait_until(Duration::from_secs(3), |f| f.count("guest-fsfreeze-freeze")
            == 1)
    );
    task.abort();
    let _ = task.await;
    assert!(wait_for_drop_thaws(Duration::from_secs(5)));
    assert!(!fake.is_frozen());
    assert!(fake.count("guest-fsfreeze-thaw") >= 1);
}

#[test]
fn f04_thaw_blocking_for_a_watchdog() {
    let fake = FakeQga::start().unwrap();
    fake.set_frozen(true);
    // Stale output from the dead agent's connection is discarded.
    fake.push_prelude(&b"{\"return\": 2, \"id\": \"dead-agent-7\"}\n{\"ret"[..]);
    let report =
        thaw_blocking(fake.socket_path(), Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(report.thawed_filesystems, 2);
    assert_eq!(report.freeze_window, None);
    assert!(!fake.is_frozen());
}

#[test]
fn f04_thaw_blocking_gives_up_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let start = Instant::now();
    let err = thaw_blocking(&path, Instant::now() + Duration::from_millis(1500)).unwrap_err();
    assert!(matches!(err, Error::ThawFailed { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_millis(2500));
}

#[tokio::test]
async fn f09_agent_gone_for_a_while_then_back_thawed() {
    // A reboot: the thaw goes unanswered (connection dropped), then the
    // agent comes back with the guest thawed.
    let fake = FakeQga::start().unwrap();
    let guard = connect(&fake).await.freeze(FreezeScope::All).await.unwrap();
    fake.push_fault("guest-fsfreeze-thaw", Fault::CloseAfterApply);
    fake.push_fault("guest-sync-delimited", Fault::NoReply);
    let report = guard.thaw().await.unwrap();
    assert!(report.attempts >= 3, "{report:?}");
    assert!(!fake.is_frozen());
}

/// Property tests for the line/JSON decoder (the fuzz targets of F-08).
/// Short by default; a long run: `PROPTEST_CASES=1000000 cargo test -p
/// guest-agent --release decoder_props`.
mod decoder_props {
    use proptest::prelude::*;
    use serde_json::Value;

    use crate::config::Config;
    use crate::wire::{exceeds_depth, parse_reply, Framer, Session};

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    proptest! {
        #[test]
        fn framer_never_panics_and_stays_bounded(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 0..32),
            max_line in 1usize..256,
            max_depth in 1usize..16,
            skip_first in any::<bool>(),
        ) {
            let mut framer = Framer::new(max_line, max_depth);
            framer.set_junk_limit(4096);
            if skip_first {
                framer.skip_until_sentinel();
            }
            for chunk in &chunks {
                framer.push(chunk);
                while let Some(frame) = framer.next_frame() {
                    if let Ok(line) = frame {
                        prop_assert!(line.len() <= max_line);
                        prop_assert!(!line.contains(&b'\n') && !line.contains(&0xFF));
                        prop_assert!(!exceeds_depth(&line, max_depth));
                    }
                    prop_assert!(framer.buffered() <= max_line + chunk.len());
                }
                prop_assert!(framer.buffered() <= max_line);
            }
        }

        #[test]
        fn framer_returns_valid_json_lines_intact(
            values in prop::collection::vec(arb_json(), 1..8),
            split in any::<prop::sample::Index>(),
        ) {
            let mut stream = Vec::new();
            for v in &values {
                stream.extend_from_slice(v.to_string().as_bytes());
                stream.push(b'\n');
            }
            let at = split.index(stream.len() + 1);
            let mut framer = Framer::new(1 << 20, 64);
            let mut got = Vec::new();
            for part in [&stream[..at], &stream[at..]] {
                framer.push(part);
                while let Some(frame) = framer.next_frame() {
                    got.push(frame.unwrap());
                }
            }
            let parsed: Vec<Value> = got.iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
            prop_assert_eq!(parsed, values);
        }

        #[test]
        fn depth_scan_agrees_with_the_real_depth(value in arb_json()) {
            let text = value.to_string();
            let real = depth(&value);
            for limit in 0..10 {
                prop_assert_eq!(exceeds_depth(text.as_bytes(), limit), real > limit);
            }
        }

        #[test]
        fn parse_reply_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_reply(&bytes, 8);
        }

        #[test]
        fn bracket_bombs_are_rejected(n in 33usize..20_000, open in prop_oneof![Just(b'['), Just(b'{')]) {
            let bomb = vec![open; n];
            prop_assert!(parse_reply(&bomb, 32).is_err());
            let mut framer = Framer::new(1 << 20, 32);
            framer.push(&bomb);
            prop_assert!(matches!(framer.next_frame(), Some(Err(_))));
        }

        #[test]
        fn session_never_panics_on_hostile_lines(
            lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..256), 0..16),
            reply_like in prop::collection::vec(arb_json(), 0..8),
        ) {
            let mut session = Session::new(&Config::default());
            let (_, sync) = session.start_sync();
            for line in &lines {
                let _ = session.on_sync_line(&sync, line);
            }
            let (_, mut pending) = session
                .start_command("guest-ping", &serde_json::json!({}))
                .unwrap();
            for line in lines.iter().cloned().chain(reply_like.iter().map(|v| {
                serde_json::json!({"return": v, "id": "x"}).to_string().into_bytes()
            })) {
                let _ = session.on_reply_line(&mut pending, &line);
            }
        }
    }
}

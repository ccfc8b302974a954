//! The `qmp` crate against real QEMU (paused, no guest): every helper the
//! backup job uses, the fleecing graph in the documented setup and teardown
//! order, dirty bitmaps in transactions, internal-snapshot jobs, and the
//! failure modes: QEMU stopped with SIGSTOP (F-19: deadlines fire, the
//! connection survives), killed with SIGKILL (F-27: everything fails fast and
//! retryably), and `quit` (F-28).
//!
//! Oracles are independent of the crate: `qemu-io` reading the NBD export,
//! `qemu-img info`, the harness's own monitor, QEMU's own error messages.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qmp::{
    BitmapAddOptions, BitmapRef, Error, ErrorKind, EventKind, ExportRemoveMode, NbdExport,
    PanicAction, Qmp, RebootAction, RunState, SetAction, ShutdownAction, TransactionAction,
};
use serde_json::{json, Value};
use shear_tests::{require_qemu, require_tool, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;
/// Connect deadline: QMP is ready ~0.1 s after QEMU starts; allow a loaded
/// machine.
const CONNECT: Duration = Duration::from_secs(10);
/// A generous bound for "fails quickly" on a loaded 2-core machine.
const QUICK: Duration = Duration::from_secs(3);

async fn connect(vm: &TestVm) -> (Qmp, qmp::Events) {
    Qmp::connect(vm.qmp_socket(), CONNECT)
        .await
        .expect("connect to the reserved QMP monitor")
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io` on an NBD export, read-only; returns (success, output).
fn qemu_io_nbd(socket: &Path, export: &str, cmd: &str) -> (bool, String) {
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &uri, "-c", cmd])
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && !text.contains("Pattern verification failed");
    (ok, text)
}

fn node_names(nodes: &[qmp::BlockNodeInfo]) -> Vec<&str> {
    nodes.iter().map(|n| n.node_name.as_str()).collect()
}

/// Time one await and print it, so runs record per-command latency.
async fn timed<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = fut.await;
    eprintln!("[qmp] {what}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    r
}

#[tokio::test]
async fn qemu_connect_and_queries_match_the_harness_view() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 32 * MIB))).unwrap();
    let t = Instant::now();
    let (qmp, _events) = connect(&vm).await;
    eprintln!("[qmp] connect+greeting+capabilities: {:?}", t.elapsed());

    let version = qmp.query_version().await.unwrap();
    assert_eq!(version, qmp.greeting().version);
    let harness_version = vm.harness_qmp("query-version", json!({})).unwrap();
    assert_eq!(
        u64::from(version.qemu.major),
        harness_version["qemu"]["major"].as_u64().unwrap()
    );
    assert!(version.qemu.major >= 7, "need QEMU 7.1+: {version:?}");

    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Prelaunch);
    assert!(!status.running);

    let blocks = qmp.query_block().await.unwrap();
    let d0 = blocks
        .iter()
        .find(|b| b.qdev.as_deref() == Some(vm.qdev("d0").as_str()))
        .unwrap_or_else(|| panic!("no device with qdev {}: {blocks:?}", vm.qdev("d0")));
    let inserted = d0.inserted.as_ref().expect("medium inserted");
    assert_eq!(inserted.node_name, vm.disk_node("d0"));
    assert_eq!(inserted.drv, "qcow2");

    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let drv = nodes
        .iter()
        .find(|n| n.node_name == "drv-d0")
        .expect("drv-d0 listed");
    let image = drv.image.as_ref().expect("image info");
    assert_eq!(image.virtual_size, 32 * MIB);
    assert_eq!(image.format, "qcow2");
    assert_eq!(Path::new(&image.filename), vm.disk_path("d0"));
    assert!(node_names(&nodes).contains(&"file-d0"));

    // 32 concurrent commands from clones of one handle, all matched.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let q = qmp.clone();
        tasks.push(tokio::spawn(async move { q.query_status().await }));
    }
    let t = Instant::now();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status, RunState::Prelaunch);
    }
    eprintln!("[qmp] 32 concurrent query-status: {:?}", t.elapsed());
    let stats = qmp.stats();
    assert_eq!(stats.orphan_replies, 0);
    assert_eq!(stats.replies_matched, stats.commands_sent);

    // HMP passthrough agrees with QMP.
    let hmp = qmp.human_monitor_command("info version").await.unwrap();
    assert!(
        hmp.starts_with(&format!(
            "{}.{}.{}",
            version.qemu.major, version.qemu.minor, version.qemu.micro
        )),
        "{hmp:?}"
    );
    // A QEMU error keeps its class and description.
    let err = qmp.blockdev_del("no-such-node").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    assert!(!err.is_retryable());
    assert_eq!(err.qemu_class(), Some("GenericError"));
    assert!(err.qemu_desc().unwrap().contains("no-such-node"), "{err}");
    let err = qmp
        .execute_value("x-no-such-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.qemu_class(), Some("CommandNotFound"));
    vm.shutdown().unwrap();
}

/// The fleecing graph of design.md §2, set up and torn down in the
/// documented order, with a guest-side write in between: the NBD export
/// shows the freeze-instant data, the live disk the new data (F-10 in
/// miniature), and nothing of ours is left afterwards (PC-C).
#[tokio::test]
async fn qemu_fleecing_graph_setup_export_and_teardown() {
    if !require_qemu() || !require_tool("qemu-io") {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 32 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0x11 0 1M").unwrap();
    let (qmp, mut events) = connect(&vm).await;

    let blocks = qmp.query_block().await.unwrap();
    let qdev = blocks
        .iter()
        .find(|b| b.inserted.as_ref().map(|i| i.node_name.as_str()) == Some("drv-d0"))
        .and_then(|b| b.qdev.clone())
        .expect("qdev of the device on drv-d0");
    assert_eq!(qdev, vm.qdev("d0"));
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let size = nodes
        .iter()
        .find(|n| n.node_name == "drv-d0")
        .and_then(|n| n.image.as_ref())
        .map(|i| i.virtual_size)
        .unwrap();

    // Setup.
    let fleece = vm.dir().join("fleece-d0.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        fleece.to_str().unwrap(),
        &size.to_string(),
    ]);
    timed(
        "blockdev-add fleece",
        qmp.blockdev_add(json!({"driver": "qcow2", "node-name": "fleece-d0",
            "file": {"driver": "file", "filename": fleece}})),
    )
    .await
    .unwrap();
    timed(
        "blockdev-add copy-before-write",
        qmp.blockdev_add(json!({"driver": "copy-before-write", "node-name": "cbw-d0",
            "file": "drv-d0", "target": "fleece-d0",
            "on-cbw-error": "break-snapshot", "cbw-timeout": 45})),
    )
    .await
    .unwrap();
    timed(
        "qom-set drive -> cbw",
        qmp.qom_set(&qdev, "drive", json!("cbw-d0")),
    )
    .await
    .unwrap();
    timed(
        "blockdev-add snapshot-access",
        qmp.blockdev_add(
            json!({"driver": "snapshot-access", "node-name": "access-d0",
            "file": "cbw-d0"}),
        ),
    )
    .await
    .unwrap();
    let nbd_sock = vm.dir().join("nbd.sock");
    timed(
        "nbd-server-start",
        qmp.nbd_server_start_unix(nbd_sock.to_str().unwrap(), Some(4)),
    )
    .await
    .unwrap();
    timed(
        "block-export-add",
        qmp.block_export_add(&NbdExport::new("exp-d0", "access-d0").name("d0")),
    )
    .await
    .unwrap();

    // The graph as QEMU reports it.
    assert_eq!(qmp.qom_get(&qdev, "drive").await.unwrap(), json!("cbw-d0"));
    let blocks = qmp.query_block().await.unwrap();
    let dev = blocks
        .iter()
        .find(|b| b.qdev.as_deref() == Some(&qdev))
        .unwrap();
    assert_eq!(dev.inserted.as_ref().unwrap().node_name, "cbw-d0");
    let cbw = qmp
        .query_named_block_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node_name == "cbw-d0")
        .expect("cbw-d0 listed");
    assert_eq!(cbw.drv, "copy-before-write");
    let exports = qmp.query_block_exports().await.unwrap();
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(exports[0].id, "exp-d0");
    assert_eq!(exports[0].node_name, "access-d0");
    assert_eq!(exports[0].export_type, "nbd");
    assert!(!exports[0].shutting_down);

    // A guest-side write after the cut: the export keeps the old bytes.
    vm.qemu_io("d0", "write -P 0xab 0 64k").unwrap();
    vm.qemu_io("d0", "read -P 0xab 0 64k").unwrap();
    let (ok, out) = qemu_io_nbd(&nbd_sock, "d0", "read -P 0x11 0 1M");
    assert!(ok, "export must show the freeze-instant data: {out}");

    // Wrong order is refused by QEMU, typed as a permanent command error.
    let err = qmp.blockdev_del("cbw-d0").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command, "{err}");
    assert!(!err.is_retryable());

    // Teardown, documented order.
    timed(
        "block-export-del + BLOCK_EXPORT_DELETED",
        qmp.block_export_del_wait("exp-d0", ExportRemoveMode::Safe, Duration::from_secs(10)),
    )
    .await
    .unwrap();
    assert!(qmp.query_block_exports().await.unwrap().is_empty());
    let deleted = events
        .wait_for("BLOCK_EXPORT_DELETED", QUICK, |e| {
            e.kind()
                == EventKind::BlockExportDeleted {
                    id: "exp-d0".into(),
                }
        })
        .await
        .unwrap();
    assert!(deleted.timestamp.is_some());
    timed("nbd-server-stop", qmp.nbd_server_stop())
        .await
        .unwrap();
    timed("blockdev-del access", qmp.blockdev_del("access-d0"))
        .await
        .unwrap();
    timed(
        "qom-set drive -> original",
        qmp.qom_set(&qdev, "drive", json!("drv-d0")),
    )
    .await
    .unwrap();
    timed("blockdev-del cbw", qmp.blockdev_del("cbw-d0"))
        .await
        .unwrap();
    timed("blockdev-del fleece", qmp.blockdev_del("fleece-d0"))
        .await
        .unwrap();
    std::fs::remove_file(&fleece).unwrap();

    // PC-C: nothing of ours is left, the device is back on its node.
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    let names = node_names(&nodes);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("cbw-") || n.starts_with("access-") || n.starts_with("fleece-")),
        "{names:?}"
    );
    let blocks = qmp.query_block().await.unwrap();
    let dev = blocks
        .iter()
        .find(|b| b.qdev.as_deref() == Some(&qdev))
        .unwrap();
    assert_eq!(dev.inserted.as_ref().unwrap().node_name, "drv-d0");
    assert_eq!(qmp.qom_get(&qdev, "drive").await.unwrap(), json!("drv-d0"));
    // A device that is gone is DeviceNotFound (teardown relies on it).
    let err = qmp
        .qom_get("/machine/peripheral/no-such-dev", "drive")
        .await
        .unwrap_err();
    assert_eq!(err.qemu_class(), Some("DeviceNotFound"), "{err}");
    // The write reached the real disk.
    vm.qemu_io("d0", "read -P 0xab 0 64k").unwrap();
    vm.qemu_io("d0", "read -P 0x11 64k 960k").unwrap();
    vm.shutdown().unwrap();
}

/// F-15: a reader still connected. Safe removal is refused while it is
/// there; hard removal disconnects it and the wait sees the export go.
#[tokio::test]
async fn qemu_export_del_hard_with_connected_client() {
    if !require_qemu() || !require_tool("qemu-io") || !require_tool("stdbuf") {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::raw("d0", 8 * MIB))).unwrap();
    let (qmp, _events) = connect(&vm).await;
    let nbd_sock = vm.dir().join("nbd.sock");
    qmp.nbd_server_start_unix(nbd_sock.to_str().unwrap(), None)
        .await
        .unwrap();
    qmp.block_export_add(&NbdExport::new("exp0", "drv-d0").name("d0"))
        .await
        .unwrap();

    // A client that reads once (so we know it is attached), then idles.
    let uri = format!("nbd+unix:///d0?socket={}", nbd_sock.display());
    let mut client = Command::new("stdbuf")
        .args(["-oL", "qemu-io", "-r", "-f", "raw", &uri])
        .args(["-c", "read 0 512", "-c", "sleep 60000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = client.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("qemu-io attached in time")
        .unwrap()
        .unwrap();
    assert!(line.contains("read 512/512"), "{line:?}");

    let err = qmp
        .block_export_del("exp0", ExportRemoveMode::Safe)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command, "{err}");
    eprintln!(
        "[qmp] safe removal with a client: {}",
        err.qemu_desc().unwrap()
    );
    assert_eq!(qmp.query_block_exports().await.unwrap().len(), 1);

    let t = Instant::now();
    qmp.block_export_del_wait("exp0", ExportRemoveMode::Hard, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("[qmp] hard removal with a client: {:?}", t.elapsed());
    assert!(qmp.query_block_exports().await.unwrap().is_empty());
    qmp.nbd_server_stop().await.unwrap();
    let _ = client.kill();
    let _ = client.wait();
    vm.shutdown().unwrap();
}

/// The freeze-window bitmap dance of design.md §2 on a persistent bitmap,
/// with counts checked after each step, and all-or-nothing on failure.
#[tokio::test]
async fn qemu_dirty_bitmaps_in_transactions() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 16 * MIB))).unwrap();
    let (qmp, _events) = connect(&vm).await;
    let node = "drv-d0";
    qmp.block_dirty_bitmap_add(
        node,
        "track",
        BitmapAddOptions {
            persistent: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    vm.qemu_io("d0", "write -P 0x01 0 64k").unwrap();

    let bitmaps = |qmp: Qmp| async move {
        let nodes = qmp.query_named_block_nodes().await.unwrap();
        let n = nodes.into_iter().find(|n| n.node_name == "drv-d0").unwrap();
        n.dirty_bitmaps
            .into_iter()
            .map(|b| (b.name.clone(), b))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let b = bitmaps(qmp.clone()).await;
    assert_eq!(b["track"].count, 65536);
    assert!(b["track"].persistent && b["track"].recording);
    assert_eq!(b["track"].granularity, 65536);

    // Inside the freeze: temp := track; clear track. One transaction.
    timed(
        "transaction add+merge+clear",
        qmp.transaction(&[
            TransactionAction::bitmap_add(
                node,
                "tmp",
                BitmapAddOptions {
                    disabled: Some(true),
                    ..Default::default()
                },
            ),
            TransactionAction::bitmap_merge(node, "tmp", &["track".into()]),
            TransactionAction::bitmap_clear(node, "track"),
        ]),
    )
    .await
    .unwrap();
    let b = bitmaps(qmp.clone()).await;
    assert_eq!(b["tmp"].count, 65536);
    assert!(!b["tmp"].recording && !b["tmp"].persistent);
    assert_eq!(b["track"].count, 0);

    // Writes after the cut land only in the tracking bitmap.
    vm.qemu_io("d0", "write -P 0x02 1M 64k").unwrap();
    let b = bitmaps(qmp.clone()).await;
    assert_eq!((b["track"].count, b["tmp"].count), (65536, 65536));

    // Failure path: merge the temporary bitmap back so nothing is lost.
    qmp.block_dirty_bitmap_merge(node, "track", &[BitmapRef::new(node, "tmp").into()])
        .await
        .unwrap();
    assert_eq!(bitmaps(qmp.clone()).await["track"].count, 131_072);

    // A transaction with one bad action changes nothing.
    let err = qmp
        .transaction(&[
            TransactionAction::bitmap_add(node, "other", BitmapAddOptions::default()),
            TransactionAction::bitmap_remove(node, "no-such-bitmap"),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command, "{err}");
    assert!(!bitmaps(qmp.clone()).await.contains_key("other"));

    // enable/disable/clear/remove, standalone and transactional.
    qmp.block_dirty_bitmap_enable(node, "tmp").await.unwrap();
    assert!(bitmaps(qmp.clone()).await["tmp"].recording);
    qmp.block_dirty_bitmap_disable(node, "tmp").await.unwrap();
    assert!(!bitmaps(qmp.clone()).await["tmp"].recording);
    qmp.transaction(&[
        TransactionAction::bitmap_enable(node, "tmp"),
        TransactionAction::bitmap_disable(node, "tmp"),
    ])
    .await
    .unwrap();
    qmp.block_dirty_bitmap_clear(node, "tmp").await.unwrap();
    assert_eq!(bitmaps(qmp.clone()).await["tmp"].count, 0);
    qmp.transaction(&[TransactionAction::bitmap_remove(node, "tmp")])
        .await
        .unwrap();
    let b = bitmaps(qmp.clone()).await;
    assert_eq!(b.keys().collect::<Vec<_>>(), vec!["track"]);
    qmp.block_dirty_bitmap_remove(node, "track").await.unwrap();
    assert!(bitmaps(qmp.clone()).await.is_empty());
    let err = qmp
        .block_dirty_bitmap_remove(node, "track")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command);
    vm.shutdown().unwrap();
}

/// stop/cont/query-status with their events, set-action, reset/powerdown.
#[tokio::test]
async fn qemu_run_state_actions_and_events() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused()).unwrap();
    let (qmp, mut events) = connect(&vm).await;
    qmp.set_action(&SetAction {
        reboot: Some(RebootAction::Shutdown),
        shutdown: Some(ShutdownAction::Pause),
        panic: Some(PanicAction::Pause),
        watchdog: None,
    })
    .await
    .unwrap();
    let err = qmp
        .set_action(&SetAction {
            shutdown: Some(ShutdownAction::Other("bogus".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command, "{err}");

    assert_eq!(
        qmp.query_status().await.unwrap().status,
        RunState::Prelaunch
    );
    qmp.cont().await.unwrap();
    events
        .wait_for("RESUME", QUICK, |e| e.kind() == EventKind::Resume)
        .await
        .unwrap();
    let st = qmp.query_status().await.unwrap();
    assert!(st.running);
    assert_eq!(st.status, RunState::Running);
    qmp.stop().await.unwrap();
    events
        .wait_for("STOP", QUICK, |e| e.kind() == EventKind::Stop)
        .await
        .unwrap();
    let st = qmp.query_status().await.unwrap();
    assert_eq!((st.running, st.status), (false, RunState::Paused));

    // set-action took effect: with reboot=shutdown and shutdown=pause a
    // reset request becomes a SHUTDOWN event and QEMU stays alive.
    qmp.system_reset().await.unwrap();
    let shutdown = events
        .wait_for("SHUTDOWN", QUICK, |e| {
            matches!(e.kind(), EventKind::Shutdown { .. })
        })
        .await
        .unwrap();
    assert_eq!(
        shutdown.kind(),
        EventKind::Shutdown {
            guest: false,
            reason: "host-qmp-system-reset".into()
        }
    );
    let st = qmp.query_status().await.unwrap();
    eprintln!(
        "[qmp] status after reset-as-shutdown with pause: {}",
        st.status
    );
    assert!(!st.running);
    assert!(vm.is_running(), "shutdown action pause keeps QEMU alive");

    qmp.set_action(&SetAction {
        reboot: Some(RebootAction::Reset),
        ..Default::default()
    })
    .await
    .unwrap();
    qmp.system_reset().await.unwrap();
    let reset = events
        .wait_for("RESET", QUICK, |e| {
            matches!(e.kind(), EventKind::Reset { .. })
        })
        .await
        .unwrap();
    assert_eq!(
        reset.kind(),
        EventKind::Reset {
            guest: false,
            reason: "host-qmp-system-reset".into()
        }
    );
    qmp.system_powerdown().await.unwrap();
    events
        .wait_for("POWERDOWN", QUICK, |e| e.kind() == EventKind::Powerdown)
        .await
        .unwrap();
    // Still stopped: nothing here resumes a VM on its own.
    assert!(!qmp.query_status().await.unwrap().running);
    vm.shutdown().unwrap();
}

/// snapshot-save / snapshot-delete jobs to conclusion + job-dismiss, with
/// the VM state on the qcow2 disk; a job on a raw disk fails typed.
#[tokio::test]
async fn qemu_snapshot_save_load_delete_jobs() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(
        VmConfig::paused()
            .disk(DiskSpec::qcow2("d0", 16 * MIB))
            .disk(DiskSpec::raw("d1", 4 * MIB)),
    )
    .unwrap();
    let (qmp, _events) = connect(&vm).await;
    vm.qemu_io("d0", "write -P 0x33 0 64k").unwrap();

    qmp.snapshot_save("save0", "snap1", "drv-d0", &["drv-d0"])
        .await
        .unwrap();
    let job = timed(
        "snapshot-save job",
        qmp.wait_job_and_dismiss("save0", Duration::from_secs(60)),
    )
    .await
    .unwrap();
    assert_eq!(job.job_type, "snapshot-save");
    assert!(qmp.query_jobs().await.unwrap().is_empty(), "dismissed");
    let info = qmp.human_monitor_command("info snapshots").await.unwrap();
    assert!(info.contains("snap1"), "{info}");

    // Change the disk, load the snapshot, the old data is back.
    vm.qemu_io("d0", "write -P 0x44 0 64k").unwrap();
    qmp.snapshot_load("load0", "snap1", "drv-d0", &["drv-d0"])
        .await
        .unwrap();
    qmp.wait_job_and_dismiss("load0", Duration::from_secs(60))
        .await
        .unwrap();
    vm.qemu_io("d0", "read -P 0x33 0 64k").unwrap();

    qmp.snapshot_delete("del0", "snap1", &["drv-d0"])
        .await
        .unwrap();
    qmp.wait_job_and_dismiss("del0", Duration::from_secs(60))
        .await
        .unwrap();
    let info = qmp.human_monitor_command("info snapshots").await.unwrap();
    assert!(!info.contains("snap1"), "{info}");

    // A raw disk cannot hold snapshots: the job concludes with an error.
    qmp.snapshot_save("save1", "snap2", "drv-d0", &["drv-d1"])
        .await
        .unwrap();
    let err = qmp
        .wait_job_and_dismiss("save1", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::JobFailed { ref id, .. } if id == "save1"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Failed);
    eprintln!("[qmp] snapshot on raw disk: {err}");
    assert!(qmp.query_jobs().await.unwrap().is_empty(), "dismissed");
    // Waiting for a job that does not exist is typed, not a hang.
    let err = qmp
        .wait_job("no-such-job", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::JobVanished { .. }), "{err:?}");
    vm.shutdown().unwrap();
}

/// F-19: QEMU stopped with SIGSTOP. Commands hit their deadline (the
/// connection survives); after SIGCONT the same connection works again and
/// the late reply is discarded.
#[tokio::test]
async fn qemu_deadline_fires_while_qemu_is_sigstopped() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused()).unwrap();
    let (qmp, _events) = connect(&vm).await;
    qmp.query_status().await.unwrap();
    let pid = vm.pid();
    signal(pid, "STOP");
    let deadline = Duration::from_millis(500);
    let t = Instant::now();
    let res = qmp.with_timeout(deadline).query_status().await;
    let elapsed = t.elapsed();
    signal(pid, "CONT");
    let err = res.unwrap_err();
    eprintln!("[qmp] deadline {deadline:?} under SIGSTOP fired after {elapsed:?}");
    assert!(
        matches!(err, Error::CommandTimeout { ref command, .. } if command == "query-status"),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(
        elapsed >= deadline && elapsed < deadline + QUICK,
        "{elapsed:?}"
    );
    assert!(!qmp.is_closed());

    // After SIGCONT: works again, the stale reply is counted, not delivered.
    let st = qmp.query_status().await.unwrap();
    assert_eq!(st.status, RunState::Prelaunch);
    assert_eq!(qmp.stats().orphan_replies, 1);
    vm.shutdown().unwrap();
}

/// F-27: QEMU killed while a command waits (it is SIGSTOPped first so the
/// command is certainly pending). The pending command, every later command
/// and the event stream fail fast, retryably.
#[tokio::test]
async fn qemu_sigkill_fails_pending_and_new_commands_retryable() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused()).unwrap();
    let (qmp, mut events) = connect(&vm).await;
    signal(vm.pid(), "STOP");
    let pending = {
        let q = qmp.with_timeout(Duration::from_secs(60));
        tokio::spawn(async move { q.query_block().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    let t = Instant::now();
    vm.kill();
    let err = tokio::time::timeout(QUICK, pending)
        .await
        .expect("pending command failed fast")
        .unwrap()
        .unwrap_err();
    let elapsed = t.elapsed();
    eprintln!("[qmp] SIGKILL -> pending command failed after {elapsed:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err:?}");
    assert!(err.is_retryable());
    assert!(matches!(err, Error::ConnectionLost { .. }));

    let t = Instant::now();
    let err = qmp.query_status().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert!(err.is_retryable(), "{err:?}");
    assert!(qmp.is_closed());
    assert!(tokio::time::timeout(QUICK, events.recv())
        .await
        .unwrap()
        .is_none());
    // Reconnecting fails typed and retryable too (nobody listens).
    let err = Qmp::connect(vm.qmp_socket(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

/// F-28: `quit`. QEMU answers, emits SHUTDOWN, exits; the connection ends
/// as a retryable disconnect, not a hang.
#[tokio::test]
async fn qemu_quit_ends_connection_cleanly() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused()).unwrap();
    let (qmp, mut events) = connect(&vm).await;
    qmp.quit().await.unwrap();
    let shutdown = events
        .wait_for("SHUTDOWN", QUICK, |e| {
            matches!(e.kind(), EventKind::Shutdown { .. })
        })
        .await
        .unwrap();
    assert_eq!(
        shutdown.kind(),
        EventKind::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    assert!(tokio::time::timeout(QUICK, events.recv())
        .await
        .unwrap()
        .is_none());
    let err = qmp.query_status().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err:?}");
    // EOF, or ECONNRESET when QEMU exits with bytes unread: both are a
    // lost connection.
    assert!(
        matches!(err.connection_cause(), Error::Eof | Error::Read { .. }),
        "{err:?}"
    );
    shear_tests::wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "exit",
        || (!vm.is_running()).then_some(()),
    )
    .unwrap();
}

/// The monitor serves one client: a second client gets no greeting, and its
/// connect deadline fires instead of hanging. The first client is unaffected.
#[tokio::test]
async fn qemu_connect_deadline_when_monitor_is_busy() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused()).unwrap();
    let (qmp, _events) = connect(&vm).await;
    let t = Instant::now();
    let err = Qmp::connect(vm.qmp_socket(), Duration::from_millis(500))
        .await
        .unwrap_err();
    let elapsed = t.elapsed();
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
    assert!(err.is_retryable());
    assert!(elapsed < Duration::from_millis(500) + QUICK, "{elapsed:?}");
    // The message says why a monitor does not greet, and names QEMU.
    let msg = err.to_string();
    assert!(
        msg.contains("another client probably holds this monitor")
            && msg.contains(&format!("(pid {})", vm.pid())),
        "{msg}"
    );
    assert_eq!(
        qmp.query_status().await.unwrap().status,
        RunState::Prelaunch
    );
    vm.shutdown().unwrap();
}

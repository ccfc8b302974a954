//! The `guest-agent` crate against real qemu-ga in the booted tiny guest
//! (and, for F-01, against a real QEMU chardev with no agent behind it).
//!
//! Each `vm_*` test boots one guest and runs several scenarios in sequence
//! (a boot costs ~3-5 s under TCG); tests do not depend on each other.
//! The harness's `vm.qga()` opens its own connection, so every
//! `GuestAgent`/`FreezeGuard` is dropped before the harness talks to qemu-ga
//! (QEMU serves one client per socket at a time).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::{
    thaw_blocking, Config, Error, FreezeGuard, FreezeScope, FsFreezeStatus, GuestAgent, GuestExec,
};
use serde_json::json;
use shear_tests::{require_guest, require_qemu, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

/// Generous deadlines: TCG on a loaded 2-core machine is slow.
fn config() -> Config {
    let mut c = Config::default();
    c.connect_timeout = Duration::from_secs(10);
    c.command_timeout = Duration::from_secs(30);
    c.freeze_timeout = Duration::from_secs(30);
    c.thaw_deadline = Duration::from_secs(60);
    c.drop_wait = Duration::from_secs(10);
    c
}

async fn connect(vm: &TestVm) -> GuestAgent {
    GuestAgent::connect(vm.qga_socket(), config())
        .await
        .expect("connect and sync with qemu-ga")
}

async fn status(vm: &TestVm) -> FsFreezeStatus {
    connect(vm)
        .await
        .fsfreeze_status()
        .await
        .expect("guest-fsfreeze-status")
}

/// Leaves requests on the chardev whose replies nobody reads: a full
/// command, then a partial one, then closes (an earlier client that died).
fn leave_stale_requests(socket: &Path, tag: &str) {
    let mut raw = UnixStream::connect(socket).expect("raw connect");
    let stale = format!(
        "{{\"execute\":\"guest-info\",\"id\":\"{tag}-1\"}}\n\
         {{\"execute\":\"guest-fsfreeze-status\",\"id\":\"{tag}-2\"}}\n\
         {{\"execute\":\"guest-ping\",\"id\":\"{tag}-3\""
    );
    raw.write_all(stale.as_bytes())
        .expect("write stale requests");
}

/// Reads whatever the chardev hands a fresh client within `wait`.
fn drain_fresh_connection(socket: &Path, wait: Duration) -> Vec<u8> {
    let mut raw = UnixStream::connect(socket).expect("raw connect");
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        raw.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("set_read_timeout");
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    got
}

#[test]
fn qemu_f01_chardev_without_agent_fails_sync_within_2s() {
    if !require_qemu() {
        return;
    }
    // A real QEMU chardev + virtio-serial port, but no guest (paused): the
    // socket accepts, nobody answers.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let vm = TestVm::start(
        VmConfig::paused()
            .arg("-chardev")
            .arg(&format!(
                "socket,id=qga0,path={},server=on,wait=off",
                sock.display()
            ))
            .arg("-device")
            .arg("virtio-serial-pci,id=vser0")
            .arg("-device")
            .arg("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let err = rt
        .block_on(GuestAgent::connect(&sock, Config::default()))
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::SyncTimeout { .. }), "{err}");
    assert_eq!(err.kind(), guest_agent::ErrorKind::Temporary);
    assert!(took < Duration::from_millis(2500), "F-01: took {took:?}");
    drop(vm);
}

#[tokio::test]
async fn vm_qga_commands_and_sync_after_stale_replies() {
    if !require_guest() {
        return;
    }
    let vm = TestVm::start(VmConfig::guest().disk(DiskSpec::raw("d0", 64 * MIB).ext4())).unwrap();
    let sock = vm.qga_socket();

    // ping, info, status, fsinfo.
    let mut agent = connect(&vm).await;
    agent.ping().await.unwrap();
    let info = agent.info().await.unwrap();
    eprintln!("qemu-ga version {}", info.version);
    assert!(!info.version.is_empty());
    for cmd in [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-freeze-list",
        "guest-fsfreeze-thaw",
        "guest-exec",
        "guest-file-open",
    ] {
        assert!(info.is_enabled(cmd), "{cmd} not enabled");
    }
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
    let fs = agent.get_fsinfo().await.unwrap();
    let data = fs
        .iter()
        .find(|f| f.mountpoint == "/mnt/vda")
        .unwrap_or_else(|| panic!("no /mnt/vda in {fs:?}"));
    assert_eq!(data.fs_type, "ext4");
    assert!(data.total_bytes.is_some_and(|t| t > 0), "{data:?}");

    // guest-exec with stdout, stderr and exit code.
    let out = agent
        .exec_wait(
            &GuestExec::new("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(out.exited);
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let cat = agent
        .exec_wait(
            &GuestExec::new("/bin/cat", Vec::<String>::new()).stdin(b"via stdin"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(cat.success());
    assert_eq!(cat.stdout, b"via stdin");

    // Files: write binary data, read it back through the agent and through
    // the guest's own tools.
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let h = agent.file_open("/mnt/vda/qga-file.bin", "w").await.unwrap();
    let mut written = 0;
    while written < payload.len() {
        written += agent.file_write(h, &payload[written..]).await.unwrap();
    }
    agent.file_close(h).await.unwrap();
    let h = agent.file_open("/mnt/vda/qga-file.bin", "r").await.unwrap();
    let mut back = Vec::new();
    loop {
        let chunk = agent.file_read(h, 64 << 10).await.unwrap();
        back.extend_from_slice(&chunk.data);
        if chunk.eof || chunk.data.is_empty() {
            break;
        }
    }
    agent.file_close(h).await.unwrap();
    assert_eq!(back, payload);
    let err = agent
        .file_open("/mnt/vda/does-not-exist", "r")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Agent { .. }), "{err}");
    agent.ping().await.unwrap();
    drop(agent);
    let sum = vm.guest_sh("wc -c < /mnt/vda/qga-file.bin").unwrap();
    assert_eq!(sum.trim(), "100000");

    // Premise: replies to a client that left leak to the next one.
    leave_stale_requests(&sock, "premise");
    let leaked = drain_fresh_connection(&sock, Duration::from_secs(3));
    let leaked = String::from_utf8_lossy(&leaked);
    assert!(
        leaked.contains("premise-1"),
        "no stale reply leaked: {leaked:?}"
    );

    // The client must sync past them and get its own answers.
    leave_stale_requests(&sock, "stale");
    let mut agent = connect(&vm).await;
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
    agent.ping().await.unwrap();
    assert!(!agent.info().await.unwrap().supported_commands.is_empty());
    drop(agent);

    // A client abandoned mid-command (future dropped) resyncs on reuse.
    let mut agent = connect(&vm).await;
    let _ = tokio::time::timeout(Duration::from_micros(1), agent.info()).await;
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        FsFreezeStatus::Thawed
    );
    drop(agent);

    // The harness (another client) still gets through: we released the socket.
    assert_eq!(vm.qga("guest-ping", json!(null)).unwrap(), json!({}));
}

#[tokio::test]
async fn vm_freeze_guard_thaws_on_every_path_f04_f05_f06_f07() {
    if !require_guest() {
        return;
    }
    let vm = TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 64 * MIB).ext4())).unwrap();

    // Explicit: freeze -> frozen -> thaw -> thawed, window measured (F-07).
    let mut guard = connect(&vm).await.freeze(FreezeScope::All).await.unwrap();
    assert!(guard.frozen_filesystems() >= 1);
    assert_eq!(guard.status().await.unwrap(), FsFreezeStatus::Frozen);
    let latency = guard.freeze_latency();
    let report = guard.thaw().await.unwrap();
    let window = report.freeze_window.unwrap();
    eprintln!(
        "freeze latency {:.1} ms, freeze window (freeze sent -> thaw answered) {:.1} ms, {} fs thawed",
        latency.as_secs_f64() * 1e3,
        window.as_secs_f64() * 1e3,
        report.thawed_filesystems
    );
    assert_eq!(report.attempts, 1);
    assert!(report.thawed_filesystems >= 1);
    assert!(
        window >= latency && window < Duration::from_secs(10),
        "{window:?}"
    );
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);

    // Freeze a list of mountpoints.
    let guard = connect(&vm)
        .await
        .freeze(FreezeScope::Mountpoints(vec!["/mnt/vda".into()]))
        .await
        .unwrap();
    assert_eq!(guard.frozen_filesystems(), 1);
    guard.thaw().await.unwrap();

    // F-06: a mountpoint that does not exist freezes nothing: an error, and
    // the guard still thawed.
    let err = connect(&vm)
        .await
        .freeze(FreezeScope::Mountpoints(vec!["/no/such/mount".into()]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FreezeFailed { source, thaw_error: None } if matches!(**source, Error::NoFilesystemFrozen)),
        "{err}"
    );
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);

    // Drop: the guest is thawed when drop returns.
    let guard = connect(&vm).await.freeze(FreezeScope::All).await.unwrap();
    drop(guard);
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);

    // Error path: a job step fails after the freeze and `?` returns early.
    fn set_up_block_graph() -> Result<(), String> {
        Err("the block-graph setup failed".to_string())
    }
    async fn job_step_that_fails(vm: &TestVm) -> Result<(), String> {
        let guard = connect(vm)
            .await
            .freeze(FreezeScope::All)
            .await
            .map_err(|e| e.to_string())?;
        set_up_block_graph()?;
        guard.thaw().await.map_err(|e| e.to_string())?;
        Ok(())
    }
    assert!(job_step_that_fails(&vm)
        .await
        .is_err_and(|e| e.contains("block-graph")));
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);

    // Task abort while holding the guard.
    let (frozen_tx, frozen_rx) = tokio::sync::oneshot::channel();
    let socket = vm.qga_socket();
    let task = tokio::spawn(async move {
        let agent = GuestAgent::connect(&socket, config()).await.unwrap();
        let _guard = agent.freeze(FreezeScope::All).await.unwrap();
        frozen_tx.send(()).unwrap();
        std::future::pending::<()>().await;
    });
    frozen_rx.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);

    // F-05: frozen by someone else -> refused, not thawed, still frozen.
    assert!(
        vm.qga("guest-fsfreeze-freeze", json!(null))
            .unwrap()
            .as_u64()
            >= Some(1)
    );
    let err = connect(&vm)
        .await
        .freeze(FreezeScope::All)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyFrozen), "{err}");
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "frozen"
    );
    vm.qga("guest-fsfreeze-thaw", json!(null)).unwrap();
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);

    // F-04: the agent "dies" holding a freeze (no guard, connection gone);
    // a watchdog thaws with the blocking std-only call.
    let mut agent = connect(&vm).await;
    assert!(agent.fsfreeze_freeze().await.unwrap() >= 1);
    drop(agent);
    let socket = vm.qga_socket();
    let report = tokio::task::spawn_blocking(move || {
        thaw_blocking(&socket, Instant::now() + Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(report.thawed_filesystems >= 1);
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);
}

#[tokio::test]
async fn vm_f02_hook_hang_f03_agent_killed_f09_reboot_all_thaw() {
    if !require_guest() {
        return;
    }
    let vm = TestVm::start(VmConfig::guest().disk(DiskSpec::raw("d0", 64 * MIB).ext4())).unwrap();

    // F-02: the freeze hook hangs 4 s. The freeze deadline (1 s) expires;
    // the guard reconnects, resyncs past the late freeze reply and thaws as
    // soon as qemu-ga answers again.
    vm.guest_sh(
        "mkdir -p /etc/qemu/fsfreeze-hook.d && \
         printf '#!/bin/sh\\n[ \"$1\" = freeze ] && sleep 4\\nexit 0\\n' > /etc/qemu/fsfreeze-hook.d/50-hang && \
         chmod +x /etc/qemu/fsfreeze-hook.d/50-hang",
    )
    .unwrap();
    let mut cfg = config();
    cfg.freeze_timeout = Duration::from_secs(1);
    let agent = GuestAgent::connect(vm.qga_socket(), cfg).await.unwrap();
    let start = Instant::now();
    let err = agent.freeze(FreezeScope::All).await.unwrap_err();
    let took = start.elapsed();
    eprintln!("F-02: freeze failed after {took:?}: {err}");
    match &err {
        Error::FreezeFailed { source, thaw_error } => {
            assert!(matches!(**source, Error::Timeout { .. }), "{source}");
            assert!(thaw_error.is_none(), "{thaw_error:?}");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(30),
        "{took:?}"
    );
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);
    vm.guest_sh("rm /etc/qemu/fsfreeze-hook.d/50-hang").unwrap();

    // F-03: qemu-ga is SIGKILLed while the guest is frozen; init restarts it
    // (in frozen mode, from its state file) and the guard's thaw gets
    // through to the new one.
    vm.guest_sh(
        "printf '#!/bin/sh\\n[ \"$1\" = freeze ] && (sleep 1; kill -9 $(pidof qemu-ga)) >/dev/null 2>&1 &\\nexit 0\\n' \
           > /etc/qemu/fsfreeze-hook.d/50-kill && chmod +x /etc/qemu/fsfreeze-hook.d/50-kill",
    )
    .unwrap();
    let pid_before = vm.guest_sh("pidof qemu-ga").unwrap();
    let mut cfg = config();
    cfg.thaw_attempt_timeout = Duration::from_secs(3);
    let guard = GuestAgent::connect(vm.qga_socket(), cfg)
        .await
        .unwrap()
        .freeze(FreezeScope::All)
        .await
        .unwrap();
    // Let the kill happen while frozen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    let report = guard.thaw().await.unwrap();
    eprintln!(
        "F-03: thawed after qemu-ga restart in {:?}: {report:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(15));
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);
    // The agent really was killed while frozen: another qemu-ga process
    // (restarted by init, in frozen mode) answered the thaw.
    let pid_after = vm.guest_sh("pidof qemu-ga").unwrap();
    assert!(
        !pid_before.trim().is_empty() && pid_before.trim() != pid_after.trim(),
        "qemu-ga was not restarted: {pid_before:?} -> {pid_after:?}"
    );
    vm.guest_sh("rm /etc/qemu/fsfreeze-hook.d/50-kill").unwrap();
    let log = vm.guest_sh("cat /var/log/qemu-ga.log; true").unwrap();
    eprintln!(
        "qemu-ga log tail: {}",
        log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
    );

    // F-09: the guest reboots between freeze and thaw. (The harness runs
    // QEMU with -no-reboot; make a reset reboot instead of exit.)
    let mut vm = vm;
    vm.harness_qmp("set-action", json!({"reboot": "reset"}))
        .unwrap();
    let mut cfg = config();
    cfg.thaw_attempt_timeout = Duration::from_secs(3);
    cfg.thaw_deadline = Duration::from_secs(90);
    vm.guest_sh("touch /tmp/before-reset").unwrap();
    let guard: FreezeGuard = GuestAgent::connect(vm.qga_socket(), cfg)
        .await
        .unwrap()
        .freeze(FreezeScope::All)
        .await
        .unwrap();
    vm.harness_qmp("system_reset", json!(null)).unwrap();
    let start = Instant::now();
    let report = guard.thaw().await.unwrap();
    eprintln!(
        "F-09: thawed across a reboot in {:?}: {report:?}",
        start.elapsed()
    );
    assert_eq!(status(&vm).await, FsFreezeStatus::Thawed);
    // The marker lived in the initramfs: gone means the guest rebooted.
    let marker = vm
        .guest_sh("test -e /tmp/before-reset && echo kept || echo gone")
        .unwrap();
    assert_eq!(marker.trim(), "gone", "the guest did not reboot");
}

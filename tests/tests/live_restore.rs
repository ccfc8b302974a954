//! Issue 13 part 2, `shear restore --live`: the VM starts at once on qcow2
//! images backed by the served backup, QEMU copies the rest while the
//! guest runs and writes; the serving process killed (restarted by the
//! supervising shear), then shear and the server killed together (the copy
//! pauses, nothing is lost, `--resume` finishes it); at the end no node of
//! the VM reads from the server and the images hold the backup plus the
//! guest's writes, read from the image files. A raw target: mirrored from
//! a qcow2 overlay, the device switched over to it.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shear_tests::shear::{report_of, run_ok, ShearEnv};
use shear_tests::{require_guest, wait_until, DiskSpec, TestVm, VmConfig};

const MIB: usize = 1 << 20;
const SIZE: usize = 32 * MIB;
const JOB: &str = "shear-live-scsi0";

fn record(state: &Path) -> Value {
    let dir = state.join("live-restore");
    let f = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
    serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap()
}

fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(c.stdin.as_mut().unwrap(), data).unwrap();
    drop(c.stdin.take());
    let out = String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap();
    out.split_whitespace().next().unwrap().to_owned()
}

fn alive(pid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

fn kill9(pid: u64) {
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

fn job(vm: &mut TestVm) -> Option<Value> {
    let jobs = vm.harness_qmp("query-block-jobs", json!({})).unwrap();
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["device"] == JOB)
        .cloned()
}

fn image_info(p: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Lines of a child's stdout, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[shear] {l}");
            let _ = tx.send(l);
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line starting {prefix:?} within 60 s"));
        if l.starts_with(prefix) {
            return l;
        }
    }
}

/// A backup of vm/100 with scsi0 (32 MiB: data at 1 MiB and 20 MiB and in
/// the last 4 KiB, zeros elsewhere), taken from a paused QEMU; returns the
/// disk's bytes.
fn backed_up(env: &ShearEnv) -> Vec<u8> {
    let mut src =
        TestVm::start(VmConfig::paused().disk(DiskSpec::raw("scsi0", SIZE as u64).scsi())).unwrap();
    src.qemu_io("scsi0", "write -P 0x5c 1M 3M").unwrap();
    src.qemu_io("scsi0", "write -P 0xa7 20M 2M").unwrap();
    src.qemu_io("scsi0", "write -P 0x01 32764k 4k").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    report_of(&run_ok(env.backup_with(
        &src,
        &no_agent,
        &env.fleece_dir(),
        &[],
    )));
    drop(src);
    let mut expect = vec![0u8; SIZE];
    expect[MIB..4 * MIB].fill(0x5c);
    expect[20 * MIB..22 * MIB].fill(0xa7);
    expect[SIZE - 4096..].fill(0x01);
    expect
}

/// The image's data, read from the file (qemu-img convert to raw).
fn image_bytes(env: &ShearEnv, image: &Path) -> Vec<u8> {
    let raw = env.dir.path().join("check.raw");
    let _ = std::fs::remove_file(&raw);
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::read(&raw).unwrap()
}

#[test]
fn vm_live_restore_rto_writes_server_death_resume_f19() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut expect = backed_up(&env);

    let state = env.dir.path().join("state");
    let target = env.dir.path().join("live");
    let qmp = env.dir.path().join("vm.qmp");
    let image = target.join("scsi0.qcow2");
    let t0 = Instant::now();
    let mut sup = env
        .shear(&["restore", "vm/100", "--live", "--target"])
        .arg(&target)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--state-dir")
        .arg(&state)
        // 512 KiB/s: the copy outlasts the boot and the faults below; the
        // test lifts the limit once it has seen them.
        .args(["--bwlimit", "512", "--reconnect-delay", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut sup);
    wait_line(&rx, "live-restore: ready");
    let ready = t0.elapsed();
    let r = record(&state);
    assert_eq!(r["phase"], "serving", "{r}");
    assert!(image_info(&image)["backing-filename"]
        .as_str()
        .unwrap()
        .contains("nbd"));

    // The VM on the image, as an operator starts it; rerror/werror=stop: a
    // lost server pauses the guest instead of failing its reads.
    let mut vm = TestVm::start(
        VmConfig::guest()
            .arg("-blockdev")
            .arg(
                &json!({"driver": "qcow2", "node-name": "rst0",
                        "file": {"driver": "file", "filename": image}})
                .to_string(),
            )
            .arg("-device")
            .arg("virtio-blk-pci,id=vd0,drive=rst0,rerror=stop,werror=stop")
            .arg("-qmp")
            .arg(&format!("unix:{},server=on,wait=off", qmp.display())),
    )
    .unwrap();
    let rto = t0.elapsed();
    eprintln!(
        "[live-restore] RTO (command start -> qemu-ga answers): {:.2} s (images served after {:.2} s, QEMU start -> qemu-ga {:.2} s)",
        rto.as_secs_f64(),
        ready.as_secs_f64(),
        vm.boot_time().unwrap().as_secs_f64()
    );
    assert!(rto < Duration::from_secs(90), "RTO {rto:?}");

    // The copy runs, and the guest reads served data and writes while it does.
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the stream job",
        || job(&mut vm),
    )
    .unwrap();
    let sum = vm
        .guest_sh("dd if=/dev/vda bs=1M skip=20 count=2 2>/dev/null | sha256sum")
        .unwrap();
    let want = sha256(&expect[20 * MIB..22 * MIB]);
    assert_eq!(
        sum.split_whitespace().next(),
        Some(want.as_str()),
        "the guest reads the backup's data"
    );
    // 64 KiB of 0xEE over backup data at 1.5 MiB and into a hole at 8 MiB.
    for seek in [24, 128] {
        vm.guest_sh(&format!(
            "dd if=/dev/zero bs=65536 count=1 2>/dev/null | tr '\\000' '\\356' | dd of=/dev/vda bs=65536 seek={seek} conv=fsync 2>/dev/null"
        ))
        .unwrap();
        let at = seek * 65536;
        expect[at..at + 65536].fill(0xee);
    }

    // F-19 (connection lost) a: the serving process dies; the supervising shear restarts it.
    let pid = record(&state)["server_pid"].as_u64().unwrap();
    kill9(pid);
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the server restarted",
        || (record(&state)["server_restarts"].as_u64() >= Some(1)).then_some(()),
    )
    .unwrap();
    let pid2 = record(&state)["server_pid"].as_u64().unwrap();
    assert_ne!(pid, pid2);
    assert!(alive(pid2));
    // One supervisor at a time: a second one is refused, changing nothing.
    let mut second = env.shear(&["restore", "vm/100", "--live", "--resume", "--target"]);
    second.arg(&target).arg("--state-dir").arg(&state);
    let out = second.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another shear supervises"),
        "{out:?}"
    );

    // F-19 b: shear and the server die together: the copy pauses on its
    // read error, the VM runs on, the state says what is left to do.
    kill9(sup.id().into());
    let _ = sup.wait();
    kill9(pid2);
    let paused = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "the copy to pause on the lost server",
        || job(&mut vm).filter(|j| j["status"] == "paused"),
    )
    .unwrap();
    assert_eq!(paused["io-status"], "failed", "{paused}");
    let r = record(&state);
    assert_eq!(r["phase"], "streaming", "{r}");
    assert!(!alive(pid2));
    assert!(vm.is_running());
    vm.qga("guest-ping", Value::Null).unwrap();
    assert!(image_info(&image)["backing-filename"].is_string());

    // --resume: restarts the server, resumes the job, waits for the end.
    let mut res = env
        .shear(&["restore", "vm/100", "--live", "--resume", "--target"])
        .arg(&target)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut res);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "the copy to run again",
        || job(&mut vm).filter(|j| j["status"] == "running"),
    )
    .unwrap();
    let pid3 = record(&state)["server_pid"].as_u64().unwrap();
    assert!(alive(pid3) && pid3 != pid2, "--resume serves again");
    // Seen resumed: now as fast as it goes.
    let _ = vm.harness_qmp("block-job-set-speed", json!({"device": JOB, "speed": 0}));
    let done = wait_line(&rx, "live-restore: complete");
    let st = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "--resume to exit",
        || res.try_wait().unwrap(),
    )
    .unwrap();
    assert!(st.success(), "{st}: {done}");
    let r = record(&state);
    assert_eq!(r["phase"], "complete", "{r}");
    assert!(r["complete_ms"].as_u64().unwrap() > r["started_ms"].as_u64().unwrap());
    let nodes = vm
        .harness_qmp("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    assert!(
        !nodes.as_array().unwrap().iter().any(|n| n["drv"] == "nbd"),
        "the VM still has an NBD node: {nodes}"
    );
    let last = pid3;
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(50),
        "the server to be gone",
        || (!alive(last)).then_some(()),
    )
    .unwrap();
    assert!(
        !r["socket"].as_str().map(Path::new).unwrap().exists(),
        "socket left"
    );
    // The guest still reads its data (now from the image alone).
    let sum = vm
        .guest_sh("dd if=/dev/vda bs=1M skip=20 count=2 2>/dev/null | sha256sum")
        .unwrap();
    assert_eq!(sum.split_whitespace().next(), Some(want.as_str()));
    vm.shutdown().unwrap();

    // The image alone: no backing file, the backup's data + the writes.
    assert!(
        image_info(&image).get("backing-filename").is_none(),
        "{}",
        image_info(&image)
    );
    let got = image_bytes(&env, &image);
    assert_eq!(got.len(), expect.len());
    let first_bad = got.iter().zip(&expect).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "image differs at {first_bad:?}");
    // Resuming a finished restore says so and changes nothing.
    let mut again = env.shear(&["restore", "vm/100", "--live", "--resume", "--target"]);
    again.arg(&target).arg("--state-dir").arg(&state);
    let out = run_ok(again);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already complete"),
        "{out:?}"
    );
}

/// Without --qmp shear only serves and prepares; QEMU copies (a stream
/// started by an earlier shear, here by the test) and is gone before any
/// shear saw the end: `--resume` finds the copy done in the image header,
/// stops the server and records the restore complete.
#[test]
fn qemu_live_restore_resume_after_vm_gone_finishes_from_image_headers() {
    if !shear_tests::require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let expect = backed_up(&env);
    let state = env.dir.path().join("state");
    let target = env.dir.path().join("live");
    let image = target.join("scsi0.qcow2");
    let mut prep = env.shear(&["restore", "vm/100", "--live", "--target"]);
    prep.arg(&target).arg("--state-dir").arg(&state);
    let out = run_ok(prep);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));
    let r = record(&state);
    assert_eq!(r["phase"], "serving", "{r}");
    let pid = r["server_pid"].as_u64().unwrap();
    assert!(alive(pid), "the server outlives the command");
    let mut vm = TestVm::start(
        VmConfig::paused()
            .arg("-blockdev")
            .arg(
                &json!({"driver": "qcow2", "node-name": "rst0",
                        "file": {"driver": "file", "filename": image}})
                .to_string(),
            )
            .arg("-device")
            .arg("virtio-blk-pci,id=vd0,drive=rst0"),
    )
    .unwrap();
    vm.harness_qmp("block-stream", json!({"job-id": JOB, "device": "rst0"}))
        .unwrap();
    vm.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    vm.harness_qmp("quit", Value::Null).unwrap();
    vm.wait_exit(Duration::from_secs(30)).unwrap();

    let mut res = env.shear(&["restore", "vm/100", "--live", "--resume", "--target"]);
    res.arg(&target)
        .arg("--state-dir")
        .arg(&state)
        .arg("--qmp")
        .arg(env.dir.path().join("gone.qmp"));
    let out = run_ok(res);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("live-restore: complete"),
        "{out:?}"
    );
    let r = record(&state);
    assert_eq!(r["phase"], "complete", "{r}");
    // Stopped (its /proc entry may outlive its exit by a moment).
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(50),
        "the server to be gone",
        || (!alive(pid)).then_some(()),
    )
    .unwrap();
    assert!(image_info(&image).get("backing-filename").is_none());
    assert!(image_bytes(&env, &image) == expect, "image differs");

    raw_target_is_mirrored_and_the_device_switched(&env, &state, expect);
}

/// `--format raw`: the VM starts on a qcow2 overlay (the backup as its
/// backing file); shear mirrors it into `<disk>.raw` (write-blocking, so
/// a write during the copy lands in both), switches the device over once
/// in sync, drops the overlay and the NBD node, and stops serving. The
/// raw file alone then holds the backup plus every write.
fn raw_target_is_mirrored_and_the_device_switched(
    env: &ShearEnv,
    state: &Path,
    mut expect: Vec<u8>,
) {
    let dir = env.dir.path().join("raw");
    let qmp = env.dir.path().join("raw.qmp");
    let overlay = dir.join("scsi0.live.qcow2");
    let raw = dir.join("scsi0.raw");
    let mut sup = env
        .shear(&["restore", "vm/100", "--live", "--format", "raw", "--target"])
        .arg(&dir)
        .arg("--qmp")
        .arg(&qmp)
        .arg("--state-dir")
        .arg(state)
        // Slow enough that the write below lands during the copy.
        .args(["--bwlimit", "1024"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut sup);
    wait_line(&rx, "live-restore: ready");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), SIZE as u64);
    assert!(image_info(&overlay)["backing-filename"]
        .as_str()
        .unwrap()
        .contains("nbd"));
    let mut vm = TestVm::start(
        VmConfig::paused()
            .arg("-blockdev")
            .arg(
                &json!({"driver": "qcow2", "node-name": "rst1",
                        "file": {"driver": "file", "filename": overlay}})
                .to_string(),
            )
            .arg("-device")
            .arg("virtio-blk-pci,id=vd0,drive=rst1")
            .arg("-qmp")
            .arg(&format!("unix:{},server=on,wait=off", qmp.display())),
    )
    .unwrap();
    let j = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        "the mirror job",
        || job(&mut vm),
    )
    .unwrap();
    assert_eq!(j["type"], "mirror", "{j}");
    // Into a hole of the backup, while the copy runs.
    vm.qemu_io("vd0", "write -P 0xee 8M 64k").unwrap();
    expect[8 * MIB..8 * MIB + 65536].fill(0xee);
    let _ = vm.harness_qmp("block-job-set-speed", json!({"device": JOB, "speed": 0}));
    let done = wait_line(&rx, "live-restore: complete");
    let st = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the supervisor to exit",
        || sup.try_wait().unwrap(),
    )
    .unwrap();
    assert!(st.success(), "{st}: {done}");
    let blocks = vm.harness_qmp("query-block", json!({})).unwrap();
    assert!(
        blocks
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["inserted"]["node-name"] == "shear-live-raw-scsi0"),
        "the device is not on the raw target: {blocks}"
    );
    let nodes = vm
        .harness_qmp("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let overlay_s = overlay.to_string_lossy();
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["drv"] == "nbd" || n["file"].as_str() == Some(&*overlay_s)),
        "the VM still uses the overlay or the server: {nodes}"
    );
    assert!(!overlay.exists(), "the overlay is left");
    // After the switch a write goes to the raw file alone.
    vm.qemu_io("vd0", "write -P 0x77 30M 4k").unwrap();
    expect[30 * MIB..30 * MIB + 4096].fill(0x77);
    vm.harness_qmp("quit", Value::Null).unwrap();
    vm.wait_exit(Duration::from_secs(30)).unwrap();
    let got = std::fs::read(&raw).unwrap();
    assert_eq!(got.len(), expect.len());
    let first_bad = got.iter().zip(&expect).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "raw target differs at {first_bad:?}");
}

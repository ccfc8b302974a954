//! `shear backup` under faults, on real QEMU (reliability catalogue IDs in
//! the test names). Every test checks the standard post-conditions: the
//! guest runs and is thawed (PC-G, PC-T), nothing of ours is left in QEMU's
//! graph or on disk (PC-C), and a failed run is not listed (PC-R).
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use shear_tests::shear::{
    assert_graph_clean, assert_released_and_clean, report_of, run_ok, wait_reading, HeldHook,
    ShearEnv,
};
use shear_tests::{require_guest, require_qemu, wait_until, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_random(path: &Path, size: u64) {
    use std::io::Read;
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; usize::try_from(size).unwrap()];
    f.read_exact(&mut buf).unwrap();
    std::fs::write(path, &buf).unwrap();
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !st {
            shear_tests::prereq::skip("mounting a tmpfs (root)");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
    fn used_bytes(&self) -> u64 {
        let out = Command::new("du").arg("-sb").arg(&self.0).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn vm_f01_no_guest_agent_backup_is_crash_consistent() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(
        VmConfig::guest()
            .without_qga()
            .disk(DiskSpec::qcow2("d0", 32 * MIB).ext4()),
    )
    .unwrap();
    let t = Instant::now();
    let out = run_ok(env.backup(&vm, &[]));
    let r = report_of(&out);
    assert_eq!(r["consistency"], "crash");
    let w = r["warnings"].to_string();
    assert!(w.contains("qemu-ga"), "{w}");
    // F-01: the missing agent costs no more than its 2 s connect deadline.
    assert!(t.elapsed() < Duration::from_secs(30));
    // The vCPUs were paused around the graph change (a short hold).
    assert!(
        r["freeze_window_ms"].as_u64().is_some_and(|ms| ms < 5000),
        "{r}"
    );
    let st = vm.harness_qmp("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "running");
    assert_graph_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 1);
}

#[test]
fn vm_f02_freeze_hook_hangs_guest_thawed_backup_crash_consistent() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    vm.guest_sh(
        "printf '#!/bin/sh\\n[ \"$1\" = freeze ] && sleep 6\\nexit 0\\n' > /etc/qemu/fsfreeze-hook.d/50-hang \
         && chmod +x /etc/qemu/fsfreeze-hook.d/50-hang",
    )
    .unwrap();
    let t = Instant::now();
    let out = run_ok(env.backup(&vm, &["--freeze-timeout", "2"]));
    let r = report_of(&out);
    eprintln!("F-02 report: {r}");
    assert_eq!(r["consistency"], "crash", "{r}");
    assert!(r["warnings"].to_string().contains("fsfreeze failed"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(60));
    vm.guest_sh("rm -f /etc/qemu/fsfreeze-hook.d/50-hang")
        .unwrap();
    assert_released_and_clean(&mut vm, &env, &["d0"]);
}

#[test]
fn vm_f04_agent_sigkill_while_frozen_watchdog_thaws_and_takes_back_graph() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    let hook = HeldHook::new(&env);
    let mut cmd = env.backup(&vm, &[]);
    hook.install(&mut cmd);
    let mut child = spawn(cmd);
    hook.wait_held(&mut child, Duration::from_secs(60));
    // shear holds the qemu-ga socket (one client at a time) while frozen;
    // its run record says the guest is frozen by it.
    let rec = std::fs::read_to_string(env.run_dir().join("backup-100.json")).unwrap();
    assert!(rec.contains("\"freeze\""), "{rec}");
    child.kill().unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    hook.release();
    // PC-T: thawed within 10 s by the watchdog, though the agent is gone.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "watchdog thaw",
        || (vm.qga("guest-fsfreeze-status", json!(null)).ok()? == "thawed").then_some(()),
    )
    .unwrap();
    eprintln!(
        "F-04: thawed {:.2} s after SIGKILL",
        killed.elapsed().as_secs_f64()
    );
    // Issue 16 D(b): the watchdog also takes back the graph changes the
    // dead agent recorded (filters, fleece, record), without a new backup.
    env.wait_record_gone(Duration::from_secs(15), "the kill");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
    let out = run_ok(env.backup(&vm, &[]));
    let r = report_of(&out);
    assert!(!r["warnings"].to_string().contains("cleaned up"), "{r}");
    assert_eq!(r["consistency"], "application");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 1);
}

/// Issue 16 bug 6: what systemd does on a unit's stop timeout or OOM —
/// SIGKILL to every process of the unit's cgroup, shear and its children —
/// while the guest is frozen. The watchdog moved itself out of that cgroup
/// when it started, so it survives, thaws the guest and takes back the
/// graph. (Before, it died with shear and the guest stayed frozen.)
#[test]
fn vm_f04_unit_cgroup_killed_while_frozen_watchdog_outside_thaws() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    // The "unit": a cgroup of the test's own that shear is started in.
    let unit = shear::job::watchdog::cgroup2_mount()
        .expect("no cgroup v2 hierarchy mounted (needed to act as a service manager)")
        .join(format!("shear-test-unit-{}", std::process::id()));
    std::fs::create_dir(&unit).unwrap();
    let hook = HeldHook::new(&env);
    let mut inner = env.backup(&vm, &[]);
    hook.install(&mut inner);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(&unit)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = spawn(cmd);
    hook.wait_held(&mut child, Duration::from_secs(60));
    let rec = std::fs::read_to_string(env.run_dir().join("backup-100.json")).unwrap();
    assert!(rec.contains("\"freeze\""), "{rec}");
    // The unit is stopped the hard way: every process in its cgroup.
    std::fs::write(unit.join("cgroup.kill"), "1").unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "the unit's processes to die",
        || {
            std::fs::read_to_string(unit.join("cgroup.procs"))
                .ok()
                .filter(|p| p.trim().is_empty())
        },
    )
    .unwrap();
    hook.release();
    wait_until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        "watchdog thaw after the unit's cgroup was killed",
        || (vm.qga("guest-fsfreeze-status", json!(null)).ok()? == "thawed").then_some(()),
    )
    .unwrap();
    eprintln!(
        "bug 6: thawed {:.2} s after the cgroup kill",
        killed.elapsed().as_secs_f64()
    );
    env.wait_record_gone(Duration::from_secs(15), "the kill");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
    std::fs::remove_dir(&unit).unwrap();
}

/// F-07: the guest is held 12 s (the test's held hook sleeps while shear
/// holds it frozen with the filters in place). The freeze window is
/// measured and reported (≥ 12 s), and the run raises the alarm (> 5 s) in
/// its warnings. A Linux guest holds a freeze as long as asked, so the
/// backup stays application-consistent and restores.
#[test]
fn vm_f07_freeze_window_over_alarm_measured_and_warned() {
    use std::os::unix::fs::PermissionsExt;
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    let hook = env.dir.path().join("hold-12s.sh");
    std::fs::write(&hook, "#!/bin/sh\nsleep 12\nexit 0\n").unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = env.backup(&vm, &[]);
    cmd.env("SHEAR_TEST_FROZEN_HOOK", &hook);
    let r = report_of(&run_ok(cmd));
    let window = r["freeze_window_ms"].as_u64().unwrap();
    assert!((12_000..30_000).contains(&window), "{r}");
    assert!(
        r["warnings"].to_string().contains("alarm level"),
        "no alarm for a {window} ms freeze: {r}"
    );
    assert_eq!(r["consistency"], "application", "{r}");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    // A normal run: no alarm.
    let r = report_of(&run_ok(env.backup(&vm, &[])));
    assert!(!r["warnings"].to_string().contains("alarm level"), "{r}");
}

/// F-28 (guest side): the guest powers itself off in the middle of the
/// read (QEMU then exits). QEMU exits cleanly (status 0); shear fails
/// within 10 s naming QEMU's exit; no backup is listed; no fleece file or
/// run record is left.
#[test]
fn vm_f28_guest_poweroff_during_backup_fails_cleanly() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = slow_backup_vm();
    let mut child = spawn(env.backup(&vm, &["--bwlimit", "2048"]));
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    // No reply comes back: the guest powers off under qemu-ga.
    let _ = vm.qga("guest-exec", json!({"path": "/sbin/shear-poweroff"}));
    let st = vm.wait_exit(Duration::from_secs(60)).unwrap();
    let t = Instant::now();
    let (ok, stdout, stderr) = finish(child);
    assert!(st.success(), "QEMU did not exit cleanly: {st}");
    assert!(!ok, "{stdout}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let msg = format!("{stdout}{stderr}");
    eprintln!("F-28 (poweroff) error: {msg}");
    assert!(msg.contains("QEMU exited"), "{msg}");
    assert!(env.list().is_empty());
    let fleece: Vec<_> = std::fs::read_dir(env.fleece_dir()).unwrap().collect();
    assert!(fleece.is_empty(), "fleece files left: {fleece:?}");
    assert!(!env.run_dir().join("backup-100.json").exists());
}

/// A VM whose raw disk d0 holds 24 MiB of data, to be read slowly
/// (`--bwlimit 2048`: ~12 s, and the reader holds at most two chunks).
fn slow_backup_vm() -> TestVm {
    let mut vm = TestVm::start(VmConfig::guest().disk(DiskSpec::raw("d0", 32 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0xab 0 24M").unwrap();
    vm
}

#[test]
fn vm_sigint_mid_read_rolls_back_no_backup() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = slow_backup_vm();
    let mut child = spawn(env.backup(&vm, &["--bwlimit", "2048"]));
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, "-INT");
    let t = Instant::now();
    let (ok, stdout, stderr) = finish(child);
    assert!(!ok, "backup should fail after SIGINT: {stdout}");
    assert!(
        format!("{stdout}{stderr}").contains("SIGINT"),
        "{stdout}{stderr}"
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty(), "a failed backup must not be listed");
    run_ok(env.shear(&["verify", "--all"]));
}

/// Issue 16 A: a dropped SSH session. The terminal is gone (stdout and
/// stderr are closed pipes: every write fails) and shear gets SIGHUP in the
/// read phase. It must roll back like SIGINT, not die of the signal (129)
/// with the filter and a growing fleece image left in the VM.
#[test]
fn vm_sighup_with_terminal_gone_mid_read_rolls_back_no_backup() {
    use std::os::unix::process::ExitStatusExt;
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = slow_backup_vm();
    let mut child = spawn(env.backup(&vm, &["--bwlimit", "2048"]));
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    // The session's terminal goes away: nobody reads stdout/stderr any more.
    drop(child.stdout.take());
    drop(child.stderr.take());
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "-HUP");
    let t = Instant::now();
    let st = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "shear to exit after SIGHUP",
        || child.try_wait().unwrap(),
    )
    .unwrap();
    eprintln!(
        "SIGHUP: exit {st:?} after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(st.signal(), None, "killed by a signal: {st:?}");
    assert_eq!(st.code(), Some(1), "{st:?}");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(
        env.list().is_empty(),
        "a cancelled backup must not be listed"
    );
}

/// The `shear __watchdog` child of the shear process `pid`.
fn watchdog_of(pid: u32) -> u32 {
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "shear's watchdog",
        || {
            std::fs::read_dir("/proc").ok()?.find_map(|e| {
                let e = e.ok()?;
                let p: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let ppid: u32 = stat.rsplit(") ").next()?.split(' ').nth(1)?.parse().ok()?;
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                (ppid == pid && String::from_utf8_lossy(&cmd).contains("__watchdog")).then_some(p)
            })
        },
    )
    .unwrap()
}

/// Issue 16 D(b): SIGKILL in the read phase. The watchdog takes back the
/// filter, export, fleece image and record within seconds, without waiting
/// for a next backup of the VM.
#[test]
fn vm_sigkill_mid_read_watchdog_takes_back_graph_without_next_run() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = slow_backup_vm();
    let mut child = spawn(env.backup(&vm, &["--bwlimit", "2048"]));
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    child.kill().unwrap();
    let _ = child.wait();
    env.wait_record_gone(Duration::from_secs(10), "the kill");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
    let out = run_ok(env.backup(&vm, &[]));
    let r = report_of(&out);
    assert!(!r["warnings"].to_string().contains("cleaned up"), "{r}");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 1);
    run_ok(env.shear(&["verify", "--all"]));
}

#[test]
fn vm_f12_fleece_storage_full_backup_fails_guest_unaffected() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let small = env.dir.path().join("small-fleece");
    let Some(tmpfs) = Tmpfs::mount(&small, "2m") else {
        return;
    };
    let mut vm = TestVm::start(VmConfig::guest().disk(DiskSpec::raw("d0", 32 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0xab 0 24M").unwrap();
    // A 2 MiB tmpfs on purpose: allowed explicitly, no free-space floor.
    let cmd = env.backup_with(
        &vm,
        &vm.qga_socket(),
        &small,
        &[
            "--bwlimit",
            "1024",
            "--fleecing-allow-tmpfs",
            "--fleecing-min-free",
            "0",
        ],
    );
    let mut child = spawn(cmd);
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    // Guest writes over data not read yet: copy-before-write needs 16 MiB
    // of fleece space and has 2. The guest's write must still succeed.
    vm.qemu_io("d0", "write -P 0xcd 8M 16M").unwrap();
    let (ok, stdout, stderr) = finish(child);
    assert!(
        !ok,
        "backup must fail when the fleece storage is full: {stdout}"
    );
    eprintln!("F-12 error: {stdout}{stderr}");
    // Issue 16: the real cause (ENOSPC on the fleecing storage) and the
    // failing offset are named, not a fixed hint.
    let msg = format!("{stdout}{stderr}");
    assert!(
        msg.contains("No space left on device") && msg.contains("fleecing storage"),
        "{msg}"
    );
    let offset: u64 = msg
        .split("reading d0 failed at offset ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failing offset in {msg}"));
    assert!(offset < 32 * MIB, "offset {offset}");
    vm.qemu_io("d0", "read -P 0xcd 8M 16M").unwrap();
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(
        tmpfs.used_bytes() < 64 * 1024,
        "fleece space not given back"
    );
    assert!(env.list().is_empty());
    // The next backup (fleecing storage with room) works.
    report_of(&run_ok(env.backup(&vm, &[])));
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 1);
}

#[test]
fn vm_f33_repository_full_fails_cleanly_earlier_backup_intact() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    // Re-create the repository on a 6 MiB tmpfs.
    std::fs::remove_dir_all(env.repo()).unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&env.repo(), "6m") else {
        return;
    };
    run_ok(env.shear(&["init"]));
    let d0 = env.dir.path().join("d0.raw");
    let d1 = env.dir.path().join("d1.raw");
    write_random(&d0, 2 * MIB);
    write_random(&d1, 16 * MIB);
    let mut vm = TestVm::start(
        VmConfig::guest()
            .disk(DiskSpec::raw("d0", 2 * MIB).image(&d0))
            .disk(DiskSpec::raw("d1", 16 * MIB).image(&d1)),
    )
    .unwrap();
    let first = report_of(&run_ok(env.backup(&vm, &["--exclude", "d1"])));
    let (ok, stdout, stderr) = finish(spawn(env.backup(&vm, &[])));
    assert!(!ok, "backup into a full repository must fail: {stdout}");
    assert!(
        format!("{stdout}{stderr}").contains("No space left"),
        "{stdout}{stderr}"
    );
    assert_released_and_clean(&mut vm, &env, &["d0", "d1"]);
    let list = env.list();
    assert_eq!(list.len(), 1, "only the first backup: {list:?}");
    run_ok(env.shear(&["verify", "--all"]));
    let target = env.dir.path().join("restore");
    std::fs::create_dir_all(&target).unwrap();
    // The tmpfs is full: restore outside it.
    run_ok(env.shear(&[
        "restore",
        first["backup_id"].as_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read(target.join("d0.raw")).unwrap(),
        std::fs::read(&d0).unwrap()
    );
}

#[test]
fn vm_f27_qemu_killed_mid_backup_clear_error_no_manifest() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = slow_backup_vm();
    let mut child = spawn(env.backup(&vm, &["--bwlimit", "2048"]));
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    vm.kill();
    let t = Instant::now();
    let (ok, stdout, stderr) = finish(child);
    assert!(!ok);
    eprintln!(
        "F-27 error after {:.2} s: {stdout}{stderr}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "failure not detected in time"
    );
    // Issue 16: the cause is QEMU's exit, not a copy-before-write hint.
    let msg = format!("{stdout}{stderr}");
    assert!(msg.contains("QEMU exited"), "{msg}");
    assert!(!msg.contains("copy-before-write"), "{msg}");
    assert!(env.list().is_empty());
    let fleece: Vec<_> = std::fs::read_dir(env.fleece_dir()).unwrap().collect();
    assert!(fleece.is_empty(), "fleece files left: {fleece:?}");
    assert!(
        !env.run_dir().join("backup-100.json").exists(),
        "nothing left to undo in a dead QEMU"
    );
}

/// Peak RSS (VmHWM) of a running process, polled until it exits.
fn run_measuring_rss(mut c: Command) -> (std::process::Output, u64) {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let status = format!("/proc/{}/status", child.id());
    let (tx, rx) = std::sync::mpsc::channel();
    let poller = std::thread::spawn(move || {
        let mut peak = 0u64;
        while rx.try_recv().is_err() {
            if let Ok(s) = std::fs::read_to_string(&status) {
                if let Some(kb) = s
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    peak = peak.max(kb * 1024);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        peak
    });
    let out = child.wait_with_output().unwrap();
    tx.send(()).unwrap();
    (out, poller.join().unwrap())
}

#[test]
fn qemu_16g_disk_with_300m_written_reads_300m() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 16 << 30))).unwrap();
    for (i, off) in ["0", "5G", "15G"].iter().enumerate() {
        vm.qemu_io("d0", &format!("write -P 0x{:x}1 {off} 100M", i + 1))
            .unwrap();
    }
    let cmd = env.backup_with(
        &vm,
        &env.dir.path().join("no-agent.sock"),
        &env.fleece_dir(),
        &[],
    );
    let (out, peak) = run_measuring_rss(cmd);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report_of(&out);
    let read = r["disks"][0]["bytes_read"].as_u64().unwrap();
    eprintln!(
        "16 GiB disk, 300 MiB written: read {} MiB, peak RSS {} MiB",
        read / MIB,
        peak / MIB
    );
    assert!((300 * MIB..=310 * MIB).contains(&read), "read {read} bytes");
    assert_eq!(r["disks"][0]["virtual_size"], 16u64 << 30);
    assert!(peak < 256 * MIB, "peak RSS {peak}");
    assert_graph_clean(&mut vm, &env, &["d0"]);
}

#[test]
fn vm_backup_freeze_window_under_1s_list_verify_restore_qcow2() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(
        VmConfig::guest().disk(DiskSpec::qcow2("d0", 64 * MIB).file("/hello", b"hi\n")),
    )
    .unwrap();
    let r = report_of(&run_ok(
        env.backup(&vm, &["--notes-template", "{{vmid}} on {{node}}"]),
    ));
    let window = r["freeze_window_ms"].as_u64().unwrap();
    eprintln!("freeze window: {window} ms");
    assert!(window < 1000, "freeze window {window} ms");
    assert_eq!(r["consistency"], "application");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    let id = r["backup_id"].as_str().unwrap();
    let list = env.list();
    assert_eq!(list.len(), 1);
    assert!(list[0].to_string().contains(id), "{list:?}");
    run_ok(env.shear(&["verify", id]));
    let show = run_ok(env.shear(&["show", id, "--json"]));
    let manifest: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert!(
        manifest["notes"].as_str().unwrap().starts_with("100 on "),
        "{manifest}"
    );
    let target = env.dir.path().join("restore");
    std::fs::create_dir_all(&target).unwrap();
    let t = target.to_str().unwrap();
    run_ok(env.shear(&["restore", id, "--target", t, "--format", "qcow2"]));
    let img = target.join("d0.qcow2");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(shear_tests::debugfs_cat(&img, "/hello").unwrap(), b"hi\n");
    // Existing files are not overwritten without --force.
    let again = env
        .shear(&["restore", id, "--target", t, "--format", "qcow2"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    run_ok(env.shear(&["restore", id, "--target", t, "--format", "qcow2", "--force"]));
}

#[test]
fn qemu_compress_none_and_zstd_levels() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 64 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0x5a 0 8M").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    let stored = |args: &[&str]| {
        let out = run_ok(env.backup_with(&vm, &no_agent, &env.fleece_dir(), args));
        report_of(&out)["disks"][0]["bytes_stored"]
            .as_u64()
            .unwrap()
    };
    // Uncompressed: every byte of the 8 MiB (plus headers) is stored.
    let none = stored(&["--compress", "none"]);
    assert!(none >= 8 * MIB, "stored {none}");
    // Same data again, compressed: the chunks already exist (dedup by
    // plaintext digest), so nothing new is stored.
    let again = stored(&["--compress", "zstd:3"]);
    assert_eq!(again, 0);
    let bad = env
        .backup_with(&vm, &no_agent, &env.fleece_dir(), &["--compress", "gzip"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--compress"));
    assert_graph_clean(&mut vm, &env, &["d0"]);
}

#[test]
fn vm_f29_vm_paused_by_someone_else_stays_paused() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    vm.harness_qmp("stop", json!({})).unwrap();
    for mode in ["snapshot", "suspend", "stop"] {
        let r = report_of(&run_ok(env.backup(&vm, &["--mode", mode])));
        assert_eq!(r["consistency"], "crash", "{mode}: {r}");
        assert!(
            r["freeze_window_ms"].is_null(),
            "{mode}: not held by us: {r}"
        );
        let st = vm.harness_qmp("query-status", json!({})).unwrap();
        assert_eq!(
            st["status"], "paused",
            "{mode}: shear resumed a VM it did not pause"
        );
    }
    vm.harness_qmp("cont", json!({})).unwrap();
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 3);
}

#[test]
fn vm_stop_mode_agent_killed_while_guest_down_watchdog_boots_it() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    let hook = HeldHook::new(&env);
    let mut cmd = env.backup(&vm, &["--mode", "stop", "--stop-timeout", "60"]);
    hook.install(&mut cmd);
    let mut child = spawn(cmd);
    hook.wait_held(&mut child, Duration::from_secs(90));
    let st = vm.harness_qmp("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "shutdown", "{st}");
    child.kill().unwrap();
    let _ = child.wait();
    hook.release();
    // The watchdog boots the guest again (system_reset + cont).
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "guest back up",
        || vm.qga("guest-ping", json!(null)).ok(),
    )
    .unwrap();
    env.wait_record_gone(Duration::from_secs(30), "the kill");
    report_of(&run_ok(env.backup(&vm, &[])));
    assert_released_and_clean(&mut vm, &env, &["d0"]);
}

#[test]
fn qemu_several_vms_from_config_templates_with_exclude() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let vms: Vec<TestVm> = (0..2)
        .map(|_| {
            let mut vm = TestVm::start(
                VmConfig::paused()
                    .disk(DiskSpec::qcow2("d0", 16 * MIB))
                    .disk(DiskSpec::qcow2("d1", 16 * MIB)),
            )
            .unwrap();
            vm.qemu_io("d0", "write -P 0x11 0 1M").unwrap();
            vm
        })
        .collect();
    // Proxmox-style layout: <dir>/<vmid>.qmp, found through the config.
    let socks = env.dir.path().join("qemu-server");
    std::fs::create_dir_all(&socks).unwrap();
    for (vmid, vm) in ["100", "101"].iter().zip(&vms) {
        std::os::unix::fs::symlink(vm.qmp_socket(), socks.join(format!("{vmid}.qmp"))).unwrap();
    }
    let config = env.dir.path().join("shear.toml");
    std::fs::write(
        &config,
        format!(
            "qmp_socket = \"{0}/{{vmid}}.qmp\"\nqga_socket = \"{0}/{{vmid}}.qga\"\nnode = \"testnode\"\n",
            socks.display()
        ),
    )
    .unwrap();
    let fleece = env.fleece_dir();
    let mut cmd = env.shear(&["backup", "100", "101", "--exclude", "d1", "--json"]);
    cmd.arg("--fleecing-dir").arg(&fleece);
    cmd.arg("--notes-template").arg("{{vmid}}@{{node}}");
    cmd.env("SHEAR_CONFIG", &config);
    let out = run_ok(cmd);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    for (r, vmid) in reports.iter().zip(["100", "101"]) {
        assert_eq!(r["vmid"], vmid, "{r}");
        let disks: Vec<&str> = r["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(disks, ["d0"], "--exclude d1: {r}");
        assert_eq!(r["consistency"], "crash", "{r}");
        let id = r["backup_id"].as_str().unwrap();
        let show = run_ok(env.shear(&["show", id, "--json"]));
        let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        assert_eq!(m["notes"], format!("{vmid}@testnode"));
    }
    // --qmp names one VM's socket: refused with several VM ids.
    let bad = env
        .shear(&["backup", "100", "101", "--qmp", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    for mut vm in vms {
        assert_graph_clean(&mut vm, &env, &["d0", "d1"]);
    }
}

/// Issue 16: an NBD server someone else started in QEMU (another tool's, a
/// migration's) and its export survive a backup. shear fails clearly before
/// it touches the guest, and its teardown leaves the foreign server alone
/// (it used to `nbd-server-stop` whatever server ran).
#[test]
fn qemu_foreign_nbd_server_is_left_alone_backup_fails_clearly() {
    if !require_qemu() || !shear_tests::require_tool("nbdinfo") {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::raw("d0", 4 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0x42 0 1M").unwrap();
    let sock = vm.dir().join("foreign-nbd.sock");
    vm.harness_qmp(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .unwrap();
    vm.harness_qmp(
        "block-export-add",
        json!({"type": "nbd", "id": "foreign-exp", "node-name": "drv-d0", "name": "foreign"}),
    )
    .unwrap();
    let uri = format!("nbd+unix:///foreign?socket={}", sock.display());
    let nbdinfo = |uri: &str| {
        Command::new("nbdinfo")
            .args(["--size", uri])
            .output()
            .unwrap()
    };
    let before = nbdinfo(&uri);
    assert!(before.status.success(), "the foreign export is not served");

    let (ok, stdout, stderr) = finish(spawn(env.backup(&vm, &[])));
    assert!(
        !ok,
        "backup must fail while a foreign NBD server runs: {stdout}"
    );
    assert!(
        format!("{stdout}{stderr}")
            .contains("an NBD server shear did not start is running in QEMU"),
        "{stdout}{stderr}"
    );
    // The foreign server still serves its export, with the same size.
    let after = nbdinfo(&uri);
    assert!(
        after.status.success(),
        "the foreign NBD server or its export is gone: {}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert_eq!(after.stdout, before.stdout);
    let exports = vm.harness_qmp("query-block-exports", json!({})).unwrap();
    let ids: Vec<&str> = exports
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, ["foreign-exp"], "{exports}");
    // Nothing of ours is left, and no backup was recorded.
    vm.harness_qmp("block-export-del", json!({"id": "foreign-exp"}))
        .unwrap();
    vm.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10))
        .unwrap();
    assert_graph_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
    // Once the foreign server is gone, the backup works.
    vm.harness_qmp("nbd-server-stop", json!({})).unwrap();
    report_of(&run_ok(env.backup(&vm, &[])));
    assert_graph_clean(&mut vm, &env, &["d0"]);
}

/// Issue 16 B (F-12 before it happens): a RAM-backed fleecing directory is
/// refused unless allowed, and a directory with less free space than the
/// bound is refused saying how much is needed and free; both before
/// anything changes in the VM.
#[test]
fn qemu_f12_fleecing_on_tmpfs_or_short_of_space_refused_before_touching_vm() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 64 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0x5a 0 8M").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    let shm = tempfile::Builder::new()
        .prefix("shear-fleece-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let graph_before = vm.harness_qmp("query-block", json!({})).unwrap();
    let refused = |fleece: &Path, extra: &[&str]| {
        let out = env
            .backup_with(&vm, &no_agent, fleece, extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!out.status.success(), "must be refused: {stdout}");
        stdout
    };
    // tmpfs: refused by default, naming the way out.
    let msg = refused(shm.path(), &[]);
    assert!(
        msg.contains("tmpfs") && msg.contains("--fleecing-allow-tmpfs"),
        "{msg}"
    );
    assert_eq!(std::fs::read_dir(shm.path()).unwrap().count(), 0);
    // Free space short of the bound: says needed and free.
    let msg = refused(&env.fleece_dir(), &["--fleecing-min-free", "1000000T"]);
    assert!(
        msg.contains("not enough free space for fleecing")
            && msg.contains(&format!("{} bytes needed", 1_000_000u64 << 40))
            && msg.contains("bytes free"),
        "{msg}"
    );
    assert_eq!(
        vm.harness_qmp("query-block", json!({})).unwrap(),
        graph_before,
        "the VM's block graph changed"
    );
    assert_graph_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
    // Allowed explicitly: backs up, and says the fleece was in RAM.
    let r = report_of(&run_ok(env.backup_with(
        &vm,
        &no_agent,
        shm.path(),
        &["--fleecing-allow-tmpfs"],
    )));
    assert!(r["warnings"].to_string().contains("in RAM"), "{r}");
    assert_eq!(std::fs::read_dir(shm.path()).unwrap().count(), 0);
    // The default bound (10 % of the allocation) is met on the test's disk.
    report_of(&run_ok(env.backup_with(
        &vm,
        &no_agent,
        &env.fleece_dir(),
        &[],
    )));
    assert_graph_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 2);
}

/// Issue 16 D(a): `shear cleanup VMID` takes back a killed run's changes
/// now (shear and its watchdog both SIGKILLed), saying what it did; it is
/// refused while a live backup of the VM holds the per-VM lock.
#[test]
fn qemu_cleanup_command_takes_back_killed_run_refused_during_live_backup() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::raw("d0", 32 * MIB))).unwrap();
    vm.qemu_io("d0", "write -P 0xab 0 24M").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    let mut child =
        spawn(env.backup_with(&vm, &no_agent, &env.fleece_dir(), &["--bwlimit", "2048"]));
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    let wd = watchdog_of(child.id());
    let st = Command::new("kill")
        .args(["-KILL", &wd.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.kill().unwrap();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(500));
    assert!(env.run_dir().join("backup-100.json").exists());
    assert_ne!(
        vm.harness_qmp("query-block-exports", json!({})).unwrap(),
        json!([]),
        "the killed run's export is still there"
    );
    let out = run_ok(env.shear(&["cleanup", "100"]));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("cleanup said:\n{said}");
    assert!(said.contains("took back"), "{said}");
    assert!(said.contains("removed NBD export"), "{said}");
    assert!(said.contains("pointed "), "{said}");
    assert!(said.contains("removed fleecing image"), "{said}");
    assert_graph_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
    let again = run_ok(env.shear(&["cleanup", "100"]));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to clean up"));

    // A live backup holds the VM: cleanup is refused and changes nothing.
    let hook = HeldHook::new(&env);
    let mut cmd = env.backup_with(&vm, &no_agent, &env.fleece_dir(), &[]);
    hook.install(&mut cmd);
    let mut child = spawn(cmd);
    hook.wait_held(&mut child, Duration::from_secs(60));
    let busy = env.shear(&["cleanup", "100"]).output().unwrap();
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.contains("another shear backup of VM 100 is running"),
        "{err}"
    );
    assert!(env.run_dir().join("backup-100.json").exists());
    hook.release();
    let (ok, stdout, stderr) = finish(child);
    assert!(ok, "{stdout}{stderr}");
    assert_graph_clean(&mut vm, &env, &["d0"]);
    assert_eq!(env.list().len(), 1);
}

/// Issue 16 C: shear checks which VM is behind the QMP socket before it
/// changes anything. A QEMU with Proxmox's pidfile of VM 101, reached as
/// VM 100, is refused with nothing changed in its graph; a QEMU named
/// `100` (`-name guest=100,…`) is backed up; one with no identity at all is
/// backed up as asked, with a warning saying identity was not checked.
#[test]
fn qemu_wrong_vm_behind_qmp_socket_refused_matching_one_proceeds() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let no_agent = env.dir.path().join("no-agent.sock");
    let qs = env.dir.path().join("qemu-server");
    std::fs::create_dir_all(&qs).unwrap();
    let pidfile = qs.join("101.pid");
    let mut other = TestVm::start(
        VmConfig::paused()
            .disk(DiskSpec::qcow2("d0", 16 * MIB))
            .arg("-name")
            .arg("web01,debug-threads=on")
            .arg("-pidfile")
            .arg(pidfile.to_str().unwrap()),
    )
    .unwrap();
    assert!(pidfile.exists(), "QEMU wrote the Proxmox-style pidfile");
    let before = other.harness_qmp("query-block", json!({})).unwrap();
    let nodes_before = other
        .harness_qmp("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let out = env
        .backup_with(&other, &no_agent, &env.fleece_dir(), &[])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "another VM's QEMU must be refused: {stdout}"
    );
    assert!(
        stdout.contains("refusing to back up VM 100") && stdout.contains("VM 101"),
        "{stdout}"
    );
    assert_eq!(other.harness_qmp("query-block", json!({})).unwrap(), before);
    assert_eq!(
        other
            .harness_qmp("query-named-block-nodes", json!({"flat": true}))
            .unwrap(),
        nodes_before,
        "the other VM's graph changed"
    );
    assert_graph_clean(&mut other, &env, &["d0"]);
    assert!(env.list().is_empty());
    drop(other);

    let mut named = TestVm::start(
        VmConfig::paused()
            .disk(DiskSpec::qcow2("d0", 16 * MIB))
            .arg("-name")
            .arg("guest=100,debug-threads=on"),
    )
    .unwrap();
    let r = report_of(&run_ok(env.backup_with(
        &named,
        &no_agent,
        &env.fleece_dir(),
        &[],
    )));
    assert!(
        !r["warnings"].to_string().contains("could not check"),
        "{r}"
    );
    assert_graph_clean(&mut named, &env, &["d0"]);
    drop(named);

    let mut plain =
        TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 16 * MIB))).unwrap();
    let r = report_of(&run_ok(env.backup_with(
        &plain,
        &no_agent,
        &env.fleece_dir(),
        &[],
    )));
    assert!(r["warnings"].to_string().contains("could not check"), "{r}");
    assert_graph_clean(&mut plain, &env, &["d0"]);
    assert_eq!(env.list().len(), 2);
}

/// Issue 16 D(c) (F-04 with qemu-ga out of reach): shear is SIGKILLed
/// while the guest is frozen, and qemu-ga stays unreachable for longer than
/// the watchdog's old 60 s rescue deadline (the socket shear was given
/// disappears; QEMU itself is alive). The watchdog must not give up: when
/// qemu-ga is back it thaws the guest and takes back the graph.
#[test]
fn vm_f04_qga_unreachable_past_old_deadline_watchdog_never_gives_up() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();
    let link = env.dir.path().join("qga-link.sock");
    std::os::unix::fs::symlink(vm.qga_socket(), &link).unwrap();
    let hook = HeldHook::new(&env);
    let mut cmd = env.backup_with(&vm, &link, &env.fleece_dir(), &[]);
    hook.install(&mut cmd);
    let mut child = spawn(cmd);
    hook.wait_held(&mut child, Duration::from_secs(60));
    let rec = std::fs::read_to_string(env.run_dir().join("backup-100.json")).unwrap();
    assert!(rec.contains("\"freeze\""), "{rec}");
    // qemu-ga goes out of reach, then shear dies holding the freeze.
    std::fs::remove_file(&link).unwrap();
    let wd = watchdog_of(child.id());
    child.kill().unwrap();
    let _ = child.wait();
    hook.release();
    std::thread::sleep(Duration::from_secs(65));
    assert!(
        Path::new(&format!("/proc/{wd}")).exists(),
        "the watchdog gave up on a frozen guest"
    );
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "frozen",
        "nobody could have thawed it yet"
    );
    std::os::unix::fs::symlink(vm.qga_socket(), &link).unwrap();
    let back = Instant::now();
    env.wait_record_gone(Duration::from_secs(30), "the kill");
    eprintln!(
        "D(c): thawed and taken back {:.2} s after qemu-ga came back",
        back.elapsed().as_secs_f64()
    );
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert!(env.list().is_empty());
}

//! Running the `shear` binary from tests: a private repository/run dir,
//! JSON reports, and the post-conditions every backup test checks.
//!
//! These are assertions: a failed step is a failed test, so they unwrap.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{shear_bin, TestVm};

/// A repository, run dir and fleecing dir for one test.
#[derive(Debug)]
pub struct ShearEnv {
    /// The test's private directory.
    pub dir: tempfile::TempDir,
}

impl Default for ShearEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl ShearEnv {
    /// A fresh directory with an initialised repository.
    pub fn new() -> ShearEnv {
        let env = ShearEnv {
            dir: tempfile::Builder::new()
                .prefix("shear-e2e-")
                .tempdir_in(disk_tmp())
                .unwrap(),
        };
        let out = env.shear(&["init"]).output().unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }
    /// Path.
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
    /// Path.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    /// Path.
    pub fn fleece_dir(&self) -> PathBuf {
        self.dir.path().join("fleece")
    }
    /// A `shear` command on this repository and run dir.
    pub fn shear(&self, args: &[&str]) -> Command {
        let mut c = Command::new(shear_bin());
        c.arg("--repo").arg(self.repo()).args(args);
        c.env("SHEAR_RUN_DIR", self.run_dir());
        c.env("SHEAR_CONFIG", self.dir.path().join("no-config.toml"));
        c.env_remove("SHEAR_TEST_FROZEN_HOOK");
        c
    }
    /// `shear backup 100 --qmp … --qga … --json` for `vm`.
    pub fn backup(&self, vm: &TestVm, extra: &[&str]) -> Command {
        self.backup_with(vm, &vm.qga_socket(), &self.fleece_dir(), extra)
    }
    /// [`ShearEnv::backup`] with another qemu-ga socket and fleecing dir.
    pub fn backup_with(&self, vm: &TestVm, qga: &Path, fleece: &Path, extra: &[&str]) -> Command {
        let mut c = self.shear(&["backup", "100", "--json"]);
        c.arg("--qmp").arg(vm.qmp_socket());
        c.arg("--qga").arg(qga);
        c.arg("--fleecing-dir").arg(fleece);
        c.args(extra);
        c
    }
}

/// A temporary directory on disk for repositories and fleecing images:
/// `$SHEAR_TEST_TMP`, else the system's temp dir unless that is a RAM
/// filesystem (shear refuses tmpfs fleecing by default), else `/var/tmp`.
pub fn disk_tmp() -> PathBuf {
    if let Some(d) = std::env::var_os("SHEAR_TEST_TMP") {
        return PathBuf::from(d);
    }
    let tmp = std::env::temp_dir();
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&tmp)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if fs == "tmpfs" || fs == "ramfs" {
        PathBuf::from("/var/tmp")
    } else {
        tmp
    }
}

/// Wait until shear's NBD exports exist (its data path has started),
/// at most `timeout`; panics if `child` (the `shear backup`) exits first.
pub fn wait_reading(vm: &mut TestVm, child: &mut Child, timeout: Duration) {
    crate::wait_until(
        timeout,
        Duration::from_millis(20),
        "shear's NBD export",
        || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("shear exited before reading: {st}");
            }
            let e = vm.harness_qmp("query-block-exports", json!({})).unwrap();
            (e.as_array().is_some_and(|a| !a.is_empty())).then_some(())
        },
    )
    .unwrap();
}

/// Every file of the repository with its content, sorted by path (lock
/// files left out): equal before and after means nothing was written.
pub fn repo_state(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().ends_with(".lock") {
                v.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Run; panic with its output unless it succeeds.
pub fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The first report of `shear backup --json` output; panics on an error entry.
pub fn report_of(out: &Output) -> Value {
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let r = v[0].clone();
    assert!(r.get("error").is_none(), "backup failed: {r}");
    r
}

/// PC-G/PC-T/PC-C: the guest runs, is thawed, and nothing of ours is left.
pub fn assert_released_and_clean(vm: &mut TestVm, env: &ShearEnv, disks: &[&str]) {
    let st = vm.harness_qmp("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "running", "VM not running: {st}");
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "thawed"
    );
    // PC-G: the guest saw no I/O error.
    let dmesg = vm.guest_sh("dmesg").unwrap().to_lowercase();
    assert!(
        !dmesg.contains("i/o error") && !dmesg.contains("buffer i/o"),
        "guest kernel reported I/O errors:\n{dmesg}"
    );
    assert_graph_clean(vm, env, disks);
}

/// PC-C: no node, export, drive swap, fleece file or run record of ours.
pub fn assert_graph_clean(vm: &mut TestVm, env: &ShearEnv, disks: &[&str]) {
    let nodes = vm
        .harness_qmp("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let ours: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("shear-"))
        .collect();
    assert!(ours.is_empty(), "leftover nodes: {ours:?}");
    // Change tracking outlives every run, failed or not: each bitmap of
    // ours left on a disk records and is free (a disabled one would miss
    // every write after that run's freeze; a busy one is still exported).
    for n in nodes.as_array().unwrap() {
        let bitmaps = n["dirty-bitmaps"].as_array().into_iter().flatten();
        for b in bitmaps.filter(|b| b["name"].as_str().is_some_and(|s| s.starts_with("shear-"))) {
            assert!(
                b["recording"] == json!(true) && b["busy"] != json!(true),
                "bitmap left not recording or busy on {}: {b}",
                n["node-name"]
            );
        }
    }
    let exports = vm.harness_qmp("query-block-exports", json!({})).unwrap();
    assert_eq!(exports, json!([]), "leftover exports");
    for d in disks {
        // query-block says which node a device uses; qom-get `drive` does
        // only for a `-blockdev` device (a legacy one answers `drive-<id>`).
        let qdev = vm.qdev(d);
        let node = vm.current_node(&qdev).unwrap();
        assert_eq!(
            node.as_deref(),
            Some(vm.disk_node(d).as_str()),
            "device {qdev} of {d} is not back on its original node"
        );
        let drive = vm
            .harness_qmp("qom-get", json!({"path": qdev, "property": "drive"}))
            .unwrap();
        let expected = if vm.is_legacy(d) {
            format!("drive-{d}")
        } else {
            vm.disk_node(d)
        };
        assert_eq!(drive, json!(expected), "drive of {d} not restored");
    }
    let fleece: Vec<_> = std::fs::read_dir(env.fleece_dir())
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(fleece.is_empty(), "leftover fleece files: {fleece:?}");
    let run: Vec<_> = std::fs::read_dir(env.run_dir())
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    assert!(run.is_empty(), "leftovers in the run dir: {run:?}");
}

impl ShearEnv {
    /// `shear list --json` of VM 100.
    pub fn list(&self) -> Vec<Value> {
        let out = run_ok(self.shear(&["list", "100", "--json"]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().cloned().unwrap_or_default()
    }

    /// Wait (up to `timeout`) until VM 100's run record is gone: the run
    /// was taken back (by shear, its watchdog or a cleanup) after `what`.
    pub fn wait_record_gone(&self, timeout: Duration, what: &str) {
        let rec = self.run_dir().join("backup-100.json");
        let t = Instant::now();
        crate::wait_until(
            timeout,
            Duration::from_millis(50),
            &format!("the run record to go after {what}"),
            || (!rec.exists()).then_some(()),
        )
        .unwrap();
        eprintln!(
            "run taken back {:.2} s after {what}",
            t.elapsed().as_secs_f64()
        );
    }
}

/// The test-only hold hook (`SHEAR_TEST_FROZEN_HOOK`): shear runs it while
/// the guest is held with every filter in place; it signals `held` and
/// waits (at most 60 s) for the test to say `go`.
#[derive(Debug)]
pub struct HeldHook {
    dir: PathBuf,
    script: PathBuf,
}

impl HeldHook {
    /// Write the hook script in a fresh `hook-*` directory of `env` (one
    /// per hook: a `held` marker left by an earlier backup of the same env
    /// would release the test before shear holds the guest).
    pub fn new(env: &ShearEnv) -> HeldHook {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("hook-")
            .tempdir_in(env.dir.path())
            .unwrap()
            .keep();
        let script = dir.join("held-hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ntouch {d}/held\ni=0\nwhile [ ! -e {d}/go ]; do sleep 0.01; i=$((i+1)); [ $i -gt 6000 ] && exit 1; done\nexit 0\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        HeldHook { dir, script }
    }

    /// Make `cmd` (a `shear backup`) run the hook.
    pub fn install(&self, cmd: &mut Command) {
        cmd.env("SHEAR_TEST_FROZEN_HOOK", &self.script);
    }

    /// Wait until shear holds the guest; panics if `child` exits first.
    pub fn wait_held(&self, child: &mut Child, timeout: Duration) {
        let held = self.dir.join("held");
        crate::wait_until(
            timeout,
            Duration::from_millis(5),
            "shear to hold the guest",
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    let mut out = String::new();
                    if let Some(mut o) = child.stdout.take() {
                        let _ = std::io::Read::read_to_string(&mut o, &mut out);
                    }
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut out);
                    }
                    panic!("shear exited before holding the guest: {st}\n{out}");
                }
                held.exists().then_some(())
            },
        )
        .unwrap();
    }

    /// Let the hook (and so shear) go on.
    pub fn release(&self) {
        std::fs::write(self.dir.join("go"), b"").unwrap();
    }
}

// ---- ground truth at the hold instant (shared by the backup tests) ----

/// Start the in-guest writer: a counter (written to every mounted data disk
/// in order, then `sync`) plus churn, forever.
pub fn start_writer(vm: &TestVm, mounts: &[&str]) {
    let mut body = String::from("i=0; while :; do i=$((i+1)); ");
    for m in mounts {
        // Written aside and renamed: a freeze between `>`'s truncate and
        // its write would otherwise leave an empty counter in the image.
        body.push_str(&format!(
            "echo $i > {m}/counter.new; mv {m}/counter.new {m}/counter; "
        ));
    }
    for m in mounts {
        body.push_str(&format!(
            "dd if=/dev/urandom of={m}/churn bs=4k count=8 seek=$((i % 64)) conv=notrunc 2>/dev/null; "
        ));
    }
    body.push_str("sync; done");
    vm.guest_sh(&format!(
        "(sh -c '{body}' </dev/null >/dev/null 2>&1 &) ; true"
    ))
    .unwrap();
    // Let it run a few rounds.
    let first = mounts[0];
    crate::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "writer",
        || {
            vm.guest_sh(&format!("cat {first}/counter"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|&n| n > 5)
        },
    )
    .unwrap();
}

pub fn stop_writer(vm: &TestVm) {
    let _ = vm.guest_sh("pkill -f 'counter' ; sync; true");
}

/// While shear holds the guest: start a `sync=full` copy of each source
/// node into a raw file (the truth at that instant), then release the hook.
pub fn take_truth_when_held(
    vm: &mut TestVm,
    hook: &HeldHook,
    child: &mut Child,
    disks: &[&str],
) -> Vec<PathBuf> {
    hook.wait_held(child, Duration::from_secs(120));
    let mut truths = Vec::new();
    for d in disks {
        let size = vm
            .harness_qmp("query-block", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["qdev"] == vm.qdev(d))
            .map(|b| b["inserted"]["image"]["virtual-size"].as_u64().unwrap())
            .unwrap();
        let path = vm.dir().join(format!("truth-{d}.raw"));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        vm.harness_qmp(
            "blockdev-add",
            json!({"driver": "raw", "node-name": format!("truth-{d}"),
                   "file": {"driver": "file", "filename": path}}),
        )
        .unwrap();
        vm.harness_qmp(
            "blockdev-backup",
            json!({"device": vm.disk_node(d), "target": format!("truth-{d}"),
                   "sync": "full", "job-id": format!("truth-{d}")}),
        )
        .unwrap();
        truths.push(path);
    }
    hook.release();
    truths
}

pub fn wait_truth_jobs(vm: &mut TestVm, disks: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = vm.harness_qmp("query-jobs", json!({})).unwrap();
        let pending = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["id"].as_str().is_some_and(|i| i.starts_with("truth-")))
            .count();
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "truth jobs did not finish: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for d in disks {
        vm.harness_qmp("blockdev-del", json!({"node-name": format!("truth-{d}")}))
            .unwrap();
    }
}

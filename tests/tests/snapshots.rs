//! `shear snapshot` on real QEMU (issue 15): qcow2 internal snapshots of
//! every disk at one instant, with and without memory; names and
//! descriptions in shear's record; orphans both ways; refusals; rollback
//! and the next backup.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use shear_tests::shear::{
    report_of, run_ok, start_writer, stop_writer, take_truth_when_held, wait_truth_jobs, HeldHook,
    ShearEnv as Env,
};
use shear_tests::{e2fsck_clean, require_guest, require_qemu, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

/// `shear snapshot 100 ARGS --qmp … --qga … --state-dir …`.
fn snap(env: &Env, vm_dir: &Path, args: &[&str]) -> Command {
    let mut c = env.shear(&["snapshot"]);
    c.args(args);
    c.arg("--qmp").arg(vm_dir.join("qmp.sock"));
    c.arg("--qga").arg(vm_dir.join("qga.sock"));
    c.arg("--state-dir").arg(env.dir.path().join("state"));
    c
}

fn fails(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Tags QEMU has on each of `disks` (harness monitor, `query-block`).
fn qemu_tags(vm: &mut TestVm, disks: &[&str]) -> Vec<Vec<String>> {
    let blocks = vm.harness_qmp("query-block", json!({})).unwrap();
    disks
        .iter()
        .map(|d| {
            let node = vm.disk_node(d);
            blocks
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["inserted"]["node-name"] == node.as_str())
                .and_then(|b| b["inserted"]["image"]["snapshots"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .collect()
}

/// Tags in a stopped image (`qemu-img info`).
fn image_tags(image: &Path) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect()
}

/// A raw copy of `image` as it is now (`-U`: QEMU may hold it).
fn raw_copy(image: &Path, out: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-q", "-O", "raw"])
        .arg(image)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
}

fn same_bytes(a: &Path, b: &Path, what: &str) {
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    assert_eq!(a.len(), b.len(), "{what}: size");
    if let Some(pos) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{what}: differs at byte {pos}");
    }
}

fn row<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:#}"))
}

/// Disk-only snapshots on a two-disk VM (one a legacy `-drive`), QEMU
/// paused (no guest): both
/// disks get the tag in one transaction; rename/describe/list; a snapshot
/// made behind shear's back is flagged "foreign", a deleted one "gone";
/// rollback without memory is refused while QEMU runs and, once it is
/// stopped, gives both disks byte for byte as they were at the snapshot;
/// delete and prune round trips (foreign snapshots never touched).
#[test]
fn qemu_snapshot_disk_only_two_disks_round_trip() {
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    let disks = ["d0", "d1"];
    let mut vm = TestVm::start(
        VmConfig::paused()
            .disk(DiskSpec::qcow2("d0", 16 * MIB))
            // Legacy -drive (Proxmox VE 8, libvirt): QEMU names the node.
            .disk(DiskSpec::qcow2("d1", 16 * MIB).legacy()),
    )
    .unwrap();
    let dir = vm.dir().to_path_buf();
    vm.qemu_io("d0", "write -P 0xa1 0 1M").unwrap();
    vm.qemu_io("d1", "write -P 0xb1 1M 1M").unwrap();
    vm.qemu_io("d0", "flush").unwrap();
    vm.qemu_io("d1", "flush").unwrap();
    // The truth at the snapshot instant (QEMU paused: nothing writes).
    let truth: Vec<PathBuf> = disks
        .iter()
        .map(|d| {
            let p = env.dir.path().join(format!("{d}.truth.raw"));
            raw_copy(&vm.disk_path(d), &p);
            p
        })
        .collect();
    let out = run_ok(snap(
        &env,
        &dir,
        &["100", "create", "base", "--description", "first", "--json"],
    ));
    let r = json_of(&out);
    assert_eq!(r["tag"], "base");
    assert_eq!(r["consistency"], "crash", "{r:#}");
    // QEMU lists legacy drives first.
    let mut names: Vec<&str> = r["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["d0", "d1"]);
    assert_eq!(qemu_tags(&mut vm, &disks), vec![vec!["base"], vec!["base"]]);

    // Same name twice: refused, nothing new in QEMU.
    let e = fails(snap(&env, &dir, &["100", "create", "base"]));
    assert!(e.contains("already has a snapshot named \"base\""), "{e}");

    // Rename keeps the QEMU tag; a new snapshot may take the old name
    // and gets another tag.
    run_ok(snap(&env, &dir, &["100", "rename", "base", "pre-upgrade"]));
    run_ok(snap(
        &env,
        &dir,
        &["100", "describe", "pre-upgrade", "before apt upgrade"],
    ));
    vm.qemu_io("d0", "write -P 0xa2 0 1M").unwrap();
    run_ok(snap(&env, &dir, &["100", "create", "base"]));
    assert_eq!(
        qemu_tags(&mut vm, &disks),
        vec![vec!["base", "base.2"], vec!["base", "base.2"]]
    );
    // Behind shear's back: a snapshot on d0 only, and base.2 deleted on d1.
    vm.harness_qmp(
        "blockdev-snapshot-internal-sync",
        json!({"device": vm.disk_node("d0"), "name": "by-hand"}),
    )
    .unwrap();
    vm.harness_qmp(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": vm.disk_node("d1"), "name": "base.2"}),
    )
    .unwrap();
    let list = json_of(&run_ok(snap(&env, &dir, &["100", "list", "--json"])));
    eprintln!("{list:#}");
    let pre = row(&list, "pre-upgrade");
    assert_eq!(pre["tag"], "base");
    assert_eq!(pre["standing"], "ok");
    assert_eq!(pre["description"], "before apt upgrade");
    assert_eq!(pre["vmstate"], false);
    assert_eq!(pre["too_old"], false);
    let b = row(&list, "base");
    assert_eq!(b["standing"], "partial");
    assert_eq!(b["missing_on"], json!(["d1"]));
    let f = row(&list, "by-hand");
    assert_eq!(f["standing"], "foreign");
    // The human listing says so.
    let human = String::from_utf8(run_ok(snap(&env, &dir, &["100", "list"])).stdout).unwrap();
    eprintln!("{human}");
    assert!(human.contains("created outside shear"), "{human}");
    assert!(human.contains("missing on d1"), "{human}");
    // Deleting a foreign snapshot is refused (not shear's).
    let e = fails(snap(&env, &dir, &["100", "delete", "by-hand"]));
    assert!(e.contains("no snapshot named \"by-hand\""), "{e}");

    // Rollback without memory while QEMU runs: refused, says what to do.
    vm.qemu_io("d1", "write -P 0xb3 0 2M").unwrap();
    let e = fails(snap(
        &env,
        &dir,
        &["100", "rollback", "pre-upgrade", "--yes"],
    ));
    assert!(
        e.contains("has no memory state") && e.contains("Stop the VM"),
        "{e}"
    );
    // Without --yes and without a terminal: refused, nothing done.
    let e = fails(snap(&env, &dir, &["100", "rollback", "pre-upgrade"]));
    assert!(e.contains("pass --yes"), "{e}");

    // Stopped: the offline rollback gives the snapshot instant back.
    vm.shutdown().unwrap();
    let out = run_ok(snap(
        &env,
        &dir,
        &["100", "rollback", "pre-upgrade", "--yes", "--json"],
    ));
    let r = json_of(&out);
    assert_eq!(r["how"], "offline", "{r:#}");
    for (d, t) in disks.iter().zip(&truth) {
        let now = env.dir.path().join(format!("{d}.after.raw"));
        raw_copy(&vm.disk_path(d), &now);
        same_bytes(&now, t, d);
    }
    // Offline list and delete; the foreign snapshot stays.
    let list = json_of(&run_ok(snap(&env, &dir, &["100", "list", "--json"])));
    assert_eq!(row(&list, "pre-upgrade")["standing"], "ok");
    run_ok(snap(&env, &dir, &["100", "delete", "pre-upgrade"]));
    assert_eq!(image_tags(&vm.disk_path("d0")), vec!["base.2", "by-hand"]);
    assert!(image_tags(&vm.disk_path("d1")).is_empty());

    // prune: only shear's, only older than the limit.
    std::thread::sleep(Duration::from_millis(1100));
    let dry = json_of(&run_ok(env.shear(&[
        "snapshot",
        "prune",
        "--older-than",
        "1h",
        "--state-dir",
        env.dir.path().join("state").to_str().unwrap(),
        "--json",
    ])));
    assert_eq!(dry, json!([]));
    let mut c = env.shear(&["snapshot", "prune", "--older-than", "0", "--vmid", "100"]);
    c.arg("--qmp").arg(dir.join("qmp.sock"));
    c.arg("--state-dir").arg(env.dir.path().join("state"));
    c.arg("--json");
    let pruned = json_of(&run_ok(c));
    assert_eq!(pruned.as_array().unwrap().len(), 1, "{pruned:#}");
    assert_eq!(pruned[0]["name"], "base");
    assert_eq!(pruned[0]["removed"], true);
    assert_eq!(image_tags(&vm.disk_path("d0")), vec!["by-hand"]);
}

/// Refusals and failed creates leave nothing: a raw disk is refused naming
/// the disk and what is needed; a disk whose writes fail (blkdebug ENOSPC
/// under the qcow2) makes the transaction fail and the other disk keeps
/// no half snapshot, with and without memory; the per-VM lock held by a
/// backup refuses a snapshot.
#[test]
fn qemu_snapshot_refusals_and_failed_create_leave_nothing() {
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    // A raw disk: refused before anything changes.
    {
        let mut vm = TestVm::start(
            VmConfig::paused()
                .disk(DiskSpec::qcow2("d0", 16 * MIB))
                .disk(DiskSpec::raw("r1", 16 * MIB)),
        )
        .unwrap();
        let dir = vm.dir().to_path_buf();
        let e = fails(snap(&env, &dir, &["100", "create", "s"]));
        assert!(
            e.contains("disk r1 of VM 100 is raw") && e.contains("qemu-img convert -O qcow2"),
            "{e}"
        );
        assert_eq!(qemu_tags(&mut vm, &["d0"]), vec![Vec::<String>::new()]);
    }
    // A qcow2 disk whose image writes fail with ENOSPC (disk full).
    let bad = env.dir.path().join("bad.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&bad)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let blk = json!({"driver": "qcow2", "node-name": "drv-bad",
        "file": {"driver": "blkdebug",
                 "inject-error": [{"event": "pwritev", "errno": 28}],
                 "image": {"driver": "file", "filename": bad}}});
    let mut vm = TestVm::start(
        VmConfig::paused()
            .disk(DiskSpec::qcow2("d0", 16 * MIB))
            .arg("-blockdev")
            .arg(&blk.to_string())
            .arg("-device")
            .arg("virtio-blk-pci,id=bad,drive=drv-bad"),
    )
    .unwrap();
    let dir = vm.dir().to_path_buf();
    let e = fails(snap(&env, &dir, &["100", "create", "s1"]));
    eprintln!("disk-only failure: {e}");
    assert!(e.contains("transaction"), "{e}");
    assert_eq!(qemu_tags(&mut vm, &["d0"]), vec![Vec::<String>::new()]);
    let e = fails(snap(&env, &dir, &["100", "create", "s2", "--vmstate"]));
    eprintln!("vmstate failure: {e}");
    assert!(e.contains("snapshot-save"), "{e}");
    assert_eq!(qemu_tags(&mut vm, &["d0"]), vec![Vec::<String>::new()]);
    let list = json_of(&run_ok(snap(&env, &dir, &["100", "list", "--json"])));
    assert_eq!(list["snapshots"], json!([]), "{list:#}");

    // Paused by someone else (not by shear): refused, nothing changed.
    vm.harness_qmp("cont", json!({})).unwrap();
    vm.harness_qmp("stop", json!({})).unwrap();
    let e = fails(snap(&env, &dir, &["100", "create", "p"]));
    assert!(e.contains("paused by someone else"), "{e}");
    assert_eq!(qemu_tags(&mut vm, &["d0"]), vec![Vec::<String>::new()]);
    // Running (firmware only) from here.
    vm.harness_qmp("cont", json!({})).unwrap();

    // The per-VM lock, held as a backup holds it: refused at once.
    let run = env.run_dir();
    std::fs::create_dir_all(&run).unwrap();
    let lock = run.join("backup-100.lock");
    std::fs::write(&lock, "backup 1").unwrap();
    // flock locks belong to the open file: this one conflicts with shear's.
    let held = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    held.try_lock().unwrap();
    let e = fails(snap(&env, &dir, &["100", "create", "s3"]));
    assert!(e.contains("backup or snapshot of VM 100 is running"), "{e}");
    let e = fails(snap(&env, &dir, &["100", "delete", "x"]));
    assert!(e.contains("backup or snapshot of VM 100 is running"), "{e}");
    drop(held);
    // Free again: the same create now fails only for the disk (above).
    let e = fails(snap(&env, &dir, &["100", "create", "s3"]));
    assert!(e.contains("transaction"), "{e}");
}

/// The booted guest with a counter writer: a disk-only snapshot is
/// application-consistent (frozen and thawed); a snapshot with memory,
/// more writes, rollback: the guest resumes with the counter back at the
/// snapshot's value and keeps counting, qemu-ga answers; the rollback
/// removed the tracking bitmaps, so the next backup reads in full (with
/// the reason) and its restore equals the disk; e2fsck is clean.
#[test]
fn vm_snapshot_memory_rollback_resumes_counter_and_next_backup_is_full() {
    if !require_guest() {
        return;
    }
    let env = Env::new();
    let mut vm = TestVm::start(
        VmConfig::guest()
            .disk(DiskSpec::qcow2("d0", 64 * MIB).file("/seed.txt", b"d0"))
            .disk(DiskSpec::qcow2("d1", 64 * MIB).file("/seed.txt", b"d1")),
    )
    .unwrap();
    let dir = vm.dir().to_path_buf();
    // Counter to vda then vdb, sync, forever (F-17 order).
    start_writer(&vm, &["/mnt/vda", "/mnt/vdb"]);
    // The writer truncates then writes: an empty read is retried.
    let counter = |vm: &TestVm| -> u64 {
        shear_tests::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "a counter value",
            || {
                vm.guest_sh("cat /mnt/vda/counter")
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            },
        )
        .unwrap()
    };
    // A backup first: it leaves a tracking bitmap for the next one.
    let b1 = report_of(&run_ok(env.backup(&vm, &[])));
    eprintln!("backup 1: {}", b1["backup_id"]);

    // Disk-only, frozen through qemu-ga.
    let r = json_of(&run_ok(snap(
        &env,
        &dir,
        &["100", "create", "disk", "--json"],
    )));
    assert_eq!(r["consistency"], "application", "{r:#}");
    assert!(r["freeze_window_ms"].as_u64().is_some(), "{r:#}");
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "thawed"
    );
    // Both disks at one instant: read the snapshot itself out of each
    // image; the writer updates vda then vdb, so vdb lags by at most one.
    let at_snapshot: Vec<u64> = ["d0", "d1"]
        .iter()
        .map(|d| {
            let raw = env.dir.path().join(format!("{d}.snap.raw"));
            let st = Command::new("qemu-img")
                .args([
                    "convert",
                    "-U",
                    "-q",
                    "-l",
                    "snapshot.name=disk",
                    "-O",
                    "raw",
                ])
                .arg(vm.disk_path(d))
                .arg(&raw)
                .status()
                .unwrap();
            assert!(st.success());
            e2fsck_clean(&raw).unwrap();
            let c = shear_tests::debugfs_cat(&raw, "/counter").unwrap();
            String::from_utf8_lossy(&c).trim().parse().unwrap()
        })
        .collect();
    eprintln!("counters in the disk-only snapshot: {at_snapshot:?}");
    assert!(
        at_snapshot[1] <= at_snapshot[0] && at_snapshot[0] <= at_snapshot[1] + 1,
        "{at_snapshot:?}"
    );

    // With memory.
    let before = counter(&vm);
    let t = std::time::Instant::now();
    let r = json_of(&run_ok(snap(
        &env,
        &dir,
        &[
            "100",
            "create",
            "mem",
            "--vmstate",
            "--vmstate-disk",
            "d1",
            "--json",
        ],
    )));
    let create_ms = t.elapsed().as_millis();
    let after = counter(&vm);
    assert_eq!(r["vmstate"], true);
    assert_eq!(r["vmstate_disk"], "d1");
    // More writes.
    shear_tests::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "counter to move on",
        || (counter(&vm) > after + 20).then_some(()),
    )
    .unwrap();
    let later = counter(&vm);
    let list = json_of(&run_ok(snap(&env, &dir, &["100", "list", "--json"])));
    let m = row(&list, "mem");
    assert_eq!(m["vmstate"], true);
    assert!(m["vm_state_size"].as_u64().unwrap() > MIB, "{m}");

    let t = std::time::Instant::now();
    let r = json_of(&run_ok(snap(
        &env,
        &dir,
        &["100", "rollback", "mem", "--yes", "--json"],
    )));
    let rollback_ms = t.elapsed().as_millis();
    assert_eq!(r["how"], "memory", "{r:#}");
    assert!(
        !r["bitmaps_removed"].as_array().unwrap().is_empty(),
        "the tracking bitmap must go: {r:#}"
    );
    // The guest resumed where it was: the counter is back at the
    // snapshot's value (between the reads around create), below `later`.
    let back = counter(&vm);
    eprintln!(
        "counter: before create {before}, after {after}, later {later}, after rollback {back}; \
         create {create_ms} ms, rollback {rollback_ms} ms"
    );
    assert!(
        back >= before && back < later,
        "counter {back} not in [{before}, {later})"
    );
    shear_tests::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "counter to keep counting",
        || (counter(&vm) > back + 5).then_some(()),
    )
    .unwrap();
    vm.qga("guest-ping", json!(null)).unwrap();

    // The next backup, the writer still running: full, with the reason;
    // its restore equals the disk at its hold instant (sync=full copy).
    let hook = HeldHook::new(&env);
    let mut cmd = env.backup(&vm, &[]);
    hook.install(&mut cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let truths = take_truth_when_held(&mut vm, &hook, &mut child, &["d0", "d1"]);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_truth_jobs(&mut vm, &["d0", "d1"]);
    let b2 = report_of(&out);
    for d in b2["disks"].as_array().unwrap() {
        assert_eq!(d["kind"], "full", "{d:#}");
        assert!(
            d["full_reason"]
                .as_str()
                .unwrap()
                .contains("no change-tracking bitmap"),
            "{d:#}"
        );
    }
    let id = b2["backup_id"].as_str().unwrap().to_string();
    stop_writer(&vm);
    let target = env.dir.path().join("restore");
    std::fs::create_dir_all(&target).unwrap();
    run_ok(env.shear(&["restore", &id, "--target", target.to_str().unwrap()]));
    for (d, truth) in ["d0", "d1"].iter().zip(&truths) {
        let restored = target.join(format!("{d}.raw"));
        same_bytes(&restored, truth, "restore of the backup after rollback");
        e2fsck_clean(&restored).unwrap();
    }
    vm.shutdown().unwrap();
    e2fsck_clean(&vm.disk_path("d0")).unwrap();
    e2fsck_clean(&vm.disk_path("d1")).unwrap();
}

//! Incremental backups on persistent dirty bitmaps, end to end on real
//! QEMU (reliability.md F-22..F-26).
//!
//! The oracle is the same as backup_e2e's: while shear holds the guest with
//! every filter in place, a `blockdev-backup sync=full` of each source node
//! copies the disk as it is at that instant; every restore must equal it
//! byte for byte. An incremental that lost a change would reuse a stale
//! chunk from its base and differ from the truth.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use shear_tests::shear::{
    report_of, run_ok, start_writer, stop_writer, take_truth_when_held, wait_reading,
    wait_truth_jobs, HeldHook, ShearEnv as Env,
};
use shear_tests::{require_guest, require_qemu, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A backup taken with the ground-truth hook: the report and one raw truth
/// image per disk.
struct Checked {
    report: Value,
    truths: Vec<PathBuf>,
}

impl Checked {
    fn id(&self) -> String {
        self.report["backup_id"].as_str().unwrap().to_string()
    }
    fn disk(&self, name: &str) -> &Value {
        self.report["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no disk {name} in {}", self.report))
    }
    fn kind(&self, name: &str) -> &str {
        self.disk(name)["kind"].as_str().unwrap()
    }
    fn reason(&self, name: &str) -> String {
        self.disk(name)["full_reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    fn read(&self, name: &str) -> u64 {
        self.disk(name)["bytes_read"].as_u64().unwrap()
    }
}

/// Back up with the truth hook (a guest must be running for snapshot mode
/// to freeze; a paused VM is backed up as it is).
fn backup_checked(env: &Env, vm: &mut TestVm, disks: &[&str], extra: &[&str]) -> Checked {
    let hook = HeldHook::new(env);
    let mut cmd = env.backup(vm, extra);
    hook.install(&mut cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let truths = take_truth_when_held(vm, &hook, &mut child, disks);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backup failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_truth_jobs(vm, disks);
    // Keep the truths past this VM (its directory goes with it).
    let truths = truths
        .into_iter()
        .map(|t| {
            let keep = env.dir.path().join(format!(
                "{}-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos(),
                t.file_name().unwrap().to_string_lossy()
            ));
            std::fs::rename(&t, &keep)
                .or_else(|_| std::fs::copy(&t, &keep).map(|_| ()))
                .unwrap();
            keep
        })
        .collect();
    let report = report_of(&out);
    eprintln!("report: {report:#}");
    Checked { report, truths }
}

/// Restore `b` and compare every disk with its truth, byte for byte.
fn assert_restores_to_truth(env: &Env, b: &Checked, disks: &[&str]) {
    let target = env
        .dir
        .path()
        .join(format!("restore-{}", b.id().replace('/', "_")));
    run_ok(env.shear(&[
        "restore",
        &b.id(),
        "--target",
        target.to_str().unwrap(),
        "--format",
        "raw",
    ]));
    for (d, truth) in disks.iter().zip(&b.truths) {
        let a = std::fs::read(target.join(format!("{d}.raw"))).unwrap();
        let t = std::fs::read(truth).unwrap();
        assert_eq!(a.len(), t.len(), "{d}: size");
        if let Some(pos) = a.iter().zip(&t).position(|(x, y)| x != y) {
            panic!(
                "{}: {d} differs from the truth at its freeze instant at byte {pos} \
                 (chunk {})",
                b.id(),
                pos as u64 / CHUNK
            );
        }
    }
    std::fs::remove_dir_all(&target).unwrap();
}

fn guest_write(vm: &TestVm, file: &str, mib: u64, seek_mib: u64) {
    vm.guest_sh(&format!(
        "dd if=/dev/urandom of={file} bs=1M count={mib} seek={seek_mib} conv=notrunc \
         2>/dev/null; sync"
    ))
    .unwrap();
}

fn round_up_chunks(bytes: u64) -> u64 {
    bytes.div_ceil(CHUNK) * CHUNK
}

/// An incremental read exactly the chunks its bitmap marked dirty: at least
/// what the test wrote, at most the dirty bytes rounded out to chunks (one
/// dirty byte captures its whole chunk), and far less than a full read.
fn assert_read_is_the_dirty_data(b: &Checked, disk: &str, wrote: u64, full_read: u64) {
    let d = b.disk(disk);
    let dirty = d["dirty_bytes"].as_u64().unwrap();
    let read = b.read(disk);
    assert!(dirty >= wrote, "{disk}: dirty {dirty} < written {wrote}");
    assert!(read >= wrote, "{disk}: read {read} < written {wrote}");
    // Each dirty 64 KiB granule can pull in one 4 MiB chunk.
    assert!(
        read <= round_up_chunks(dirty) + dirty / (64 << 10) * CHUNK,
        "{disk}: read {read} for {dirty} dirty bytes"
    );
    assert!(
        read * 2 < full_read,
        "{disk}: incremental read {read} is not much less than the full read {full_read}"
    );
    eprintln!("{disk}: wrote {wrote}, dirty {dirty}, read {read} (full {full_read})");
}

/// F-22/F-23: a guest that keeps writing across five backups (full,
/// incremental, a clean QEMU restart, a QEMU SIGKILL after a clean restart,
/// incremental): every
/// restore equals the truth at its freeze; a persistent (qcow2) bitmap
/// survives the clean restart; a raw disk's bitmap does not (full read,
/// said why); SIGKILL makes the bitmap inconsistent (full read, said why);
/// then prune everything but the newest incremental, gc, verify, restore.
#[test]
fn vm_incremental_chain_survives_restart_and_kill_f22_f23() {
    if !require_guest() {
        return;
    }
    let env = Env::new();
    let disks = ["d0", "d1"];
    let qcow = env.dir.path().join("d0.qcow2");
    let raw = env.dir.path().join("d1.raw");
    let cfg = VmConfig::guest()
        .disk(
            DiskSpec::qcow2("d0", 128 * MIB)
                .file("/seed.bin", &noise(48 << 20, 1))
                .image(&qcow),
        )
        .disk(
            DiskSpec::raw("d1", 64 * MIB)
                .file("/seed.bin", &noise(8 << 20, 2))
                .image(&raw),
        );
    let mounts = ["/mnt/vda", "/mnt/vdb"];
    let mut vm = TestVm::start_with(&cfg).unwrap();
    start_writer(&vm, &mounts);

    // 1: full (no bitmap yet).
    let b1 = backup_checked(&env, &mut vm, &disks, &[]);
    for d in disks {
        assert_eq!(b1.kind(d), "full");
        assert!(
            b1.reason(d).contains("no change-tracking bitmap"),
            "{}",
            b1.reason(d)
        );
    }
    assert_restores_to_truth(&env, &b1, &disks);
    let full_read = b1.read("d0");

    // 2: incremental on both (same QEMU process).
    guest_write(&vm, "/mnt/vda/new1", 4, 0);
    let b2 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b2.kind("d0"), "incremental", "{}", b2.report);
    assert_eq!(b2.kind("d1"), "incremental", "{}", b2.report);
    assert_eq!(b2.disk("d0")["base"], b1.id().as_str());
    assert_read_is_the_dirty_data(&b2, "d0", 4 * MIB, full_read);
    assert_restores_to_truth(&env, &b2, &disks);

    // 3: clean restart: the qcow2 bitmap persists, the raw one is gone.
    stop_writer(&vm);
    vm.shutdown().unwrap();
    drop(vm);
    let mut vm = TestVm::start_with(&cfg).unwrap();
    start_writer(&vm, &mounts);
    guest_write(&vm, "/mnt/vda/new2", 3, 0);
    let b3 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b3.kind("d0"), "incremental", "{}", b3.report);
    assert_eq!(b3.kind("d1"), "full");
    assert!(
        b3.reason("d1").contains("no change-tracking bitmap"),
        "{}",
        b3.reason("d1")
    );
    assert_read_is_the_dirty_data(&b3, "d0", 3 * MIB, full_read);
    assert_restores_to_truth(&env, &b3, &disks);

    // 4: QEMU SIGKILLed. A bitmap is stored in the qcow2 image when QEMU
    // closes it; one loaded from the image is marked in use, so after a
    // SIGKILL it loads inconsistent. So: a clean restart (b3's bitmap
    // stored), then SIGKILL, then start again.
    stop_writer(&vm);
    vm.shutdown().unwrap();
    drop(vm);
    let mut vm = TestVm::start_with(&cfg).unwrap();
    vm.kill();
    drop(vm);
    let mut vm = TestVm::start_with(&cfg).unwrap();
    start_writer(&vm, &mounts);
    let b4 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b4.kind("d0"), "full");
    assert!(
        b4.reason("d0").contains("inconsistent"),
        "{}",
        b4.reason("d0")
    );
    assert_restores_to_truth(&env, &b4, &disks);

    // 5: incremental again, by itself.
    guest_write(&vm, "/mnt/vda/new3", 2, 0);
    let b5 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b5.kind("d0"), "incremental", "{}", b5.report);
    assert_eq!(b5.kind("d1"), "incremental", "{}", b5.report);
    assert_eq!(
        b5.report["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w.as_str().unwrap_or("").contains("stale"))
            .count(),
        0
    );
    assert_restores_to_truth(&env, &b5, &disks);
    stop_writer(&vm);

    // Every backup is complete by itself: keep only the newest incremental.
    run_ok(env.shear(&["prune", "100", "--keep-last", "1"]));
    let left: Value =
        serde_json::from_slice(&run_ok(env.shear(&["list", "--json"])).stdout).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    run_ok(env.shear(&["gc"]));
    run_ok(env.shear(&["verify", "--all"]));
    assert_restores_to_truth(&env, &b5, &disks);
}

/// F-22: shear SIGKILLed in the read phase of an incremental. The next run
/// merges the split bitmap back (from the run record), so the next
/// incremental still holds every change since the last good backup.
#[test]
fn vm_incremental_after_sigkill_in_read_phase_loses_nothing_f22() {
    if !require_guest() {
        return;
    }
    let env = Env::new();
    let disks = ["d0"];
    let cfg = VmConfig::guest()
        .disk(DiskSpec::qcow2("d0", 128 * MIB).file("/seed.bin", &noise(24 << 20, 3)));
    let mut vm = TestVm::start_with(&cfg).unwrap();
    start_writer(&vm, &["/mnt/vda"]);
    let b1 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b1.kind("d0"), "full");

    // Changes the killed run would have taken.
    guest_write(&vm, "/mnt/vda/lost-if-not-merged", 6, 0);
    let mut cmd = env.backup(&vm, &["--bwlimit", "512"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    // The read phase: our export exists.
    wait_reading(&mut vm, &mut child, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    // More changes after the kill.
    guest_write(&vm, "/mnt/vda/after-kill", 2, 0);

    let b3 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b3.kind("d0"), "incremental", "{}", b3.report);
    assert_eq!(b3.disk("d0")["base"], b1.id().as_str());
    assert!(
        b3.disk("d0")["dirty_bytes"].as_u64().unwrap() >= 8 * MIB,
        "{}",
        b3.report
    );
    assert_restores_to_truth(&env, &b3, &disks);
    stop_writer(&vm);
}

/// Two repositories alternating backups of one VM keep two independent
/// chains: each backup after the first of its repository is incremental
/// against that repository's previous one, and every restore is exact.
#[test]
fn vm_two_repositories_keep_independent_chains() {
    if !require_guest() {
        return;
    }
    let a = Env::new();
    let b = Env::new();
    let disks = ["d0"];
    let cfg = VmConfig::guest()
        .disk(DiskSpec::qcow2("d0", 128 * MIB).file("/seed.bin", &noise(24 << 20, 4)));
    let mut vm = TestVm::start_with(&cfg).unwrap();
    start_writer(&vm, &["/mnt/vda"]);
    let a1 = backup_checked(&a, &mut vm, &disks, &[]);
    guest_write(&vm, "/mnt/vda/x", 2, 0);
    let b1 = backup_checked(&b, &mut vm, &disks, &[]);
    assert_eq!(a1.kind("d0"), "full");
    assert_eq!(
        b1.kind("d0"),
        "full",
        "B's first backup has no bitmap of B's yet"
    );
    guest_write(&vm, "/mnt/vda/y", 2, 0);
    let a2 = backup_checked(&a, &mut vm, &disks, &[]);
    guest_write(&vm, "/mnt/vda/z", 2, 0);
    let b2 = backup_checked(&b, &mut vm, &disks, &[]);
    guest_write(&vm, "/mnt/vda/w", 2, 0);
    let a3 = backup_checked(&a, &mut vm, &disks, &[]);
    for (env, x, base) in [(&a, &a2, &a1), (&b, &b2, &b1), (&a, &a3, &a2)] {
        assert_eq!(x.kind("d0"), "incremental", "{}", x.report);
        assert_eq!(x.disk("d0")["base"], base.id().as_str());
        assert_restores_to_truth(env, x, &disks);
    }
    // A's second incremental saw B's writes too (dirty since A's last).
    assert!(a2.disk("d0")["dirty_bytes"].as_u64().unwrap() >= 4 * MIB);
    stop_writer(&vm);
}

fn paused_vm(image: &Path) -> TestVm {
    TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 64 * MIB).image(image))).unwrap()
}

fn backup_json(env: &Env, vm: &TestVm, extra: &[&str]) -> Value {
    report_of(&run_ok(env.backup(vm, extra)))["disks"][0].clone()
}

fn write_pattern(vm: &mut TestVm, disk: &str, pattern: u8, offset_mib: u64, mib: u64) {
    vm.qemu_io(disk, &format!("write -P {pattern:#x} {offset_mib}M {mib}M"))
        .unwrap();
}

/// F-23/F-24/F-25 fallbacks, each with its reason, and incremental again
/// right after: `--full`; the bitmap removed by someone else; the base
/// pruned; the base failed verify; the disk resized. A foreign bitmap is
/// never touched. (QEMU paused, no guest: writes through qemu-io.)
#[test]
fn qemu_incremental_fallbacks_say_why_and_heal_f23_f24_f25() {
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    let image = env.dir.path().join("d0.qcow2");
    let mut vm = paused_vm(&image);
    let node = vm.disk_node("d0");
    vm.harness_qmp(
        "block-dirty-bitmap-add",
        json!({"node": node, "name": "foreign", "persistent": true}),
    )
    .unwrap();
    write_pattern(&mut vm, "d0", 0x11, 0, 16);
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "full");
    write_pattern(&mut vm, "d0", 0x22, 20, 1);
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "incremental", "{d}");
    // Only the dirty chunk is read, and only its allocated part.
    assert_eq!(d["bytes_read"], MIB, "the dirty MiB alone is read: {d}");
    assert_eq!(d["dirty_bytes"], MIB, "{d}");

    // --full: full read with the reason; tracking goes on.
    let d = backup_json(&env, &vm, &["--full"]);
    assert_eq!(d["kind"], "full");
    assert!(d["full_reason"].as_str().unwrap().contains("--full"), "{d}");
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "incremental", "{d}");

    // Someone removed our bitmap.
    let ours = bitmaps(&mut vm, &node)
        .into_iter()
        .find(|b| b.starts_with("shear-"))
        .unwrap();
    vm.harness_qmp(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": ours}),
    )
    .unwrap();
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "full");
    assert!(
        d["full_reason"]
            .as_str()
            .unwrap()
            .contains("no change-tracking bitmap"),
        "{d}"
    );
    assert_eq!(backup_json(&env, &vm, &[])["kind"], "incremental");

    // The base is pruned (forgotten).
    let list: Value =
        serde_json::from_slice(&run_ok(env.shear(&["list", "--json"])).stdout).unwrap();
    let newest = list.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    run_ok(env.shear(&["forget", &newest]));
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "full");
    assert!(
        d["full_reason"]
            .as_str()
            .unwrap()
            .contains("not in the repository"),
        "{d}"
    );

    // The base failed verify: damage one of its chunks.
    write_pattern(&mut vm, "d0", 0x33, 30, 4);
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "incremental", "{d}");
    damage_chunks(&env);
    let out = env.shear(&["verify", "--all"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "verify must find the damage");
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "full");
    assert!(
        d["full_reason"].as_str().unwrap().contains("failed verify"),
        "{d}"
    );

    // The disk grows.
    vm.harness_qmp("block_resize", json!({"node-name": node, "size": 80 * MIB}))
        .unwrap();
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "full");
    assert!(
        d["full_reason"].as_str().unwrap().contains("size changed"),
        "{d}"
    );
    let d = backup_json(&env, &vm, &[]);
    assert_eq!(d["kind"], "incremental", "{d}");

    // Never touched: the foreign bitmap; and only one bitmap of ours.
    let names = bitmaps(&mut vm, &node);
    assert!(names.iter().any(|n| n == "foreign"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.starts_with("shear-")).count(),
        1,
        "{names:?}"
    );
}

fn bitmaps(vm: &mut TestVm, node: &str) -> Vec<String> {
    let nodes = vm
        .harness_qmp("query-named-block-nodes", json!({}))
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .map(|n| {
            n["dirty-bitmaps"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Flip a byte in the middle of every stored chunk file (every backup,
/// the newest included, then fails verify).
fn damage_chunks(env: &Env) {
    let mut n = 0;
    for dir in std::fs::read_dir(env.repo().join("chunks")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            let mut bytes = std::fs::read(&f).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&f, bytes).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "no chunk to damage");
}

fn migrate(src: &mut TestVm, dst: &mut TestVm, sock: &Path, bitmaps: bool) {
    for vm in [&mut *src, &mut *dst] {
        vm.harness_qmp(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "dirty-bitmaps", "state": bitmaps}]}),
        )
        .unwrap();
    }
    src.harness_qmp(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    )
    .unwrap();
    shear_tests::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        "migration",
        || {
            let st = src.harness_qmp("query-migrate", json!({})).ok()?;
            match st["status"].as_str()? {
                "completed" => Some(Ok(())),
                "failed" | "cancelled" => Some(Err(format!("migration {st}"))),
                _ => None,
            }
        },
    )
    .unwrap()
    .unwrap();
    shear_tests::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "destination",
        || {
            let st = dst.harness_qmp("query-status", json!({})).ok()?;
            (st["status"] != "inmigrate").then_some(())
        },
    )
    .unwrap();
    // A migration ends with the destination running (its images become
    // active); this VM has no guest, it idles in the firmware.
    dst.harness_qmp("cont", json!({})).unwrap();
}

fn migration_target(disks: &[DiskSpec], sock: &Path) -> TestVm {
    let mut cfg = VmConfig::paused()
        .arg("-incoming")
        .arg(&format!("unix:{}", sock.display()));
    for d in disks {
        cfg = cfg.disk(d.clone());
    }
    TestVm::start(cfg).unwrap()
}

/// F-26(b): a VM live-migrated to another QEMU process keeps its change
/// tracking (the `dirty-bitmaps` capability carries the raw disk's
/// in-memory bitmap; the qcow2 disk's persistent one travels through the
/// shared image): the first backup on the destination is incremental and
/// exact. Migrated back without the capability, the raw disk's tracking is
/// lost: a full read that says why; the qcow2 disk stays incremental.
#[test]
fn qemu_incremental_survives_live_migration_f26() {
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    let disks = ["d0", "d1"];
    let specs = [
        DiskSpec::qcow2("d0", 64 * MIB).image(&env.dir.path().join("d0.qcow2")),
        DiskSpec::raw("d1", 32 * MIB).image(&env.dir.path().join("d1.raw")),
    ];
    let mut src = TestVm::start(
        VmConfig::paused()
            .disk(specs[0].clone())
            .disk(specs[1].clone()),
    )
    .unwrap();
    write_pattern(&mut src, "d0", 0x41, 0, 8);
    write_pattern(&mut src, "d1", 0x42, 0, 8);
    let b1 = backup_checked(&env, &mut src, &disks, &[]);
    assert_eq!(b1.kind("d0"), "full");
    write_pattern(&mut src, "d0", 0x43, 40, 2);
    write_pattern(&mut src, "d1", 0x44, 20, 1);

    let sock = env.dir.path().join("mig1.sock");
    let mut dst = migration_target(&specs, &sock);
    migrate(&mut src, &mut dst, &sock, true);
    drop(src);
    let b2 = backup_checked(&env, &mut dst, &disks, &[]);
    for d in disks {
        assert_eq!(
            b2.kind(d),
            "incremental",
            "{d} after migration: {}",
            b2.report
        );
    }
    assert_eq!(b2.disk("d0")["dirty_bytes"], 2 * MIB);
    assert_eq!(b2.disk("d1")["dirty_bytes"], MIB);
    assert_restores_to_truth(&env, &b2, &disks);

    // Back, without the capability.
    write_pattern(&mut dst, "d0", 0x45, 50, 1);
    write_pattern(&mut dst, "d1", 0x46, 24, 1);
    let sock = env.dir.path().join("mig2.sock");
    let mut back = migration_target(&specs, &sock);
    migrate(&mut dst, &mut back, &sock, false);
    drop(dst);
    let b3 = backup_checked(&env, &mut back, &disks, &[]);
    assert_eq!(b3.kind("d0"), "incremental", "{}", b3.report);
    assert_eq!(b3.kind("d1"), "full");
    assert!(
        b3.reason("d1").contains("no change-tracking bitmap"),
        "{}",
        b3.reason("d1")
    );
    assert_restores_to_truth(&env, &b3, &disks);
}

/// F-22 without a guest: shear SIGKILLed in the read phase of an
/// incremental, writes before and after; the next incremental restores to
/// the truth.
#[test]
fn qemu_incremental_after_sigkill_in_read_phase_loses_nothing_f22() {
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    let disks = ["d0"];
    let mut vm = paused_vm(&env.dir.path().join("d0.qcow2"));
    write_pattern(&mut vm, "d0", 0x11, 0, 24);
    let b1 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b1.kind("d0"), "full");
    write_pattern(&mut vm, "d0", 0x22, 1, 6);
    let mut cmd = env.backup(&vm, &["--bwlimit", "512"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    write_pattern(&mut vm, "d0", 0x33, 9, 2);
    write_pattern(&mut vm, "d0", 0x44, 0, 1);
    let b3 = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b3.kind("d0"), "incremental", "{}", b3.report);
    assert_eq!(b3.disk("d0")["dirty_bytes"], 9 * MIB, "{}", b3.report);
    assert_restores_to_truth(&env, &b3, &disks);
}

/// F-26(a): a live migration started while shear reads. QEMU must not
/// move the VM while shear's filter, snapshot and export sit on its disk:
/// the migration fails (the source keeps the VM, nothing crashes), the
/// backup is not harmed (it completes and restores to the truth), the
/// graph is clean afterwards, and a migration started then succeeds.
#[test]
fn qemu_migration_during_backup_fails_backup_unharmed_f26() {
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    let spec = DiskSpec::qcow2("d0", 32 * MIB).image(&env.dir.path().join("d0.qcow2"));
    let mut src = TestVm::start(VmConfig::paused().disk(spec.clone())).unwrap();
    write_pattern(&mut src, "d0", 0x51, 0, 12);
    let mut cmd = env.backup(&src, &["--bwlimit", "2048"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    wait_reading(&mut src, &mut child, Duration::from_secs(60));
    let sock = env.dir.path().join("mig-during.sock");
    let mut dst = migration_target(std::slice::from_ref(&spec), &sock);
    let started = src.harness_qmp(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    let outcome = shear_tests::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        "the migration to end",
        || {
            let st = src.harness_qmp("query-migrate", json!({})).ok()?;
            match st["status"].as_str()? {
                "completed" | "failed" | "cancelled" => Some(st),
                _ => None,
            }
        },
    );
    eprintln!("F-26(a): migrate {started:?} -> {outcome:?}");
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "F-26(a) backup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome = outcome.unwrap();
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert!(src.is_running(), "the source QEMU died");
    assert!(out.status.success(), "the backup was harmed");
    let r = report_of(&out);
    drop(dst);
    shear_tests::shear::assert_graph_clean(&mut src, &env, &["d0"]);
    let target = env.dir.path().join("restored");
    run_ok(env.shear(&[
        "restore",
        r["backup_id"].as_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--format",
        "raw",
    ]));
    let restored = std::fs::read(target.join("d0.raw")).unwrap();
    assert!(
        restored[..12 << 20].iter().all(|&b| b == 0x51),
        "the restore differs from the disk at the backup"
    );
    // Now the VM can move.
    let sock = env.dir.path().join("mig-after.sock");
    dst = migration_target(std::slice::from_ref(&spec), &sock);
    migrate(&mut src, &mut dst, &sock, true);
}

/// F-31 on a live backup (issue 16): shear SIGKILLed at durable steps while
/// it backs up a running QEMU (`SHEAR_TEST_KILL_AT`): in the data, while
/// the index is renamed into place, before the manifest (the commit point)
/// is durable, right after it, and while the run record is rewritten. After
/// each kill: shear really died of SIGKILL; the watchdog took the graph
/// back without a new run; the killed backup is listed only if its
/// manifest was durable; `verify --all` is clean; and the next backup
/// (incremental or full, with its reason) restores to the disk's state at
/// its freeze instant byte for byte (F-22: no change is lost).
#[test]
fn qemu_live_backup_killed_at_durable_steps_f31_f22() {
    use std::os::unix::process::ExitStatusExt;
    if !require_qemu() {
        return;
    }
    let env = Env::new();
    let disks = ["d0"];
    let mut vm = paused_vm(&env.dir.path().join("d0.qcow2"));
    write_pattern(&mut vm, "d0", 0x11, 0, 24);
    let b = backup_checked(&env, &mut vm, &disks, &[]);
    assert_eq!(b.kind("d0"), "full");
    let points = [
        ("chunk:fsync:2", false),
        ("index:rename:1", false),
        ("manifest:fsync:1", false),
        ("manifest:done:1", true),
        ("record:rename:2", false),
    ];
    for (i, (point, committed)) in points.into_iter().enumerate() {
        let pattern = 0x21 + u8::try_from(i).unwrap();
        // 10 MiB over three chunks, at a different place each round.
        write_pattern(&mut vm, "d0", pattern, 2 + 4 * (i as u64 % 4), 10);
        let before = env.list().len();
        let mut cmd = env.backup(&vm, &[]);
        cmd.env("SHEAR_TEST_KILL_AT", point)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: shear was not killed there ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        env.wait_record_gone(Duration::from_secs(30), point);
        shear_tests::shear::assert_graph_clean(&mut vm, &env, &disks);
        let listed = env.list().len();
        assert_eq!(
            listed,
            before + usize::from(committed),
            "{point}: the killed backup is listed iff its manifest was durable"
        );
        run_ok(env.shear(&["verify", "--all"]));
        let next = backup_checked(&env, &mut vm, &disks, &[]);
        eprintln!(
            "{point}: next backup {} ({})",
            next.kind("d0"),
            next.reason("d0")
        );
        assert_restores_to_truth(&env, &next, &disks);
    }
}

/// F-38 (lock lost: a stalled writer): a backup SIGSTOPped in its read
/// phase, past any lease a lock could have. shear's locks are flock locks
/// held by the living process, with no lease to expire, so nothing can
/// take them over while it is stalled: `forget` of the backup it builds on
/// is refused as busy, `gc` waits for it (bounded by `--wait`) and gives up
/// deleting nothing, and a forget of an unrelated backup is allowed. After
/// SIGCONT the backup commits, `verify --all` is clean, and every backup
/// restores to its data; a gc afterwards frees the forgotten backup's
/// chunks and leaves the rest verifiable.
#[test]
fn qemu_f38_stalled_writer_keeps_its_base_and_chunks_gc_waits() {
    if !require_qemu() {
        return;
    }
    /// SIGCONT and kill a stopped child if the test fails midway.
    struct Stopped(Option<std::process::Child>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = signal(c, "-CONT");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    fn signal(c: &std::process::Child, sig: &str) -> bool {
        std::process::Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }
    fn chunk_files(repo: &Path) -> usize {
        let mut n = 0;
        for d in std::fs::read_dir(repo.join("chunks")).unwrap() {
            n += std::fs::read_dir(d.unwrap().path()).unwrap().count();
        }
        n
    }
    let env = Env::new();
    let mut vm = paused_vm(&env.dir.path().join("d0.qcow2"));
    // b1: 0x11 over 16 MiB (unique chunks, freed once b1 is forgotten).
    write_pattern(&mut vm, "d0", 0x11, 0, 16);
    let b1 = report_of(&run_ok(env.backup(&vm, &[])))["backup_id"]
        .as_str()
        .unwrap()
        .to_string();
    // b2 (the base of b3): 0x22 over 24 MiB.
    write_pattern(&mut vm, "d0", 0x22, 0, 24);
    let b2 = report_of(&run_ok(env.backup(&vm, &[])))["backup_id"]
        .as_str()
        .unwrap()
        .to_string();
    write_pattern(&mut vm, "d0", 0x33, 32, 16);
    let repo = env.dir.path().join("repo");
    assert!(repo.join("chunks").is_dir(), "repository layout changed");
    let chunks_of_b1_b2 = chunk_files(&repo);
    let mut cmd = env.backup(&vm, &["--bwlimit", "1024"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    wait_reading(&mut vm, &mut child, Duration::from_secs(60));
    // Stop it once it stores data: its repository session (and the shared
    // lock on its base) is open by then; the export alone comes earlier.
    shear_tests::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        "the backup's first new chunk",
        || (chunk_files(&repo) > chunks_of_b1_b2).then_some(()),
    )
    .unwrap();
    let mut stalled = Stopped(Some(child));
    assert!(signal(stalled.0.as_ref().unwrap(), "-STOP"));
    let chunks_before = chunk_files(&repo);

    // The stalled writer's base cannot be forgotten.
    let out = env.shear(&["forget", &b2]).output().unwrap();
    assert!(
        !out.status.success(),
        "forget of the stalled writer's base succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("busy") || err.contains("in use") || err.contains("locked"),
        "{err}"
    );
    // An unrelated backup can.
    run_ok(env.shear(&["forget", &b1]));
    // GC cannot sweep under it: it waits (bounded) and deletes nothing.
    let t = std::time::Instant::now();
    let out = env.shear(&["gc", "--wait", "2"]).output().unwrap();
    let waited = t.elapsed();
    assert!(!out.status.success(), "gc swept under a stalled writer");
    assert!(
        waited >= Duration::from_secs(2),
        "gc did not wait: {waited:?}"
    );
    assert_eq!(chunk_files(&repo), chunks_before, "gc deleted chunks");

    let child = stalled.0.take().unwrap();
    assert!(signal(&child, "-CONT"));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the resumed backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b3 = report_of(&out)["backup_id"].as_str().unwrap().to_string();
    run_ok(env.shear(&["verify", "--all"]));
    // b1's only chunk (4 MiB of 0x11) is referenced by nothing now.
    let gc: Value =
        serde_json::from_slice(&run_ok(env.shear(&["gc", "--wait", "10", "--json"])).stdout)
            .unwrap();
    assert!(
        gc["chunks_removed"].as_u64().unwrap() >= 1,
        "gc freed nothing of b1: {gc}"
    );
    run_ok(env.shear(&["verify", "--all"]));
    for (id, expect) in [
        (&b2, vec![(0u64, 24u64, 0x22u8)]),
        (&b3, vec![(0, 24, 0x22), (32, 16, 0x33)]),
    ] {
        let target = env.dir.path().join(format!("r-{}", id.replace('/', "_")));
        run_ok(env.shear(&[
            "restore",
            id,
            "--target",
            target.to_str().unwrap(),
            "--format",
            "raw",
        ]));
        let img = std::fs::read(target.join("d0.raw")).unwrap();
        for (off, len, byte) in expect {
            let at = |mib: u64| usize::try_from(mib * MIB).unwrap();
            let r = &img[at(off)..at(off + len)];
            assert!(
                r.iter().all(|&b| b == byte),
                "{id}: {off}M+{len}M is not {byte:#x}"
            );
        }
    }
}

//! Issue 14: the real guest backed up to an S3 repository (a Garage node on
//! loopback, `tests/src/s3.rs`), full then incremental, each restored from
//! S3 byte-identical to the ground truth taken while shear held the guest
//! (the `SHEAR_TEST_FROZEN_HOOK` oracle of backup_e2e.rs), and
//! `verify --all` clean on the bucket.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use shear_tests::s3::Creds;
use shear_tests::shear::{
    assert_released_and_clean, report_of, run_ok, start_writer, stop_writer, take_truth_when_held,
    wait_truth_jobs, HeldHook, ShearEnv as Env,
};
use shear_tests::{e2fsck_clean, require_guest, shear_bin, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;
const REPO: &str = "s3://shear/vm-test";

/// The server's key and port.
type S3 = (Creds, u16);

/// `shear --repo s3://… ARGS` with the test's run dir and the server's
/// environment.
fn shear(env: &Env, s3: &S3, args: &[&str]) -> Command {
    let mut c = Command::new(shear_bin());
    c.args(["--repo", REPO]).args(args);
    c.env("SHEAR_RUN_DIR", env.run_dir());
    c.env("SHEAR_CONFIG", env.dir.path().join("no-config.toml"));
    c.env_remove("SHEAR_TEST_FROZEN_HOOK");
    for (k, v) in shear_tests::s3::env(&s3.0, s3.1, &env.dir.path().join("s3-cache")) {
        c.env(k, v);
    }
    c
}

/// A backup to S3 with the truth hook: (report, truth image of d0).
fn backup_checked(env: &Env, vm: &mut TestVm, s3: &S3, truth_name: &str) -> (Value, PathBuf) {
    let hook = HeldHook::new(env);
    let mut cmd = shear(env, s3, &["backup", "100", "--json"]);
    cmd.arg("--qmp").arg(vm.qmp_socket());
    cmd.arg("--qga").arg(vm.qga_socket());
    cmd.arg("--fleecing-dir").arg(env.fleece_dir());
    hook.install(&mut cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let truths = take_truth_when_held(vm, &hook, &mut child, &["d0"]);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backup to S3 failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_truth_jobs(vm, &["d0"]);
    // The next backup's truth goes to the same path: keep this one aside.
    let truth = env.dir.path().join(truth_name);
    std::fs::rename(&truths[0], &truth).unwrap();
    (report_of(&out), truth)
}

fn disk0(report: &Value) -> &Value {
    &report["disks"][0]
}

fn restore_and_compare(env: &Env, s3: &S3, id: &str, truth: &Path, dir: &str) {
    let target = env.dir.path().join(dir);
    std::fs::create_dir_all(&target).unwrap();
    run_ok(shear(
        env,
        s3,
        &[
            "restore",
            id,
            "--target",
            target.to_str().unwrap(),
            "--format",
            "raw",
        ],
    ));
    let restored = target.join("d0.raw");
    let a = std::fs::read(&restored).unwrap();
    let b = std::fs::read(truth).unwrap();
    assert_eq!(a.len(), b.len(), "{id}: size");
    if let Some(pos) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{id}: restored from S3, differs from the ground truth at byte {pos}");
    }
    e2fsck_clean(&restored).unwrap();
}

/// Full and incremental backups of the running guest (a writer churning
/// its disk) into an S3 bucket: both restore byte-identical to the truth
/// at their hold instants, the incremental reads only what changed, the
/// guest is released clean, `verify --all` on the bucket is clean and
/// `list` shows both.
#[test]
fn vm_s3_full_and_incremental_backup_restore_byte_identical_verify_clean() {
    if !require_guest() {
        return;
    }
    let Some(garage) = shear_tests::s3::start_garage() else {
        return;
    };
    let s3 = (garage.creds(), garage.port);
    let s3 = &s3;
    let env = Env::new();
    run_ok(shear(&env, s3, &["init"]));
    let mut vm = TestVm::start(
        VmConfig::guest().disk(DiskSpec::qcow2("d0", 64 * MIB).file("/seed.txt", b"s3")),
    )
    .unwrap();
    start_writer(&vm, &["/mnt/vda"]);

    let (full, truth_full) = backup_checked(&env, &mut vm, s3, "truth-full.raw");
    assert_eq!(disk0(&full)["kind"], "full", "{full}");
    vm.guest_sh("dd if=/dev/urandom of=/mnt/vda/more bs=1M count=4 conv=fsync 2>/dev/null")
        .unwrap();
    let (incr, truth_incr) = backup_checked(&env, &mut vm, s3, "truth-incr.raw");
    assert_eq!(disk0(&incr)["kind"], "incremental", "{incr}");
    let (full_read, incr_read) = (
        disk0(&full)["bytes_read"].as_u64().unwrap(),
        disk0(&incr)["bytes_read"].as_u64().unwrap(),
    );
    // The incremental read what the guest dirtied (4 MiB written, plus the
    // writer's churn), not the 64 MiB disk.
    let dirty = disk0(&incr)["dirty_bytes"].as_u64().unwrap();
    assert!(
        (4 * MIB..16 * MIB).contains(&dirty) && (4 * MIB..32 * MIB).contains(&incr_read),
        "incremental: dirty {dirty}, read {incr_read} (wrote 4 MiB; the full read {full_read})"
    );
    stop_writer(&vm);
    assert_released_and_clean(&mut vm, &env, &["d0"]);

    let ids: Vec<String> = [&full, &incr]
        .iter()
        .map(|r| r["backup_id"].as_str().unwrap().to_string())
        .collect();
    restore_and_compare(&env, s3, &ids[0], &truth_full, "restore-full");
    restore_and_compare(&env, s3, &ids[1], &truth_incr, "restore-incr");
    let v = run_ok(shear(&env, s3, &["verify", "--all", "--json"]));
    eprintln!("verify --all: {}", String::from_utf8_lossy(&v.stdout));
    let out = run_ok(shear(&env, s3, &["list", "100", "--json"]));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    eprintln!("full read {full_read} B, incremental read {incr_read} B; both restored from S3");
}

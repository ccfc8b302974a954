//! Issue 13 parts 3-4: `shear verify --boot` (a restore test that boots
//! the backup in an isolated QEMU and records the result beside the
//! manifest) and `shear files` (ls/cat/extract through a restore VM and
//! qemu-ga; the backed-up filesystem is never mounted on the host).
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use shear_tests::shear::{report_of, ShearEnv};
use shear_tests::{require_guest, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

/// A guest with an ext4 data disk holding hostile names, backed up
/// (application-consistent) as vm/100; the source VM is stopped after.
fn backed_up_guest(env: &ShearEnv) -> String {
    let mut vm = TestVm::start(
        VmConfig::guest()
            .disk(DiskSpec::raw("d0", 64 * MIB).file("hello.txt", b"hello from the backup\n")),
    )
    .unwrap();
    vm.guest_sh(
        "set -e; cd /mnt/vda; mkdir -p dir/sub; printf 'secret\\n' > \"dir/new\nline.txt\"; \
         printf deep > dir/sub/f; ln -s /etc/passwd dir/abs; ln -s ../../../../x dir/up; \
         ln -s sub/f dir/rel; printf dots > 'dir/..x'; sync",
    )
    .unwrap();
    let out = env.backup(&vm, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = report_of(&out)["backup_id"].as_str().unwrap().to_owned();
    vm.shutdown().unwrap();
    id
}

fn manifest_path(env: &ShearEnv, id: &str) -> PathBuf {
    // vm/100/<time> → backups/vm/100/<time>/manifest.blob
    env.repo().join("backups").join(id).join("manifest.blob")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn listed_restore_test(env: &ShearEnv) -> Value {
    let out = env.shear(&["list", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["restore_test"].clone()
}

#[test]
fn vm_verify_boot_good_backup_records_ok_and_panicking_kernel_fails_clearly() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let id = backed_up_guest(&env);
    let manifest = std::fs::read(manifest_path(&env, &id)).unwrap();

    // Good: boots from the recorded kernel/initrd, qemu-ga answers, the
    // backup's ext4 disk is seen and the probe reads the backed-up file.
    let t = Instant::now();
    let out = env
        .shear(&[
            "verify",
            "--boot",
            &id,
            "--accel",
            "tcg",
            "--memory",
            "256",
            "--timeout",
            "180",
            "--probe",
            "cat /mnt/vda/hello.txt; echo probe-ran >&2",
            "--json",
        ])
        .output()
        .unwrap();
    let took = t.elapsed();
    eprintln!("verify --boot (good) took {took:?}");
    assert!(out.status.success(), "{}", text(&out));
    let rec: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["state"], "ok", "{rec}");
    assert_eq!(rec["boot"], "kernel");
    assert_eq!(rec["accel"], "tcg");
    let ping = rec["ping_ms"].as_u64().unwrap();
    assert!(ping > 0 && u128::from(ping) < took.as_millis(), "{rec}");
    eprintln!("verify --boot: guest agent answered after {ping} ms");
    assert!(
        rec["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "vda" && f["type"] == "ext4" && f["mountpoint"] == "/mnt/vda"),
        "{rec}"
    );
    assert_eq!(rec["probe"]["exit_code"], 0, "{rec}");
    assert_eq!(rec["probe"]["stdout"], "hello from the backup\n", "{rec}");
    assert_eq!(rec["probe"]["stderr"], "probe-ran\n", "{rec}");
    // Recorded beside the manifest, which is unchanged (immutable).
    assert_eq!(listed_restore_test(&env)["state"], "ok");
    let list = env.shear(&["list"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("last restore test: ok"),
        "{}",
        text(&list)
    );
    let show = env.shear(&["show", &id]).output().unwrap();
    let show_text = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(
        show_text.contains("restore test restore test of") && show_text.contains(": ok at"),
        "{}",
        text(&show)
    );
    assert_eq!(std::fs::read(manifest_path(&env, &id)).unwrap(), manifest);
    // Nothing of the throw-away VM is left (its QEMU was killed, its
    // directory removed).
    let out = env.shear(&["verify", &id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Broken: a kernel command line whose init cannot run panics the
    // kernel; the test fails clearly (exit 2) and the record says why.
    let t = Instant::now();
    let out = env
        .shear(&[
            "verify",
            "--boot",
            &id,
            "--accel",
            "tcg",
            "--memory",
            "256",
            "--timeout",
            "180",
            "--append",
            "console=ttyS0 panic=-1 rdinit=/no/such/init root=/dev/nonexistent",
        ])
        .output()
        .unwrap();
    eprintln!("verify --boot (broken) took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains(": failed at"), "{}", text(&out));
    let rec = listed_restore_test(&env);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert!(rec["ping_ms"].is_null(), "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("Kernel panic") || reason.contains("panicked"),
        "reason: {reason}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "a panicking guest must fail fast, not at the deadline"
    );
    assert_eq!(std::fs::read(manifest_path(&env, &id)).unwrap(), manifest);
}

#[test]
fn vm_files_ls_cat_extract_hostile_names_stay_inside() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let id = backed_up_guest(&env);
    let guest = shear_tests::guest_image().unwrap();
    let rvm = guest.kernel.parent().unwrap().to_owned();
    let files = |args: &[&str]| {
        let mut c = env.shear(&["files", &id, "d0"]);
        c.args(["--accel", "tcg", "--memory", "256", "--timeout", "180"]);
        c.arg("--restore-vm").arg(&rvm);
        c.args(args);
        let t = Instant::now();
        let out = c.output().unwrap();
        eprintln!("files {args:?} took {:?}", t.elapsed());
        out
    };

    let out = files(&["ls", "/dir", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for want in ["new\nline.txt", "sub", "abs", "up", "rel", "..x"] {
        assert!(names.contains(&want), "{want:?} missing from {names:?}");
    }
    let abs = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "abs")
        .unwrap();
    assert_eq!(abs["target"], "/etc/passwd");

    let out = files(&["cat", "/hello.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, b"hello from the backup\n");

    let to = env.dir.path().join("extracted");
    let out = files(&["extract", "/dir", "--to", to.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(to.join("new\nline.txt")).unwrap(),
        b"secret\n"
    );
    assert_eq!(std::fs::read(to.join("sub/f")).unwrap(), b"deep");
    assert_eq!(std::fs::read(to.join("..x")).unwrap(), b"dots");
    // The inside symlink is kept; the absolute and escaping ones are not.
    assert_eq!(
        std::fs::read_link(to.join("rel")).unwrap(),
        PathBuf::from("sub/f")
    );
    std::fs::symlink_metadata(to.join("abs")).unwrap_err();
    std::fs::symlink_metadata(to.join("up")).unwrap_err();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("abs -> /etc/passwd (leads outside)"),
        "{stderr}"
    );
    // Nothing was written beside the target.
    let mut beside: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    beside.sort();
    assert!(!beside.iter().any(|n| n == "x"), "{beside:?}");
}

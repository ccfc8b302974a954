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

/// A guest with an ext4 data disk holding `hello.txt`, backed up
/// (application-consistent) as vm/100; the source VM is stopped after.
fn backed_up_guest(env: &ShearEnv) -> String {
    let mut vm = TestVm::start(
        VmConfig::guest()
            .disk(DiskSpec::raw("d0", 64 * MIB).file("hello.txt", b"hello from the backup\n")),
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

/// The private directory of the restore VM a `verify --boot` started
/// under `tmp`, once its console log exists (60 s at most).
fn restore_vm_dir(tmp: &std::path::Path) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = std::fs::read_dir(tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("console.log").exists());
        if let Some(d) = found {
            return d;
        }
        assert!(Instant::now() < deadline, "no restore VM started");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    // With `--accel auto`: where /dev/kvm opens but cannot run a guest (the
    // project machines: broken nested KVM), the KVM guest shows no progress
    // and the VM is restarted under TCG within --kvm-stall seconds instead
    // of hanging until --timeout.
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let t = Instant::now();
    let out = env
        .shear(&[
            "verify",
            "--boot",
            &id,
            "--accel",
            "auto",
            "--kvm-stall",
            "10",
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
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match rec["accel"].as_str() {
        // KVM works here: no fallback.
        Some("kvm") => assert!(rec["accel_fallback"].is_null(), "{rec}"),
        Some("tcg") if kvm_opens => {
            // KVM opened but ran nothing: one clear line, recorded.
            let why = rec["accel_fallback"].as_str().unwrap_or_default();
            assert!(
                why.contains("no progress within 10 s") && why.contains("TCG"),
                "{rec}"
            );
            assert_eq!(
                stderr
                    .lines()
                    .filter(|l| l.contains("no progress within"))
                    .count(),
                1,
                "{}",
                text(&out)
            );
            eprintln!("verify --boot --accel auto fell back to TCG: {why}");
        }
        // No usable /dev/kvm: QEMU itself took TCG, nothing to fall back from.
        Some("tcg") => assert!(rec["accel_fallback"].is_null(), "{rec}"),
        other => panic!("accelerator {other:?}: {rec}"),
    }
    assert!(
        took < Duration::from_secs(10 + 180),
        "bounded by --kvm-stall + --timeout"
    );
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
    // `shear report` shows the last restore test per VM.
    let d = env.dir.path();
    let cfg = d.join("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            "run_dir = \"{d}/run\"\nstate_dir = \"{d}/state\"\nfleecing_dir = \"{d}/fleece\"\n\
             [api]\nsocket = \"{d}/api.sock\"\n[[job]]\nid = \"j\"\nschedule = \"daily\"\n\
             enabled = false\nvmids = [\"100\"]\nrepo = \"{repo}\"\nkeep = {{ last = 1 }}\n",
            d = d.display(),
            repo = env.repo().display()
        ),
    )
    .unwrap();
    let out = env
        .shear(&["report", "--json", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep[0]["vmid"], "100", "{rep}");
    assert_eq!(rep[0]["last_restore_test_state"], "failed", "{rep}");
    assert!(rep[0]["last_restore_test"].as_i64().is_some(), "{rep}");

    // SIGTERM mid-boot: QEMU is killed, the private directory removed,
    // and nothing is recorded (an interruption says nothing of the backup).
    let tmp = env.dir.path().join("rtmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut c = env.shear(&["verify", "--boot", &id, "--accel", "tcg", "--memory", "256"]);
    c.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &tmp);
    let mut child = c.spawn().unwrap();
    let vmdir = restore_vm_dir(&tmp);
    std::thread::sleep(Duration::from_millis(500));
    let qemu_running = |dir: &std::path::Path| {
        std::fs::read_dir("/proc").unwrap().any(|e| {
            let p = e.unwrap().path().join("cmdline");
            std::fs::read(p)
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        })
    };
    assert!(qemu_running(&vmdir), "the restore VM's QEMU is not running");
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(1), "{st}");
    assert!(!vmdir.exists(), "the restore VM's directory was left");
    assert!(
        !qemu_running(&vmdir),
        "the restore VM's QEMU was left running"
    );
    assert_eq!(
        listed_restore_test(&env),
        rec,
        "an interrupted test was recorded"
    );

    // SIGKILL mid-boot (issue 13): shear cannot clean up, but its restore
    // VM must not outlive it (QEMU carries a parent-death SIGKILL).
    let mut c = env.shear(&["verify", "--boot", &id, "--accel", "tcg", "--memory", "256"]);
    c.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &tmp);
    let mut child = c.spawn().unwrap();
    let vmdir = restore_vm_dir(&tmp);
    std::thread::sleep(Duration::from_millis(500));
    assert!(qemu_running(&vmdir), "the restore VM's QEMU is not running");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_running(&vmdir) {
        assert!(
            Instant::now() < deadline,
            "the restore VM's QEMU outlived the SIGKILLed shear by 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(listed_restore_test(&env), rec, "a killed test was recorded");
}

/// An MBR-partitioned raw disk whose partition 1 (at 1 MiB) is ext4
/// with hostile names (made on the host by `mkfs.ext4 -d`), backed up from
/// a paused QEMU (no guest needed) as vm/100.
fn backed_up_partitioned_image(env: &ShearEnv) -> String {
    use std::os::unix::fs::symlink;
    let stg = env.dir.path().join("staging");
    std::fs::create_dir_all(stg.join("dir/sub")).unwrap();
    std::fs::write(stg.join("hello.txt"), b"hello from the backup\n").unwrap();
    std::fs::write(stg.join("dir/new\nline.txt"), b"secret\n").unwrap();
    std::fs::write(stg.join("dir/sub/f"), b"deep").unwrap();
    std::fs::write(stg.join("dir/..x"), b"dots").unwrap();
    symlink("/etc/passwd", stg.join("dir/abs")).unwrap();
    symlink("../../../../x", stg.join("dir/up")).unwrap();
    symlink("sub/f", stg.join("dir/rel")).unwrap();
    let img = env.dir.path().join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576,root_owner=0:0", "-d"])
        .arg(&stg)
        .arg(&img)
        .arg("62M")
        .status()
        .unwrap();
    assert!(st.success());
    // The MBR: one Linux partition from sector 2048 to the end.
    let mut mbr = [0u8; 512];
    let e = &mut mbr[446..462];
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = 0x83;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&u32::try_from(64 * MIB / 512 - 2048).unwrap().to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(&mbr).unwrap();
    }
    // d0: garbage (no boot signature) for the disk-boot failure; d1: the
    // partitioned ext4 disk.
    let garbage = env.dir.path().join("garbage.raw");
    let junk: Vec<u8> = (0..MIB)
        .map(|i| u8::try_from((i * 7 + 13) % 256).unwrap())
        .collect();
    std::fs::write(&garbage, junk).unwrap();
    let vm = TestVm::start(
        VmConfig::paused()
            .disk(DiskSpec::raw("d0", MIB).image(&garbage))
            .disk(DiskSpec::raw("d1", 64 * MIB).image(&img)),
    )
    .unwrap();
    let out = env.backup(&vm, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    report_of(&out)["backup_id"].as_str().unwrap().to_owned()
}

#[test]
fn vm_files_ls_cat_extract_hostile_names_stay_inside() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let id = backed_up_partitioned_image(&env);
    let guest = shear_tests::guest_image().unwrap();
    let rvm = guest.kernel.parent().unwrap().to_owned();
    let files = |args: &[&str]| {
        let mut c = env.shear(&["files", &id, "d1"]);
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

    // cat follows a symlink inside the backed-up filesystem…
    let out = files(&["cat", "/dir/rel"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, b"deep");
    // …but never out of it (an absolute link would name the restore VM's
    // own /etc/passwd).
    let out = files(&["cat", "/dir/abs"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(out.stdout.is_empty(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("not a regular file inside the backed-up filesystem"),
        "{}",
        text(&out)
    );

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

    // A backup whose first disk does not boot (garbage, no boot
    // signature) fails the restore test clearly and fast, not at the
    // deadline.
    let t = Instant::now();
    let out = env
        .shear(&[
            "verify",
            "--boot",
            &id,
            "--boot-disk",
            "--accel",
            "tcg",
            "--memory",
            "256",
            "--timeout",
            "180",
        ])
        .output()
        .unwrap();
    eprintln!("verify --boot --boot-disk (garbage) took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let rec = listed_restore_test(&env);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["boot"], "disk", "{rec}");
    assert!(rec["ping_ms"].is_null(), "{rec}");
    assert!(
        rec["reason"].as_str().unwrap().contains("QEMU exited"),
        "{rec}"
    );
    assert!(t.elapsed() < Duration::from_secs(120), "{rec}");
}

//! The demo behind `scripts/demo`: boot the bundled tiny VM (TCG) with a
//! data disk full of real files and a writer running, take live backups
//! with the `shear` binary, list, verify, restore, and compare.
//!
//! Everything it runs is printed as the shell command a user would type.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shear_tests::{debugfs_cat, e2fsck_clean, DiskSpec, TestVm, VmConfig};

const GIB: u64 = 1 << 30;

fn main() {
    if let Err(e) = run() {
        eprintln!("demo FAILED: {e}");
        std::process::exit(1);
    }
}

fn shear_bin() -> PathBuf {
    std::env::var_os("SHEAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| shear_tests::workspace_root().join("target/release/shear"))
}

/// Run `shear args…`, echoing the command and its output.
fn shear(repo: &Path, run_dir: &Path, args: &[&str]) -> Result<String, String> {
    let mut shown = vec![
        "shear".to_string(),
        "--repo".into(),
        repo.display().to_string(),
    ];
    shown.extend(args.iter().map(|a| {
        if a.contains([' ', '{', '(']) {
            format!("'{a}'")
        } else {
            a.to_string()
        }
    }));
    println!("\n$ {}", shown.join(" "));
    let out = Command::new(shear_bin())
        .arg("--repo")
        .arg(repo)
        .args(args)
        .env("SHEAR_RUN_DIR", run_dir)
        .env("SHEAR_CONFIG", "/nonexistent/shear.toml")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", shear_bin().display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!(
            "shear {} exited with {}",
            args.join(" "),
            out.status
        ));
    }
    Ok(stdout)
}

/// Real files from the host for the demo disk: documentation and shared
/// libraries (a realistic mix), up to `budget` bytes.
fn host_files(budget: u64) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut stack = vec![
        PathBuf::from("/usr/share/doc"),
        PathBuf::from("/usr/lib/x86_64-linux-gnu"),
    ];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let Ok(data) = std::fs::read(&p) else {
                    continue;
                };
                total += data.len() as u64;
                if total > budget {
                    return files;
                }
                files.push((format!("/host{}", p.display()), data));
            }
        }
    }
    files
}

fn run() -> Result<(), String> {
    let demo = shear_tests::workspace_root().join("build/demo");
    let _ = std::fs::remove_dir_all(&demo);
    std::fs::create_dir_all(&demo).map_err(|e| e.to_string())?;
    let repo = demo.join("repo");
    let run_dir = demo.join("run");
    let restore = demo.join("restore");

    println!("== shear demo: live backup of a running VM ==");
    let files = host_files(160 << 20);
    let mut random = vec![0u8; 32 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for b in random.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed.to_le_bytes()[3];
    }
    let mut disk = DiskSpec::qcow2("scsi0", GIB).scsi();
    for (name, data) in &files {
        disk = disk.file(name, data);
    }
    disk = disk.file("/random.bin", &random);
    println!(
        "booting VM 100 under TCG: 128 MiB RAM, 1 GiB qcow2 data disk with {} host files + 32 MiB random",
        files.len()
    );
    // Named and with a pidfile where qemu-server keeps them, as on a
    // Proxmox host: shear checks the socket is VM 100's and the notes get
    // the guest's name.
    let pid_dir = demo.join("qemu-server");
    std::fs::create_dir_all(&pid_dir).map_err(|e| e.to_string())?;
    let pidfile = pid_dir.join("100.pid").display().to_string();
    let vm = TestVm::start(
        VmConfig::guest()
            .disk(disk)
            .arg("-name")
            .arg("demo")
            .arg("-pidfile")
            .arg(&pidfile),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "qemu-ga answered {:.2} s after QEMU started; sockets: {} {}",
        vm.boot_time().unwrap_or_default().as_secs_f64(),
        vm.qmp_socket().display(),
        vm.qga_socket().display()
    );
    vm.guest_sh(
        "(sh -c 'i=0; while :; do i=$((i+1)); echo $i > /mnt/sda/counter; \
         dd if=/dev/urandom of=/mnt/sda/churn bs=4k count=8 seek=$((i % 256)) conv=notrunc 2>/dev/null; \
         sync; done' </dev/null >/dev/null 2>&1 &); true",
    )
    .map_err(|e| e.to_string())?;
    println!("writer running in the guest (a counter and 32 KiB of churn per round, synced)");
    std::thread::sleep(Duration::from_secs(1));

    shear(&repo, &run_dir, &["init"])?;
    let qmp = vm.qmp_socket().display().to_string();
    let qga = vm.qga_socket().display().to_string();
    let fleece = demo.join("fleece").display().to_string();
    let backup_args = [
        "backup",
        "100",
        "--qmp",
        &qmp,
        "--qga",
        &qga,
        "--fleecing-dir",
        &fleece,
        "--notes-template",
        "{{guestname}} ({{vmid}}) on {{node}}",
    ];
    let t = Instant::now();
    shear(&repo, &run_dir, &backup_args)?;
    println!("(first backup: {:.2} s wall)", t.elapsed().as_secs_f64());
    println!("\nthe guest keeps writing; a second backup stores only what changed:");
    let mut json_args = backup_args.to_vec();
    json_args.push("--json");
    let second = shear(&repo, &run_dir, &json_args)?;
    let report: Value = serde_json::from_str(&second).map_err(|e| e.to_string())?;
    let id = report[0]["backup_id"]
        .as_str()
        .ok_or("no backup id in the report")?
        .to_string();

    shear(&repo, &run_dir, &["list", "100"])?;
    shear(&repo, &run_dir, &["verify", "--all"])?;
    std::fs::create_dir_all(&restore).map_err(|e| e.to_string())?;
    shear(
        &repo,
        &run_dir,
        &[
            "restore",
            &id,
            "--target",
            &restore.display().to_string(),
            "--format",
            "qcow2",
        ],
    )?;

    println!("\ncomparing the restored disk with what the guest had:");
    let img = restore.join("scsi0.qcow2");
    e2fsck_clean(&img).map_err(|e| e.to_string())?;
    println!("  e2fsck -fn: clean (the backup was taken with the filesystem frozen)");
    let mut same = 0;
    for (name, data) in files.iter().step_by(files.len().div_ceil(50).max(1)) {
        let back = debugfs_cat(&img, name).map_err(|e| e.to_string())?;
        if &back != data {
            return Err(format!("{name} differs after restore"));
        }
        same += 1;
    }
    if debugfs_cat(&img, "/random.bin").map_err(|e| e.to_string())? != random {
        return Err("/random.bin differs after restore".into());
    }
    let counter = debugfs_cat(&img, "/counter").map_err(|e| e.to_string())?;
    println!(
        "  {same} sampled host files and /random.bin are byte-identical; the writer's counter was at {}",
        String::from_utf8_lossy(&counter).trim()
    );
    let live = vm
        .guest_sh("cat /mnt/sda/counter")
        .map_err(|e| e.to_string())?;
    println!(
        "  (the live guest has moved on to {}: the backup is one instant)",
        live.trim()
    );
    println!("\ndemo finished: files in {}", demo.display());
    Ok(())
}

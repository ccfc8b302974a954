//! `shear hook libvirt …` and `shear hook pve …` (issue 11 §4), invoked as
//! the hypervisor would: the hook returns within a bound, and the
//! background offline backup (qemu-nbd -r + the --nbd path) appears in the
//! repository and restores byte-identical. PVE's pre-start refuses a VM
//! without a recent enough backup.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shear_tests::shear::{run_ok, ShearEnv};
use shear_tests::{require_tool, wait_until};

/// What a hook may take at most (it must not block the hypervisor).
const HOOK_BOUND: Duration = Duration::from_secs(3);

fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join("vm.qcow2");
    run_ok({
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("16M");
        c
    });
    run_ok({
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2", "-c", "write -P 0x7e 2M 3M"])
            .arg(&img);
        c
    });
    let raw = dir.join("want.raw");
    run_ok({
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-O", "raw"]).arg(&img).arg(&raw);
        c
    });
    (img, std::fs::read(&raw).unwrap())
}

fn config(env: &ShearEnv, body: &str) {
    std::fs::write(env.dir.path().join("no-config.toml"), body).unwrap();
}

fn wait_backup_and_check(env: &ShearEnv, vmid: &str, disk: &str, want: &[u8]) {
    let list = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the background backup",
        || {
            let out = run_ok(env.shear(&["list", vmid, "--json"]));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v.as_array().filter(|a| !a.is_empty()).cloned()
        },
    )
    .unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    let target = env.dir.path().join("restored");
    run_ok({
        let mut c = env.shear(&[
            "restore", &id, "--format", "raw", "--disk", disk, "--target",
        ]);
        c.arg(&target);
        c
    });
    let got = std::fs::read(target.join(format!("{disk}.raw"))).unwrap();
    assert!(got == want, "restored image differs from the source");
}

#[test]
fn qemu_libvirt_release_hook_returns_at_once_and_backs_up_offline() {
    if !["qemu-nbd", "qemu-img", "qemu-io"]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    let env = ShearEnv::new();
    let (img, want) = image(env.dir.path());
    config(&env, "[hooks]\nbackup_on = [\"release\"]\n");
    let xml = format!(
        "<domain type='kvm'><name>web1</name><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><target dev='sda'/></disk>\
         </devices></domain>",
        img.display()
    );
    let t0 = Instant::now();
    let mut child = env
        .shear(&["hook", "libvirt", "web1", "release", "end", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < HOOK_BOUND, "the hook blocked for {took:?}");
    wait_backup_and_check(&env, "web1", "vda", &want);
}

#[test]
fn qemu_pve_hookscript_refuses_start_then_backs_up_post_stop() {
    if !["qemu-nbd", "qemu-img", "qemu-io"]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    let env = ShearEnv::new();
    let (img, want) = image(env.dir.path());
    let pve = env.dir.path().join("qemu-server");
    std::fs::create_dir_all(&pve).unwrap();
    std::fs::write(
        pve.join("100.conf"),
        format!(
            "boot: order=scsi0\nide2: none,media=cdrom\nscsi0: {},size=16M\n[snap]\nscsi1: x:y\n",
            img.display()
        ),
    )
    .unwrap();
    config(
        &env,
        &format!(
            "[hooks]\nbackup_on = [\"post-stop\"]\nrefuse_start_if_backup_older_than = \"48h\"\n\
             pve_config_dir = \"{}\"\n",
            pve.display()
        ),
    );
    // No backup yet: pre-start refuses, saying why.
    let out = env
        .shear(&["hook", "pve", "100", "pre-start"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("refusing to start VM 100") && msg.contains("no good backup"),
        "{msg}"
    );
    // Phases not configured do nothing.
    run_ok(env.shear(&["hook", "pve", "100", "post-start"]));
    let t0 = Instant::now();
    run_ok(env.shear(&["hook", "pve", "100", "post-stop"]));
    assert!(
        t0.elapsed() < HOOK_BOUND,
        "the hook blocked for {:?}",
        t0.elapsed()
    );
    wait_backup_and_check(&env, "100", "scsi0", &want);
    // A fresh backup: pre-start lets the VM start.
    run_ok(env.shear(&["hook", "pve", "100", "pre-start"]));
}

//! The VM's definition, captured into every backup (inside the manifest,
//! an encrypted blob like the rest): a disk image without the VM that used
//! it is half a restore.
//!
//! Captured, each when available:
//! - QEMU's view from QMP: name, version, CPUs, memory, target, disks;
//! - the QEMU process's full command line (the QMP peer's pid, from
//!   SO_PEERCRED, → `/proc/PID/cmdline`);
//! - the Proxmox config file (`pve_config` in shear.toml, default
//!   `/etc/pve/qemu-server/<vmid>.conf`);
//! - the libvirt domain XML (`virsh dumpxml`), when the QEMU command line
//!   says libvirt started it and `virsh` is installed.
//!
//! Everything here is best effort and bounded: a missing piece is `null`,
//! never a failed backup.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::graph::VmDisk;

/// Largest config file or XML captured.
const MAX_TEXT: u64 = 1 << 20;
/// How long `virsh dumpxml` may take.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Capture the definition of the VM behind `qmp`.
pub async fn capture(qmp: &qmp::Qmp, disks: &[VmDisk], pve_config: &Path) -> Value {
    let q = |cmd: &'static str| async move {
        qmp.execute_value(cmd, Value::Null)
            .await
            .unwrap_or(Value::Null)
    };
    let pid = qmp.peer_pid();
    let cmdline = pid.and_then(super::identity::cmdline_of);
    let libvirt_xml = match cmdline.as_deref().and_then(libvirt_domain) {
        Some(domain) => virsh_dumpxml(&domain).await,
        None => None,
    };
    let mut types = Vec::with_capacity(disks.len());
    for d in disks {
        types.push(device_type(qmp, &d.qdev).await);
    }
    json!({
        "name": q("query-name").await,
        "version": q("query-version").await,
        "cpus": q("query-cpus-fast").await,
        "memory": q("query-memory-size-summary").await,
        "machine": q("query-target").await,
        "disks": disks.iter().zip(&types).map(|(d, t)| json!({
            "name": d.name, "device": d.device, "qdev": d.qdev, "node": d.node,
            "format": d.format, "filename": d.filename, "virtual-size": d.virtual_size,
            "read-only": d.read_only, "type": t,
        })).collect::<Vec<_>>(),
        "qemu_pid": pid,
        "cmdline": cmdline,
        "pve_config": read_text(pve_config).map(|text| json!({
            "path": pve_config, "text": text,
        })),
        "libvirt_xml": libvirt_xml,
    })
}

/// The qdev type of a disk's device (`virtio-blk-pci`, `scsi-hd`,
/// `ide-hd`…): for virtio, the proxy's type (the qdev path QEMU reports is
/// its inner `virtio-backend`). `None` when QEMU does not say.
async fn device_type(qmp: &qmp::Qmp, qdev: &str) -> Option<String> {
    let path = qdev.strip_suffix("/virtio-backend").unwrap_or(qdev);
    qmp.qom_get(path, "type")
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

fn read_text(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_TEXT)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// libvirt starts QEMU with `-name guest=DOMAIN,debug-threads=on`.
fn libvirt_domain(argv: &[String]) -> Option<String> {
    let i = argv.iter().position(|a| a == "-name")?;
    let v = argv.get(i + 1)?;
    v.split(',')
        .find_map(|kv| kv.strip_prefix("guest="))
        .map(str::to_string)
        .filter(|_| argv.iter().any(|a| a.contains("libvirt")))
}

async fn virsh_dumpxml(domain: &str) -> Option<String> {
    let out = tokio::time::timeout(
        VIRSH_TIMEOUT,
        tokio::process::Command::new("virsh")
            .args(["dumpxml", domain])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Options of a captured command line that cannot be reused for a restored
/// VM: sockets and fds of the old process, its pidfile, daemonising, an
/// incoming migration.
const NOT_REUSABLE: &[&str] = &[
    "-qmp",
    "-mon",
    "-chardev",
    "-pidfile",
    "-daemonize",
    "-incoming",
    "-runas",
    "-sandbox",
];

/// The captured QEMU command line adapted to restored disks: each
/// original image path replaced by its restored file, and the options that
/// cannot be reused dropped. Returns the argv and what was dropped.
pub fn adapt_cmdline(argv: &[String], restored: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        let takes_value = i + 1 < argv.len() && !argv[i + 1].starts_with('-');
        let netdev_fd = (a == "-netdev" || a == "-device")
            && argv.get(i + 1).is_some_and(|v| v.contains("fd="));
        // Character devices on the old host's files and sockets.
        let old_path = ["-serial", "-monitor", "-parallel", "-vnc"].contains(&a.as_str())
            && argv
                .get(i + 1)
                .is_some_and(|v| v.starts_with("unix:") || v.starts_with("file:"));
        if NOT_REUSABLE.contains(&a.as_str()) || netdev_fd || old_path {
            let v = if takes_value { argv.get(i + 1) } else { None };
            dropped.push(match v {
                Some(v) => format!("{a} {v}"),
                None => a.clone(),
            });
            i += if takes_value { 2 } else { 1 };
            continue;
        }
        let mut w = a.clone();
        for (orig, new) in restored {
            if !orig.is_empty() {
                w = w.replace(orig.as_str(), new);
            }
        }
        out.push(w);
        i += 1;
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn cmdline_is_adapted_to_restored_disks() {
        let a = argv(
            "qemu-system-x86_64 -name guest=web,debug-threads=on -qmp unix:/run/x.qmp,server=on \
             -drive file=/var/lib/vz/images/100/vm-100-disk-0.qcow2,if=none,id=drive-scsi0 \
             -netdev type=tap,id=n0,fd=23 -pidfile /run/100.pid -daemonize \
             -serial unix:/run/100.serial,server=on -m 2048",
        );
        let (out, dropped) = adapt_cmdline(
            &a,
            &[(
                "/var/lib/vz/images/100/vm-100-disk-0.qcow2".into(),
                "/restore/scsi0.qcow2".into(),
            )],
        );
        let joined = out.join(" ");
        assert!(
            joined.contains("file=/restore/scsi0.qcow2,if=none"),
            "{joined}"
        );
        assert!(
            !joined.contains("-qmp") && !joined.contains("-pidfile"),
            "{joined}"
        );
        assert!(
            !joined.contains("fd=23") && !joined.contains("-daemonize"),
            "{joined}"
        );
        assert!(joined.ends_with("-m 2048"), "{joined}");
        assert_eq!(dropped.len(), 5, "{dropped:?}");
    }

    #[test]
    fn libvirt_domains_are_recognised_by_their_command_line() {
        let a = argv("/usr/bin/qemu-system-x86_64 -name guest=db1,debug-threads=on -S -object {\"qom-type\":\"secret\",\"file\":\"/var/lib/libvirt/qemu/domain-1-db1/master-key.aes\"}");
        assert_eq!(libvirt_domain(&a).as_deref(), Some("db1"));
        assert_eq!(libvirt_domain(&argv("qemu -name guest=db1")), None);
    }
}

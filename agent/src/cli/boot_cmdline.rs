//! The QEMU command line printed after a restore: the restored disks on the
//! buses they had, with the memory and CPU count the manifest recorded.

use std::path::Path;

use serde_json::Value;

/// Quote a word for a POSIX shell when it needs it.
pub(super) fn sh_quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:@+".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// One restored disk: its name, file and format.
#[derive(Debug, Clone)]
pub struct RestoredDisk<'a> {
    /// Disk name (the qdev id it had).
    pub name: &'a str,
    /// Restored image.
    pub path: &'a Path,
    /// `raw` or `qcow2`.
    pub format: &'a str,
}

/// The argv of a QEMU invocation that boots the restored disks.
pub fn qemu_argv(vm_config: &Value, disks: &[RestoredDisk<'_>]) -> Vec<String> {
    let mem_mib = vm_config["memory"]["base-memory"]
        .as_u64()
        .map_or(1024, |b| (b >> 20).max(64));
    let cpus = vm_config["cpus"].as_array().map_or(1, |c| c.len().max(1));
    let mut argv: Vec<String> = ["qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg", "-m"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(mem_mib.to_string());
    argv.push("-smp".into());
    argv.push(cpus.to_string());
    let mut scsi = false;
    for d in disks {
        let qdev = vm_config["disks"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == d.name))
            .and_then(|x| x["qdev"].as_str())
            .unwrap_or("");
        let node = format!("drive-{}", d.name);
        argv.push("-blockdev".into());
        argv.push(format!(
            "driver=file,filename={},node-name=file-{}",
            d.path.display(),
            d.name
        ));
        argv.push("-blockdev".into());
        argv.push(format!(
            "driver={},file=file-{},node-name={node}",
            d.format, d.name
        ));
        argv.push("-device".into());
        if qdev.ends_with("/virtio-backend") || qdev.is_empty() {
            argv.push(format!("virtio-blk-pci,id={},drive={node}", d.name));
        } else {
            if !scsi {
                argv.push("virtio-scsi-pci,id=restored-scsi".into());
                argv.push("-device".into());
                scsi = true;
            }
            argv.push(format!(
                "scsi-hd,id={},drive={node},bus=restored-scsi.0",
                d.name
            ));
        }
    }
    argv
}

/// The command line as one shell-quoted string.
pub fn qemu_command(vm_config: &Value, disks: &[RestoredDisk<'_>]) -> String {
    qemu_argv(vm_config, disks)
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_line_keeps_buses_memory_and_cpus() {
        let cfg = json!({
            "memory": {"base-memory": 134217728u64},
            "cpus": [{}, {}],
            "disks": [
                {"name": "d0", "qdev": "/machine/peripheral/d0/virtio-backend"},
                {"name": "scsi0", "qdev": "scsi0"},
            ],
        });
        let disks = [
            RestoredDisk {
                name: "d0",
                path: Path::new("/r/d0.qcow2"),
                format: "qcow2",
            },
            RestoredDisk {
                name: "scsi0",
                path: Path::new("/r dir/scsi0.raw"),
                format: "raw",
            },
        ];
        let cmd = qemu_command(&cfg, &disks);
        assert!(
            cmd.starts_with("qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 128 -smp 2 "),
            "{cmd}"
        );
        assert!(
            cmd.contains("-device virtio-blk-pci,id=d0,drive=drive-d0"),
            "{cmd}"
        );
        assert!(
            cmd.contains("'driver=file,filename=/r dir/scsi0.raw,node-name=file-scsi0'"),
            "{cmd}"
        );
        assert!(
            cmd.contains("-device virtio-scsi-pci,id=restored-scsi -device scsi-hd,id=scsi0"),
            "{cmd}"
        );
    }
}

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

/// How a restored disk is attached: the device type it had (from the
/// captured definition's `type`, else the captured command line's
/// `-device`, else guessed from its qdev path) and whether it was
/// read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// qdev driver to use (`virtio-blk-pci`, `scsi-hd`, `ide-hd`, `nvme`).
    pub device: String,
    /// The disk was read-only: attached with `read-only=on`.
    pub read_only: bool,
}

/// The attachment of disk `name` as the captured `vm_config` describes it.
pub fn attachment(vm_config: &Value, name: &str) -> Attachment {
    let d = vm_config["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name));
    let field = |k: &str| d.and_then(|d| d[k].as_str()).unwrap_or("");
    let read_only = d.is_some_and(|d| d["read-only"].as_bool() == Some(true));
    let captured = Some(field("type"))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .or_else(|| device_in_cmdline(vm_config, &[name, field("device"), field("node")], name));
    let qdev = field("qdev");
    let device = match captured.as_deref() {
        // The virtio proxy's inner device, and every virtio-blk transport,
        // boot as virtio-blk-pci.
        Some(t) if t.starts_with("virtio-blk") => "virtio-blk-pci",
        // SCSI passthrough of a host device cannot be: the image is a disk.
        Some("scsi-hd" | "scsi-block" | "scsi-generic" | "scsi-disk") => "scsi-hd",
        Some("ide-hd" | "ide-drive") => "ide-hd",
        // A CD-ROM backed up with --include-cdrom goes back in a drive.
        Some("ide-cd") => "ide-cd",
        Some("scsi-cd") => "scsi-cd",
        Some("nvme" | "nvme-ns") => "nvme",
        Some("usb-storage") => "usb-storage",
        Some(_) | None if qdev.ends_with("/virtio-backend") || qdev.is_empty() => "virtio-blk-pci",
        Some(_) | None => "scsi-hd",
    };
    Attachment {
        device: device.to_string(),
        // A CD-ROM medium is read-only whatever QEMU said of its node.
        read_only: read_only || device.ends_with("-cd"),
    }
}

/// The driver of the captured command line's `-device` whose `drive=` is
/// one of `drives` or whose `id=` is `id` (`-device TYPE,k=v…` or its JSON
/// form).
fn device_in_cmdline(vm_config: &Value, drives: &[&str], id: &str) -> Option<String> {
    let argv = vm_config["cmdline"].as_array()?;
    let mut it = argv.iter().filter_map(Value::as_str);
    while let Some(a) = it.next() {
        if a != "-device" {
            continue;
        }
        let v = it.next()?;
        let (driver, props): (String, Vec<(String, String)>) = if v.starts_with('{') {
            let j: Value = serde_json::from_str(v).ok()?;
            let props = j
                .as_object()?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_string)))
                .collect();
            (j["driver"].as_str()?.to_string(), props)
        } else {
            let mut parts = v.split(',');
            let driver = parts.next()?.to_string();
            let props = parts
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (driver, props)
        };
        let matches = props.iter().any(|(k, v)| {
            (k == "drive" && drives.iter().any(|d| !d.is_empty() && d == v))
                || (k == "id" && v == id)
        });
        if matches {
            return Some(driver);
        }
    }
    None
}

/// The argv of a QEMU invocation that boots the restored disks: each on
/// the device type it had, read-only when it was.
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
    let mut usb = false;
    let mut ide_port = 0u32;
    for d in disks {
        let at = attachment(vm_config, d.name);
        let node = format!("drive-{}", d.name);
        let ro = if at.read_only { ",read-only=on" } else { "" };
        argv.push("-blockdev".into());
        argv.push(format!(
            "driver=file,filename={},node-name=file-{}{ro}",
            d.path.display(),
            d.name
        ));
        argv.push("-blockdev".into());
        argv.push(format!(
            "driver={},file=file-{},node-name={node}{ro}",
            d.format, d.name
        ));
        let name = d.name;
        let device = match at.device.as_str() {
            t @ ("scsi-hd" | "scsi-cd") => {
                if !scsi {
                    argv.push("-device".into());
                    argv.push("virtio-scsi-pci,id=restored-scsi".into());
                    scsi = true;
                }
                format!("{t},id={name},drive={node},bus=restored-scsi.0")
            }
            t @ ("ide-hd" | "ide-cd") => {
                // q35's AHCI controller: ports ide.0 … ide.5.
                let dev = format!("{t},id={name},drive={node},bus=ide.{ide_port}");
                ide_port += 1;
                dev
            }
            "nvme" => format!("nvme,id={name},drive={node},serial={name}"),
            "usb-storage" => {
                if !usb {
                    argv.push("-device".into());
                    argv.push("qemu-xhci,id=restored-usb".into());
                    usb = true;
                }
                format!("usb-storage,id={name},drive={node},bus=restored-usb.0")
            }
            _ => format!("virtio-blk-pci,id={name},drive={node}"),
        };
        argv.push("-device".into());
        argv.push(device);
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
    fn device_types_and_read_only_come_from_the_definition() {
        // Captured types (new backups), and the command line's -device for
        // a backup captured before types were recorded.
        let cfg = json!({
            "disks": [
                {"name": "virtio0", "qdev": "/machine/peripheral/virtio0/virtio-backend",
                 "type": "virtio-blk-pci", "read-only": true},
                {"name": "scsi0", "qdev": "scsi0", "type": "scsi-hd", "read-only": false},
                {"name": "sata0", "qdev": "sata0", "device": "drive-sata0", "node": "#block1"},
                {"name": "n0", "qdev": "/machine/peripheral/n0", "node": "drv-n0"},
            ],
            "cmdline": ["qemu-system-x86_64", "-drive", "file=/x,if=none,id=drive-sata0",
                        "-device", "ide-hd,id=sata0,drive=drive-sata0,bus=ide.2",
                        "-device", "{\"driver\":\"nvme\",\"drive\":\"drv-n0\",\"serial\":\"a\"}"],
        });
        let a = |n: &str| attachment(&cfg, n);
        assert_eq!(a("virtio0").device, "virtio-blk-pci");
        assert!(a("virtio0").read_only);
        assert_eq!(a("scsi0").device, "scsi-hd");
        assert!(!a("scsi0").read_only);
        assert_eq!(a("sata0").device, "ide-hd");
        assert_eq!(a("n0").device, "nvme");
        let disks: Vec<RestoredDisk<'_>> = ["virtio0", "scsi0", "sata0"]
            .iter()
            .map(|n| RestoredDisk {
                name: n,
                path: Path::new("/r/x.raw"),
                format: "raw",
            })
            .collect();
        let cmd = qemu_command(&cfg, &disks);
        assert!(
            cmd.contains("node-name=file-virtio0,read-only=on")
                && cmd.contains("node-name=drive-virtio0,read-only=on"),
            "{cmd}"
        );
        assert!(!cmd.contains("file-scsi0,read-only"), "{cmd}");
        assert!(
            cmd.contains("-device ide-hd,id=sata0,drive=drive-sata0,bus=ide.0"),
            "{cmd}"
        );
        assert!(
            cmd.contains("-device scsi-hd,id=scsi0,drive=drive-scsi0,bus=restored-scsi.0"),
            "{cmd}"
        );
    }

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

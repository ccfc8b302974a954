//! `shear backup` of disks attached the way Proxmox VE 8 and libvirt attach
//! them: a legacy `-drive file=…,if=none,id=drive-<id>` plus a device with
//! `drive=drive-<id>`, on virtio-blk, virtio-scsi and SATA (AHCI), with and
//! without an iothread, raw and qcow2, next to a CD-ROM with an ISO.
//!
//! For such a disk `qom-get <qdev> drive` answers the BlockBackend name
//! (`drive-scsi0`), never the node: teardown that decided "is the device on
//! our filter" from it left the copy-before-write filter in the guest's
//! write path after a "successful" backup, and every later backup failed
//! with "node is in use" (issue 16). CD-ROMs are not disks of the VM.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use shear_tests::shear::{assert_released_and_clean, report_of, run_ok, ShearEnv};
use shear_tests::{require_guest, DiskFormat, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

/// A raw image of `size` bytes with random data in a few ranges (and holes
/// between them), converted to `format`.
fn make_image(dir: &Path, id: &str, size: u64, format: DiskFormat) -> PathBuf {
    use std::io::{Read, Seek, SeekFrom, Write};
    let raw = dir.join(format!("{id}.src.raw"));
    let mut f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    let mut rnd = std::fs::File::open("/dev/urandom").unwrap();
    for (off, len) in [(0, MIB), (5 * MIB + 4096, MIB / 2), (size - MIB, MIB)] {
        let mut buf = vec![0u8; usize::try_from(len).unwrap()];
        rnd.read_exact(&mut buf).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&buf).unwrap();
    }
    drop(f);
    if format == DiskFormat::Raw {
        return raw;
    }
    let out = dir.join(format!("{id}.src.qcow2"));
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&raw).unwrap();
    out
}

/// The guest-visible bytes of `image` (raw or qcow2), read while QEMU may
/// still hold it open (`-U`: the data are static).
fn raw_bytes(image: &Path, tmp: &Path) -> Vec<u8> {
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-U", "-O", "raw"])
        .arg(image)
        .arg(tmp)
        .status()
        .unwrap();
    assert!(st.success());
    let b = std::fs::read(tmp).unwrap();
    std::fs::remove_file(tmp).unwrap();
    b
}

/// How a layout attaches its disk.
type Attach = fn(DiskSpec) -> DiskSpec;

fn disk_names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// One booted guest with six legacy-attached devices; two backups in a row.
#[test]
fn vm_legacy_drive_layouts_backup_twice_restore_identical_cdrom_skipped() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let img_dir = env.dir.path().join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    // (id, spec): every layout of issue 16.
    let layouts: Vec<(&str, DiskFormat, Attach)> = vec![
        // virtio-blk, qcow2, iothread (Proxmox `virtio0` with iothread=1)
        ("virtio0", DiskFormat::Qcow2, |d| d.iothread()),
        // virtio-blk, raw, no iothread
        ("virtio1", DiskFormat::Raw, |d| d),
        // scsi-hd on virtio-scsi with an iothread (Proxmox `scsi0`)
        ("scsi0", DiskFormat::Qcow2, |d| d.scsi().iothread()),
        ("scsi1", DiskFormat::Raw, |d| d.scsi()),
        // ide-hd on the AHCI controller (Proxmox `sata0`)
        ("sata0", DiskFormat::Qcow2, |d| d.ide()),
    ];
    let mut cfg = VmConfig::guest();
    let mut sources = Vec::new();
    for (id, format, attach) in &layouts {
        let src = make_image(&img_dir, id, 8 * MIB, *format);
        let spec = match format {
            DiskFormat::Qcow2 => DiskSpec::qcow2(id, 8 * MIB),
            DiskFormat::Raw => DiskSpec::raw(id, 8 * MIB),
        };
        cfg = cfg.disk(attach(spec.image(&src).legacy()));
        sources.push((*id, src));
    }
    // The CD-ROM (Proxmox `ide2` with an installer ISO).
    let iso = make_image(&img_dir, "ide2", 2 * MIB, DiskFormat::Raw);
    cfg = cfg.disk(DiskSpec::cdrom("ide2", &iso));
    let mut vm = TestVm::start(cfg).unwrap();
    let ids: Vec<&str> = layouts.iter().map(|l| l.0).collect();
    for id in &ids {
        assert!(vm.is_legacy(id));
        eprintln!("{id}: qdev {} node {}", vm.qdev(id), vm.disk_node(id));
    }
    let mut expected: Vec<String> = ids.iter().map(|s| (*s).to_string()).collect();
    expected.sort();

    let mut backups = Vec::new();
    for round in 1..=2 {
        let out = run_ok(env.backup(&vm, &[]));
        let r = report_of(&out);
        eprintln!("backup {round}: {r:#}");
        let warnings = r["warnings"].to_string();
        assert!(
            !warnings.contains("teardown"),
            "backup {round}: teardown trouble: {warnings}"
        );
        assert!(
            warnings.contains("CD-ROM ide2"),
            "backup {round}: the skipped CD-ROM is not reported: {warnings}"
        );
        assert_eq!(disk_names(&r), expected, "backup {round}: {r}");
        // Every device is back on its original node; nothing of ours left.
        assert_released_and_clean(&mut vm, &env, &ids);
        let cd = vm.qdev("ide2");
        assert!(
            vm.current_node(&cd).unwrap().is_some(),
            "the CD-ROM lost its medium"
        );
        backups.push(r);
    }
    // Same static data, same image digests.
    for (a, b) in backups[0]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(backups[1]["disks"].as_array().unwrap())
    {
        assert_eq!(a["name"], b["name"]);
        assert_eq!(a["image_digest"], b["image_digest"], "{a} / {b}");
    }
    let id = backups[1]["backup_id"].as_str().unwrap().to_string();
    let show = run_ok(env.shear(&["show", &id, "--json"]));
    let manifest: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(disk_names(&manifest), expected, "manifest: {manifest}");

    // The restored disks equal the sources byte for byte (the data are
    // static: the guest neither mounts nor writes these disks).
    let target = env.dir.path().join("restore");
    std::fs::create_dir_all(&target).unwrap();
    run_ok(env.shear(&[
        "restore",
        &id,
        "--target",
        target.to_str().unwrap(),
        "--format",
        "raw",
    ]));
    let tmp = env.dir.path().join("src.raw");
    for (d, src) in &sources {
        let want = raw_bytes(src, &tmp);
        let got = std::fs::read(target.join(format!("{d}.raw"))).unwrap();
        assert_eq!(got.len(), want.len(), "{d}: size");
        if let Some(pos) = got.iter().zip(&want).position(|(x, y)| x != y) {
            panic!("{d}: restored image differs from the source at byte {pos}");
        }
    }
    assert!(!target.join("ide2.raw").exists(), "the CD-ROM was restored");
    // A guest write after two backups reaches the disk (no filter left in
    // the write path) and is seen by the next reader.
    vm.qemu_io("scsi0", "write -P 0x5a 0 64k").unwrap();
    let qdev = vm.qdev("scsi0");
    assert_eq!(vm.current_node(&qdev).unwrap(), Some(vm.disk_node("scsi0")));
}

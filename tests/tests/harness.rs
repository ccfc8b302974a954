//! The harness itself against real QEMU and the real tiny guest: boot and
//! ping, freeze/thaw through qemu-ga, a guest write seen on the host, and
//! the paused no-guest mode with host-side writes.

use std::time::Duration;

use serde_json::json;
use shear_tests::{
    debugfs_cat, e2fsck_clean, require_guest, require_qemu, DiskSpec, TestVm, VmConfig,
};

const MIB: u64 = 1 << 20;
const MIBU: usize = 1 << 20;

#[test]
fn vm_boot_and_guest_ping() {
    if !require_guest() {
        return;
    }
    let vm = TestVm::start(VmConfig::guest().disk(DiskSpec::raw("d0", 64 * MIB).ext4())).unwrap();
    let t = vm.boot_time().expect("boot time measured");
    eprintln!(
        "boot: QEMU start -> qemu-ga ready in {:.2} s",
        t.as_secs_f64()
    );
    assert!(t < Duration::from_secs(120));
    assert_eq!(vm.qga("guest-ping", json!(null)).unwrap(), json!({}));
    let info = vm.qga("guest-info", json!(null)).unwrap();
    assert!(
        info["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{info}"
    );
    // The data disk is mounted read-write in the guest.
    let mounts = vm.guest_sh("cat /proc/mounts").unwrap();
    assert!(mounts.contains("/dev/vda /mnt/vda ext4 rw"), "{mounts}");
}

#[test]
fn vm_fsfreeze_freeze_and_thaw_change_status() {
    if !require_guest() {
        return;
    }
    let vm = TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 64 * MIB).ext4())).unwrap();
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "thawed"
    );
    let frozen = vm.qga("guest-fsfreeze-freeze", json!(null)).unwrap();
    assert!(
        frozen.as_i64().is_some_and(|n| n >= 1),
        "froze {frozen} filesystems"
    );
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "frozen"
    );
    // While frozen qemu-ga refuses everything but a few commands.
    vm.qga("guest-get-fsinfo", json!(null)).unwrap_err();
    let thawed = vm.qga("guest-fsfreeze-thaw", json!(null)).unwrap();
    assert_eq!(thawed, frozen);
    assert_eq!(
        vm.qga("guest-fsfreeze-status", json!(null)).unwrap(),
        "thawed"
    );
}

#[test]
fn vm_guest_write_is_on_the_host_image_after_shutdown() {
    if !require_guest() {
        return;
    }
    for disk in [
        DiskSpec::raw("d0", 64 * MIB),
        DiskSpec::qcow2("d0", 64 * MIB).scsi(),
    ] {
        let mut vm =
            TestVm::start(VmConfig::guest().disk(disk.file("/seed.txt", b"from the host\n")))
                .unwrap();
        let dev = if vm.qdev("d0").contains("virtio") {
            "vda"
        } else {
            "sda"
        };
        let seen = vm.guest_sh(&format!("cat /mnt/{dev}/seed.txt")).unwrap();
        assert_eq!(seen, "from the host\n");
        vm.guest_sh(&format!(
            "echo 'written in the guest' > /mnt/{dev}/hello.txt && sync"
        ))
        .unwrap();
        vm.shutdown().unwrap();
        let img = vm.disk_path("d0");
        assert_eq!(
            debugfs_cat(&img, "/hello.txt").unwrap(),
            b"written in the guest\n"
        );
        e2fsck_clean(&img).unwrap();
    }
}

#[test]
fn qemu_paused_mode_host_side_write_lands_on_disk() {
    if !require_qemu() {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 16 * MIB))).unwrap();
    let status = vm.harness_qmp("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "prelaunch");
    vm.qemu_io("d0", "write -P 0xab 1M 64k").unwrap();
    vm.qemu_io("d0", "read -P 0xab 1M 64k").unwrap();
    // A pattern mismatch is reported as an error.
    vm.qemu_io("d0", "read -P 0xcd 1M 64k").unwrap_err();
    // A write past the end is an error, and the harness reports it.
    vm.qemu_io("d0", "write -P 0xab 32M 64k").unwrap_err();
    vm.shutdown().unwrap();
    let raw = vm.dir().join("d0.raw");
    shear_tests::disk::to_raw(&vm.disk_path("d0"), &raw).unwrap();
    let data = std::fs::read(&raw).unwrap();
    assert!(data[MIBU..MIBU + 65536].iter().all(|&b| b == 0xab));
    assert!(data[..MIBU].iter().all(|&b| b == 0));
}

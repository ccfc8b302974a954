//! Issue 19, against real QEMU: a restore gives back what each disk was (a
//! read-only disk stays read-only, scsi-hd stays scsi-hd, virtio-blk stays
//! virtio-blk, ide-hd stays ide-hd), and QEMU starts from the printed boot
//! line; and an
//! encrypted repository sealed to a master key is restored byte-identical
//! after its key file and passphrase are lost, with `shear backup` (not the
//! library) writing the backup.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shear_tests::shear::{assert_graph_clean, report_of, run_ok, ShearEnv};
use shear_tests::wire::HarnessQmp;
use shear_tests::{require_qemu, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;
const KPW: &str = "everyday key passphrase";
const MPW: &str = "offline master passphrase";

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The guest-visible bytes of `image` (raw or qcow2), read while QEMU may
/// hold it (`-U`; the VM is paused, the data are static).
fn guest_bytes(image: &Path, tmp: &Path) -> Vec<u8> {
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

/// Kills the QEMU started from the printed line, whatever happens.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_restore_keeps_read_only_and_device_types_boots_and_master_key_recovers() {
    if !require_qemu() {
        return;
    }
    let env = ShearEnv::new();
    let p = |n: &str| env.dir.path().join(n).to_str().unwrap().to_string();
    let (mkey, mpub, key) = (p("master.key"), p("master.pub"), p("key.json"));
    let fast = ["--kdf-memory-kib", "64", "--kdf-passes", "1"];
    let with_pw = |mut c: Command, pw: &str| {
        c.env("SHEAR_KEY_PASSPHRASE", pw)
            .env("SHEAR_MASTER_PASSPHRASE", MPW)
            .stdin(Stdio::null());
        c
    };

    // An encrypted repository sealed to a master key (replacing the plain
    // one ShearEnv made).
    std::fs::remove_dir_all(env.repo()).unwrap();
    let mut a = vec!["key", "create-master", &mkey, &mpub];
    a.extend(fast);
    run_ok(with_pw(env.shear(&a), KPW));
    let mut a = vec!["key", "create", &key, "--master-pubkey", &mpub];
    a.extend(fast);
    run_ok(with_pw(env.shear(&a), KPW));
    let out = run_ok(with_pw(env.shear(&["--keyfile", &key, "init"]), KPW));
    assert!(
        text(&out).contains("sealed the key to master key"),
        "init did not take the key file's seal: {}",
        text(&out)
    );

    // A paused VM: a read-only virtio-blk disk (legacy -drive, readonly=on),
    // a scsi-hd (legacy, qcow2) and a virtio-blk (-blockdev, raw).
    let img_dir = env.dir.path().join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    let ro_image = img_dir.join("virtio0.raw");
    let mut ro_bytes = vec![0u8; usize::try_from(8 * MIB).unwrap()];
    for (i, b) in ro_bytes.iter_mut().enumerate().take(3 << 20) {
        *b = u8::try_from(i % 251).unwrap();
    }
    std::fs::write(&ro_image, &ro_bytes).unwrap();
    // A CD-ROM with an "ISO", backed up on request (--include-cdrom).
    let iso = img_dir.join("install.iso");
    let iso_bytes: Vec<u8> = (0..2 * MIB)
        .map(|i| u8::try_from(i % 239).unwrap())
        .collect();
    std::fs::write(&iso, &iso_bytes).unwrap();
    let mut vm = TestVm::start(
        VmConfig::paused()
            .disk(
                DiskSpec::raw("virtio0", 8 * MIB)
                    .image(&ro_image)
                    .legacy()
                    .read_only(),
            )
            .disk(DiskSpec::qcow2("scsi0", 16 * MIB).legacy().scsi())
            .disk(DiskSpec::raw("virtio1", 8 * MIB))
            .disk(DiskSpec::raw("sata0", 4 * MIB).legacy().ide())
            .disk(DiskSpec::cdrom("ide2", &iso)),
    )
    .unwrap();
    vm.qemu_io("scsi0", "write -P 0x5c 1M 3M").unwrap();
    vm.qemu_io("virtio1", "write -P 0xc5 0 2M").unwrap();
    vm.qemu_io("sata0", "write -P 0x17 1M 1M").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    let out = run_ok(with_pw(
        env.backup_with(
            &vm,
            &no_agent,
            &env.fleece_dir(),
            &["--keyfile", &key, "--include-cdrom"],
        ),
        KPW,
    ));
    let id = report_of(&out)["backup_id"].as_str().unwrap().to_string();
    // Every device, the CD-ROM drive included, is back on its own node.
    assert_graph_clean(
        &mut vm,
        &env,
        &["virtio0", "scsi0", "virtio1", "sata0", "ide2"],
    );

    // The truth, read while the VM is paused.
    let tmp = env.dir.path().join("truth.raw");
    let mut truth: Vec<(&str, Vec<u8>)> = ["virtio0", "scsi0", "virtio1", "sata0"]
        .iter()
        .map(|d| (*d, guest_bytes(&vm.disk_path(d), &tmp)))
        .collect();
    truth.push(("ide2", iso_bytes));
    assert_eq!(truth[0].1, ro_bytes);
    drop(vm);

    // The key file and its passphrase are lost; the master key recovers a
    // new key file from the repository's seal.
    std::fs::remove_file(&key).unwrap();
    let newkey = p("recovered.json");
    let mut a = vec!["key", "recover", &newkey, "--master-key", &mkey];
    a.extend(fast);
    let out = run_ok(with_pw(env.shear(&a), "a brand new passphrase"));
    assert!(text(&out).contains("recovered key"), "{}", text(&out));

    // Restore with the recovered key: byte-identical, each disk on its
    // device type, the read-only one read-only.
    let target = env.dir.path().join("restore");
    let mut c = env.shear(&["--keyfile", &newkey, "restore", &id, "--target"]);
    c.arg(&target);
    let out = run_ok(with_pw(c, "a brand new passphrase"));
    let said = text(&out);
    eprintln!("{said}");
    for (d, want) in &truth {
        let got = std::fs::read(target.join(format!("{d}.raw"))).unwrap();
        assert!(got == *want, "restored {d} differs from the backed-up VM");
    }
    assert!(
        said.contains("disk virtio0 attaches as virtio-blk-pci, read-only"),
        "{said}"
    );
    assert!(said.contains("disk scsi0 attaches as scsi-hd\n"), "{said}");
    assert!(
        said.contains("disk virtio1 attaches as virtio-blk-pci\n"),
        "{said}"
    );
    let boot = said
        .split("boot the restored disks with:\n")
        .nth(1)
        .and_then(|r| r.lines().next())
        .unwrap()
        .trim()
        .to_string();
    assert!(
        boot.contains("node-name=file-virtio0,read-only=on")
            && boot.contains("node-name=drive-virtio0,read-only=on")
            && !boot.contains("file-scsi0,read-only")
            && boot.contains("scsi-hd,id=scsi0,drive=drive-scsi0")
            && boot.contains("virtio-blk-pci,id=virtio1,drive=drive-virtio1")
            && boot.contains("virtio-blk-pci,id=virtio0,drive=drive-virtio0")
            && boot.contains("ide-hd,id=sata0,drive=drive-sata0,bus=ide.0")
            && boot.contains("node-name=drive-ide2,read-only=on")
            && boot.contains("ide-cd,id=ide2,drive=drive-ide2,bus=ide.1"),
        "{boot}"
    );
    // The captured definition beside the disks keeps both too.
    let def: Value =
        serde_json::from_slice(&std::fs::read(target.join("vm-definition.json")).unwrap()).unwrap();
    let disk = |n: &str| {
        def["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(disk("virtio0")["read-only"], json!(true), "{def}");
    assert_eq!(disk("virtio0")["type"], json!("virtio-blk-pci"), "{def}");
    assert_eq!(disk("scsi0")["type"], json!("scsi-hd"), "{def}");
    assert_eq!(disk("scsi0")["read-only"], json!(false), "{def}");

    // QEMU starts from the printed line (paused) and sees what was printed.
    let sock = target.join("boot.qmp");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {boot} -S -display none -nodefaults -qmp unix:{},server=on,wait=off",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        if let Some(st) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("QEMU refused the printed line ({st}): {err}\n{boot}");
        }
        assert!(Instant::now() < deadline, "QEMU never opened its monitor");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut qmp = HarnessQmp::connect(&sock, Duration::from_secs(30)).unwrap();
    let blocks = qmp
        .execute("query-block", json!({}), Duration::from_secs(30))
        .unwrap();
    let ro_of = |qdev_part: &str| -> bool {
        blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(qdev_part)))
            .unwrap_or_else(|| panic!("no device {qdev_part}: {blocks}"))["inserted"]["ro"]
            .as_bool()
            .unwrap()
    };
    assert!(ro_of("virtio0") && ro_of("ide2"), "{blocks}");
    assert!(
        !ro_of("scsi0") && !ro_of("virtio1") && !ro_of("sata0"),
        "{blocks}"
    );
    for (id, want) in [
        ("sata0", "ide-hd"),
        ("ide2", "ide-cd"),
        ("virtio0", "virtio-blk-pci"),
        ("virtio1", "virtio-blk-pci"),
        ("scsi0", "scsi-hd"),
    ] {
        let t = qmp
            .execute(
                "qom-get",
                json!({"path": format!("/machine/peripheral/{id}"), "property": "type"}),
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(t, json!(want), "device {id}");
    }
    let _ = qmp.execute("quit", json!({}), Duration::from_secs(10));
    drop(child);
}

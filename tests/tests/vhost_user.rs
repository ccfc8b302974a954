//! Issue 13 §1: `shear serve --vhost-user`, a backup disk attached to the
//! real guest as `vhost-user-blk-pci` (guest RAM a shared memfd). One boot
//! proves: the guest reads the whole disk with the restored image's
//! checksum (read-only and overlay devices), read-only is announced
//! (`/sys/block/vdX/ro`) and a write there fails and changes nothing, a
//! write into the overlay device reads back in the guest after its page
//! cache is dropped and lands in the overlay file, the guest's fsync (a
//! virtio FLUSH) makes it survive a SIGKILL of the server, the serial is
//! the disk's name (`T_GET_ID`), the repository is untouched, and after
//! QEMU and a garbage frontend hang up the server still answers the next
//! vhost-user connection. The backend's answers to hostile descriptors are
//! unit tests in agent/src/serve/vhost_user.rs.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shear_tests::shear::{repo_state, report_of, run_ok, ShearEnv};
use shear_tests::{require_guest, require_tool, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// A running `shear serve`; killed and reaped on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    /// Starts `shear serve vm/100 --disk scsi0 <extra>`, waits for `ready`
    /// at the start of a stdout line.
    fn start(env: &ShearEnv, extra: &[&str], socket: &Path, ready: &str) -> Serve {
        let mut c = env.shear(&["serve", "vm/100", "--disk", "scsi0"]);
        c.args(extra).arg(socket);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = c.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("shear serve printed no {ready:?} within 60 s"));
            if line.starts_with(ready) {
                break;
            }
        }
        Serve {
            child,
            socket: socket.to_owned(),
        }
    }

    fn vhost(env: &ShearEnv, socket: &Path, overlay: Option<&Path>) -> Serve {
        let mut extra = Vec::new();
        if let Some(o) = overlay {
            extra.extend(["--overlay", o.to_str().unwrap()]);
        }
        extra.push("--vhost-user");
        Serve::start(env, &extra, socket, "-chardev socket,id=vu0,path=")
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn wait(&mut self, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "serve did not {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; asserts a clean exit and the socket removed.
    fn stop(mut self) {
        self.signal("-TERM");
        let status = self.wait("stop on SIGTERM");
        assert!(status.success(), "serve exited with {status}");
        assert!(!self.socket.exists(), "socket left behind");
    }

    /// SIGKILL: no exit-time flush.
    fn crash(mut self) {
        self.signal("-KILL");
        self.wait("die on SIGKILL");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.as_mut().unwrap().write_all(data).unwrap();
    drop(c.stdin.take());
    let out = String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap();
    out.split_whitespace().next().unwrap().to_owned()
}

/// A paused VM with scsi0 (32 MiB: data at 1 MiB, 20 MiB and in the last
/// MiB, zeros elsewhere) backed up; returns the restored raw image.
fn backed_up_disk(env: &ShearEnv) -> Vec<u8> {
    let mut vm =
        TestVm::start(VmConfig::paused().disk(DiskSpec::raw("scsi0", SIZE).scsi())).unwrap();
    vm.qemu_io("scsi0", "write -P 0x5c 1M 3M").unwrap();
    vm.qemu_io("scsi0", "write -P 0xa7 20M 2M").unwrap();
    vm.qemu_io("scsi0", "write -P 0x01 31M 1M").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    report_of(&run_ok(env.backup_with(
        &vm,
        &no_agent,
        &env.fleece_dir(),
        &[],
    )));
    drop(vm);
    let target = env.dir.path().join("restored");
    run_ok(env.shear(&["restore", "vm/100", "--target", target.to_str().unwrap()]));
    std::fs::read(target.join("scsi0.raw")).unwrap()
}

/// One vhost-user GET_FEATURES exchange on a fresh connection.
fn vhost_user_features(socket: &Path) -> u64 {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // request 1 (GET_FEATURES), flags: version 1, no payload.
    let mut m = 1u32.to_le_bytes().to_vec();
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&m).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r[..4], 1u32.to_le_bytes(), "reply to another request");
    assert_eq!(r[8..12], 8u32.to_le_bytes(), "payload size");
    u64::from_le_bytes(r[12..20].try_into().unwrap())
}

#[test]
fn vm_guest_reads_and_writes_backup_over_vhost_user_blk() {
    if !require_guest() || !require_tool("qemu-img") {
        return;
    }
    let env = ShearEnv::new();
    let truth = backed_up_disk(&env);
    assert_eq!(truth.len() as u64, SIZE);
    let want_sum = sha256(&truth);
    let before = repo_state(&env.repo());
    let ro_sock = env.dir.path().join("ro.sock");
    let rw_sock = env.dir.path().join("rw.sock");
    let ov = env.dir.path().join("overlay");
    let ro = Serve::vhost(&env, &ro_sock, None);
    let rw = Serve::vhost(&env, &rw_sock, Some(&ov));

    let mut vm = TestVm::start(
        VmConfig::guest()
            .arg("-object")
            .arg("memory-backend-memfd,id=mem,size=128M,share=on")
            .arg("-machine")
            .arg("memory-backend=mem")
            .arg("-chardev")
            .arg(&format!("socket,id=vu0,path={}", ro_sock.display()))
            .arg("-device")
            .arg("vhost-user-blk-pci,chardev=vu0,id=vublk0")
            .arg("-chardev")
            .arg(&format!("socket,id=vu1,path={}", rw_sock.display()))
            .arg("-device")
            .arg("vhost-user-blk-pci,chardev=vu1,id=vublk1"),
    )
    .unwrap();

    // Both devices: the disk's size, serial (T_GET_ID), one read-only.
    let listing = vm
        .guest_sh("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/size) $(cat $d/ro) $(cat $d/serial); done")
        .unwrap();
    let sectors = (SIZE / 512).to_string();
    let (mut ro_dev, mut rw_dev) = (None, None);
    for l in listing.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 && f[1] == sectors && f[3] == "scsi0" {
            match f[2] {
                "1" => ro_dev = Some(format!("/dev/{}", f[0])),
                "0" => rw_dev = Some(format!("/dev/{}", f[0])),
                _ => {}
            }
        }
    }
    let (Some(ro_dev), Some(rw_dev)) = (ro_dev, rw_dev) else {
        panic!("expected a read-only and a writable {sectors}-sector disk with serial scsi0:\n{listing}");
    };

    // The guest reads every byte of both (past its page cache, from the
    // backend): the restored image's checksum.
    let sum_of = |dev: &str| {
        let o = vm
            .guest_sh(&format!(
                "echo 3 >/proc/sys/vm/drop_caches; sha256sum {dev}"
            ))
            .unwrap();
        o.split_whitespace().next().unwrap_or_default().to_owned()
    };
    assert_eq!(sum_of(&ro_dev), want_sum, "read-only device");
    assert_eq!(sum_of(&rw_dev), want_sum, "overlay device before writes");

    // Read-only: the write fails.
    let w = vm
        .guest_exec(&[
            "/bin/sh",
            "-c",
            &format!("dd if=/dev/zero of={ro_dev} bs=4096 count=4 conv=fsync"),
        ])
        .unwrap();
    assert_ne!(w.exit, 0, "a write to the read-only device succeeded");

    // Overlay: 12 KiB inside a 64 KiB block of data (copy on write) and the
    // last 4 KiB of the disk, fsynced (a virtio FLUSH).
    let pat: Vec<u8> = b"shear-vhost-user\n"
        .iter()
        .copied()
        .cycle()
        .take(12288)
        .collect();
    let at = 514 * 4096;
    vm.guest_sh(&format!(
        "yes shear-vhost-user | head -c 12288 >/tmp/pat && \
         dd if=/tmp/pat of={rw_dev} bs=4096 seek=514 conv=fsync && \
         dd if=/dev/zero of={rw_dev} bs=4096 seek={} count=1 conv=fsync",
        SIZE / 4096 - 1
    ))
    .unwrap();
    let mut expect = truth.clone();
    expect[at..at + pat.len()].copy_from_slice(&pat);
    let end = expect.len();
    expect[end - 4096..].fill(0);
    assert_eq!(
        sum_of(&rw_dev),
        sha256(&expect),
        "overlay device after writes"
    );
    assert_eq!(
        sum_of(&ro_dev),
        want_sum,
        "read-only device after the refused write"
    );
    // The write is in the overlay file.
    let ovf = std::fs::read(ov.join("scsi0.overlay")).unwrap();
    assert!(
        ovf[at..at + pat.len()] == pat[..],
        "not in the overlay file"
    );

    // Kill QEMU, then the overlay server with SIGKILL: what the guest
    // flushed is kept (read it back through an NBD serve of the overlay).
    vm.kill();
    drop(vm);
    rw.crash();
    let nbd = env.dir.path().join("nbd.sock");
    let serve = Serve::start(
        &env,
        &["--overlay", ov.to_str().unwrap(), "--socket"],
        &nbd,
        "nbd+unix:///scsi0",
    );
    let copy = env.dir.path().join("copy.raw");
    let uri = format!("nbd+unix:///scsi0?socket={}", nbd.display());
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "flushed writes lost after the server's SIGKILL"
    );
    serve.stop();

    // QEMU gone, a garbage frontend: the read-only server still answers.
    {
        let mut s = UnixStream::connect(&ro_sock).unwrap();
        s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 1])
            .unwrap();
    }
    let f = vhost_user_features(&ro_sock);
    assert_ne!(f & (1 << 5), 0, "VIRTIO_BLK_F_RO not offered: {f:#x}");
    assert_ne!(f & (1 << 32), 0, "VIRTIO_F_VERSION_1 not offered: {f:#x}");
    ro.stop();

    assert_eq!(repo_state(&env.repo()), before, "the repository changed");
    run_ok(env.shear(&["verify", "vm/100"]));
}

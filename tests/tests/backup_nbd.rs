//! `shear backup VMID --nbd NAME=URI [--bitmap NAME=BITMAP]` against real
//! NBD servers (issue 11 §3): `qemu-nbd` exports of qcow2 images with and
//! without a persistent dirty bitmap, `nbdkit` exports over a unix socket
//! and TCP. Oracles: `qemu-img convert -O raw` of the source image, and
//! `nbdcopy` of the nbdkit export; restores must be byte-identical.
//!
//! Bad input (unreachable server, no such export, unknown bitmap context)
//! is a clear error and stores nothing.
//!
//! `qemu_*` tests start qemu-nbd/qemu-img/qemu-io (no QEMU VM).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use shear_tests::shear::{report_of, run_ok, ShearEnv};
use shear_tests::{require_tool, wait_until};

const MIB: u64 = 1 << 20;

/// A server process we started; killed (by its pid) on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path) {
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "NBD socket",
        || p.exists().then_some(()),
    )
    .unwrap();
}

/// `qemu-nbd -r` of `image` on `sock`, export `name`, optional bitmap.
fn qemu_nbd(image: &Path, sock: &Path, name: &str, bitmap: Option<&str>) -> Server {
    let _ = std::fs::remove_file(sock);
    let mut c = Command::new("qemu-nbd");
    c.args([
        "-r", "-f", "qcow2", "-t", "-e", "16", "-x", name, "--socket",
    ])
    .arg(sock);
    if let Some(b) = bitmap {
        c.args(["-B", b]);
    }
    c.arg(image).stdout(Stdio::null()).stderr(Stdio::null());
    let s = Server(c.spawn().unwrap());
    wait_socket(sock);
    s
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(image: &Path, op: &str) {
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", op])
        .arg(image));
}

fn raw_of(image: &Path, out: &Path) -> Vec<u8> {
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(out));
    std::fs::read(out).unwrap()
}

fn restore(env: &ShearEnv, id: &str, disk: &str, dir: &Path) -> Vec<u8> {
    let _ = std::fs::remove_dir_all(dir);
    let mut c = env.shear(&["restore", id, "--format", "raw", "--disk", disk, "--target"]);
    c.arg(dir);
    run_ok(c);
    std::fs::read(dir.join(format!("{disk}.raw"))).unwrap()
}

fn backup_nbd(env: &ShearEnv, args: &[String]) -> std::process::Output {
    let mut c = env.shear(&["backup", "100", "--json"]);
    c.args(args);
    c.output().unwrap()
}

fn unix_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}

fn has_tools(tools: &[&str]) -> bool {
    tools.iter().all(|t| require_tool(t))
}

/// Issue 17: `disks[].stages` of a backup that stored new data: CPU
/// measured for every stage that ran, none for encryption (the repository
/// is not encrypted), and bytes that agree with the disk's report.
fn assert_stage_figures(disk: &Value) {
    let st = &disk["stages"];
    let cpu = |s: &str| st[s]["cpu_s"].as_f64().unwrap_or(-1.0);
    let bytes = |s: &str| st[s]["bytes"].as_u64().unwrap_or(u64::MAX);
    let read = disk["bytes_read"].as_u64().unwrap();
    let stored = disk["bytes_stored"].as_u64().unwrap();
    assert!(stored > 0, "the test needs new data: {disk}");
    assert_eq!(bytes("read"), read, "{disk}");
    // Whole chunks are hashed; the parts of a chunk that are holes are not
    // read.
    assert!(bytes("hash") >= read, "{disk}");
    assert!(
        bytes("compress") > 0 && bytes("compress") <= bytes("hash"),
        "{disk}"
    );
    assert_eq!(bytes("verify"), bytes("compress"), "{disk}");
    assert_eq!(bytes("write"), stored, "{disk}");
    for s in ["read", "hash", "compress", "verify", "write"] {
        assert!(cpu(s) > 0.0 && cpu(s) < 60.0, "{s}: {disk}");
    }
    assert_eq!((cpu("encrypt"), bytes("encrypt")), (0.0, 0), "{disk}");
}

/// A qcow2 image with data, exported by qemu-nbd: a full backup restores
/// byte-identical. Then a persistent bitmap records new writes; a second
/// backup with `--bitmap` reads only the dirty chunks, reuses the rest,
/// and restores byte-identical too; the first still restores as it was.
/// A `--bitmap` backup with no previous backup of the disk reads in full
/// and says why. Both reports carry sane per-stage CPU figures (issue 17).
#[test]
fn qemu_nbd_full_then_bitmap_incremental_restore_identical() {
    if !has_tools(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let env = ShearEnv::new();
    let d = env.dir.path();
    let img = d.join("src.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    qemu_io(&img, "write -P 0x11 0 3M");
    qemu_io(&img, "write -P 0x22 40M 1M");
    // The bitmap of a provider that tracks from before the first backup.
    sh(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    let sock = d.join("nbd.sock");

    // First backup with --bitmap: no base → full, with the reason.
    let v1_raw = raw_of(&img, &d.join("v1.raw"));
    let id1 = {
        let _s = qemu_nbd(&img, &sock, "disk", Some("b0"));
        let out = backup_nbd(
            &env,
            &[
                "--nbd".into(),
                format!("d0={}", unix_uri(&sock, "disk")),
                "--bitmap".into(),
                "d0=b0".into(),
            ],
        );
        let r = report_of(&out);
        assert_eq!(r["mode"], "nbd", "{r}");
        let disk = &r["disks"][0];
        assert_eq!(disk["kind"], "full", "{r}");
        assert!(
            disk["full_reason"]
                .as_str()
                .unwrap()
                .contains("no previous backup of disk d0"),
            "{r}"
        );
        assert_eq!(disk["virtual_size"], 64 * MIB);
        // Holes were skipped (base:allocation): 4 MiB written of 64.
        assert!(disk["bytes_read"].as_u64().unwrap() <= 8 * MIB, "{r}");
        assert_stage_figures(disk);
        r["backup_id"].as_str().unwrap().to_string()
    };
    assert_same(
        &restore(&env, &id1, "d0", &d.join("r1")),
        &v1_raw,
        "backup 1",
    );

    // New writes after backup 1; the bitmap records them (its earlier
    // content, from before backup 1, is a superset: allowed).
    sh(Command::new("qemu-img")
        .args(["bitmap", "--clear"])
        .arg(&img)
        .arg("b0"));
    qemu_io(&img, "write -P 0x33 20M 512k");
    let v2_raw = raw_of(&img, &d.join("v2.raw"));
    let id2 = {
        let _s = qemu_nbd(&img, &sock, "disk", Some("b0"));
        let out = backup_nbd(
            &env,
            &[
                "--nbd".into(),
                format!("d0={}", unix_uri(&sock, "disk")),
                "--bitmap".into(),
                "d0=b0".into(),
            ],
        );
        let r = report_of(&out);
        let disk = &r["disks"][0];
        assert_eq!(disk["kind"], "incremental", "{r}");
        assert_eq!(disk["base"], id1.as_str(), "{r}");
        // One dirty 512 KiB range: at most one chunk read (4 MiB).
        assert!(disk["bytes_read"].as_u64().unwrap() <= 4 * MIB, "{r}");
        assert!(disk["bytes_read"].as_u64().unwrap() >= 512 * 1024, "{r}");
        assert_stage_figures(disk);
        r["backup_id"].as_str().unwrap().to_string()
    };
    assert_ne!(id1, id2);
    assert_same(
        &restore(&env, &id2, "d0", &d.join("r2")),
        &v2_raw,
        "backup 2",
    );
    assert_same(
        &restore(&env, &id1, "d0", &d.join("r1b")),
        &v1_raw,
        "backup 1 again",
    );
    let list = env.list();
    assert_eq!(list.len(), 2);
}

/// A plain qemu-nbd export without a bitmap, over TCP (nbd://HOST:PORT/NAME).
#[test]
fn qemu_nbd_tcp_export_restores_identical() {
    if !has_tools(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let env = ShearEnv::new();
    let d = env.dir.path();
    let img = d.join("src.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("20M"));
    qemu_io(&img, "write -P 0x5a 1M 5M");
    let want = raw_of(&img, &d.join("want.raw"));
    let port = free_port();
    let _s = Server(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "qcow2",
                "-t",
                "-e",
                "16",
                "-x",
                "e",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "qemu-nbd TCP listener",
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    )
    .unwrap();
    let out = backup_nbd(
        &env,
        &["--nbd".into(), format!("vda=nbd://127.0.0.1:{port}/e")],
    );
    let r = report_of(&out);
    let id = r["backup_id"].as_str().unwrap();
    assert_same(&restore(&env, id, "vda", &d.join("r")), &want, "tcp backup");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nbdkit's data plugin (no qcow2, no QEMU): restore equals what nbdcopy
/// reads from the same export.
#[test]
fn nbdkit_data_export_restores_identical() {
    if !has_tools(&["nbdkit", "nbdcopy"]) {
        return;
    }
    let env = ShearEnv::new();
    let d = env.dir.path();
    let sock = d.join("kit.sock");
    let _s = Server(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args([
                "data",
                "1 2 3 @0x500000 (0x55 0xaa)*4096 @0x1200000 \"hello\"",
                "size=24M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&sock);
    let uri = unix_uri(&sock, "");
    let want_path = d.join("want.raw");
    sh(Command::new("nbdcopy").arg(&uri).arg(&want_path));
    let want = std::fs::read(&want_path).unwrap();
    let out = backup_nbd(&env, &["--nbd".into(), format!("kit={uri}")]);
    let r = report_of(&out);
    let id = r["backup_id"].as_str().unwrap();
    assert_same(
        &restore(&env, id, "kit", &d.join("r")),
        &want,
        "nbdkit backup",
    );
    // The manifest records the URI (no secrets in it) as the disk's file.
    let show = run_ok(env.shear(&["show", id, "--json"]));
    let m: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert!(m.to_string().contains("nbd+unix:///?socket="), "{m}");
}

fn assert_fails_nothing_stored(env: &ShearEnv, args: &[String], expect: &[&str]) {
    let out = backup_nbd(env, args);
    assert!(!out.status.success(), "succeeded: {args:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = v[0]["error"].as_str().unwrap_or_default().to_string();
    for e in expect {
        assert!(msg.contains(e), "{args:?}: {msg:?} lacks {e:?}");
    }
    assert!(env.list().is_empty(), "something was stored: {args:?}");
}

/// Bad input: an unreachable socket or port, an export that does not
/// exist, a bitmap the export does not offer. Each a clear error naming
/// what failed; nothing stored.
#[test]
fn qemu_nbd_bad_input_is_a_clear_error_and_stores_nothing() {
    if !has_tools(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let env = ShearEnv::new();
    let d = env.dir.path();
    let img = d.join("src.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("8M"));
    sh(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("real"));
    let missing = d.join("absent.sock");
    assert_fails_nothing_stored(
        &env,
        &["--nbd".into(), format!("d0={}", unix_uri(&missing, "x"))],
        &["connecting to nbd+unix:///x", "absent.sock", "d0"],
    );
    let port = free_port(); // bound then released: nobody listens
    assert_fails_nothing_stored(
        &env,
        &["--nbd".into(), format!("d0=nbd://127.0.0.1:{port}/x")],
        &["connecting to nbd://127.0.0.1:", "refused"],
    );
    let sock = d.join("nbd.sock");
    let _s = qemu_nbd(&img, &sock, "disk", None);
    assert_fails_nothing_stored(
        &env,
        &["--nbd".into(), format!("d0={}", unix_uri(&sock, "nosuch"))],
        &["nosuch"],
    );
    // The export exists but offers no qemu:dirty-bitmap:real context
    // (qemu-nbd ran without -B).
    assert_fails_nothing_stored(
        &env,
        &[
            "--nbd".into(),
            format!("d0={}", unix_uri(&sock, "disk")),
            "--bitmap".into(),
            "d0=real".into(),
        ],
        &["qemu:dirty-bitmap:real"],
    );
    // An export that lies about its size: it claims 64 MiB and fails
    // every read past its first MiB (nbdkit's sh plugin).
    if has_tools(&["nbdkit"]) {
        let script = d.join("liar.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in\n  get_size) echo 67108864 ;;\n  pread) if [ \"$4\" -ge 1048576 ]; \
             then echo 'EIO no data past 1 MiB' >&2; exit 1; fi; head -c \"$3\" /dev/zero ;;\n  \
             *) exit 2 ;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let liar = d.join("liar.sock");
        let _k = Server(
            Command::new("nbdkit")
                .args(["-f", "-U"])
                .arg(&liar)
                .arg("sh")
                .arg(&script)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_socket(&liar);
        assert_fails_nothing_stored(
            &env,
            &["--nbd".into(), format!("d0={}", unix_uri(&liar, ""))],
            &["d0", "offset"],
        );
    }
    // A --bitmap for a disk no --nbd names.
    assert_fails_nothing_stored(
        &env,
        &[
            "--nbd".into(),
            format!("d0={}", unix_uri(&sock, "disk")),
            "--bitmap".into(),
            "d1=real".into(),
        ],
        &["d1"],
    );
}

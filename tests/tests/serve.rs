//! Issue 13, `shear serve` against real clients: qemu-img (compare,
//! convert), nbdinfo --map (holes stay holes), nbdcopy, qemu-io writes into
//! an overlay (kept across restarts, the repository untouched), hostile
//! clients on a raw socket (bad option, read past the end, huge length,
//! disconnect mid-request, 1000 quick connects: the server still serves),
//! and a real guest reading the served disk through QEMU's NBD driver.
//! TLS on TCP: qemu-img (tls-creds-x509) and libnbd (`nbds://`) read over
//! TLS, plaintext clients and hostile STARTTLS clients are refused, client
//! certificates with --tls-verify-peer, PSK credentials refused.
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shear_tests::shear::{repo_state, report_of, run_ok, ShearEnv};
use shear_tests::{require_guest, require_qemu, require_tool, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

/// A running `shear serve`; SIGTERM and reaped on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    fn start(env: &ShearEnv, socket: &Path, extra: &[&str]) -> Serve {
        let mut args = vec!["--socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (mut serve, _) = Serve::start_with(env, &args, "nbd+unix:///scsi0?socket=");
        serve.socket = socket.to_owned();
        serve
    }

    /// Serves on TCP (127.0.0.1, a free port) with `extra`; returns the
    /// server and the port of the printed URI (`prefix…:PORT/scsi0`).
    fn start_tcp(env: &ShearEnv, extra: &[&str], prefix: &str) -> (Serve, u16) {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (mut serve, line) = Serve::start_with(env, &args, prefix);
        // No socket file for TCP: stop() checks nothing is left there.
        serve.socket = env.dir.path().join("no-such-socket");
        let port = line[prefix.len()..]
            .trim_end_matches("/scsi0")
            .parse()
            .unwrap_or_else(|_| panic!("no port in {line:?}"));
        (serve, port)
    }

    /// Starts `shear serve vm/100 ARGS` and waits for a line starting
    /// with `prefix` (returned).
    fn start_with(env: &ShearEnv, args: &[&str], prefix: &str) -> (Serve, String) {
        let mut c = env.shear(&["serve", "vm/100"]);
        c.args(args);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut serve = Serve {
            child: c.spawn().unwrap(),
            socket: PathBuf::new(),
        };
        let out = serve.child.stdout.take().unwrap();
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
                .unwrap_or_else(|_| panic!("shear serve printed no URI within 60 s"));
            if line.starts_with(prefix) {
                break (serve, line);
            }
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///scsi0?socket={}", self.socket.display())
    }

    /// SIGTERM; asserts a clean exit and the socket removed.
    fn stop(mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "serve exited with {status}");
        assert!(!self.socket.exists(), "socket left behind");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(c: &mut Command) -> std::process::Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A paused VM with scsi0 (48 MiB: data at 1 MiB and 20 MiB, zeros
/// elsewhere) backed up; returns the restored raw image's bytes.
fn backed_up_disk(env: &ShearEnv) -> Vec<u8> {
    let mut vm =
        TestVm::start(VmConfig::paused().disk(DiskSpec::raw("scsi0", SIZE).scsi())).unwrap();
    vm.qemu_io("scsi0", "write -P 0x5c 1M 3M").unwrap();
    vm.qemu_io("scsi0", "write -P 0xa7 20M 2M").unwrap();
    vm.qemu_io("scsi0", "write -P 0x01 47M 4k").unwrap();
    let no_agent = env.dir.path().join("no-agent.sock");
    let out = run_ok(env.backup_with(&vm, &no_agent, &env.fleece_dir(), &[]));
    report_of(&out);
    drop(vm);
    let target = env.dir.path().join("restored");
    run_ok(env.shear(&["restore", "vm/100", "--target", target.to_str().unwrap()]));
    std::fs::read(target.join("scsi0.raw")).unwrap()
}

/// `nbdinfo --map URI`: the zero chunks between the data are holes.
fn check_map(uri: &str) {
    let map = String::from_utf8(ok(Command::new("nbdinfo").args(["--map", uri])).stdout).unwrap();
    let mut hole_at_30m = false;
    let mut data_at_1m = false;
    for l in map.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Ok(off), Ok(len)) = (f[0].parse::<u64>(), f[1].parse::<u64>()) else {
            continue;
        };
        let covers = |x: u64| off <= x && x < off + len;
        if covers(30 * MIB) && f[2] == "3" {
            hole_at_30m = true;
        }
        if covers(MIB) && f[2] == "0" {
            data_at_1m = true;
        }
    }
    assert!(hole_at_30m && data_at_1m, "unexpected map:\n{map}");
}

fn read_via_qemu_img(uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    ok(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "raw", uri])
        .arg(out));
    std::fs::read(out).unwrap()
}

/// A raw NBD client: greeting read, fixed newstyle + no zeroes sent.
fn raw_client(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn option<S: Read + Write>(s: &mut S, opt: u32, data: &[u8]) -> u32 {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        if ty == 1 || ty & (1 << 31) != 0 {
            return ty;
        }
    }
}

fn go(s: &mut UnixStream) {
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"scsi0");
    d.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(option(s, 7, &d), 1, "NBD_OPT_GO not acknowledged");
}

fn request(s: &mut UnixStream, cmd: u16, cookie: u64, offset: u64, len: u32) -> (u32, u64) {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    s.write_all(&v).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

#[test]
fn qemu_serve_interop_holes_overlay_and_hostile_clients() {
    if !require_qemu()
        || !require_tool("nbdinfo")
        || !require_tool("nbdcopy")
        || !require_tool("qemu-io")
        || !require_tool("openssl")
    {
        return;
    }
    let env = ShearEnv::new();
    let truth = backed_up_disk(&env);
    assert_eq!(truth.len() as u64, SIZE);
    let sock = env.dir.path().join("nbd.sock");
    let before = repo_state(&env.repo());
    let serve = Serve::start(&env, &sock, &[]);
    let uri = serve.uri();

    // qemu-img compare and convert: the served disk is the restored disk.
    let restored = env.dir.path().join("restored/scsi0.raw");
    ok(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", &uri])
        .arg(&restored));
    let copy = env.dir.path().join("copy.raw");
    assert!(
        read_via_qemu_img(&uri, &copy) == truth,
        "qemu-img convert differs"
    );

    // nbdinfo --map: the zero chunks between the data are holes.
    check_map(&uri);

    // nbdcopy (multi-conn, parallel requests).
    let nc = env.dir.path().join("nbdcopy.raw");
    ok(Command::new("nbdcopy").arg(&uri).arg(&nc));
    assert!(std::fs::read(&nc).unwrap() == truth, "nbdcopy differs");
    std::fs::remove_file(&nc).unwrap();

    // Read-only: a write is refused.
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 64k", &uri])
        .output()
        .unwrap();
    assert!(
        !w.status.success() || String::from_utf8_lossy(&w.stdout).contains("error"),
        "a write to the read-only export succeeded: {}",
        String::from_utf8_lossy(&w.stdout)
    );

    // Hostile clients.
    let mut s = raw_client(&sock);
    assert_eq!(option(&mut s, 4242, b"x"), (1 << 31) | 1, "unknown option");
    go(&mut s);
    assert_eq!(
        request(&mut s, 0, 1, SIZE - 512, 1024),
        (22, 1),
        "read past end"
    );
    assert_eq!(request(&mut s, 0, 2, 0, u32::MAX), (75, 2), "huge read");
    assert_eq!(
        request(&mut s, 0, 3, u64::MAX - 10, 512),
        (22, 3),
        "overflow"
    );
    // Disconnect mid-request and mid-reply.
    let mut s = raw_client(&sock);
    go(&mut s);
    s.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(s);
    let mut s = raw_client(&sock);
    go(&mut s);
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&[0, 0, 0, 0]);
    v.extend_from_slice(&9u64.to_be_bytes());
    v.extend_from_slice(&MIB.to_be_bytes());
    v.extend_from_slice(&(16u32 << 20).to_be_bytes());
    s.write_all(&v).unwrap();
    drop(s);
    // 1000 quick connects, some closing before the greeting is read.
    for i in 0..1000 {
        let c = UnixStream::connect(&sock).unwrap();
        if i % 10 == 0 {
            let mut c = c;
            let mut g = [0u8; 18];
            let _ = c.read_exact(&mut g);
        }
    }
    // Still serving, correctly.
    ok(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", &uri])
        .arg(&restored));
    serve.stop();

    // Overlay: writes land in DIR, survive a restart, never the repository.
    let ov = env.dir.path().join("overlay");
    let serve = Serve::start(&env, &sock, &["--overlay", ov.to_str().unwrap()]);
    let uri = serve.uri();
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x33 1000k 100k",
        "-c",
        "write -z 20M 1M",
        "-c",
        "flush",
        &uri,
    ]));
    let mut expect = truth.clone();
    expect[1000 * 1024..1100 * 1024].fill(0x33);
    expect[20 << 20..21 << 20].fill(0);
    assert!(
        read_via_qemu_img(&uri, &copy) == expect,
        "overlay view differs"
    );
    serve.stop();
    assert!(ov.join("scsi0.overlay").exists() && ov.join("scsi0.overlay.map").exists());
    let serve = Serve::start(&env, &sock, &["--overlay", ov.to_str().unwrap()]);
    assert!(
        read_via_qemu_img(&serve.uri(), &copy) == expect,
        "overlay writes lost across a restart"
    );
    serve.stop();
    // A plain serve still shows the backup as it was.
    let serve = Serve::start(&env, &sock, &[]);
    assert!(read_via_qemu_img(&serve.uri(), &copy) == truth);
    serve.stop();
    assert_eq!(repo_state(&env.repo()), before, "the repository changed");
    run_ok(env.shear(&["verify", "vm/100"]));

    // TCP without TLS is refused unless --insecure.
    let out = env
        .shear(&["serve", "vm/100", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--insecure"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    tls_interop(&env, &truth);
}

/// Runs openssl in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    ok(Command::new("openssl").current_dir(dir).args(args));
}

/// x509 credentials from one test CA, in QEMU's tls-creds-x509 layout:
/// `server/` (ca-cert.pem, server-cert.pem, server-key.pem), `client/`
/// (ca-cert.pem) and `client-auth/` (also client-cert.pem, client-key.pem).
fn make_creds(base: &Path) -> [PathBuf; 3] {
    let [server, client, auth] = ["server", "client", "client-auth"].map(|d| base.join(d));
    for d in [&server, &client, &auth] {
        std::fs::create_dir_all(d).unwrap();
    }
    openssl(
        base,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=shear test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (name, eku, san) in [
        (
            "server",
            "serverAuth",
            "\nsubjectAltName=DNS:localhost,IP:127.0.0.1",
        ),
        ("client", "clientAuth", ""),
    ] {
        std::fs::write(
            base.join(format!("{name}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={eku}{san}\n"
            ),
        )
        .unwrap();
        let (key, csr, cert, ext) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
            format!("{name}.ext"),
        );
        openssl(
            base,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            base,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        );
    }
    let cp = |f: &str, d: &Path| std::fs::copy(base.join(f), d.join(f)).map(|_| ()).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        cp(f, &server);
    }
    cp("ca-cert.pem", &client);
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        cp(f, &auth);
    }
    [server, client, auth]
}

/// qemu-img convert through QEMU's NBD client with tls-creds-x509 from
/// `creds` (its own process: the output, or the failure).
fn qemu_img_tls(port: u16, creds: &Path, out: &Path) -> std::process::Output {
    let _ = std::fs::remove_file(out);
    Command::new("qemu-img")
        .args(["convert", "-q", "--object"])
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ))
        .args(["-O", "raw", "--image-opts"])
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={port},export=scsi0,tls-creds=tls0"
        ))
        .arg(out)
        .output()
        .unwrap()
}

fn tcp_client(port: u16) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Whether the server closes `s` (after whatever it still sends).
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Issue 13 §1, TLS: `shear serve --listen --tls-creds` against QEMU's
/// and libnbd's TLS clients (gnutls), plaintext clients refused, hostile
/// STARTTLS clients, client certificates, PSK refused.
fn tls_interop(env: &ShearEnv, truth: &[u8]) {
    const NBD_OPT_STARTTLS: u32 = 5;
    const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
    let [server, client, auth] = make_creds(&env.dir.path().join("tls"));
    let (serve, port) = Serve::start_tcp(
        env,
        &["--tls-creds", server.to_str().unwrap()],
        "nbds://127.0.0.1:",
    );
    let out = env.dir.path().join("tls.raw");
    let o = qemu_img_tls(port, &client, &out);
    assert!(
        o.status.success(),
        "qemu-img over TLS: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == truth,
        "qemu-img over TLS differs"
    );
    let uri = format!(
        "nbds://127.0.0.1:{port}/scsi0?tls-certificates={}",
        client.display()
    );
    check_map(&uri);
    std::fs::remove_file(&out).unwrap();
    ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == truth,
        "nbdcopy over TLS differs"
    );

    // Plaintext clients are refused: TLS is required.
    let plain = format!("nbd://127.0.0.1:{port}/scsi0");
    let o = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "raw", &plain])
        .arg(env.dir.path().join("plain.raw"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("TLS"),
        "plaintext qemu-img: {err}"
    );
    let o = Command::new("nbdinfo").arg(&plain).output().unwrap();
    assert!(!o.status.success(), "plaintext nbdinfo was served");
    let mut s = tcp_client(port);
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"scsi0");
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        option(&mut s, 7, &go),
        NBD_REP_ERR_TLS_REQD,
        "GO before STARTTLS"
    );
    // Hostile: NBD options where the TLS ClientHello should be.
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]), 1, "STARTTLS");
    let mut junk = Vec::new();
    for _ in 0..32 {
        junk.extend_from_slice(b"IHAVEOPT\0\0\0\x07\0\0\0\x0bscsi0 junk!");
    }
    s.write_all(&junk).unwrap();
    assert!(
        closed_by_server(&mut s),
        "garbage after STARTTLS not refused"
    );
    // STARTTLS, then silence: closed at the handshake deadline (10 s).
    let mut s = tcp_client(port);
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]), 1, "STARTTLS");
    assert!(closed_by_server(&mut s), "a silent TLS client was kept");
    // Still serving.
    let o = qemu_img_tls(port, &client, &out);
    assert!(
        o.status.success(),
        "after hostile clients: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serve.stop();

    // --tls-verify-peer: a client certificate signed by the CA is needed.
    let (serve, port) = Serve::start_tcp(
        env,
        &["--tls-creds", server.to_str().unwrap(), "--tls-verify-peer"],
        "nbds://127.0.0.1:",
    );
    let o = qemu_img_tls(port, &client, &out);
    assert!(
        !o.status.success(),
        "a client without a certificate was served"
    );
    let o = qemu_img_tls(port, &auth, &out);
    assert!(
        o.status.success(),
        "client certificate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == truth,
        "verified TLS read differs"
    );
    serve.stop();

    // PSK credentials (QEMU tls-creds-psk) are refused, saying why.
    let psk = env.dir.path().join("psk");
    std::fs::create_dir_all(&psk).unwrap();
    std::fs::write(psk.join("keys.psk"), "qemu:0123456789abcdef\n").unwrap();
    let o = env
        .shear(&["serve", "vm/100", "--listen", "127.0.0.1:0", "--tls-creds"])
        .arg(&psk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("TLS-PSK is not supported"),
        "{err}"
    );
}

#[test]
fn vm_guest_reads_the_served_disk_through_qemu_nbd_driver() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let truth = backed_up_disk(&env);
    let sock = env.dir.path().join("nbd.sock");
    let serve = Serve::start(&env, &sock, &[]);
    let vm = TestVm::start(
        VmConfig::guest()
            .arg("-blockdev")
            .arg(&format!(
                "driver=nbd,node-name=served,server.type=unix,server.path={},export=scsi0,read-only=on",
                sock.display()
            ))
            .arg("-device")
            .arg("virtio-blk-pci,drive=served,serial=SERVED"),
    )
    .unwrap();
    let sectors = SIZE / 512;
    let out = vm
        .guest_sh(&format!(
            "for d in /sys/block/vd*; do if [ \"$(cat $d/size)\" = {sectors} ]; then sha256sum /dev/${{d##*/}}; fi; done"
        ))
        .unwrap();
    let want = {
        let o = ok(Command::new("sha256sum").arg(env.dir.path().join("restored/scsi0.raw")));
        String::from_utf8(o.stdout).unwrap()
    };
    let want = want.split_whitespace().next().unwrap().to_owned();
    let got = out.split_whitespace().next().unwrap_or("").to_owned();
    assert_eq!(got, want, "guest checksum of the served disk: {out}");
    assert_eq!(truth.len() as u64, SIZE);
    drop(vm);
    serve.stop();
}

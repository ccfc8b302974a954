//! nbd-export against real NBD servers: `qemu-nbd` (allocation depth, a
//! persistent dirty bitmap, a backing chain), `nbdkit` (memory, data and
//! sparse-random plugins; error and delay filters) and QEMU's built-in
//! server on a snapshot-access export (fleecing).
//!
//! Oracles are libnbd's tools on the same export: block-status maps must
//! equal `nbdinfo --map --json` (adjacent equal extents merged on both
//! sides), and data must equal `nbdcopy URI -` byte for byte. Every check
//! runs with both I/O engines.
//!
//! `nbd_*` tests need qemu-img/qemu-nbd/nbdkit/libnbd-bin only;
//! `qemu_*` starts QEMU paused (no guest).

// Test helpers fail by panicking; test sizes are small constants.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_export::{
    plan, ChunkKind, ChunkReader, Client, ClientOptions, EngineChoice, Error, ErrorKind,
    ExportSource, Extent, ReadStats, ReaderConfig,
};
use serde_json::{json, Value};
use shear_tests::{require_qemu, require_tool, wait_until, DiskSpec, TestVm, VmConfig};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Engines to test: both, unless io_uring is unavailable outside CI.
fn engines() -> Vec<EngineChoice> {
    let mut v = vec![EngineChoice::Sync];
    match EngineChoice::Uring.resolve() {
        Ok(_) => v.push(EngineChoice::Uring),
        Err(e) => {
            shear_tests::prereq::skip(&format!("io_uring ({e}); the sync engine only"));
        }
    }
    v
}

/// A server process, killed by pid and reaped on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    /// Spawns `cmd` with `pid_flag PIDFILE` appended; both qemu-nbd and
    /// nbdkit write the pid file once they listen, so no probe connection
    /// is needed.
    fn spawn(cmd: &mut Command, socket: &Path, pid_flag: &str) -> Server {
        let pid_file = socket.with_extension("pid");
        let child = cmd
            .arg(format!("{pid_flag}{}", pid_file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let mut s = Server {
            child,
            socket: socket.to_path_buf(),
        };
        let sock = socket.to_path_buf();
        let r = wait_until(
            Duration::from_secs(20),
            Duration::from_millis(10),
            "NBD server",
            || {
                let pid = std::fs::read_to_string(&pid_file).ok()?;
                (!pid.trim().is_empty() && sock.exists()).then_some(())
            },
        );
        if let Err(e) = r {
            let status = s.child.try_wait();
            panic!("{cmd:?} did not come up: {e} (status {status:?})");
        }
        s
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `nbdinfo --map[=CONTEXT] --json`, merged.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<Extent> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".into(),
    };
    let out = run(Command::new("nbdinfo").args([flag.as_str(), "--json", uri]));
    let v: Value = serde_json::from_slice(&out).expect("nbdinfo JSON");
    let mut ext: Vec<Extent> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| Extent {
            offset: e["offset"].as_u64().unwrap(),
            len: e["length"].as_u64().unwrap(),
            flags: u32::try_from(e["type"].as_u64().unwrap()).unwrap(),
        })
        .collect();
    plan::merge_extents(&mut ext);
    ext
}

/// The export's bytes as nbdcopy reads them.
fn nbdcopy(uri: &str) -> Vec<u8> {
    run(Command::new("nbdcopy").args([uri, "-"]))
}

struct ReadResult {
    image: Vec<u8>,
    kinds: BTreeMap<u64, ChunkKind>,
    stats: ReadStats,
    connections: usize,
}

fn read_export(src: &ExportSource, cfg: &ReaderConfig) -> Result<ReadResult, Error> {
    let mut s = ChunkReader::start(src, cfg)?;
    let size = s.export_info().size;
    let mut image = vec![0u8; usize::try_from(size).unwrap()];
    let mut kinds = BTreeMap::new();
    for item in &mut s {
        let ch = item?;
        let at = usize::try_from(ch.offset).unwrap();
        if let ChunkKind::Data(d) = &ch.kind {
            assert_eq!(d.len(), ch.len as usize);
            image[at..at + d.len()].copy_from_slice(d);
        }
        let kind = match ch.kind {
            ChunkKind::Data(_) => ChunkKind::Data(Vec::new()),
            k => k,
        };
        assert!(kinds.insert(ch.index, kind).is_none());
    }
    Ok(ReadResult {
        image,
        kinds,
        stats: s.stats(),
        connections: s.connections(),
    })
}

fn reader_cfg(engine: EngineChoice, conns: usize) -> ReaderConfig {
    ReaderConfig {
        engine,
        connections: conns,
        byte_budget: 64 * MIB,
        ..ReaderConfig::new(4 * MIB as u32)
    }
}

fn data_bytes(map: &[Extent]) -> u64 {
    map.iter().filter(|e| e.flags & 2 == 0).map(|e| e.len).sum()
}

/// Checks one export against nbdinfo and nbdcopy with both engines.
fn check_export(src: &ExportSource, uri: &str, contexts: &[&str], conns: usize) -> Vec<u8> {
    let reference = nbdcopy(uri);
    let alloc_ref = nbdinfo_map(uri, None);
    let bitmap = contexts
        .iter()
        .find_map(|c| c.strip_prefix("qemu:dirty-bitmap:"));
    let map_src = match bitmap {
        Some(b) => src.clone().with_dirty_bitmap(b),
        None => src.clone(),
    };
    for engine in engines() {
        let opts = ClientOptions {
            engine,
            allocation_depth: contexts.contains(&"qemu:allocation-depth"),
            ..ClientOptions::default()
        };
        let mut c = Client::connect(&map_src, &opts).unwrap();
        assert_eq!(c.info().size, reference.len() as u64);
        assert_eq!(c.map("base:allocation").unwrap(), alloc_ref, "{engine:?}");
        for ctx in contexts {
            assert_eq!(
                c.map(ctx).unwrap(),
                nbdinfo_map(uri, Some(ctx)),
                "{engine:?} {ctx}"
            );
        }
        let whole = c.read(0, reference.len()).unwrap();
        assert!(
            whole == reference,
            "{engine:?}: Client::read differs from nbdcopy"
        );
        c.disconnect().unwrap();

        let r = read_export(src, &reader_cfg(engine, conns)).unwrap();
        assert!(
            r.image == reference,
            "{engine:?}: chunk reader differs from nbdcopy"
        );
        // Zero extents are never read: what was read is at most the data
        // extents, widened to alignment.
        let want = data_bytes(&alloc_ref);
        assert!(
            r.stats.bytes_read + r.stats.hole_bytes <= want + 64 * KIB * r.stats.read_requests,
            "{engine:?}: read {} of {want} data bytes",
            r.stats.bytes_read
        );
        eprintln!(
            "{engine:?}: {} conns, {} chunks data / {} zero, read {} MiB of {} MiB",
            r.connections,
            r.stats.data_chunks,
            r.stats.zero_chunks,
            r.stats.bytes_read / MIB,
            reference.len() as u64 / MIB
        );
    }
    reference
}

fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(image);
    run(&mut c);
}

/// A qcow2 over a backing file, with data, zero clusters and discards,
/// and a persistent bitmap `b0` that records the writes made after it.
fn build_qcow2(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M"));
    qemu_io(&base, &["write -P 0x11 0 2M", "write -P 0x12 30M 1M"]);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    qemu_io(
        &top,
        &[
            "write -P 0x21 1M 512k",
            "write -P 0x22 5M 64k",
            "write -z 8M 1M",
            "write -P 0x23 17M 3M",
        ],
    );
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&top)
        .arg("b0"));
    qemu_io(
        &top,
        &[
            "write -P 0x44 5M 4k",
            "write -P 0x55 40M 2M",
            "discard 18M 1M",
            "write -P 0x66 63M 1M",
        ],
    );
    top
}

#[test]
fn nbd_qemu_nbd_maps_bitmap_depth_and_data_match_libnbd() {
    if !require_tool("qemu-nbd") || !require_tool("nbdinfo") || !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = build_qcow2(dir.path());
    let sock = dir.path().join("q.sock");
    let srv = Server::spawn(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-e", "8", "-A", "-B", "b0", "-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(&top),
        &sock,
        "--pid-file=",
    );
    let src = ExportSource::unix(&sock, "");
    let uri = srv.uri("");
    let reference = check_export(
        &src,
        &uri,
        &["qemu:allocation-depth", "qemu:dirty-bitmap:b0"],
        4,
    );
    // The backing file shows through: depth 2 where only the base has data.
    let depth = nbdinfo_map(&uri, Some("qemu:allocation-depth"));
    assert!(depth.iter().any(|e| e.flags == 2), "{depth:?}");
    assert_eq!(reference[30 * MIB as usize], 0x12);

    // Incremental: chunks with no dirty byte are Clean, the rest equal
    // nbdcopy's bytes.
    let dirty = nbdinfo_map(&uri, Some("qemu:dirty-bitmap:b0"));
    for engine in engines() {
        let r = read_export(&src.clone().with_dirty_bitmap("b0"), &reader_cfg(engine, 4)).unwrap();
        for (&i, k) in &r.kinds {
            let (a, b) = (i * 4 * MIB, (i + 1) * 4 * MIB);
            let is_dirty = dirty
                .iter()
                .any(|e| e.flags & 1 != 0 && e.offset < b && a < e.end());
            assert_eq!(
                *k == ChunkKind::Clean,
                !is_dirty,
                "{engine:?} chunk {i}: {k:?}"
            );
            if *k != ChunkKind::Clean {
                let (a, b) = (a as usize, b as usize);
                assert!(r.image[a..b] == reference[a..b], "{engine:?} chunk {i}");
            }
        }
        assert_eq!(
            r.stats.clean_chunks,
            16 - 4,
            "{engine:?}: dirty chunks 1, 4, 10, 15"
        );
    }
}

#[test]
fn nbd_qemu_nbd_over_tcp() {
    if !require_tool("qemu-nbd") || !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = build_qcow2(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "-e",
            "4",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-f",
            "qcow2",
        ])
        .arg(&top)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let up = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        "TCP NBD",
        || std::net::TcpStream::connect(&addr).ok().map(drop),
    );
    let uri = format!("nbd://127.0.0.1:{port}/");
    let result = std::panic::catch_unwind(|| {
        up.unwrap();
        let reference = nbdcopy(&uri);
        for engine in engines() {
            let r = read_export(&ExportSource::tcp(&addr, ""), &reader_cfg(engine, 2)).unwrap();
            assert!(r.image == reference, "{engine:?}");
            assert_eq!(r.connections, 2);
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn nbd_nbdkit_memory_data_and_sparse_random_match_libnbd() {
    if !require_tool("nbdkit") || !require_tool("nbdinfo") || !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nbdkit = |sock: &Path, args: &[&str]| {
        let mut c = Command::new("nbdkit");
        c.args(["-f", "-U"]).arg(sock).args(args);
        c
    };
    // data: explicit bytes at offsets, zero elsewhere.
    {
        let sock = dir.path().join("data.sock");
        let srv = Server::spawn(
            &mut nbdkit(
                &sock,
                &[
                    "data",
                    "@0x10000 ( 0x55 0xaa 1 2 3 )*20000 @0x300000 ( 7 )*70000 @0x1000000 ( 9 8 )*300000",
                    "size=40M",
                ],
            ),
            &sock,
            "-P",
        );
        let r = check_export(&ExportSource::unix(&sock, ""), &srv.uri(""), &[], 4);
        assert_eq!(r[0x10000], 0x55);
    }
    // sparse-random: deterministic random runs of data and holes.
    {
        let sock = dir.path().join("sparse.sock");
        let srv = Server::spawn(
            &mut nbdkit(
                &sock,
                &["sparse-random", "size=300M", "seed=4242", "percent=15"],
            ),
            &sock,
            "-P",
        );
        check_export(&ExportSource::unix(&sock, ""), &srv.uri(""), &[], 4);
    }
    // memory: filled by nbdcopy from a local file, then read back.
    {
        let sock = dir.path().join("memory.sock");
        let srv = Server::spawn(&mut nbdkit(&sock, &["memory", "24M"]), &sock, "-P");
        let file = dir.path().join("fill.raw");
        let mut content = vec![0u8; 24 * MIB as usize];
        for (i, b) in content[3 * MIB as usize..9 * MIB as usize]
            .iter_mut()
            .enumerate()
        {
            *b = (i % 251) as u8;
        }
        std::fs::write(&file, &content).unwrap();
        run(Command::new("nbdcopy").arg(&file).arg(srv.uri("")));
        let r = check_export(&ExportSource::unix(&sock, ""), &srv.uri(""), &[], 2);
        assert!(r == content);
    }
}

/// F-18: with nbdkit's error filter every read fails; each data chunk's
/// error surfaces with its offset, and no data chunk is ever delivered
/// (never zero-filled). Zero chunks need no read and still arrive.
#[test]
fn nbd_nbdkit_error_filter_read_error_surfaces_for_that_range() {
    if !require_tool("nbdkit") || !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("e.sock");
    let srv = Server::spawn(
        Command::new("nbdkit").args(["-f", "-U"]).arg(&sock).args([
            "--filter=error",
            "data",
            "@0x900000 ( 1 2 3 4 )*100000",
            "size=32M",
            "error-pread-rate=100%",
            "error-pread=EIO",
        ]),
        &sock,
        "-P",
    );
    let map = nbdinfo_map(&srv.uri(""), None);
    let data: Vec<&Extent> = map.iter().filter(|e| e.flags & 2 == 0).collect();
    assert!(!data.is_empty());
    for engine in engines() {
        let cfg = ReaderConfig {
            read_retries: 1,
            ..reader_cfg(engine, 2)
        };
        let mut s = ChunkReader::start(&ExportSource::unix(&sock, ""), &cfg).unwrap();
        let mut err = None;
        for item in &mut s {
            match item {
                Ok(ch) => assert!(
                    !matches!(ch.kind, ChunkKind::Data(_)),
                    "{engine:?}: chunk {} delivered although every read fails",
                    ch.index
                ),
                Err(e) => err = Some(e),
            }
        }
        let e = err.expect("read error must surface");
        let off = e.offset().expect("offset");
        assert!(
            data.iter().any(|x| x.offset <= off && off < x.end()),
            "{engine:?}: error offset {off} outside every data extent: {e}"
        );
        assert!(matches!(e.root(), Error::Command { errno: 5, .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Temporary);
        assert!(s.stats().read_retries >= 1);
    }
}

/// F-18 with random errors: whatever happens, delivered data equals the
/// clean server's (same seed), and a failure carries an offset.
#[test]
fn nbd_nbdkit_random_read_errors_never_corrupt() {
    if !require_tool("nbdkit") || !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = ["sparse-random", "size=128M", "seed=99", "percent=30"];
    let clean_sock = dir.path().join("clean.sock");
    let clean = Server::spawn(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&clean_sock)
            .args(plugin),
        &clean_sock,
        "-P",
    );
    let reference = nbdcopy(&clean.uri(""));
    let mut run_no = 0;
    for engine in engines() {
        for retries in [0, 3] {
            // A fresh server each time: nbdkit 1.32 can abort when a client
            // hard-disconnects in the middle of an error reply.
            run_no += 1;
            let bad_sock = dir.path().join(format!("bad{run_no}.sock"));
            let _bad = Server::spawn(
                Command::new("nbdkit")
                    .args(["-f", "-U"])
                    .arg(&bad_sock)
                    .arg("--filter=error")
                    .args(plugin)
                    .args(["error-pread-rate=5%"]),
                &bad_sock,
                "-P",
            );
            let cfg = ReaderConfig {
                read_retries: retries,
                read_request_len: 256 * KIB as u32,
                ..reader_cfg(engine, 4)
            };
            let mut s = ChunkReader::start(&ExportSource::unix(&bad_sock, ""), &cfg).unwrap();
            let mut delivered = 0;
            let mut failed = None;
            for item in &mut s {
                match item {
                    Ok(ch) => {
                        let a = ch.offset as usize;
                        let want = &reference[a..a + ch.len as usize];
                        match &ch.kind {
                            ChunkKind::Data(d) => assert!(d[..] == want[..], "chunk {}", ch.index),
                            ChunkKind::Zero => assert!(want.iter().all(|&b| b == 0)),
                            ChunkKind::Clean => panic!("no bitmap"),
                        }
                        delivered += 1;
                    }
                    Err(e) => failed = Some(e),
                }
            }
            match &failed {
                Some(e) => {
                    assert!(e.offset().is_some(), "{e}");
                    assert!(matches!(e.root(), Error::Command { errno: 5, .. }), "{e:?}");
                }
                None => assert_eq!(delivered, 32),
            }
            eprintln!(
                "{engine:?} retries={retries}: delivered {delivered}, retried {}, failed: {}",
                s.stats().read_retries,
                failed.is_some()
            );
        }
    }
}

/// F-19: nbdkit's delay filter. Pipelining hides latency (64 reads at
/// 100 ms each take far less than 6.4 s); a delay beyond the idle deadline
/// is a Temporary timeout.
#[test]
fn nbd_nbdkit_delay_filter_latency_and_deadline() {
    if !require_tool("nbdkit") || !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut delayed = || {
        n += 1;
        let sock = dir.path().join(format!("d{n}.sock"));
        let srv = Server::spawn(
            Command::new("nbdkit").args(["-f", "-U"]).arg(&sock).args([
                "--filter=delay",
                "pattern",
                "size=16M",
                "rdelay=100ms",
            ]),
            &sock,
            "-P",
        );
        (srv, sock)
    };
    let (srv, _) = delayed();
    let reference = nbdcopy(&srv.uri(""));
    drop(srv);
    for engine in engines() {
        let (_srv, sock) = delayed();
        let cfg = ReaderConfig {
            read_request_len: 256 * KIB as u32,
            ..reader_cfg(engine, 1)
        };
        let t = Instant::now();
        let r = read_export(&ExportSource::unix(&sock, ""), &cfg).unwrap();
        let took = t.elapsed();
        assert!(r.image == reference);
        assert_eq!(r.stats.read_requests, 64);
        assert!(
            took < Duration::from_secs(4),
            "{engine:?}: {took:?}: requests not pipelined"
        );
        eprintln!("{engine:?}: 64 reads x 100 ms in {took:?}");

        let (_srv, sock) = delayed();
        let cfg = ReaderConfig {
            idle_timeout: Duration::from_millis(30),
            ..cfg
        };
        let err = match read_export(&ExportSource::unix(&sock, ""), &cfg) {
            Err(e) => e,
            Ok(_) => panic!("{engine:?}: a 100 ms stall must trip a 30 ms deadline"),
        };
        assert!(matches!(err.root(), Error::Timeout { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Temporary);
    }
}

// ------------------------------------------------------ QEMU's server

/// QEMU's built-in NBD server on a snapshot-access node (the fleecing
/// setup of design.md §2), with a disabled copy of a dirty bitmap
/// exported too. Guest-style writes after the snapshot must not show.
#[test]
fn qemu_snapshot_access_export_matches_libnbd() {
    if !require_qemu() || !require_tool("nbdinfo") || !require_tool("nbdcopy") {
        return;
    }
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2("d0", 64 * MIB))).unwrap();
    let node = vm.disk_node("d0");
    let qdev = vm.qdev("d0");
    vm.qemu_io("d0", "write -P 0xab 0 1M").unwrap();
    vm.qemu_io("d0", "write -P 0xcd 12M 3M").unwrap();
    vm.harness_qmp(
        "block-dirty-bitmap-add",
        json!({"node": node, "name": "track", "persistent": true}),
    )
    .unwrap();
    vm.qemu_io("d0", "write -P 0xef 12M 64k").unwrap();
    vm.qemu_io("d0", "write -P 0x77 40M 1M").unwrap();

    // Fleecing graph + a disabled copy of the bitmap for the export.
    let fleece = vm.dir().join("fleece.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&fleece)
        .arg("64M"));
    let q = |vm: &mut TestVm, cmd: &str, args: Value| {
        vm.harness_qmp(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
    };
    q(
        &mut vm,
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": node, "name": "tmp", "disabled": true}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": node, "target": "tmp", "bitmaps": ["track"]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": "track"}}
        ]}),
    );
    q(
        &mut vm,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece",
               "file": {"driver": "file", "filename": fleece.to_str().unwrap()}}),
    );
    q(
        &mut vm,
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": node,
               "target": "fleece", "on-cbw-error": "break-snapshot", "cbw-timeout": 30}),
    );
    q(
        &mut vm,
        "qom-set",
        json!({"path": qdev, "property": "drive", "value": "cbw"}),
    );
    q(
        &mut vm,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
    );
    let sock = vm.dir().join("nbd.sock");
    q(
        &mut vm,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
    q(
        &mut vm,
        "block-export-add",
        json!({"type": "nbd", "id": "exp0", "node-name": "snap", "name": "exp0",
               "writable": false, "bitmaps": [{"node": node, "name": "tmp"}]}),
    );
    // Writes after the snapshot: copied to the fleece, invisible in the export.
    vm.qemu_io("d0", "write -P 0x99 0 64k").unwrap();
    vm.qemu_io("d0", "write -P 0x99 50M 1M").unwrap();

    let uri = format!("nbd+unix:///exp0?socket={}", sock.display());
    let src = ExportSource::unix(&sock, "exp0");
    let reference = check_export(&src, &uri, &["qemu:dirty-bitmap:tmp"], 4);
    assert!(
        reference[..MIB as usize].iter().all(|&b| b == 0xab),
        "snapshot shows a later write"
    );
    assert!(reference[50 * MIB as usize..51 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(reference[12 * MIB as usize], 0xef);

    // Incremental through the exported bitmap: chunks 3 (12M) and 10 (40M).
    for engine in engines() {
        let r = read_export(
            &src.clone().with_dirty_bitmap("tmp"),
            &reader_cfg(engine, 4),
        )
        .unwrap();
        let not_clean: Vec<u64> = r
            .kinds
            .iter()
            .filter(|(_, k)| **k != ChunkKind::Clean)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(not_clean, vec![3, 10], "{engine:?}");
        for i in [3usize, 10] {
            let (a, b) = (i * 4 * MIB as usize, (i + 1) * 4 * MIB as usize);
            assert!(r.image[a..b] == reference[a..b], "{engine:?} chunk {i}");
        }
    }
    q(&mut vm, "block-export-del", json!({"id": "exp0"}));
    vm.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10))
        .unwrap();
    q(&mut vm, "nbd-server-stop", json!({}));
}

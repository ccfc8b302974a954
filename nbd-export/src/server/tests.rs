//! Server tests against this crate's own client and a raw socket.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zerocopy::IntoBytes;

use super::*;
use crate::wire;
use crate::{Client, ClientOptions, EngineChoice, ExportSource};

/// Data with holes: the hole ranges read as zeroes and report as holes.
struct Mem {
    data: Mutex<Vec<u8>>,
    holes: Vec<(u64, u64)>,
    writable: bool,
}

impl BlockSource for Mem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<SourceExtent>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (hole, next) = match self.holes.iter().find(|(s, e)| *s <= pos && pos < *e) {
                Some(&(_, e)) => (true, e),
                None => (
                    false,
                    self.holes
                        .iter()
                        .map(|h| h.0)
                        .filter(|s| *s > pos)
                        .min()
                        .unwrap_or(u64::MAX),
                ),
            };
            let n = next.min(end) - pos;
            out.push(SourceExtent { length: n, hole });
            pos += n;
        }
        Ok(out)
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _trim: bool) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

const SIZE: usize = 4 << 20;

fn pattern() -> Vec<u8> {
    let mut v: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
    v[1 << 20..2 << 20].fill(0);
    v
}

struct Running {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    server: Arc<Server>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(writable: bool, config: ServerConfig) -> Running {
    let src = Arc::new(Mem {
        data: Mutex::new(pattern()),
        holes: vec![(1 << 20, 2 << 20)],
        writable,
    });
    start_source(src, config)
}

fn start_source(src: Arc<dyn BlockSource>, config: ServerConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = Server::new(
        vec![Export {
            name: "disk0".into(),
            description: "test".into(),
            source: src,
        }],
        config,
    )
    .unwrap();
    let l = Listener::Unix(UnixListener::bind(&path).unwrap());
    let stop = StopHandle::new();
    let (s2, st2) = (Arc::clone(&server), stop.clone());
    let thread = std::thread::spawn(move || l.run(&s2, &st2).unwrap());
    Running {
        _dir: dir,
        path,
        stop,
        thread: Some(thread),
        server,
    }
}

fn client(r: &Running) -> Client {
    let opts = ClientOptions {
        engine: EngineChoice::Sync,
        ..ClientOptions::default()
    };
    Client::connect(&ExportSource::unix(&r.path, "disk0"), &opts).unwrap()
}

#[test]
fn own_client_reads_whole_export_and_maps_holes() {
    let r = start(false, ServerConfig::default());
    let mut c = client(&r);
    assert_eq!(c.info().size, SIZE as u64);
    assert!(c.info().flags.read_only());
    assert_eq!(c.read(0, SIZE).unwrap(), pattern());
    // Unaligned read across the hole boundary.
    let got = c.read((1 << 20) - 100, 300).unwrap();
    assert_eq!(got, pattern()[(1 << 20) - 100..(1 << 20) + 200]);
    let map = c.map(wire::CONTEXT_BASE_ALLOCATION).unwrap();
    let holes: Vec<_> = map
        .iter()
        .filter(|e| e.flags & wire::NBD_STATE_HOLE != 0)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(holes, vec![(1 << 20, 1 << 20)]);
    c.disconnect().unwrap();
}

/// A raw client: handshake helpers for hostile cases.
struct Raw(UnixStream);

impl Raw {
    fn connect(r: &Running) -> Raw {
        let s = UnixStream::connect(&r.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut raw = Raw(s);
        let mut g = [0u8; 18];
        raw.0.read_exact(&mut g).unwrap();
        raw.0
            .write_all(
                &(wire::NBD_FLAG_C_FIXED_NEWSTYLE | wire::NBD_FLAG_C_NO_ZEROES).to_be_bytes(),
            )
            .unwrap();
        raw
    }
    fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        wire::encode_option(&mut v, opt, data).unwrap();
        self.0.write_all(&v).unwrap();
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d).unwrap();
            let end = ty == wire::NBD_REP_ACK || ty & wire::NBD_REP_FLAG_ERROR != 0;
            replies.push((ty, d));
            if end {
                return replies;
            }
        }
    }
    fn go(&mut self, structured: bool) {
        if structured {
            let r = self.option(wire::NBD_OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.last().unwrap().0, wire::NBD_REP_ACK);
        }
        let r = self.option(
            wire::NBD_OPT_GO,
            &wire::encode_go_data("disk0", &[]).unwrap(),
        );
        assert_eq!(r.last().unwrap().0, wire::NBD_REP_ACK);
    }
    fn request(&mut self, cmd: u16, cookie: u64, offset: u64, length: u32) {
        self.0
            .write_all(wire::Request::new(cmd, 0, cookie, offset, length).as_bytes())
            .unwrap();
    }
    /// Reads a simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            wire::SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
}

/// The pattern in 64 KiB chunks held in memory, lent out through
/// `read_shared` (as `shear serve` lends its decoded chunks); one chunk
/// fails to "decode".
struct Chunked {
    chunks: Vec<Arc<Vec<u8>>>,
    bad_chunk: usize,
    shared: std::sync::atomic::AtomicU64,
    copied: std::sync::atomic::AtomicU64,
    /// Chunks `read_ready` hands over (even ones when set), and how often.
    ready_even: bool,
    ready: std::sync::atomic::AtomicU64,
}

const CHUNKED: usize = 64 << 10;

impl Chunked {
    fn new() -> Chunked {
        Chunked {
            chunks: pattern()
                .chunks(CHUNKED)
                .map(|c| Arc::new(c.to_vec()))
                .collect(),
            bad_chunk: 40,
            shared: Default::default(),
            copied: Default::default(),
            ready_even: false,
            ready: Default::default(),
        }
    }
    fn chunk(&self, i: usize) -> io::Result<&Arc<Vec<u8>>> {
        if i == self.bad_chunk {
            return Err(io::Error::other("chunk 40 does not decode"));
        }
        Ok(&self.chunks[i])
    }
}

impl BlockSource for Chunked {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.copied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (k, b) in buf.iter_mut().enumerate() {
            let pos = offset as usize + k;
            *b = self.chunk(pos / CHUNKED)?[pos % CHUNKED];
        }
        Ok(())
    }
    fn read_ready(&self, offset: u64, len: usize) -> Option<SharedBytes> {
        let (i, within) = (offset as usize / CHUNKED, offset as usize % CHUNKED);
        if !self.ready_even || i % 2 == 1 || within + len > CHUNKED {
            return None;
        }
        self.ready
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        SharedBytes::new(Arc::clone(self.chunk(i).ok()?), within, len)
    }
    fn read_shared(&self, offset: u64, len: usize) -> io::Result<Option<SharedBytes>> {
        let (i, within) = (offset as usize / CHUNKED, offset as usize % CHUNKED);
        if within + len > CHUNKED {
            return Ok(None);
        }
        self.shared
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(SharedBytes::new(Arc::clone(self.chunk(i)?), within, len))
    }
    fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<SourceExtent>> {
        Ok(vec![SourceExtent {
            length: len,
            hole: false,
        }])
    }
}

/// Reads inside one chunk go out from the source's own memory (no copy),
/// in simple and structured replies; reads across chunks are copied; both
/// give the same bytes; a chunk that fails gives EIO on both paths and the
/// connection goes on.
#[test]
fn shared_reads_go_out_uncopied_and_match_copied_ones() {
    use std::sync::atomic::Ordering::Relaxed;
    let src = Arc::new(Chunked::new());
    let r = start_source(
        Arc::clone(&src) as Arc<dyn BlockSource>,
        ServerConfig::default(),
    );
    let want = pattern();
    let mut own = client(&r);
    // Structured: inside chunks, across chunks.
    assert_eq!(own.read(0, CHUNKED).unwrap(), want[..CHUNKED]);
    assert_eq!(own.read(100, 4000).unwrap(), want[100..4100]);
    let (s0, c0) = (src.shared.load(Relaxed), src.copied.load(Relaxed));
    assert!(s0 >= 2, "{s0} shared reads");
    assert_eq!(
        own.read(CHUNKED as u64 - 10, 20).unwrap(),
        want[CHUNKED - 10..CHUNKED + 10]
    );
    assert_eq!(
        src.copied.load(Relaxed),
        c0 + 1,
        "a read across chunks is copied"
    );
    // The failing chunk: EIO whether lent or copied.
    let bad = (40 * CHUNKED) as u64;
    own.read(bad + 8, 512).unwrap_err();
    own.read(bad - 8, 512).unwrap_err();
    assert_eq!(
        own.read(bad - 512, 512).unwrap(),
        want[bad as usize - 512..bad as usize]
    );
    // Simple replies.
    let mut raw = Raw::connect(&r);
    raw.go(false);
    raw.request(wire::NBD_CMD_READ, 3, 3 * CHUNKED as u64 + 5, 1000);
    assert_eq!(raw.simple(), (0, 3));
    let mut d = vec![0u8; 1000];
    raw.0.read_exact(&mut d).unwrap();
    assert_eq!(d, want[3 * CHUNKED + 5..3 * CHUNKED + 1005]);
    raw.request(wire::NBD_CMD_READ, 4, bad, 16);
    assert_eq!(raw.simple(), (wire::NBD_EIO, 4));
    raw.request(wire::NBD_CMD_READ, 5, 0, 16);
    assert_eq!(raw.simple(), (0, 5));
    raw.0.read_exact(&mut d[..16]).unwrap();
    assert_eq!(d[..16], want[..16]);
}

/// Reads the source holds ready are answered by the connection's reader
/// thread (no worker), in simple and structured replies, with the same
/// bytes as the worker path; everything else still goes to a worker:
/// reads not ready, across chunks, past the end (an error), of length 0.
#[test]
fn ready_reads_are_answered_inline_and_match_the_worker_path() {
    use std::sync::atomic::Ordering::Relaxed;
    let src = Arc::new(Chunked {
        ready_even: true,
        ..Chunked::new()
    });
    let r = start_source(
        Arc::clone(&src) as Arc<dyn BlockSource>,
        ServerConfig::default(),
    );
    let want = pattern();
    let mut own = client(&r);
    let ready = || src.ready.load(Relaxed);
    let worker = || src.shared.load(Relaxed) + src.copied.load(Relaxed);
    // Chunk 2 is ready, chunk 3 is not: same bytes, different paths.
    let (r0, w0) = (ready(), worker());
    let two = 2 * CHUNKED;
    assert_eq!(
        own.read(two as u64 + 7, 5000).unwrap(),
        want[two + 7..two + 5007]
    );
    assert_eq!((ready() - r0, worker() - w0), (1, 0), "ready chunk: inline");
    let three = 3 * CHUNKED;
    assert_eq!(
        own.read(three as u64, 4096).unwrap(),
        want[three..three + 4096]
    );
    assert_eq!(
        (ready() - r0, worker() - w0),
        (1, 1),
        "chunk not ready: worker"
    );
    // Across chunks 2 and 3: a worker copies it.
    assert_eq!(
        own.read(three as u64 - 10, 20).unwrap(),
        want[three - 10..three + 10]
    );
    assert_eq!(ready() - r0, 1);
    // Simple replies, a zero-length read and one past the end.
    let mut raw = Raw::connect(&r);
    raw.go(false);
    raw.request(wire::NBD_CMD_READ, 9, 4 * CHUNKED as u64 + 1, 1000);
    assert_eq!(raw.simple(), (0, 9));
    let mut d = vec![0u8; 1000];
    raw.0.read_exact(&mut d).unwrap();
    assert_eq!(d, want[4 * CHUNKED + 1..4 * CHUNKED + 1001]);
    assert_eq!(ready() - r0, 2);
    raw.request(wire::NBD_CMD_READ, 10, SIZE as u64 - 100, 200);
    assert_ne!(raw.simple().0, 0, "a read past the end is refused");
    raw.request(wire::NBD_CMD_READ, 11, 0, 16);
    assert_eq!(raw.simple(), (0, 11));
    raw.0.read_exact(&mut d[..16]).unwrap();
    assert_eq!(d[..16], want[..16]);
    assert_eq!(ready() - r0, 3);
}

#[test]
fn bad_options_get_errors_and_negotiation_goes_on() {
    let r = start(false, ServerConfig::default());
    let mut c = Raw::connect(&r);
    // Unknown option.
    let rep = c.option(9999, b"junk");
    assert_eq!(rep[0].0, wire::NBD_REP_ERR_UNSUP);
    // GO with a name length past the data.
    let mut bad = 1000u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"disk0");
    assert_eq!(
        c.option(wire::NBD_OPT_GO, &bad)[0].0,
        wire::NBD_REP_ERR_INVALID
    );
    // Unknown export.
    let rep = c.option(
        wire::NBD_OPT_INFO,
        &wire::encode_go_data("nope", &[]).unwrap(),
    );
    assert_eq!(rep[0].0, wire::NBD_REP_ERR_UNKNOWN);
    // Meta context before structured replies.
    let q = wire::encode_meta_context_data("disk0", &["base:allocation"]).unwrap();
    assert_eq!(
        c.option(wire::NBD_OPT_SET_META_CONTEXT, &q)[0].0,
        wire::NBD_REP_ERR_INVALID
    );
    // LIST names the export.
    let rep = c.option(wire::NBD_OPT_LIST, &[]);
    assert_eq!(rep[0].0, wire::NBD_REP_SERVER);
    assert_eq!(&rep[0].1[4..9], b"disk0");
    // Still usable: GO, then read.
    c.go(false);
    c.request(wire::NBD_CMD_READ, 7, 0, 512);
    assert_eq!(c.simple(), (0, 7));
    let mut d = vec![0u8; 512];
    c.0.read_exact(&mut d).unwrap();
    assert_eq!(d, pattern()[..512]);
}

#[test]
fn out_of_range_huge_and_write_requests_are_refused_then_served() {
    let r = start(false, ServerConfig::default());
    let mut c = Raw::connect(&r);
    c.go(false);
    // Past the end, overflowing, oversized, zero length, unknown command.
    c.request(wire::NBD_CMD_READ, 1, SIZE as u64 - 10, 11);
    assert_eq!(c.simple(), (wire::NBD_EINVAL, 1));
    c.request(wire::NBD_CMD_READ, 2, u64::MAX - 5, 4096);
    assert_eq!(c.simple(), (wire::NBD_EINVAL, 2));
    c.request(wire::NBD_CMD_READ, 3, 0, u32::MAX);
    assert_eq!(c.simple(), (wire::NBD_EOVERFLOW, 3));
    c.request(wire::NBD_CMD_READ, 4, 0, 0);
    assert_eq!(c.simple(), (wire::NBD_EINVAL, 4));
    c.request(77, 5, 0, 512);
    assert_eq!(c.simple(), (wire::NBD_EINVAL, 5));
    // A write to a read-only export: payload consumed, EPERM.
    c.request(wire::NBD_CMD_WRITE, 6, 0, 4);
    c.0.write_all(b"abcd").unwrap();
    assert_eq!(c.simple(), (wire::NBD_EPERM, 6));
    // Block status without a negotiated context.
    c.request(wire::NBD_CMD_BLOCK_STATUS, 8, 0, 4096);
    assert_eq!(c.simple(), (wire::NBD_EINVAL, 8));
    // Still serving.
    c.request(wire::NBD_CMD_READ, 9, 4096, 16);
    assert_eq!(c.simple(), (0, 9));
    let mut d = [0u8; 16];
    c.0.read_exact(&mut d).unwrap();
    assert_eq!(d[..], pattern()[4096..4112]);
    // Data unchanged by the refused write.
    let mut own = client(&r);
    assert_eq!(own.read(0, 4).unwrap(), pattern()[..4]);
}

#[test]
fn writes_reach_a_writable_source() {
    let r = start(true, ServerConfig::default());
    let mut c = client(&r);
    assert!(!c.info().flags.read_only());
    drop(c);
    let mut raw = Raw::connect(&r);
    raw.go(false);
    raw.request(wire::NBD_CMD_WRITE, 1, 100, 5);
    raw.0.write_all(b"hello").unwrap();
    assert_eq!(raw.simple(), (0, 1));
    raw.request(wire::NBD_CMD_WRITE, 2, SIZE as u64 - 2, 5);
    raw.0.write_all(b"hello").unwrap();
    assert_eq!(raw.simple(), (wire::NBD_ENOSPC, 2));
    raw.request(wire::NBD_CMD_FLUSH, 3, 0, 0);
    assert_eq!(raw.simple(), (0, 3));
    c = client(&r);
    assert_eq!(c.read(100, 5).unwrap(), b"hello");
}

#[test]
fn connection_cap_slow_handshakes_and_dropped_clients_leave_it_serving() {
    let config = ServerConfig {
        max_connections: 4,
        handshake_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let r = start(false, config);
    // Four idle connections hold every slot until their handshake deadline.
    let idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&r.path).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = UnixStream::connect(&r.path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 18];
    // Refused: closed without a greeting.
    assert!(matches!(extra.read(&mut b), Ok(0) | Err(_)));
    // After the deadline the slots are free again.
    std::thread::sleep(Duration::from_millis(1200));
    drop(idle);
    // Clients that vanish mid-request and many quick connects.
    for i in 0..200u64 {
        let mut c = Raw::connect(&r);
        c.go(true);
        if i % 2 == 0 {
            c.request(wire::NBD_CMD_READ, i, 0, 4 << 20);
        } else {
            // Half a request header.
            c.0.write_all(&[0x25, 0x60, 0x95]).unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while r.server.active_connections() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.server.active_connections(), 0);
    let mut c = client(&r);
    assert_eq!(c.read(0, SIZE).unwrap(), pattern());
}

#[test]
fn descriptors_are_clipped_merged_and_bounded() {
    let ext = [
        SourceExtent {
            length: 10,
            hole: false,
        },
        SourceExtent {
            length: 5,
            hole: false,
        },
        SourceExtent {
            length: 100,
            hole: true,
        },
    ];
    assert_eq!(
        conn::descriptors_for_test(&ext, 50, 10),
        vec![(15, 0), (35, wire::NBD_STATE_HOLE | wire::NBD_STATE_ZERO)]
    );
    assert_eq!(conn::descriptors_for_test(&ext, 50, 1), vec![(15, 0)]);
}

// --- TLS (NBD_OPT_STARTTLS) ---

const CA: &[u8] = include_bytes!("testdata/ca-cert.pem");
const SERVER_CERT_PEM: &[u8] = include_bytes!("testdata/server-cert.pem");
const SERVER_KEY_PEM: &[u8] = include_bytes!("testdata/server-key.pem");
const CLIENT_CERT_PEM: &[u8] = include_bytes!("testdata/client-cert.pem");
const CLIENT_KEY_PEM: &[u8] = include_bytes!("testdata/client-key.pem");

fn tls_config(verify_peer: bool) -> ServerConfig {
    ServerConfig {
        tls: Some(
            ServerTls::from_pem(SERVER_CERT_PEM, SERVER_KEY_PEM, verify_peer.then_some(CA))
                .unwrap(),
        ),
        ..ServerConfig::default()
    }
}

/// Sends an option on any stream; the replies up to the final one.
fn opt<S: Read + Write>(s: &mut S, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    wire::encode_option(&mut v, option, data).unwrap();
    s.write_all(&v).unwrap();
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        let end = ty == wire::NBD_REP_ACK || ty & wire::NBD_REP_FLAG_ERROR != 0;
        replies.push((ty, d));
        if end {
            return replies;
        }
    }
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, UnixStream>;

fn client_config(with_cert: bool) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(CA).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(if with_cert {
        b.with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(CLIENT_CERT_PEM).unwrap()],
            PrivateKeyDer::from_pem_slice(CLIENT_KEY_PEM).unwrap(),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    })
}

/// STARTTLS on a raw client and the TLS handshake (driven to its end).
fn starttls(mut raw: Raw, with_cert: bool) -> io::Result<TlsClient> {
    let r = opt(&mut raw.0, wire::NBD_OPT_STARTTLS, &[]);
    assert_eq!(r.last().unwrap().0, wire::NBD_REP_ACK);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(with_cert), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, raw.0);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn tls_go_and_read(s: &mut TlsClient, offset: u64, len: u32) -> Vec<u8> {
    let r = opt(
        s,
        wire::NBD_OPT_GO,
        &wire::encode_go_data("disk0", &[]).unwrap(),
    );
    assert_eq!(r.last().unwrap().0, wire::NBD_REP_ACK);
    s.write_all(wire::Request::new(wire::NBD_CMD_READ, 0, 42, offset, len).as_bytes())
        .unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        0,
        "read error"
    );
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 42);
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    d
}

/// Whether the server closes the connection within 20 s (EOF or reset,
/// after whatever it still sends, e.g. a TLS alert).
fn closed_by_server(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn tls_required_before_any_option_then_negotiation_and_reads_run_inside_tls() {
    let r = start(false, tls_config(false));
    let mut c = Raw::connect(&r);
    for o in [
        wire::NBD_OPT_LIST,
        wire::NBD_OPT_STRUCTURED_REPLY,
        wire::NBD_OPT_INFO,
        wire::NBD_OPT_GO,
    ] {
        let data = if matches!(o, wire::NBD_OPT_INFO | wire::NBD_OPT_GO) {
            wire::encode_go_data("disk0", &[]).unwrap()
        } else {
            Vec::new()
        };
        let rep = c.option(o, &data);
        assert_eq!(rep.len(), 1, "{}", wire::option_name(o));
        assert_eq!(
            rep[0].0,
            wire::NBD_REP_ERR_TLS_REQD,
            "{}",
            wire::option_name(o)
        );
    }
    // STARTTLS with data is malformed (and TLS not started).
    assert_eq!(
        c.option(wire::NBD_OPT_STARTTLS, b"x")[0].0,
        wire::NBD_REP_ERR_INVALID
    );
    let mut s = starttls(c, false).unwrap();
    // STARTTLS twice: refused inside TLS, the session goes on.
    let rep = opt(&mut s, wire::NBD_OPT_STARTTLS, &[]);
    assert_eq!(rep[0].0, wire::NBD_REP_ERR_INVALID);
    let rep = opt(&mut s, wire::NBD_OPT_LIST, &[]);
    assert_eq!(rep[0].0, wire::NBD_REP_SERVER);
    // A read larger than rustls' buffers (many records) is whole.
    let got = tls_go_and_read(&mut s, 0, SIZE as u32);
    assert!(got == pattern(), "data read over TLS differs");
    // And the crate's own (plaintext) client is refused: TLS required.
    let opts = ClientOptions {
        engine: EngineChoice::Sync,
        ..ClientOptions::default()
    };
    let err = Client::connect(&ExportSource::unix(&r.path, "disk0"), &opts).unwrap_err();
    assert!(
        matches!(&err, crate::Error::OptionRefused { reply, .. } if *reply == "NBD_REP_ERR_TLS_REQD"),
        "{err:?}"
    );
}

#[test]
fn tls_export_name_before_starttls_ends_the_connection() {
    let r = start(false, tls_config(false));
    let mut c = Raw::connect(&r);
    let mut v = Vec::new();
    wire::encode_option(&mut v, wire::NBD_OPT_EXPORT_NAME, b"disk0").unwrap();
    c.0.write_all(&v).unwrap();
    assert!(closed_by_server(&mut c.0), "no close after EXPORT_NAME");
}

#[test]
fn tls_garbage_after_starttls_or_silence_ends_only_that_connection() {
    let r = start(
        false,
        ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..tls_config(false)
        },
    );
    // Plaintext NBD options where the ClientHello should be.
    let mut c = Raw::connect(&r);
    assert_eq!(
        c.option(wire::NBD_OPT_STARTTLS, &[])[0].0,
        wire::NBD_REP_ACK
    );
    let mut junk = Vec::new();
    for _ in 0..64 {
        wire::encode_option(&mut junk, wire::NBD_OPT_GO, b"garbage!").unwrap();
    }
    c.0.write_all(&junk).unwrap();
    assert!(
        closed_by_server(&mut c.0),
        "garbage after STARTTLS not refused"
    );
    // STARTTLS, then nothing: closed at the handshake deadline.
    let mut c = Raw::connect(&r);
    assert_eq!(
        c.option(wire::NBD_OPT_STARTTLS, &[])[0].0,
        wire::NBD_REP_ACK
    );
    let t0 = std::time::Instant::now();
    assert!(closed_by_server(&mut c.0), "silent TLS client kept");
    assert!(t0.elapsed() < Duration::from_secs(15));
    // The server still serves.
    let mut s = starttls(Raw::connect(&r), false).unwrap();
    assert!(tls_go_and_read(&mut s, 4096, 8192) == pattern()[4096..4096 + 8192]);
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while r.server.active_connections() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.server.active_connections(), 0);
}

#[test]
fn tls_verify_peer_refuses_a_client_without_a_certificate() {
    let r = start(false, tls_config(true));
    // Without a client certificate the handshake fails (TLS 1.3 may only
    // show it at the first read), and nothing is served.
    let refused = match starttls(Raw::connect(&r), false) {
        Err(_) => true,
        Ok(mut s) => {
            let mut v = Vec::new();
            wire::encode_option(&mut v, wire::NBD_OPT_LIST, &[]).unwrap();
            let _ = s.write_all(&v);
            let mut h = [0u8; 20];
            s.read_exact(&mut h).is_err()
        }
    };
    assert!(refused, "a client without a certificate was served");
    let mut s = starttls(Raw::connect(&r), true).unwrap();
    assert!(tls_go_and_read(&mut s, 0, 4096) == pattern()[..4096]);
}

#[test]
fn starttls_on_a_plaintext_server_is_refused_by_policy() {
    let r = start(false, ServerConfig::default());
    let mut c = Raw::connect(&r);
    assert_eq!(
        c.option(wire::NBD_OPT_STARTTLS, &[])[0].0,
        wire::NBD_REP_ERR_POLICY
    );
    c.go(false);
    c.request(wire::NBD_CMD_READ, 1, 0, 512);
    assert_eq!(c.simple(), (0, 1));
}

#[test]
fn tls_credentials_directory_psk_and_missing_files_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(PSK_FILE), "alice:0123abcd\n").unwrap();
    let e = ServerTls::from_x509_dir(d.path(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS-PSK is not supported"), "{e}");
    std::fs::remove_file(d.path().join(PSK_FILE)).unwrap();
    let e = ServerTls::from_x509_dir(d.path(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(SERVER_CERT), "{e}");
    std::fs::write(d.path().join(SERVER_CERT), SERVER_CERT_PEM).unwrap();
    std::fs::write(d.path().join(SERVER_KEY), CLIENT_KEY_PEM).unwrap();
    // A key that is not the certificate's.
    let e = ServerTls::from_x509_dir(d.path(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(SERVER_KEY), "{e}");
    std::fs::write(d.path().join(SERVER_KEY), SERVER_KEY_PEM).unwrap();
    assert!(!ServerTls::from_x509_dir(d.path(), false)
        .unwrap()
        .verify_peer());
    // Verifying peers needs the CA.
    let e = ServerTls::from_x509_dir(d.path(), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains(CA_CERT), "{e}");
    std::fs::write(d.path().join(CA_CERT), CA).unwrap();
    assert!(ServerTls::from_x509_dir(d.path(), true)
        .unwrap()
        .verify_peer());
}

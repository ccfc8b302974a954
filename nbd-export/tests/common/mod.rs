//! A scriptable in-process NBD server for tests (a test double, never used
//! by production code). It serves an in-memory image with allocation and
//! dirty-bitmap maps over a unix socket, speaking the protocol through the
//! crate's own `wire` codec, and can be told to misbehave: reorder replies,
//! fragment them, fail reads, stall, hang up, or let a test rewrite any
//! reply's bytes (the hostile-server cases).
// Test sizes are small constants; narrowing casts cannot truncate.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd_export::wire::*;
use nbd_export::{EngineChoice, ExportSource};
use zerocopy::{FromBytes, IntoBytes};

/// Engines every data-path test runs against. io_uring must be available
/// under CI; elsewhere its absence is a printed skip.
pub fn engines() -> Vec<EngineChoice> {
    let mut v = vec![EngineChoice::Sync];
    match EngineChoice::Uring.resolve() {
        Ok(_) => v.push(EngineChoice::Uring),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable under CI: {e}"
            );
            eprintln!("io_uring unavailable, testing the sync engine only: {e}");
        }
    }
    v
}

/// A stretch of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// Bytes from a deterministic pattern seeded with the value.
    Data(u8),
    /// Allocated but all zero (reported as data: must be read).
    ZeroData,
    /// A hole that reads as zeroes (`HOLE|ZERO`).
    Hole,
}

/// An in-memory disk.
#[derive(Debug, Clone)]
pub struct Image {
    pub data: Vec<u8>,
    /// base:allocation extents `(len, flags)` tiling the image.
    pub alloc: Vec<(u64, u32)>,
    /// Dirty map `(len, dirty)` tiling the image.
    pub dirty: Vec<(u64, bool)>,
}

fn pattern(seed: u8, offset: u64, out: &mut [u8]) {
    // Cheap, offset-dependent, never constant.
    for (i, b) in out.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed);
        *b = (x >> 56) as u8 | 1;
    }
}

impl Image {
    /// Builds an image from `(len, kind)` segments; nothing dirty.
    pub fn new(segs: &[(u64, Seg)]) -> Image {
        let size: u64 = segs.iter().map(|s| s.0).sum();
        let mut data = vec![0u8; size as usize];
        let mut alloc: Vec<(u64, u32)> = Vec::new();
        let mut pos = 0u64;
        for &(len, kind) in segs {
            let flags = match kind {
                Seg::Data(seed) => {
                    pattern(seed, pos, &mut data[pos as usize..(pos + len) as usize]);
                    0
                }
                Seg::ZeroData => 0,
                Seg::Hole => NBD_STATE_HOLE | NBD_STATE_ZERO,
            };
            match alloc.last_mut() {
                Some(l) if l.1 == flags => l.0 += len,
                _ => alloc.push((len, flags)),
            }
            pos += len;
        }
        Image {
            data,
            alloc,
            dirty: vec![(size, false)],
        }
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Sets the dirty map from `(len, dirty)` pieces.
    pub fn with_dirty(mut self, dirty: &[(u64, bool)]) -> Image {
        assert_eq!(dirty.iter().map(|d| d.0).sum::<u64>(), self.size());
        self.dirty = dirty.to_vec();
        self
    }

    /// Extents `(offset, len, flags)` of a map.
    fn extents(map: &[(u64, u32)]) -> Vec<(u64, u64, u32)> {
        let mut pos = 0;
        map.iter()
            .map(|&(l, f)| {
                let e = (pos, l, f);
                pos += l;
                e
            })
            .collect()
    }

    pub fn alloc_extents(&self) -> Vec<(u64, u64, u32)> {
        Self::extents(&self.alloc)
    }

    pub fn dirty_extents(&self) -> Vec<(u64, u64, u32)> {
        let m: Vec<(u64, u32)> = self.dirty.iter().map(|&(l, d)| (l, u32::from(d))).collect();
        Self::extents(&m)
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub conn: usize,
    pub seq: usize,
    pub command: u16,
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Rewrites the reply bytes for one request (hostile cases).
pub type Tamper = Arc<dyn Fn(&Req, Vec<u8>) -> Vec<u8> + Send + Sync>;
/// Rewrites handshake bytes: (stage, bytes) → bytes. Stages: "greeting",
/// "structured", "meta", "go".
pub type HandshakeTamper = Arc<dyn Fn(&str, usize, Vec<u8>) -> Vec<u8> + Send + Sync>;

/// How the server behaves.
#[derive(Clone)]
pub struct Behavior {
    pub multi_conn: bool,
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Context names the server will select when asked.
    pub offer_contexts: Vec<String>,
    /// Reply to batched requests in reverse order.
    pub reverse_replies: bool,
    /// Split read replies into pieces of at most this many bytes.
    pub read_fragment: u64,
    /// Answer hole parts of reads with `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub hole_chunks: bool,
    /// Send at most this many extents per block status reply.
    pub max_extents: usize,
    /// Let the final extent run past the request (allowed by the spec).
    pub extent_overrun: bool,
    /// Reads overlapping these ranges fail with EIO at the range start,
    /// the first `fail_times` times each (u32::MAX: always).
    pub bad_ranges: Vec<(u64, u64)>,
    pub fail_times: u32,
    /// After this many requests (over all connections): stop answering.
    pub stall_after: Option<usize>,
    /// After this many requests: close the connection.
    pub hangup_after: Option<usize>,
    /// Close the connection right after writing the reply to request `n`.
    pub eof_after_reply: Option<usize>,
    /// Rewrite reply bytes.
    pub tamper: Option<Tamper>,
    /// Rewrite handshake bytes.
    pub tamper_handshake: Option<HandshakeTamper>,
    /// Export size per connection index (F-20: a size that changes).
    pub size_override: Option<Arc<dyn Fn(usize) -> u64 + Send + Sync>>,
    /// Like QEMU's snapshot-access with released ranges: block status over
    /// any byte some connection has already read fails (EINVAL, QEMU's
    /// mapping of its EACCES), as the reader's user releases what it read.
    pub released_after_read: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            multi_conn: true,
            block_sizes: None,
            offer_contexts: vec![
                CONTEXT_BASE_ALLOCATION.into(),
                "qemu:dirty-bitmap:bitmap0".into(),
                CONTEXT_ALLOCATION_DEPTH.into(),
            ],
            reverse_replies: false,
            read_fragment: u64::MAX,
            hole_chunks: false,
            max_extents: usize::MAX,
            extent_overrun: false,
            bad_ranges: Vec::new(),
            fail_times: u32::MAX,
            stall_after: None,
            hangup_after: None,
            eof_after_reply: None,
            tamper: None,
            tamper_handshake: None,
            size_override: None,
            released_after_read: false,
        }
    }
}

struct State {
    image: Image,
    behavior: Behavior,
    requests: AtomicUsize,
    failures: Mutex<std::collections::HashMap<(u64, u64), u32>>,
    log: Mutex<Vec<Req>>,
    stop: AtomicBool,
    max_in_flight_seen: AtomicUsize,
}

/// A running fake server on a unix socket.
pub struct FakeServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepted: Arc<AtomicUsize>,
}

impl FakeServer {
    pub fn start(image: Image, behavior: Behavior) -> FakeServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            image,
            behavior,
            requests: AtomicUsize::new(0),
            failures: Mutex::new(Default::default()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            max_in_flight_seen: AtomicUsize::new(0),
        });
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (st, cs, acc) = (
            Arc::clone(&state),
            Arc::clone(&conns),
            Arc::clone(&accepted),
        );
        let accept = std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let idx = acc.fetch_add(1, Ordering::SeqCst);
                        let st2 = Arc::clone(&st);
                        cs.lock().unwrap().push(std::thread::spawn(move || {
                            let _ = serve(s, idx, &st2);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FakeServer {
            dir,
            path,
            state,
            accept: Some(accept),
            conns,
            accepted,
        }
    }

    /// Serves one already connected stream (a socketpair end).
    pub fn serve_stream(s: UnixStream, image: Image, behavior: Behavior) -> JoinHandle<()> {
        let st = Arc::new(State {
            image,
            behavior,
            requests: AtomicUsize::new(0),
            failures: Mutex::new(Default::default()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            max_in_flight_seen: AtomicUsize::new(0),
        });
        std::thread::spawn(move || {
            let _ = serve(s, 0, &st);
        })
    }

    pub fn source(&self) -> ExportSource {
        ExportSource::unix(&self.path, "exp")
    }

    pub fn requests(&self) -> Vec<Req> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Most requests one connection had outstanding at once.
    pub fn max_in_flight_seen(&self) -> usize {
        self.state.max_in_flight_seen.load(Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        for h in self.conns.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

fn read_exact_or_stop(s: &mut UnixStream, buf: &mut [u8], st: &State) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        if st.stop.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match s.read(&mut buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn opt_reply(out: &mut Vec<u8>, option: u32, ty: u32, payload: &[u8]) {
    out.extend_from_slice(OptionReply::new(option, ty, payload.len() as u32).as_bytes());
    out.extend_from_slice(payload);
}

fn serve(mut s: UnixStream, idx: usize, st: &State) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_millis(5)))?;
    let b = &st.behavior;
    let th = |stage: &str, bytes: Vec<u8>| match &b.tamper_handshake {
        Some(t) => t(stage, idx, bytes),
        None => bytes,
    };
    let size = b.size_override.as_ref().map_or(st.image.size(), |f| f(idx));
    s.write_all(&th(
        "greeting",
        Greeting::new(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
            .as_bytes()
            .to_vec(),
    ))?;
    let mut cf = [0u8; 4];
    read_exact_or_stop(&mut s, &mut cf, st)?;
    let mut contexts: Vec<(u32, String)> = Vec::new();
    loop {
        let mut h = [0u8; 16];
        read_exact_or_stop(&mut s, &mut h, st)?;
        let req = OptionRequest::read_from_bytes(&h).unwrap();
        req.validate(1 << 16)
            .map_err(|_| io::Error::other("bad option"))?;
        let mut data = vec![0u8; req.length.get() as usize];
        read_exact_or_stop(&mut s, &mut data, st)?;
        let opt = req.option.get();
        let mut out = Vec::new();
        match opt {
            NBD_OPT_STRUCTURED_REPLY => {
                opt_reply(&mut out, opt, NBD_REP_ACK, &[]);
                s.write_all(&th("structured", out))?;
            }
            NBD_OPT_SET_META_CONTEXT => {
                let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let mut p = 4 + name_len;
                let n = u32::from_be_bytes(data[p..p + 4].try_into().unwrap());
                p += 4;
                contexts.clear();
                for _ in 0..n {
                    let l = u32::from_be_bytes(data[p..p + 4].try_into().unwrap()) as usize;
                    let q = String::from_utf8(data[p + 4..p + 4 + l].to_vec()).unwrap();
                    p += 4 + l;
                    if b.offer_contexts.contains(&q) {
                        let id = 100 + contexts.len() as u32 * 7;
                        let mut pl = id.to_be_bytes().to_vec();
                        pl.extend_from_slice(q.as_bytes());
                        opt_reply(&mut out, opt, NBD_REP_META_CONTEXT, &pl);
                        contexts.push((id, q));
                    }
                }
                opt_reply(&mut out, opt, NBD_REP_ACK, &[]);
                s.write_all(&th("meta", out))?;
            }
            NBD_OPT_GO => {
                let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_DF;
                if b.multi_conn {
                    flags |= NBD_FLAG_CAN_MULTI_CONN;
                }
                opt_reply(
                    &mut out,
                    opt,
                    NBD_REP_INFO,
                    &encode_info_export(size, flags),
                );
                if let Some((a, p, m)) = b.block_sizes {
                    opt_reply(
                        &mut out,
                        opt,
                        NBD_REP_INFO,
                        &encode_info_block_size(a, p, m),
                    );
                }
                opt_reply(&mut out, opt, NBD_REP_ACK, &[]);
                s.write_all(&th("go", out))?;
                break;
            }
            _ => {
                opt_reply(&mut out, opt, NBD_REP_ERR_UNSUP, &[]);
                s.write_all(&out)?;
            }
        }
    }
    transmission(s, idx, st, &contexts)
}

fn transmission(
    mut s: UnixStream,
    idx: usize,
    st: &State,
    contexts: &[(u32, String)],
) -> io::Result<()> {
    let b = &st.behavior;
    let mut queued: Vec<(Req, Vec<u8>)> = Vec::new();
    let mut stalled = false;
    loop {
        if st.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut h = [0u8; 28];
        let mut got = 0;
        // Poll for a request; when none is waiting, flush queued replies.
        loop {
            if st.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            match s.read(&mut h[got..]) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    got += n;
                    if got == 28 {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if got == 0 && !queued.is_empty() && !stalled {
                        if b.reverse_replies {
                            queued.reverse();
                        }
                        for (q, r) in queued.drain(..) {
                            s.write_all(&r)?;
                            if b.eof_after_reply == Some(q.seq) {
                                return Ok(());
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let r = Request::read_from_bytes(&h).unwrap();
        r.validate()
            .map_err(|_| io::Error::other("bad request magic"))?;
        let seq = st.requests.fetch_add(1, Ordering::SeqCst);
        let req = Req {
            conn: idx,
            seq,
            command: r.command.get(),
            flags: r.flags.get(),
            cookie: r.cookie.get(),
            offset: r.offset.get(),
            len: r.length.get(),
        };
        st.log.lock().unwrap().push(req);
        st.max_in_flight_seen
            .fetch_max(queued.len() + 1, Ordering::SeqCst);
        if req.command == NBD_CMD_DISC {
            return Ok(());
        }
        if b.hangup_after.is_some_and(|n| seq >= n) {
            return Ok(());
        }
        if b.stall_after.is_some_and(|n| seq >= n) {
            stalled = true;
        }
        let bytes = match req.command {
            NBD_CMD_READ => read_reply(&req, st),
            NBD_CMD_BLOCK_STATUS => status_reply(&req, st, contexts),
            _ => {
                let mut v = Vec::new();
                final_einval(&mut v, &req, "unsupported");
                v
            }
        };
        let bytes = match &b.tamper {
            Some(t) => t(&req, bytes),
            None => bytes,
        };
        if !stalled {
            queued.push((req, bytes));
        }
    }
}

/// Appends the final reply chunk of `req`: an `NBD_EINVAL` error saying `msg`.
fn final_einval(out: &mut Vec<u8>, req: &Req, msg: &str) {
    encode_chunk(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        req.cookie,
        &encode_error(NBD_EINVAL, msg, None),
    );
}

fn read_reply(req: &Req, st: &State) -> Vec<u8> {
    let b = &st.behavior;
    let mut out = Vec::new();
    let (off, len) = (req.offset, u64::from(req.len));
    let end = off + len;
    if end > st.image.size() {
        final_einval(&mut out, req, "beyond end");
        return out;
    }
    for &(bo, bl) in &b.bad_ranges {
        if off < bo + bl && bo < end {
            let mut f = st.failures.lock().unwrap();
            let n = f.entry((bo, bl)).or_insert(0);
            if *n < b.fail_times {
                *n += 1;
                let at = bo.max(off);
                encode_chunk(
                    &mut out,
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_ERROR_OFFSET,
                    req.cookie,
                    &encode_error(NBD_EIO, "injected read error", Some(at)),
                );
                return out;
            }
        }
    }
    // Pieces: split at hole boundaries (if hole chunks) and at the fragment size.
    let alloc = st.image.alloc_extents();
    let mut pos = off;
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    while pos < end {
        let e = alloc
            .iter()
            .find(|e| e.0 <= pos && pos < e.0 + e.1)
            .unwrap();
        let hole = b.hole_chunks && e.2 & NBD_STATE_ZERO != 0;
        let stop = (e.0 + e.1)
            .min(end)
            .min(pos.saturating_add(b.read_fragment));
        pieces.push((pos, stop - pos, hole));
        pos = stop;
    }
    if b.reverse_replies {
        pieces.reverse();
    }
    let n = pieces.len();
    for (i, (p, l, hole)) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { NBD_REPLY_FLAG_DONE } else { 0 };
        if hole {
            encode_chunk(
                &mut out,
                flags,
                NBD_REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                &encode_hole(p, l as u32),
            );
        } else {
            let mut pl = p.to_be_bytes().to_vec();
            pl.extend_from_slice(&st.image.data[p as usize..(p + l) as usize]);
            encode_chunk(&mut out, flags, NBD_REPLY_TYPE_OFFSET_DATA, req.cookie, &pl);
        }
    }
    out
}

fn status_reply(req: &Req, st: &State, contexts: &[(u32, String)]) -> Vec<u8> {
    let b = &st.behavior;
    let mut out = Vec::new();
    let (off, len) = (req.offset, u64::from(req.len));
    if b.released_after_read
        && st.log.lock().unwrap().iter().any(|r| {
            r.command == NBD_CMD_READ && r.offset < off + len && off < r.offset + u64::from(r.len)
        })
    {
        final_einval(&mut out, req, "range partly released");
        return out;
    }
    let n = contexts.len();
    for (i, (id, name)) in contexts.iter().enumerate() {
        let map = if name == CONTEXT_BASE_ALLOCATION {
            st.image.alloc_extents()
        } else if name.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX) {
            st.image.dirty_extents()
        } else {
            // allocation depth: 1 where allocated, 0 in holes.
            st.image
                .alloc_extents()
                .into_iter()
                .map(|(o, l, f)| (o, l, u32::from(f & NBD_STATE_HOLE == 0)))
                .collect()
        };
        let mut ext: Vec<(u32, u32)> = Vec::new();
        let mut pos = off;
        for &(eo, el, f) in &map {
            if eo + el <= pos || pos >= off + len || ext.len() >= b.max_extents {
                continue;
            }
            let stop = if b.extent_overrun {
                eo + el
            } else {
                (eo + el).min(off + len)
            };
            // Keep every extent below 4 GiB (a u32).
            let stop = stop.min(pos + (1 << 31));
            ext.push(((stop - pos) as u32, f));
            pos = stop;
        }
        let flags = if i + 1 == n { NBD_REPLY_FLAG_DONE } else { 0 };
        encode_chunk(
            &mut out,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            &encode_block_status(*id, &ext),
        );
    }
    if n == 0 {
        final_einval(&mut out, req, "no contexts");
    }
    out
}

/// Runs `f` on a thread and fails the test if it takes longer than
/// `limit` (a hang is a bug: every wait has a deadline).
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not finish within {limit:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the test body panicked after {:?}", t.elapsed())
        }
    }
}

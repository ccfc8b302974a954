//! The chunked reader: how the backup job reads an export.
//!
//! [`ChunkReader::start`] connects N connections, then worker code walks the
//! export in work ranges: block status for the range (allocation, plus the
//! dirty bitmap for an incremental), a plan per chunk, and pipelined reads
//! straight into each data chunk's buffer. Finished chunks go, in any order,
//! through a bounded channel to the [`ChunkStream`] iterator.
//!
//! Memory: a data chunk's buffer is paid for from the byte budget (one
//! chunk size) before any read into it is issued, and the payment is
//! returned when the consumer receives the chunk: what the reader holds in
//! flight and queued is at most the budget, whatever the disk size. Buffers
//! the consumer hands back through a [`Recycler`] wait in a pool of at most
//! [`tuning::MAX_POOLED_BUFFERS`] and are reused without being cleared
//! (only the parts of a chunk that are not read are zeroed), so the total
//! is at most the budget plus that many chunks.
//!
//! With [`ReaderConfig::budget_until_recycled`] the payment is returned
//! only when the buffer comes back through the [`Recycler`], and pooled
//! buffers count against the budget too: then the budget bounds every
//! chunk buffer of the whole data path (read, queued, hashed, compressed,
//! pooled) — one bound for all stages.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client;
use crate::conn::{BufId, Conn, ConnStats, Done, DoneOk};
use crate::driver::Link;
use crate::engine::{self, EngineChoice, EngineKind, SocketIo};
use crate::error::{Error, Result};
use crate::handshake::ExportInfo;
use crate::plan::{self, ChunkPlan, Extent};
use crate::transport::{ExportSource, Stream};
use crate::tuning;
use crate::violation::Violation;
use crate::wire;

/// What a chunk turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkKind {
    /// Reads as zeroes (holes or zero extents): nothing was read.
    Zero,
    /// Not dirty in the bitmap: nothing was read (incremental only).
    Clean,
    /// The chunk's bytes, exactly `len` of them. Parts that block status
    /// reported as zero are zero-filled; a read error never is: it fails
    /// the chunk instead.
    Data(Vec<u8>),
}

/// One chunk of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Chunk number: `offset / chunk_size`.
    pub index: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (the chunk size, or less for the last chunk).
    pub len: u32,
    /// Contents.
    pub kind: ChunkKind,
}

/// Reader settings; [`ReaderConfig::new`] gives the tuned values for a
/// chunk size the caller chooses (the crate has no notion of one: it is
/// the caller's unit, such as a backup store's chunk size).
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// Chunk size (a multiple of the server's minimum block size, at most
    /// [`tuning::MAX_CHUNK_SIZE`]).
    pub chunk_size: u32,
    /// Connections to open (reduced to 1 if the server does not advertise
    /// multi-conn).
    pub connections: usize,
    /// Most bytes of chunk data the reader holds at once.
    pub byte_budget: u64,
    /// I/O engine.
    pub engine: EngineChoice,
    /// Length of one read request.
    pub read_request_len: u32,
    /// Requests in flight per connection.
    pub requests_in_flight: usize,
    /// Retries of a read the server failed, at the same offset (F-18).
    pub read_retries: u32,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Longest silence while requests are in flight (F-19).
    pub idle_timeout: Duration,
    /// Keep a data chunk's budget paid until its buffer is given back
    /// through the [`Recycler`] (not merely received), and count pooled
    /// buffers in the budget: the budget then bounds the consumer's
    /// stages too. The consumer must give back every data buffer (or
    /// cancel the stream), or the reader waits for budget forever.
    pub budget_until_recycled: bool,
    /// Most bytes per second to request with reads (0: no limit). Counted
    /// on the read requests sent (the bytes actually asked for, not the
    /// chunks they fill), one request at a time: the rate is smooth at the
    /// granularity of one read request.
    pub rate_limit: u64,
    /// Called on each reader thread just before it ends (after its
    /// sockets are closed), whatever the outcome: the caller can read the
    /// thread's own CPU clock there (shear's per-stage CPU figures). Every
    /// call has returned by the time the stream reports its end or is
    /// dropped.
    pub thread_end: Option<ThreadHook>,
}

/// A function a reader thread calls (see [`ReaderConfig::thread_end`]).
#[derive(Clone)]
pub struct ThreadHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook")
    }
}

impl ReaderConfig {
    /// The tuned settings for chunks of `chunk_size` bytes (checked when
    /// the reader starts).
    pub fn new(chunk_size: u32) -> Self {
        ReaderConfig {
            chunk_size,
            connections: tuning::DEFAULT_CONNECTIONS,
            byte_budget: tuning::DEFAULT_BYTE_BUDGET,
            engine: EngineChoice::Auto,
            read_request_len: tuning::DEFAULT_READ_REQUEST_LEN,
            requests_in_flight: tuning::MAX_REQUESTS_IN_FLIGHT,
            read_retries: tuning::READ_RETRIES,
            handshake_timeout: tuning::HANDSHAKE_TIMEOUT,
            idle_timeout: tuning::IDLE_TIMEOUT,
            budget_until_recycled: false,
            rate_limit: 0,
            thread_end: None,
        }
    }
}

/// Counters of a read, see [`ChunkStream::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Bytes actually received as data from the server.
    pub bytes_read: u64,
    /// Bytes the server answered as holes inside read requests.
    pub hole_bytes: u64,
    /// Chunks delivered as data.
    pub data_chunks: u64,
    /// Chunks delivered as zero.
    pub zero_chunks: u64,
    /// Chunks delivered as clean.
    pub clean_chunks: u64,
    /// Read requests sent.
    pub read_requests: u64,
    /// Block status requests sent.
    pub block_status_requests: u64,
    /// Reads retried after a server error.
    pub read_retries: u64,
    /// Data chunks built in a buffer given back through a [`Recycler`].
    pub buffers_reused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_read: AtomicU64,
    hole_bytes: AtomicU64,
    data_chunks: AtomicU64,
    zero_chunks: AtomicU64,
    clean_chunks: AtomicU64,
    read_requests: AtomicU64,
    block_status_requests: AtomicU64,
    read_retries: AtomicU64,
    buffers_reused: AtomicU64,
}

/// Byte budget: bytes of chunk buffers in use by the reader (in flight or
/// queued for the consumer), one chunk size each. Buffers the consumer
/// gives back wait in a small pool outside the budget (at most
/// [`tuning::MAX_POOLED_BUFFERS`]); taking one pays the budget like a fresh
/// allocation, so a recycle arriving just after the release never races.
#[derive(Debug)]
struct Budget {
    limit: u64,
    /// Payment returned on recycle, pool inside the budget
    /// ([`ReaderConfig::budget_until_recycled`]).
    until_recycled: bool,
    state: Mutex<BudgetState>,
    /// Signalled when bytes are released.
    freed: Condvar,
}

#[derive(Debug, Default)]
struct BudgetState {
    used: u64,
    pool: Vec<Vec<u8>>,
}

/// A buffer for a new data chunk (its budget is paid).
enum Slot {
    /// A pooled buffer (contents stale).
    Pooled(Vec<u8>),
    /// Allocate a fresh, zeroed buffer.
    Fresh,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pays `n` and hands out a pooled buffer if there is one.
    fn try_take(&self, n: u64) -> Option<Slot> {
        let mut st = self.lock();
        if st.used + n > self.limit {
            return None;
        }
        st.used += n;
        Some(st.pool.pop().map_or(Slot::Fresh, Slot::Pooled))
    }

    /// Waits until `n` bytes are free, or `cancel` is set (false).
    fn wait_available(&self, n: u64, cancel: &AtomicBool) -> bool {
        let mut st = self.lock();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            if st.used + n <= self.limit {
                return true;
            }
            // Wake periodically to notice cancellation.
            st = self
                .freed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&self, n: u64) {
        let mut st = self.lock();
        st.used = st.used.saturating_sub(n);
        self.freed.notify_all();
    }

    /// Pools `buf` (contents kept: clearing is what reuse saves) while the
    /// pool has room, else drops it. With `until_recycled`, returns its
    /// `n` bytes of budget first, and pools it only while pooled and paid
    /// buffers together stay within the limit.
    fn recycle(&self, buf: Vec<u8>, n: u64) {
        let mut st = self.lock();
        if self.until_recycled {
            st.used = st.used.saturating_sub(n);
            self.freed.notify_all();
            let pooled = st.pool.len() as u64 * n;
            if st.used + pooled + n > self.limit {
                return;
            }
        }
        if st.pool.len() < tuning::MAX_POOLED_BUFFERS {
            st.pool.push(buf);
        }
    }

    fn in_use(&self) -> u64 {
        self.lock().used
    }
}

#[derive(Debug)]
struct Shared {
    size: u64,
    chunk_size: u64,
    n_chunks: u64,
    chunks_per_range: u64,
    /// First chunk no worker has claimed yet. Workers claim work ranges
    /// from here, and extend their claim over chunks their block status
    /// reply already covers (see [`Worker::extend_claim`]).
    next_chunk: AtomicU64,
    budget: Budget,
    cancel: AtomicBool,
    failed: AtomicBool,
    counters: Counters,
    /// Clones of every socket, to wake blocked threads on cancel.
    sockets: Mutex<Vec<Stream>>,
    request_len: u32,
    requests_in_flight: usize,
    read_retries: u32,
    rate: RateLimit,
}

/// The read rate limit, shared by every connection: a read of `n` bytes may
/// be sent once every byte sent before it is paid for at `rate` bytes/s
/// since the start (so the limit is exceeded by at most one request).
#[derive(Debug)]
struct RateLimit {
    rate: u64,
    start: Instant,
    sent: Mutex<u64>,
}

impl RateLimit {
    fn new(rate: u64) -> Self {
        RateLimit {
            rate,
            start: Instant::now(),
            sent: Mutex::new(0),
        }
    }

    /// How long until the bytes sent so far are paid for (zero: now).
    fn wait_left(&self, sent: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_precision_loss)]
        let due = Duration::from_secs_f64(sent as f64 / self.rate as f64);
        due.saturating_sub(self.start.elapsed())
    }

    /// Takes `n` bytes if a request may be sent now.
    fn try_take(&self, n: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if !self.wait_left(*sent).is_zero() {
            return false;
        }
        *sent += n;
        true
    }

    /// How long until the next request may be sent (`None`: now).
    fn throttled_for(&self) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let sent = *self.sent.lock().unwrap_or_else(|p| p.into_inner());
        Some(self.wait_left(sent)).filter(|d| !d.is_zero())
    }
}

impl Shared {
    fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.budget.freed.notify_all();
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s.shutdown();
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn chunk_range(&self, index: u64) -> (u64, u64) {
        let off = index * self.chunk_size;
        (off, (self.size - off).min(self.chunk_size))
    }
}

/// Entry point of the chunked reader.
#[derive(Debug)]
pub struct ChunkReader;

impl ChunkReader {
    /// Connects to `source` and starts reading. Handshake failures are
    /// returned here; everything later arrives through the stream.
    pub fn start(source: &ExportSource, cfg: &ReaderConfig) -> Result<ChunkStream> {
        validate_config(cfg)?;
        let kind = cfg.engine.resolve()?;
        let bitmap = source.dirty_bitmap.as_deref();
        let first = Stream::connect(&source.endpoint)?;
        let (first, info) = client::open(
            first,
            &source.export_name,
            bitmap,
            false,
            cfg.handshake_timeout,
        )?;
        let mut conns = cfg.connections;
        if conns > 1 && !info.flags.can_multi_conn() {
            tracing::info!("server does not advertise multi-conn; reading over one connection");
            conns = 1;
        }
        let mut links = vec![(first, info)];
        for _ in 1..conns {
            let s = Stream::connect(&source.endpoint)?;
            let (s, i) =
                client::open(s, &source.export_name, bitmap, false, cfg.handshake_timeout)?;
            check_same_export(&links[0].1, &i)?;
            links.push((s, i));
        }
        start_with(links, kind, cfg)
    }
}

fn validate_config(cfg: &ReaderConfig) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if cfg.chunk_size == 0 || cfg.chunk_size > tuning::MAX_CHUNK_SIZE {
        return bad(format!("chunk size {} out of range", cfg.chunk_size));
    }
    if cfg.byte_budget < u64::from(cfg.chunk_size) {
        return bad(format!(
            "byte budget {} is smaller than one chunk ({})",
            cfg.byte_budget, cfg.chunk_size
        ));
    }
    if cfg.connections == 0 || cfg.connections > tuning::MAX_CONNECTIONS {
        return bad(format!("{} connections out of range", cfg.connections));
    }
    if cfg.requests_in_flight == 0 || cfg.requests_in_flight > 1024 {
        return bad(format!(
            "{} requests in flight out of range",
            cfg.requests_in_flight
        ));
    }
    if cfg.read_request_len == 0 {
        return bad("read request length 0".into());
    }
    Ok(())
}

/// F-20: every connection must see the same export.
fn check_same_export(a: &ExportInfo, b: &ExportInfo) -> Result<()> {
    fn names(i: &ExportInfo) -> Vec<&str> {
        let mut v: Vec<&str> = i.contexts.iter().map(|c| c.name.as_str()).collect();
        v.sort_unstable();
        v
    }
    if a.size != b.size || a.flags != b.flags || a.block_sizes != b.block_sizes {
        return Err(Violation::ExportChanged(format!(
            "size {} flags {:#x} vs size {} flags {:#x}",
            a.size, a.flags.0, b.size, b.flags.0
        ))
        .into());
    }
    if names(a) != names(b) {
        return Err(Violation::ExportChanged("different metadata contexts".into()).into());
    }
    Ok(())
}

fn start_with(
    links: Vec<(Stream, ExportInfo)>,
    kind: EngineKind,
    cfg: &ReaderConfig,
) -> Result<ChunkStream> {
    let info = links[0].1.clone();
    let min = info.min_block();
    if cfg.chunk_size % min != 0 {
        return Err(Error::InvalidArgument(format!(
            "chunk size {} is not a multiple of the server's minimum block size {min}",
            cfg.chunk_size
        )));
    }
    let request_len = (cfg.read_request_len.min(info.max_request()) / min * min).max(min);
    let chunk_size = u64::from(cfg.chunk_size);
    let n_chunks = info.size.div_ceil(chunk_size);
    let chunks_per_range = (tuning::WORK_RANGE_LEN / chunk_size).max(1);
    let mut sockets = Vec::new();
    for (s, _) in &links {
        sockets.push(s.try_clone().map_err(|source| Error::Io {
            step: "cloning a socket",
            source,
        })?);
    }
    let shared = Arc::new(Shared {
        size: info.size,
        chunk_size,
        n_chunks,
        chunks_per_range,
        next_chunk: AtomicU64::new(0),
        budget: Budget {
            limit: cfg.byte_budget,
            until_recycled: cfg.budget_until_recycled,
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
        },
        cancel: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        counters: Counters::default(),
        sockets: Mutex::new(sockets),
        request_len,
        requests_in_flight: cfg.requests_in_flight,
        read_retries: cfg.read_retries,
        rate: RateLimit::new(cfg.rate_limit),
    });
    let (tx, rx) = mpsc::sync_channel(tuning::CHANNEL_CAPACITY);
    let n_conns = links.len();
    let mut groups: Vec<Vec<(Stream, ExportInfo)>> = Vec::new();
    match kind {
        // One thread per connection, blocking I/O.
        EngineKind::Sync => groups.extend(links.into_iter().map(|l| vec![l])),
        // One thread, one ring, all connections.
        EngineKind::Uring => groups.push(links),
    }
    let mut threads = Vec::new();
    for (g, group) in groups.into_iter().enumerate() {
        let (streams, infos): (Vec<Stream>, Vec<ExportInfo>) = group.into_iter().unzip();
        let io = engine::build(kind, streams, cfg.idle_timeout)?;
        let workers: Vec<Worker> = infos
            .into_iter()
            .enumerate()
            .map(|(i, inf)| Worker::new(Conn::new(Arc::new(inf)), i, cfg.idle_timeout))
            .collect();
        let shared2 = Arc::clone(&shared);
        let tx2 = tx.clone();
        let end = cfg.thread_end.clone();
        let h = std::thread::Builder::new()
            .name(format!("nbd-read-{g}"))
            .spawn(move || {
                run_thread(io, workers, &shared2, &tx2);
                // Before `tx2` is dropped: the consumer sees the end only
                // after every hook has run.
                if let Some(ThreadHook(f)) = end {
                    f();
                }
            })
            .map_err(|source| Error::Io {
                step: "spawning a reader thread",
                source,
            })?;
        threads.push(h);
    }
    drop(tx);
    Ok(ChunkStream {
        rx: Some(rx),
        shared,
        threads,
        info,
        engine: kind,
        connections: n_conns,
        delivered: 0,
        finished: false,
    })
}

fn run_thread(
    mut io: Box<dyn SocketIo>,
    mut workers: Vec<Worker>,
    shared: &Shared,
    tx: &SyncSender<Result<Chunk>>,
) {
    let r = drive(io.as_mut(), &mut workers, shared, tx);
    for w in &mut workers {
        w.report(shared);
    }
    match r {
        Ok(()) => {}
        Err(_) if shared.cancelled() => {}
        Err(e) => {
            if !shared.failed.swap(true, Ordering::SeqCst) {
                // The consumer may have gone; then nobody needs the error.
                let _ = tx.send(Err(e));
            }
            shared.cancel();
        }
    }
    // Dropping `io` closes the sockets (a uring engine first reaps or leaks
    // its buffers).
    drop(io);
}

/// The engine loop shared by both engines: fill requests, start I/O, wait,
/// apply completions, repeat.
fn drive(
    io: &mut dyn SocketIo,
    workers: &mut [Worker],
    shared: &Shared,
    tx: &SyncSender<Result<Chunk>>,
) -> Result<()> {
    let mut comps = Vec::new();
    loop {
        if shared.cancelled() {
            return Err(Error::Cancelled);
        }
        let mut all_done = true;
        for w in workers.iter_mut() {
            w.fill(shared, tx)?;
            if !w.finished() {
                all_done = false;
            }
            w.link.start_io(io)?;
        }
        if all_done {
            break;
        }
        let throttled = shared.rate.throttled_for();
        if io.outstanding() == 0 {
            if let Some(wait) = throttled {
                // The rate limit holds the next read back.
                std::thread::sleep(wait.min(Duration::from_millis(50)));
                continue;
            }
            // Nothing in flight anywhere: the workers wait for budget, held
            // by chunks queued for the consumer. Block until it frees some.
            let Some(need) = workers.iter().filter_map(|w| w.budget_needed(shared)).min() else {
                // The rate limit refused a read in `fill` and its window
                // ended before `throttled_for` was asked (a descheduled
                // thread on a loaded host): go round again.
                if workers.iter().any(Worker::has_reads_to_issue) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                return Err(Error::Internal("reader stalled with nothing to do".into()));
            };
            // fill() takes the buffer itself, in order.
            if !shared.budget.wait_available(need, &shared.cancel) {
                return Err(Error::Cancelled);
            }
            continue;
        }
        comps.clear();
        let slice = workers
            .iter()
            .filter_map(|w| w.link.wait_allowance())
            .min()
            .map_or(tuning::URING_WAIT_SLICE, |a| {
                a.min(tuning::URING_WAIT_SLICE)
            })
            .min(throttled.map_or(tuning::URING_WAIT_SLICE, |t| {
                t.max(Duration::from_millis(1))
            }));
        let t0 = Instant::now();
        io.wait(slice, &mut comps).map_err(|source| Error::Io {
            step: "waiting for I/O",
            source,
        })?;
        let waited = t0.elapsed();
        let mut progressed = vec![false; workers.len()];
        for c in comps.drain(..) {
            let i = c.conn;
            let w = workers
                .get_mut(i)
                .ok_or_else(|| Error::Internal("completion for unknown connection".into()))?;
            progressed[i] = true;
            w.link.complete(c)?;
            w.handle_done(shared, tx)?;
            w.report(shared);
        }
        for (w, p) in workers.iter_mut().zip(progressed) {
            w.link.account_wait(waited, p)?;
        }
    }
    // Clean end: NBD_CMD_DISC on every connection, best effort and bounded.
    for w in workers.iter_mut() {
        w.link.conn.submit_disc();
        w.link.start_io(io)?;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while io.outstanding() > 0 && Instant::now() < deadline {
        comps.clear();
        if io.wait(Duration::from_millis(50), &mut comps).is_err() {
            break;
        }
        for c in comps.drain(..) {
            if let Some(w) = workers.get_mut(c.conn) {
                let _ = w.link.complete(c);
            }
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Piece {
    offset: u64,
    len: u32,
    attempts: u32,
}

#[derive(Debug)]
struct Active {
    offset: u64,
    len: u32,
    buf: BufId,
    to_issue: VecDeque<Piece>,
    attempts: BTreeMap<u64, u32>,
    outstanding: usize,
}

/// Tag of block status requests (read tags are chunk indexes).
const BS_TAG: u64 = u64::MAX;

#[derive(Debug)]
struct Worker {
    link: Link,
    alloc_ctx: Option<usize>,
    dirty_ctx: Option<usize>,
    /// Current work range: chunks `[next_plan, range_end)` not yet planned.
    next_plan: u64,
    range_end: u64,
    /// Block status known up to here (may reach past the current range).
    bs_pos: u64,
    bs_in_flight: bool,
    /// Length of the next block status request beyond the current range:
    /// grows while the export turns out clean or zero past the range (a
    /// sparse or barely dirty disk is mapped in few round trips), back to
    /// one work range as soon as there is data to read.
    bs_ahead: u64,
    /// A data chunk was planned (or stopped a claim) since the last reply.
    data_seen: bool,
    /// The block status request in flight reaches past the current range.
    bs_past_range: bool,
    /// The server refused a block status request reaching past the range:
    /// ask only within this worker's own ranges from then on.
    bs_own_range_only: bool,
    /// Extents from the first unplanned chunk on, per context index.
    known: Vec<VecDeque<Extent>>,
    /// Data chunks planned, waiting for budget.
    ready: VecDeque<(u64, Vec<(u64, u32)>)>,
    active: BTreeMap<u64, Active>,
    no_more_ranges: bool,
    /// Connection statistics already added to the shared counters.
    reported: ConnStats,
}

impl Worker {
    fn new(conn: Conn, idx: usize, idle: Duration) -> Worker {
        let info = Arc::clone(conn.info());
        let pos = |name: &str| info.contexts.iter().position(|c| c.name == name);
        let alloc_ctx = pos(wire::CONTEXT_BASE_ALLOCATION);
        let dirty_ctx = info
            .contexts
            .iter()
            .position(|c| c.name.starts_with(wire::CONTEXT_DIRTY_BITMAP_PREFIX));
        Worker {
            known: vec![VecDeque::new(); info.contexts.len()],
            link: Link::new(conn, idx, idle),
            alloc_ctx,
            dirty_ctx,
            next_plan: 0,
            range_end: 0,
            bs_pos: 0,
            bs_in_flight: false,
            bs_ahead: tuning::WORK_RANGE_LEN,
            data_seen: false,
            bs_past_range: false,
            bs_own_range_only: false,
            ready: VecDeque::new(),
            active: BTreeMap::new(),
            no_more_ranges: false,
            reported: ConnStats::default(),
        }
    }

    fn uses_block_status(&self) -> bool {
        self.alloc_ctx.is_some() || self.dirty_ctx.is_some()
    }

    fn finished(&self) -> bool {
        self.no_more_ranges
            && self.next_plan >= self.range_end
            && self.ready.is_empty()
            && self.active.is_empty()
            && !self.bs_in_flight
            && self.link.conn.in_flight() == 0
    }

    /// Bytes the next planned chunk needs (it waits for budget).
    /// Whether a chunk it holds budget for still has reads to send.
    fn has_reads_to_issue(&self) -> bool {
        self.active.values().any(|a| !a.to_issue.is_empty())
    }

    fn budget_needed(&self, shared: &Shared) -> Option<u64> {
        self.ready.front().map(|_| shared.chunk_size)
    }

    /// Adds bytes received since the last report to the shared counters.
    fn report(&mut self, shared: &Shared) {
        let s = self.link.conn.stats;
        shared
            .counters
            .bytes_read
            .fetch_add(s.data_bytes - self.reported.data_bytes, Ordering::Relaxed);
        shared
            .counters
            .hole_bytes
            .fetch_add(s.hole_bytes - self.reported.hole_bytes, Ordering::Relaxed);
        self.reported = s;
    }

    /// Issues every request the limits allow.
    fn fill(&mut self, shared: &Shared, tx: &SyncSender<Result<Chunk>>) -> Result<()> {
        loop {
            self.issue_reads(shared)?;
            self.issue_block_status(shared)?;
            let mut progressed = false;
            // Budget for planned data chunks, in order.
            while let Some((index, _)) = self.ready.front() {
                let (off, len) = shared.chunk_range(*index);
                let Some(slot) = shared.budget.try_take(shared.chunk_size) else {
                    break;
                };
                let Some((index, reqs)) = self.ready.pop_front() else {
                    break;
                };
                // len ≤ chunk size ≤ MAX_CHUNK_SIZE.
                let len_usize = wire::sat_usize(len);
                let data = match slot {
                    Slot::Pooled(mut b) => {
                        shared
                            .counters
                            .buffers_reused
                            .fetch_add(1, Ordering::Relaxed);
                        // Reused: only what will not be read needs zeroes
                        // (resize zero-fills only if the buffer was shrunk).
                        b.resize(len_usize, 0);
                        zero_gaps(&mut b, off, &reqs);
                        b
                    }
                    Slot::Fresh => vec![0; len_usize],
                };
                let buf = self.link.conn.add_buf(data);
                self.active.insert(
                    index,
                    Active {
                        offset: off,
                        len: wire::sat_u32(len),
                        buf,
                        to_issue: reqs
                            .into_iter()
                            .map(|(offset, len)| Piece {
                                offset,
                                len,
                                attempts: 0,
                            })
                            .collect(),
                        attempts: BTreeMap::new(),
                        outstanding: 0,
                    },
                );
                progressed = true;
            }
            // Next work range once this one is planned.
            if self.next_plan >= self.range_end
                && !self.no_more_ranges
                && !self.bs_in_flight
                && self.ready.len() < tuning::MAX_PLANNED_AHEAD
            {
                let first = shared
                    .next_chunk
                    .fetch_add(shared.chunks_per_range, Ordering::Relaxed);
                if first >= shared.n_chunks {
                    self.no_more_ranges = true;
                } else {
                    let start_off = shared.chunk_range(first).0;
                    // Right after our own range, with block status already
                    // known past its start: keep what we know.
                    let contiguous = first == self.range_end && self.bs_pos > start_off;
                    self.next_plan = first;
                    self.range_end = (first + shared.chunks_per_range).min(shared.n_chunks);
                    if !contiguous {
                        self.bs_pos = start_off;
                        for k in &mut self.known {
                            k.clear();
                        }
                    }
                    if !self.uses_block_status() {
                        // No metadata: every chunk is read whole.
                        self.bs_pos = shared.chunk_range(self.range_end - 1).0
                            + shared.chunk_range(self.range_end - 1).1;
                    }
                    self.plan_ready(shared, tx)?;
                    progressed = true;
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn issue_reads(&mut self, shared: &Shared) -> Result<()> {
        let max_bytes = tuning::MAX_BYTES_IN_FLIGHT;
        for (&index, a) in self.active.iter_mut() {
            while let Some(p) = a.to_issue.front() {
                let conn = &self.link.conn;
                if conn.in_flight() >= shared.requests_in_flight
                    || (conn.in_flight() > 0
                        && conn.bytes_in_flight() + u64::from(p.len) > max_bytes)
                {
                    return Ok(());
                }
                if !shared.rate.try_take(u64::from(p.len)) {
                    return Ok(());
                }
                let Some(p) = a.to_issue.pop_front() else {
                    break;
                };
                let buf_off = wire::sat_usize(p.offset - a.offset);
                self.link
                    .conn
                    .submit_read(index, p.offset, p.len, a.buf, buf_off)
                    .map_err(|e| chunk_err(index, a.offset, e))?;
                if p.attempts > 0 {
                    a.attempts.insert(p.offset, p.attempts);
                }
                a.outstanding += 1;
                shared
                    .counters
                    .read_requests
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn issue_block_status(&mut self, shared: &Shared) -> Result<()> {
        if !self.uses_block_status()
            || self.bs_in_flight
            || self.next_plan >= self.range_end
            || self.ready.len() >= tuning::MAX_PLANNED_AHEAD
            || self.link.conn.in_flight() >= shared.requests_in_flight
        {
            return Ok(());
        }
        let (last_off, last_len) = shared.chunk_range(self.range_end - 1);
        let end = last_off + last_len;
        if self.bs_pos >= end {
            return Ok(());
        }
        // Ask for the rest of the range, or further ahead while the export
        // has been clean past our ranges (then the reply lets this worker
        // claim the chunks it covers). Each reply stays bounded by
        // MAX_EXTENTS_PER_CHUNK per context, whatever the length asked.
        let min = u64::from(self.link.conn.info().min_block());
        let max = u64::from(tuning::BLOCK_STATUS_MAX_LEN) / min * min;
        let rest = end - self.bs_pos;
        let mut want = rest.max(self.bs_ahead);
        // Past our range, chunks another worker claimed may be read and
        // released already, and QEMU's snapshot-access fails block status
        // over any released byte (EACCES): look ahead only while nobody has
        // claimed past our range (unclaimed chunks are never released).
        if self.bs_own_range_only || shared.next_chunk.load(Ordering::Relaxed) > self.range_end {
            want = rest;
        }
        let len = wire::sat_u32(want.min(max).min(shared.size - self.bs_pos));
        self.bs_past_range = u64::from(len) > rest;
        self.link
            .conn
            .submit_block_status(BS_TAG, self.bs_pos, len)?;
        self.bs_in_flight = true;
        shared
            .counters
            .block_status_requests
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Plans every chunk of the range whose extents are all known.
    fn plan_ready(&mut self, shared: &Shared, tx: &SyncSender<Result<Chunk>>) -> Result<()> {
        while self.next_plan < self.range_end {
            let index = self.next_plan;
            let (off, len) = shared.chunk_range(index);
            let Some(plan) = self.plan_known(shared, index, &[0, 0]) else {
                return Ok(());
            };
            for k in &mut self.known {
                while k.front().is_some_and(|e| e.end() <= off + len) {
                    k.pop_front();
                }
            }
            self.next_plan += 1;
            let len32 = wire::sat_u32(len);
            match plan {
                ChunkPlan::Zero | ChunkPlan::Clean => {
                    let (counter, kind) = if matches!(plan, ChunkPlan::Zero) {
                        (&shared.counters.zero_chunks, ChunkKind::Zero)
                    } else {
                        (&shared.counters.clean_chunks, ChunkKind::Clean)
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    emit(
                        tx,
                        shared,
                        Chunk {
                            index,
                            offset: off,
                            len: len32,
                            kind,
                        },
                    )?;
                }
                ChunkPlan::Data(reqs) => {
                    self.data_seen = true;
                    self.ready.push_back((index, reqs));
                }
            }
        }
        Ok(())
    }

    /// The plan of chunk `index` if block status covers all of it. `skip`
    /// is where to start looking in each context's known extents (every
    /// extent before it ends at or before the chunk); `None` if not known.
    fn plan_known(&self, shared: &Shared, index: u64, skip: &[usize; 2]) -> Option<ChunkPlan> {
        let (off, len) = shared.chunk_range(index);
        if off + len > self.bs_pos {
            return None;
        }
        let slice = |ctx: Option<usize>, from: usize| -> Option<Vec<Extent>> {
            let k = &self.known[ctx?];
            Some(
                k.iter()
                    .skip(from)
                    .skip_while(|e| e.end() <= off)
                    .take_while(|e| e.offset < off + len)
                    .copied()
                    .collect(),
            )
        };
        let alloc = slice(self.alloc_ctx, skip[0]);
        let dirty = slice(self.dirty_ctx, skip[1]);
        Some(plan::plan_chunk(
            off,
            len,
            alloc.as_deref(),
            dirty.as_deref(),
            self.link.conn.info().min_block(),
            shared.request_len,
        ))
    }

    /// Once the current range is planned and block status reaches past it:
    /// claims the unclaimed chunks it covers that need no read (zero, or
    /// clean for an incremental), up to the first that does, so a sparse
    /// or barely dirty disk costs one request per reply, not per range.
    /// Nothing is read ahead: a data chunk stays for whoever claims it.
    fn extend_claim(&mut self, shared: &Shared) {
        if self.next_plan < self.range_end || self.no_more_ranges {
            return;
        }
        let from = shared.next_chunk.load(Ordering::Relaxed);
        if from < self.range_end || from >= shared.n_chunks {
            return;
        }
        // Count the leading chunks from `from` that are known and need no
        // read, walking each context's extents once.
        let mut skip = [0usize; 2];
        let ctxs = [self.alloc_ctx, self.dirty_ctx];
        let mut n = 0u64;
        while from + n < shared.n_chunks {
            let index = from + n;
            let (off, _) = shared.chunk_range(index);
            for (s, ctx) in skip.iter_mut().zip(ctxs) {
                if let Some(k) = ctx.and_then(|c| self.known.get(c)) {
                    while k.get(*s).is_some_and(|e| e.end() <= off) {
                        *s += 1;
                    }
                }
            }
            match self.plan_known(shared, index, &skip) {
                Some(ChunkPlan::Zero | ChunkPlan::Clean) => n += 1,
                Some(ChunkPlan::Data(_)) => {
                    self.data_seen = true;
                    break;
                }
                None => break,
            }
        }
        if n == 0 {
            return;
        }
        if shared
            .next_chunk
            .compare_exchange(from, from + n, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.next_plan = from;
        self.range_end = from + n;
    }

    fn handle_done(&mut self, shared: &Shared, tx: &SyncSender<Result<Chunk>>) -> Result<()> {
        let done: Vec<Done> = self.link.conn.take_done().collect();
        for d in done {
            if d.tag == BS_TAG {
                self.on_block_status(d, shared, tx)?;
            } else {
                self.on_read(d, shared, tx)?;
            }
        }
        Ok(())
    }

    fn on_block_status(
        &mut self,
        d: Done,
        shared: &Shared,
        tx: &SyncSender<Result<Chunk>>,
    ) -> Result<()> {
        self.bs_in_flight = false;
        let ctxs = match d.result {
            Ok(DoneOk::BlockStatus(c)) => c,
            Ok(DoneOk::Read | DoneOk::Trim) => {
                return Err(Error::Internal("read result for status".into()))
            }
            // A look-ahead the server refused: another worker claimed and
            // released chunks there after we looked (a race the check in
            // `issue_block_status` narrows but cannot close). Ask again
            // within our own range.
            Err(Error::Command { .. }) if self.bs_past_range && !self.bs_own_range_only => {
                self.bs_own_range_only = true;
                return Ok(());
            }
            Err(e) => {
                let index = d.offset / shared.chunk_size;
                return Err(chunk_err(index, shared.chunk_range(index).0, e));
            }
        };
        let min = u64::from(self.link.conn.info().min_block());
        let mut new_pos = u64::MAX;
        for (i, c) in ctxs.into_iter().enumerate() {
            let Some(last) = c.extents.last() else {
                return Err(Violation::Malformed("block status without extents".into()).into());
            };
            new_pos = new_pos.min(last.end());
            self.known[i].extend(c.extents);
        }
        if new_pos <= self.bs_pos || (new_pos < shared.size && new_pos % min != 0) {
            return Err(Violation::Malformed(format!(
                "block status at {} made no aligned progress (to {new_pos})",
                self.bs_pos
            ))
            .into());
        }
        // Extents past new_pos for the longer contexts are re-asked next time.
        for k in &mut self.known {
            while k.back().is_some_and(|e| e.offset >= new_pos) {
                k.pop_back();
            }
            if let Some(e) = k.back_mut() {
                if e.end() > new_pos {
                    e.len = new_pos - e.offset;
                }
            }
        }
        self.bs_pos = new_pos;
        self.data_seen = false;
        self.plan_ready(shared, tx)?;
        self.extend_claim(shared);
        self.plan_ready(shared, tx)?;
        // Ask further ahead next time only while nothing needed reading.
        self.bs_ahead = if self.data_seen {
            tuning::WORK_RANGE_LEN
        } else {
            self.bs_ahead
                .saturating_mul(8)
                .min(u64::from(tuning::BLOCK_STATUS_MAX_LEN))
        };
        Ok(())
    }

    fn on_read(&mut self, d: Done, shared: &Shared, tx: &SyncSender<Result<Chunk>>) -> Result<()> {
        let index = d.tag;
        let Some(a) = self.active.get_mut(&index) else {
            return Err(Error::Internal(format!(
                "read completion for chunk {index}"
            )));
        };
        a.outstanding -= 1;
        if let Err(e) = d.result {
            let attempts = a.attempts.get(&d.offset).copied().unwrap_or(0);
            let retryable = matches!(e, Error::Command { .. });
            if retryable && attempts < shared.read_retries {
                tracing::warn!(offset = d.offset, len = d.len, error = %e, "retrying read");
                shared.counters.read_retries.fetch_add(1, Ordering::Relaxed);
                a.to_issue.push_back(Piece {
                    offset: d.offset,
                    len: d.len,
                    attempts: attempts + 1,
                });
                return Ok(());
            }
            return Err(chunk_err(index, a.offset, e));
        }
        if a.outstanding > 0 || !a.to_issue.is_empty() {
            return Ok(());
        }
        let Some(a) = self.active.remove(&index) else {
            return Ok(());
        };
        let data = self
            .link
            .conn
            .take_buf(a.buf)
            .ok_or_else(|| Error::Internal("chunk buffer still busy".into()))?;
        shared.counters.data_chunks.fetch_add(1, Ordering::Relaxed);
        emit(
            tx,
            shared,
            Chunk {
                index,
                offset: a.offset,
                len: a.len,
                kind: ChunkKind::Data(data),
            },
        )
    }
}

/// Zeroes the parts of a chunk buffer (at export offset `off`) that no read
/// in `reqs` covers.
fn zero_gaps(buf: &mut [u8], off: u64, reqs: &[(u64, u32)]) {
    let mut pos = 0usize;
    for &(o, l) in reqs {
        let start = wire::sat_usize(o - off);
        if let Some(gap) = buf.get_mut(pos..start) {
            gap.fill(0);
        }
        pos = start + l as usize;
    }
    if let Some(tail) = buf.get_mut(pos..) {
        tail.fill(0);
    }
}

impl Shared {
    fn recycle(&self, buf: Vec<u8>) {
        if self.cancelled() {
            return;
        }
        if buf.capacity() >= wire::sat_usize(self.chunk_size) {
            self.budget.recycle(buf, self.chunk_size);
        } else if self.budget.until_recycled {
            self.budget.release(self.chunk_size);
        }
    }
}

/// Hands chunk buffers back to the reader for reuse (saves allocating and
/// clearing 4 MiB per chunk). Cheap to clone, usable from any thread.
/// At most [`tuning::MAX_POOLED_BUFFERS`] wait for reuse; more are freed.
#[derive(Debug, Clone)]
pub struct Recycler(Arc<Shared>);

impl Recycler {
    /// Gives a chunk's buffer back (any contents; it is never read).
    pub fn recycle(&self, buf: Vec<u8>) {
        self.0.recycle(buf);
    }
}

fn chunk_err(index: u64, offset: u64, e: Error) -> Error {
    match e {
        e @ Error::Chunk { .. } => e,
        e => Error::Chunk {
            index,
            offset,
            source: Box::new(e),
        },
    }
}

/// Sends a chunk to the consumer, waiting while the queue is full
/// (back-pressure). Cancelling drops the receiver, which ends the wait.
fn emit(tx: &SyncSender<Result<Chunk>>, shared: &Shared, chunk: Chunk) -> Result<()> {
    if shared.cancelled() {
        return Err(Error::Cancelled);
    }
    tx.send(Ok(chunk)).map_err(|_| Error::Cancelled)
}

/// Chunks of an export, in completion order. Ends after the last chunk, or
/// after the first error (which carries the chunk's offset). Dropping it
/// cancels the read and joins the reader threads.
#[derive(Debug)]
pub struct ChunkStream {
    rx: Option<Receiver<Result<Chunk>>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    info: ExportInfo,
    engine: EngineKind,
    connections: usize,
    delivered: u64,
    finished: bool,
}

impl ChunkStream {
    /// The export (from the first connection).
    pub fn export_info(&self) -> &ExportInfo {
        &self.info
    }

    /// Number of chunks the stream will deliver.
    pub fn chunk_count(&self) -> u64 {
        self.shared.n_chunks
    }

    /// Engine in use.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// A handle to give chunk buffers back for reuse.
    pub fn recycler(&self) -> Recycler {
        Recycler(Arc::clone(&self.shared))
    }

    /// Bytes of chunk buffers in use by the reader (in flight or queued),
    /// counted one chunk size each; at most the budget.
    pub fn budget_in_use(&self) -> u64 {
        self.shared.budget.in_use()
    }

    /// Counters so far; byte counts are final once the stream has ended.
    pub fn stats(&self) -> ReadStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReadStats {
            bytes_read: l(&c.bytes_read),
            hole_bytes: l(&c.hole_bytes),
            data_chunks: l(&c.data_chunks),
            zero_chunks: l(&c.zero_chunks),
            clean_chunks: l(&c.clean_chunks),
            read_requests: l(&c.read_requests),
            block_status_requests: l(&c.block_status_requests),
            read_retries: l(&c.read_retries),
            buffers_reused: l(&c.buffers_reused),
        }
    }

    /// Stops reading. Items already queued are dropped.
    pub fn cancel(&mut self) {
        self.shared.cancel();
        self.finished = true;
        self.rx = None;
        self.join();
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an NBD reader thread panicked");
            }
        }
    }
}

impl Iterator for ChunkStream {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Result<Chunk>> {
        if self.finished {
            return None;
        }
        let item = self.rx.as_ref()?.recv();
        match item {
            Ok(Ok(chunk)) => {
                if let (ChunkKind::Data(_), false) =
                    (&chunk.kind, self.shared.budget.until_recycled)
                {
                    self.shared.budget.release(self.shared.chunk_size);
                }
                self.delivered += 1;
                Some(Ok(chunk))
            }
            Ok(Err(e)) => {
                self.cancel();
                Some(Err(e))
            }
            Err(_) => {
                // Every thread has ended.
                self.finished = true;
                self.rx = None;
                self.join();
                if self.delivered < self.shared.n_chunks {
                    return Some(Err(Error::Internal(format!(
                        "reader ended after {} of {} chunks",
                        self.delivered, self.shared.n_chunks
                    ))));
                }
                None
            }
        }
    }
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.cancel();
        }
    }
}

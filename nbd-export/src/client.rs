//! A single NBD connection with a blocking, pipelined API: block status,
//! whole-export maps, reads. For tools and tests; the backup job uses the
//! chunk reader.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Conn, ContextExtents, DoneOk};
use crate::driver::Link;
use crate::engine::{self, EngineChoice, EngineKind, SocketIo};
use crate::error::{Error, Result};
use crate::handshake::{self, ExportInfo, HandshakeParams};
use crate::plan::{self, Extent};
use crate::transport::{ExportSource, Stream};
use crate::tuning;
use crate::violation::Violation;
use crate::wire;

/// Connection options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// I/O engine.
    pub engine: EngineChoice,
    /// Also select `qemu:allocation-depth` (if offered).
    pub allocation_depth: bool,
    /// Deadline for the handshake.
    pub handshake_timeout: Duration,
    /// Longest silence while requests are in flight.
    pub idle_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            engine: EngineChoice::Auto,
            allocation_depth: false,
            handshake_timeout: tuning::HANDSHAKE_TIMEOUT,
            idle_timeout: tuning::IDLE_TIMEOUT,
        }
    }
}

/// Contexts to request: `base:allocation` (optional), the dirty bitmap
/// (required when named), allocation depth (optional).
pub(crate) fn context_queries(
    source_bitmap: Option<&str>,
    allocation_depth: bool,
) -> (Vec<String>, Vec<String>) {
    let mut want = vec![wire::CONTEXT_BASE_ALLOCATION.to_owned()];
    let mut required = Vec::new();
    if let Some(b) = source_bitmap {
        let name = format!("{}{b}", wire::CONTEXT_DIRTY_BITMAP_PREFIX);
        want.push(name.clone());
        required.push(name);
    }
    if allocation_depth {
        want.push(wire::CONTEXT_ALLOCATION_DEPTH.to_owned());
    }
    (want, required)
}

/// Connects and negotiates; returns the socket in transmission phase.
pub(crate) fn open(
    mut stream: Stream,
    export_name: &str,
    dirty_bitmap: Option<&str>,
    allocation_depth: bool,
    handshake_timeout: Duration,
) -> Result<(Stream, ExportInfo)> {
    stream
        .set_timeouts(Some(handshake_timeout))
        .map_err(|source| Error::Io {
            step: "setting socket timeouts",
            source,
        })?;
    let (contexts, required) = context_queries(dirty_bitmap, allocation_depth);
    let info = handshake::negotiate(
        &mut stream,
        &HandshakeParams {
            export_name,
            contexts,
            required,
            timeout: handshake_timeout,
        },
    )?;
    Ok((stream, info))
}

/// One connection to an export.
pub struct Client {
    link: Link,
    io: Box<dyn SocketIo>,
    next_tag: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", self.link.conn.info())
            .field("engine", &self.io.kind())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `source` and negotiates.
    pub fn connect(source: &ExportSource, opts: &ClientOptions) -> Result<Client> {
        let stream = Stream::connect(&source.endpoint)?;
        Client::from_stream(
            stream,
            &source.export_name,
            source.dirty_bitmap.as_deref(),
            opts,
        )
    }

    /// Negotiates over an already connected socket (e.g. one end of a
    /// socketpair).
    pub fn from_stream(
        stream: impl Into<Stream>,
        export_name: &str,
        dirty_bitmap: Option<&str>,
        opts: &ClientOptions,
    ) -> Result<Client> {
        let kind = opts.engine.resolve()?;
        let (stream, info) = open(
            stream.into(),
            export_name,
            dirty_bitmap,
            opts.allocation_depth,
            opts.handshake_timeout,
        )?;
        let io = engine::build(kind, vec![stream], opts.idle_timeout)?;
        Ok(Client {
            link: Link::new(Conn::new(Arc::new(info)), 0, opts.idle_timeout),
            io,
            next_tag: 0,
        })
    }

    /// What the handshake learned.
    pub fn info(&self) -> &ExportInfo {
        self.link.conn.info()
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        self.io.kind()
    }

    /// Payload bytes received in data chunks so far.
    pub fn bytes_read(&self) -> u64 {
        self.link.conn.stats.data_bytes
    }

    /// Runs I/O until `n` commands finished; returns them by tag order of
    /// completion.
    fn run(&mut self, mut want: usize) -> Result<Vec<crate::conn::Done>> {
        let mut out = Vec::new();
        let mut comps = Vec::new();
        loop {
            for d in self.link.conn.take_done() {
                out.push(d);
                want = want.saturating_sub(1);
            }
            if want == 0 {
                return Ok(out);
            }
            self.link.start_io(self.io.as_mut())?;
            if self.io.outstanding() == 0 {
                return Err(Error::Internal("waiting with no I/O outstanding".into()));
            }
            comps.clear();
            let slice = self
                .link
                .wait_allowance()
                .map_or(tuning::URING_WAIT_SLICE, |a| {
                    a.min(tuning::URING_WAIT_SLICE)
                });
            let t0 = Instant::now();
            self.io
                .wait(slice, &mut comps)
                .map_err(|source| Error::Io {
                    step: "waiting for I/O",
                    source,
                })?;
            let waited = t0.elapsed();
            let progressed = !comps.is_empty();
            for c in comps.drain(..) {
                self.link.complete(c)?;
            }
            self.link.account_wait(waited, progressed)?;
        }
    }

    /// Block status for `len` bytes at `offset` (aligned, at most 32 MiB):
    /// one entry per selected context, in the order of `info().contexts`.
    /// Each may cover less than asked (the server may answer short).
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<ContextExtents>> {
        let tag = self.tag();
        self.link.conn.submit_block_status(tag, offset, len)?;
        let done = self.run(1)?;
        match done.into_iter().next().map(|d| d.result) {
            Some(Ok(DoneOk::BlockStatus(v))) => Ok(v),
            Some(Err(e)) => Err(e),
            _ => Err(Error::Internal("unexpected completion".into())),
        }
    }

    /// The whole export's map for one selected context, with neighbouring
    /// extents of equal flags merged. The export is cut into windows of
    /// [`tuning::BLOCK_STATUS_MAX_LEN`]; up to [`tuning::MAP_REQUESTS_IN_FLIGHT`]
    /// block status requests are in flight, and a window answered short is
    /// asked again from where its reply ended.
    pub fn map(&mut self, context: &str) -> Result<Vec<Extent>> {
        let idx = self
            .info()
            .contexts
            .iter()
            .position(|c| c.name == context)
            .ok_or_else(|| Error::ContextMissing(context.to_owned()))?;
        let size = self.info().size;
        let min = u64::from(self.info().min_block());
        let step = u64::from(tuning::BLOCK_STATUS_MAX_LEN) / min * min;
        // Window start → (asked up to here, window end, extents so far).
        let mut windows: BTreeMap<u64, (u64, u64, Vec<Extent>)> = BTreeMap::new();
        let mut tags: HashMap<u64, u64> = HashMap::new();
        let mut next_window = 0u64;
        let mut in_flight = 0usize;
        loop {
            while in_flight < tuning::MAP_REQUESTS_IN_FLIGHT && next_window < size {
                let start = next_window;
                let end = start.saturating_add(step).min(size);
                next_window = end;
                let tag = self.tag();
                self.link
                    .conn
                    .submit_block_status(tag, start, wire::sat_u32(end - start))?;
                tags.insert(tag, start);
                windows.insert(start, (start, end, Vec::new()));
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            for d in self.run(1)? {
                in_flight -= 1;
                let reply = match d.result {
                    Ok(DoneOk::BlockStatus(v)) => v,
                    Err(e) => return Err(e),
                    Ok(DoneOk::Read | DoneOk::Trim) => {
                        return Err(Error::Internal("read result for status".into()))
                    }
                };
                let start = tags
                    .remove(&d.tag)
                    .ok_or_else(|| Error::Internal("unknown block status tag".into()))?;
                let w = windows
                    .get_mut(&start)
                    .ok_or_else(|| Error::Internal("unknown map window".into()))?;
                let pos = d.offset;
                let extents = reply
                    .into_iter()
                    .nth(idx)
                    .map(|c| c.extents)
                    .ok_or_else(|| Error::Internal("context missing in reply".into()))?;
                let end = extents.last().map_or(pos, Extent::end);
                if end <= pos || (end < size && end % min != 0) {
                    return Err(Violation::Malformed(format!(
                        "block status at {pos} made no aligned progress (to {end})"
                    ))
                    .into());
                }
                w.2.extend_from_slice(&extents);
                plan::merge_extents(&mut w.2);
                w.0 = end;
                if end < w.1 {
                    let tag = self.tag();
                    self.link
                        .conn
                        .submit_block_status(tag, end, wire::sat_u32(w.1 - end))?;
                    tags.insert(tag, start);
                    in_flight += 1;
                }
            }
        }
        let mut out: Vec<Extent> = Vec::new();
        for (_, (_, _, ext)) in windows {
            out.extend(ext);
        }
        plan::merge_extents(&mut out);
        Ok(out)
    }

    /// Reads `len` bytes at `offset` (aligned to the minimum block size),
    /// pipelining requests of at most `info().max_request()` bytes. Holes
    /// read as zeroes; any server error fails the whole read.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let buf = self.link.conn.add_buf(vec![0; len]);
        let max = self.info().max_request();
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let n = (len - pos).min(max as usize);
            pieces.push((pos, n));
            pos += n;
        }
        let mut next = 0;
        let mut in_flight = 0;
        let mut first_err = None;
        while next < pieces.len() || in_flight > 0 {
            while next < pieces.len() && in_flight < tuning::MAX_REQUESTS_IN_FLIGHT {
                let (p, n) = pieces[next];
                let tag = self.tag();
                let r = self.link.conn.submit_read(
                    tag,
                    offset + p as u64,
                    wire::sat_u32(n as u64),
                    buf,
                    p,
                );
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                    next = pieces.len();
                    break;
                }
                next += 1;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            for d in self.run(1)? {
                in_flight -= 1;
                if let Err(e) = d.result {
                    first_err.get_or_insert(e);
                    next = pieces.len();
                }
            }
        }
        let data = self.link.conn.take_buf(buf);
        match (first_err, data) {
            (Some(e), _) => Err(e),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(Error::Internal("read buffer not returned".into())),
        }
    }

    /// Discards `len` bytes at `offset` (`NBD_CMD_TRIM`, in requests of at
    /// most [`tuning::TRIM_MAX_LEN`], all in flight at once). The export
    /// must be writable and advertise trim ([`ExportInfo::flags`]); on
    /// QEMU's `snapshot-access` node this tells the copy-before-write
    /// filter it need not preserve the range any more.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        let min = u64::from(self.info().min_block());
        let step = u64::from(tuning::TRIM_MAX_LEN) / min * min;
        let mut pos = offset;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument("trim range overflows".into()))?;
        let mut in_flight = 0usize;
        let mut first_err = None;
        while pos < end {
            let n = (end - pos).min(step);
            let tag = self.tag();
            if let Err(e) = self.link.conn.submit_trim(tag, pos, wire::sat_u32(n)) {
                first_err = Some(e);
                break;
            }
            in_flight += 1;
            pos += n;
        }
        if in_flight > 0 {
            for d in self.run(in_flight)? {
                if let Err(e) = d.result {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub fn disconnect(mut self) -> Result<()> {
        self.link.conn.submit_disc();
        let deadline = Instant::now() + self.link.idle_timeout;
        let mut comps = Vec::new();
        while self.link.conn.wants_tx() || self.link.conn.io_outstanding() {
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    step: "sending NBD_CMD_DISC",
                    timeout: self.link.idle_timeout,
                });
            }
            if let Some(b) = self.link.conn.tx_begin() {
                self.io.start(0, engine::Dir::Send, b);
            }
            comps.clear();
            self.io
                .wait(tuning::URING_WAIT_SLICE, &mut comps)
                .map_err(|source| Error::Io {
                    step: "sending NBD_CMD_DISC",
                    source,
                })?;
            for c in comps.drain(..) {
                self.link.complete(c)?;
            }
        }
        Ok(())
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }
}

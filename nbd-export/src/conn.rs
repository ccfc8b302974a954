//! Transmission phase of one connection, without I/O ("sans-IO").
//!
//! [`Conn`] encodes requests into an outgoing byte queue and parses the
//! incoming byte stream, validating every reply before trusting it. It
//! never touches a socket: an I/O engine borrows its buffers with
//! [`Conn::tx_begin`]/[`Conn::rx_begin`] (taking ownership, so io_uring can
//! hold them while the kernel writes), moves bytes, and hands them back with
//! [`Conn::tx_end`]/[`Conn::rx_end`]. Read payloads are received directly
//! into their destination buffer: one copy, kernel to chunk.
//!
//! Replies may come in any order and interleave; they are matched by
//! cookie. Any protocol violation kills the connection (hard disconnect).

use std::collections::HashMap;
use std::sync::Arc;

use zerocopy::FromBytes;

use crate::error::{Error, Result};
use crate::handshake::ExportInfo;
use crate::plan::{self, Extent};
use crate::tuning;
use crate::violation::Violation;
use crate::wire::{self, ChunkHeader};

/// Index of a destination buffer owned by a [`Conn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BufId(usize);

/// A buffer lent to an I/O engine: fill (or send) `data[start..end]`.
#[derive(Debug)]
pub(crate) struct IoBuf {
    pub data: Vec<u8>,
    pub start: usize,
    pub end: usize,
    /// Receive: wait until the range is full (`MSG_WAITALL`); else return
    /// as soon as any bytes arrived. Sends always send everything.
    pub exact: bool,
}

impl IoBuf {
    pub fn len(&self) -> usize {
        self.end - self.start
    }
}

/// Extents of one context in a block status reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExtents {
    /// Context name.
    pub context: String,
    /// Extents from the request offset on, clamped to the request; may end
    /// before the request does (the server may answer short).
    pub extents: Vec<Extent>,
}

/// Successful outcome of a command.
#[derive(Debug)]
pub(crate) enum DoneOk {
    /// All requested bytes are in the destination buffer.
    Read,
    /// One entry per selected context, in the order of `ExportInfo::contexts`.
    BlockStatus(Vec<ContextExtents>),
    /// The range was discarded (`NBD_CMD_TRIM`).
    Trim,
}

/// A finished command.
#[derive(Debug)]
pub(crate) struct Done {
    /// Caller's tag from submission.
    pub tag: u64,
    /// Request offset.
    pub offset: u64,
    /// Request length.
    pub len: u32,
    /// Outcome. Server errors are `Error::Command`; protocol violations are
    /// returned from `rx_end` instead (they end the connection).
    pub result: Result<DoneOk>,
}

/// Covered byte ranges of one read reply, as sorted disjoint intervals
/// relative to the request start; adjacent intervals merge.
#[derive(Debug, Default)]
struct Coverage {
    spans: Vec<(u64, u64)>,
    covered: u64,
}

impl Coverage {
    fn insert(&mut self, start: u64, len: u64) -> Result<(), Violation> {
        let end = start + len;
        let i = self.spans.partition_point(|s| s.0 < start);
        let overlaps_prev = i > 0 && self.spans[i - 1].1 > start;
        let overlaps_next = i < self.spans.len() && self.spans[i].0 < end;
        if overlaps_prev || overlaps_next {
            return Err(Violation::OverlappingChunk { offset: start, len });
        }
        let joins_prev = i > 0 && self.spans[i - 1].1 == start;
        let joins_next = i < self.spans.len() && self.spans[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.spans[i - 1].1 = self.spans[i].1;
                self.spans.remove(i);
            }
            (true, false) => self.spans[i - 1].1 = end,
            (false, true) => self.spans[i].0 = start,
            (false, false) => {
                if self.spans.len() >= tuning::MAX_READ_FRAGMENTS {
                    return Err(Violation::TooFragmented(tuning::MAX_READ_FRAGMENTS));
                }
                self.spans.insert(i, (start, end));
            }
        }
        self.covered += len;
        Ok(())
    }
}

#[derive(Debug)]
enum Kind {
    Read {
        buf: BufId,
        buf_off: usize,
        coverage: Coverage,
    },
    BlockStatus {
        /// Indexed like `ExportInfo::contexts`.
        got: Vec<Option<Vec<Extent>>>,
    },
    /// `NBD_CMD_TRIM`: no payload either way; the reply is simple (or a
    /// structured error / `NBD_REPLY_TYPE_NONE`).
    Trim,
}

/// Where a data or hole piece `off..off + len` of a read reply lands:
/// checks that it lies inside the request and is not covered yet, marks it
/// covered, and returns the read's buffer and the position in it.
fn place_piece(p: &mut Pending, off: u64, len: u64, what: &str) -> Result<(BufId, usize)> {
    let (req_off, req_len) = (p.offset, u64::from(p.len));
    if off < req_off || off.checked_add(len).is_none_or(|e| e > req_off + req_len) {
        return Err(Violation::ChunkOutOfRange {
            offset: off,
            len,
            req_offset: req_off,
            req_len,
        }
        .into());
    }
    let Kind::Read {
        buf,
        buf_off,
        coverage,
    } = &mut p.kind
    else {
        return Err(Violation::Malformed(format!("{what} chunk for non-read")).into());
    };
    coverage.insert(off - req_off, len)?;
    // Both ≤ the request length, which fits the buffer.
    Ok((*buf, *buf_off + wire::sat_usize(off - req_off)))
}

#[derive(Debug)]
struct Pending {
    tag: u64,
    offset: u64,
    len: u32,
    kind: Kind,
    /// First error chunk (lowest offset wins for ERROR_OFFSET).
    error: Option<wire::ErrorChunk>,
    /// A structured chunk has arrived (a later simple reply is a violation).
    started: bool,
}

impl Pending {
    fn command(&self) -> &'static str {
        match self.kind {
            Kind::Read { .. } => "NBD_CMD_READ",
            Kind::BlockStatus { .. } => "NBD_CMD_BLOCK_STATUS",
            Kind::Trim => "NBD_CMD_TRIM",
        }
    }
}

#[derive(Debug)]
struct Slot {
    /// `None` while lent to the engine (a reply's data is being received
    /// into it) and once taken back.
    data: Option<Vec<u8>>,
    /// The buffer's length while it is registered (lent or not); 0 once
    /// taken back. More reads into it may be queued while it is lent:
    /// their replies come after the one being received.
    len: usize,
    /// Reads in flight into this buffer.
    refs: usize,
}

#[derive(Debug, Clone, Copy)]
enum Rx {
    /// Filling `hdr[..16]`.
    Prefix { filled: usize },
    /// Filling `hdr[16..20]` of a structured chunk header.
    Header { filled: usize },
    /// Filling `scratch[..need]` with the fixed part (or all) of a payload.
    Fixed {
        h: ChunkHeader,
        need: usize,
        filled: usize,
    },
    /// Receiving read data straight into a destination buffer.
    Data {
        h: ChunkHeader,
        buf: BufId,
        pos: usize,
        end: usize,
    },
}

/// Statistics of one connection.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ConnStats {
    /// Payload bytes received in `NBD_REPLY_TYPE_OFFSET_DATA` chunks.
    pub data_bytes: u64,
    /// Bytes reported as `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub hole_bytes: u64,
}

/// One connection in transmission phase.
#[derive(Debug)]
pub(crate) struct Conn {
    info: Arc<ExportInfo>,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    bytes_in_flight: u64,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    tx_queue: Vec<u8>,
    tx_spare: Vec<u8>,
    tx_lent: bool,
    rx: Rx,
    rx_lent: bool,
    /// Whether the lent receive buffer is the staging buffer.
    rx_staged: bool,
    hdr: Vec<u8>,
    scratch: Vec<u8>,
    /// Received bytes not parsed yet: `stage[stage_pos..]`.
    stage: Vec<u8>,
    stage_pos: usize,
    done: Vec<Done>,
    dead: bool,
    disc_sent: bool,
    pub stats: ConnStats,
}

const HDR_LEN: usize = 20;
const PREFIX_LEN: usize = 16;
/// Small reads (headers, offsets, holes, status chunks) go through a
/// staging buffer, so one receive picks up several of them; what lands
/// there of a data payload is copied (at most this much per reply).
const STAGE_LEN: usize = 4096;
/// A payload part at least this long is received straight into its
/// destination instead.
const DIRECT_MIN: usize = 2048;

impl Conn {
    pub fn new(info: Arc<ExportInfo>) -> Conn {
        Conn {
            info,
            next_cookie: 1,
            pending: HashMap::new(),
            bytes_in_flight: 0,
            slots: Vec::new(),
            free_slots: Vec::new(),
            tx_queue: Vec::with_capacity(4096),
            tx_spare: Vec::with_capacity(4096),
            tx_lent: false,
            rx: Rx::Prefix { filled: 0 },
            rx_lent: false,
            rx_staged: false,
            hdr: vec![0; HDR_LEN],
            scratch: Vec::new(),
            stage: Vec::with_capacity(STAGE_LEN),
            stage_pos: 0,
            done: Vec::new(),
            dead: false,
            disc_sent: false,
            stats: ConnStats::default(),
        }
    }

    pub fn info(&self) -> &Arc<ExportInfo> {
        &self.info
    }

    /// Requests whose reply has not finished.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Read bytes requested and not yet finished.
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }

    /// Whether the engine should have a receive outstanding.
    pub fn wants_rx(&self) -> bool {
        !self.dead && !self.rx_lent && !self.pending.is_empty()
    }

    /// Whether bytes wait to be sent.
    pub fn wants_tx(&self) -> bool {
        !self.dead && !self.tx_lent && !self.tx_queue.is_empty()
    }

    /// Whether the engine holds one of our buffers.
    pub fn io_outstanding(&self) -> bool {
        self.rx_lent || self.tx_lent
    }

    /// Finished commands since the last call.
    pub fn take_done(&mut self) -> std::vec::Drain<'_, Done> {
        self.done.drain(..)
    }

    // ------------------------------------------------------- buffers

    /// Takes ownership of a destination buffer for reads.
    pub fn add_buf(&mut self, data: Vec<u8>) -> BufId {
        let slot = Slot {
            len: data.len(),
            data: Some(data),
            refs: 0,
        };
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i] = slot;
                BufId(i)
            }
            None => {
                self.slots.push(slot);
                BufId(self.slots.len() - 1)
            }
        }
    }

    /// Returns a buffer once no read into it is in flight.
    pub fn take_buf(&mut self, id: BufId) -> Option<Vec<u8>> {
        let slot = self.slots.get_mut(id.0)?;
        if slot.refs != 0 {
            return None;
        }
        let data = slot.data.take()?;
        slot.len = 0;
        self.free_slots.push(id.0);
        Some(data)
    }

    // ------------------------------------------------------- submission

    fn cookie(&mut self) -> u64 {
        loop {
            let c = self.next_cookie;
            self.next_cookie = self.next_cookie.wrapping_add(1);
            if !self.pending.contains_key(&c) {
                return c;
            }
        }
    }

    fn check_range(&self, offset: u64, len: u32, max: u32) -> Result<()> {
        let min = u64::from(self.info.min_block());
        let end = offset.checked_add(u64::from(len));
        if len == 0
            || len > max
            || end.is_none_or(|e| e > self.info.size)
            || offset % min != 0
            || u64::from(len) % min != 0
        {
            return Err(Error::InvalidArgument(format!(
                "request {offset}+{len} outside export of {} bytes, unaligned to {min}, or over {max} bytes",
                self.info.size
            )));
        }
        Ok(())
    }

    fn push_request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = wire::Request::new(cmd, flags, cookie, offset, len);
        self.tx_queue
            .extend_from_slice(zerocopy::IntoBytes::as_bytes(&r));
    }

    /// Queues `NBD_CMD_READ` of `len` bytes at `offset` into
    /// `buf[buf_off..buf_off+len]`.
    pub fn submit_read(
        &mut self,
        tag: u64,
        offset: u64,
        len: u32,
        buf: BufId,
        buf_off: usize,
    ) -> Result<()> {
        self.check_live()?;
        self.check_range(offset, len, self.info.max_request())?;
        let slot = self
            .slots
            .get_mut(buf.0)
            .filter(|s| buf_off.saturating_add(len as usize) <= s.len)
            .ok_or_else(|| Error::InvalidArgument("read destination out of bounds".into()))?;
        slot.refs += 1;
        self.enqueue(
            wire::NBD_CMD_READ,
            tag,
            offset,
            len,
            Kind::Read {
                buf,
                buf_off,
                coverage: Coverage::default(),
            },
        );
        self.bytes_in_flight += u64::from(len);
        Ok(())
    }

    /// Queues `NBD_CMD_BLOCK_STATUS` for `len` bytes at `offset`.
    pub fn submit_block_status(&mut self, tag: u64, offset: u64, len: u32) -> Result<()> {
        self.check_live()?;
        if self.info.contexts.is_empty() {
            return Err(Error::InvalidArgument(
                "block status without a selected metadata context".into(),
            ));
        }
        self.check_range(offset, len, tuning::BLOCK_STATUS_MAX_LEN)?;
        let n = self.info.contexts.len();
        self.enqueue(
            wire::NBD_CMD_BLOCK_STATUS,
            tag,
            offset,
            len,
            Kind::BlockStatus { got: vec![None; n] },
        );
        Ok(())
    }

    /// Sends request `cmd` and remembers it under a fresh cookie.
    fn enqueue(&mut self, cmd: u16, tag: u64, offset: u64, len: u32, kind: Kind) {
        let cookie = self.cookie();
        self.push_request(cmd, 0, cookie, offset, len);
        self.pending.insert(
            cookie,
            Pending {
                tag,
                offset,
                len,
                kind,
                error: None,
                started: false,
            },
        );
    }

    /// Queues `NBD_CMD_TRIM` for `len` bytes at `offset` (the server must
    /// have advertised `NBD_FLAG_SEND_TRIM` on a writable export).
    pub fn submit_trim(&mut self, tag: u64, offset: u64, len: u32) -> Result<()> {
        self.check_live()?;
        if self.info.flags.read_only() || !self.info.flags.can_trim() {
            return Err(Error::InvalidArgument(
                "the export does not accept NBD_CMD_TRIM".into(),
            ));
        }
        self.check_range(offset, len, tuning::TRIM_MAX_LEN)?;
        self.enqueue(wire::NBD_CMD_TRIM, tag, offset, len, Kind::Trim);
        Ok(())
    }

    /// Queues `NBD_CMD_DISC` (no reply). Nothing may be sent after it.
    pub fn submit_disc(&mut self) {
        if !self.dead && !self.disc_sent {
            let cookie = self.cookie();
            self.push_request(wire::NBD_CMD_DISC, 0, cookie, 0, 0);
            self.disc_sent = true;
        }
    }

    fn check_live(&self) -> Result<()> {
        if self.dead || self.disc_sent {
            return Err(Error::InvalidArgument("connection is closed".into()));
        }
        Ok(())
    }

    /// Marks the connection dead (after an I/O error); pending commands are
    /// abandoned.
    pub fn kill(&mut self) {
        self.dead = true;
    }

    // ------------------------------------------------------------- tx

    /// Lends the queued request bytes to the engine.
    pub fn tx_begin(&mut self) -> Option<IoBuf> {
        if !self.wants_tx() {
            return None;
        }
        let mut data = std::mem::take(&mut self.tx_spare);
        std::mem::swap(&mut data, &mut self.tx_queue);
        self.tx_lent = true;
        let end = data.len();
        Some(IoBuf {
            data,
            start: 0,
            end,
            exact: true,
        })
    }

    /// Takes the send buffer back after `n` bytes went out.
    pub fn tx_end(&mut self, mut buf: IoBuf, n: usize) {
        self.tx_lent = false;
        let sent = buf.start + n.min(buf.len());
        if sent < buf.end {
            // Partial send: the rest goes first, before newer requests.
            let mut rest = buf.data[sent..buf.end].to_vec();
            rest.extend_from_slice(&self.tx_queue);
            self.tx_queue = rest;
        } else {
            buf.data.clear();
            if self.tx_spare.capacity() < buf.data.capacity() {
                self.tx_spare = buf.data;
            }
        }
    }

    // ------------------------------------------------------------- rx

    /// Where the bytes of the current state go: (buffer, filled, needed).
    fn target(&mut self) -> Option<(&mut Vec<u8>, usize, usize)> {
        match self.rx {
            Rx::Prefix { filled } => Some((&mut self.hdr, filled, PREFIX_LEN)),
            Rx::Header { filled } => Some((&mut self.hdr, filled, HDR_LEN)),
            Rx::Fixed { need, filled, .. } => Some((&mut self.scratch, filled, need)),
            Rx::Data { buf, pos, end, .. } => {
                let d = self.slots.get_mut(buf.0)?.data.as_mut()?;
                Some((d, pos, end))
            }
        }
    }

    /// Lends the buffer the next reply bytes must go into: the current
    /// target itself when a long part is due (received exactly), else the
    /// staging buffer (whatever has arrived).
    pub fn rx_begin(&mut self) -> Option<IoBuf> {
        if self.dead || self.rx_lent {
            return None;
        }
        let staged_empty = self.stage_pos == self.stage.len();
        let (filled, needed) = {
            let (_, f, n) = self.target()?;
            (f, n)
        };
        let io = if staged_empty && needed - filled >= DIRECT_MIN {
            let data = match self.rx {
                Rx::Prefix { .. } | Rx::Header { .. } => std::mem::take(&mut self.hdr),
                Rx::Fixed { .. } => std::mem::take(&mut self.scratch),
                Rx::Data { buf, .. } => self.slots.get_mut(buf.0)?.data.take()?,
            };
            self.rx_staged = false;
            IoBuf {
                data,
                start: filled,
                end: needed,
                exact: true,
            }
        } else {
            let mut data = std::mem::take(&mut self.stage);
            // Keep unparsed bytes, at the front.
            data.drain(..self.stage_pos);
            self.stage_pos = 0;
            let start = data.len();
            data.resize(STAGE_LEN.max(start + 1), 0);
            self.rx_staged = true;
            IoBuf {
                end: data.len(),
                data,
                start,
                exact: false,
            }
        };
        self.rx_lent = true;
        Some(io)
    }

    fn put_back(&mut self, buf: IoBuf, n: usize) {
        self.rx_lent = false;
        if self.rx_staged {
            let keep = buf.start + n.min(buf.len());
            let mut data = buf.data;
            data.truncate(keep);
            self.stage = data;
            return;
        }
        match self.rx {
            Rx::Prefix { .. } | Rx::Header { .. } => self.hdr = buf.data,
            Rx::Fixed { .. } => self.scratch = buf.data,
            Rx::Data { buf: id, .. } => {
                if let Some(slot) = self.slots.get_mut(id.0) {
                    slot.data = Some(buf.data);
                }
            }
        }
    }

    /// Takes the receive buffer back without progress (the engine could not
    /// start the operation, e.g. a full submission queue).
    pub fn rx_return(&mut self, buf: IoBuf) {
        self.put_back(buf, 0);
    }

    /// Takes the receive buffer back after `n` bytes arrived, and parses.
    /// `n == 0` means end of stream. An error here is fatal for the
    /// connection.
    pub fn rx_end(&mut self, buf: IoBuf, n: usize) -> Result<()> {
        let wanted = buf.len();
        let staged = self.rx_staged;
        self.put_back(buf, n);
        if self.dead {
            return Err(Error::Disconnected {
                step: "reading replies",
            });
        }
        if n == 0 && wanted > 0 {
            self.dead = true;
            return Err(Error::Disconnected {
                step: "reading replies",
            });
        }
        let r = if staged {
            self.drain_stage()
        } else {
            self.advance(n.min(wanted))
        };
        if r.is_err() {
            self.dead = true;
        }
        r
    }

    /// Parses staged bytes: copies them into the current target piece by
    /// piece, advancing the state machine, until the stage is empty.
    fn drain_stage(&mut self) -> Result<()> {
        while self.stage_pos < self.stage.len() {
            let stage = std::mem::take(&mut self.stage);
            let avail = stage.len() - self.stage_pos;
            let from = self.stage_pos;
            let Some((dst, filled, needed)) = self.target() else {
                self.stage = stage;
                return Err(Error::Internal("receive target unavailable".into()));
            };
            let take = avail.min(needed - filled);
            if take == 0 {
                self.stage = stage;
                return Err(Error::Internal("receive state needs no bytes".into()));
            }
            dst[filled..filled + take].copy_from_slice(&stage[from..from + take]);
            self.stage = stage;
            self.stage_pos += take;
            self.advance(take)?;
        }
        self.stage.clear();
        self.stage_pos = 0;
        Ok(())
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        match self.rx {
            Rx::Prefix { filled } => {
                let filled = filled + n;
                if filled < PREFIX_LEN {
                    self.rx = Rx::Prefix { filled };
                    return Ok(());
                }
                let mut p = [0u8; PREFIX_LEN];
                p.copy_from_slice(&self.hdr[..PREFIX_LEN]);
                match wire::decode_reply_prefix(&p)? {
                    wire::ReplyStart::Simple { error, cookie } => {
                        self.rx = Rx::Prefix { filled: 0 };
                        self.on_simple(error, cookie)
                    }
                    wire::ReplyStart::Structured => {
                        self.rx = Rx::Header { filled: PREFIX_LEN };
                        Ok(())
                    }
                }
            }
            Rx::Header { filled } => {
                let filled = filled + n;
                if filled < HDR_LEN {
                    self.rx = Rx::Header { filled };
                    return Ok(());
                }
                let mut hb = [0u8; HDR_LEN];
                hb.copy_from_slice(&self.hdr[..HDR_LEN]);
                let h = wire::decode_chunk_header(&hb)?;
                self.on_header(h)
            }
            Rx::Fixed { h, need, filled } => {
                let filled = filled + n;
                if filled < need {
                    self.rx = Rx::Fixed { h, need, filled };
                    return Ok(());
                }
                self.rx = Rx::Prefix { filled: 0 };
                self.on_payload(h)
            }
            Rx::Data { h, buf, pos, end } => {
                let pos = pos + n;
                self.stats.data_bytes += n as u64;
                if pos < end {
                    self.rx = Rx::Data { h, buf, pos, end };
                    return Ok(());
                }
                self.rx = Rx::Prefix { filled: 0 };
                self.finish_chunk(h)
            }
        }
    }

    fn on_simple(&mut self, error: u32, cookie: u64) -> Result<()> {
        let p = self
            .pending
            .get(&cookie)
            .ok_or(Violation::UnknownCookie(cookie))?;
        match p.kind {
            // With structured replies negotiated a read MUST NOT get a
            // simple reply: its payload length would be unknowable.
            Kind::Read { .. } => Err(Violation::UnexpectedSimpleReply("NBD_CMD_READ").into()),
            Kind::BlockStatus { .. } | Kind::Trim if p.started => {
                Err(Violation::Malformed("simple reply after structured chunks".into()).into())
            }
            Kind::Trim => {
                let Some(p) = self.pending.remove(&cookie) else {
                    return Err(Violation::UnknownCookie(cookie).into());
                };
                let result = if error == 0 {
                    Ok(DoneOk::Trim)
                } else {
                    Err(Error::Command {
                        command: "NBD_CMD_TRIM",
                        offset: p.offset,
                        req_offset: p.offset,
                        req_len: p.len,
                        errno: error,
                        message: String::new(),
                    })
                };
                self.done.push(Done {
                    tag: p.tag,
                    offset: p.offset,
                    len: p.len,
                    result,
                });
                Ok(())
            }
            Kind::BlockStatus { .. } if error == 0 => Err(Violation::Malformed(
                "block status succeeded with a simple reply (no extents)".into(),
            )
            .into()),
            Kind::BlockStatus { .. } => {
                let Some(p) = self.pending.remove(&cookie) else {
                    return Err(Violation::UnknownCookie(cookie).into());
                };
                self.done.push(Done {
                    tag: p.tag,
                    offset: p.offset,
                    len: p.len,
                    result: Err(Error::Command {
                        command: "NBD_CMD_BLOCK_STATUS",
                        offset: p.offset,
                        req_offset: p.offset,
                        req_len: p.len,
                        errno: error,
                        message: String::new(),
                    }),
                });
                Ok(())
            }
        }
    }

    fn on_header(&mut self, h: ChunkHeader) -> Result<()> {
        let cookie = h.cookie.get();
        let ty = h.reply_type.get();
        let len = h.length.get();
        let p = self
            .pending
            .get_mut(&cookie)
            .ok_or(Violation::UnknownCookie(cookie))?;
        p.started = true;
        let is_read = matches!(p.kind, Kind::Read { .. });
        let is_status = matches!(p.kind, Kind::BlockStatus { .. });
        let command = p.command();
        let req_len = p.len;
        let bad_len = |what| {
            Err(Error::from(Violation::BadLength {
                what,
                len: len.into(),
            }))
        };
        let wrong = || {
            Err(Error::from(Violation::UnexpectedReplyType {
                command,
                reply_type: ty,
            }))
        };
        let need: u32 = match ty {
            wire::NBD_REPLY_TYPE_NONE => {
                if len != 0 {
                    return bad_len("NBD_REPLY_TYPE_NONE");
                }
                if !h.is_done() {
                    return Err(Violation::Malformed(
                        "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE".into(),
                    )
                    .into());
                }
                0
            }
            wire::NBD_REPLY_TYPE_OFFSET_DATA => {
                if !is_read {
                    return wrong();
                }
                if len < 9 {
                    return bad_len("NBD_REPLY_TYPE_OFFSET_DATA");
                }
                if len - 8 > req_len {
                    return Err(Violation::Oversized {
                        what: "NBD_REPLY_TYPE_OFFSET_DATA",
                        len: u64::from(len - 8),
                        max: req_len.into(),
                    }
                    .into());
                }
                8
            }
            wire::NBD_REPLY_TYPE_OFFSET_HOLE => {
                if !is_read {
                    return wrong();
                }
                if len != 12 {
                    return bad_len("NBD_REPLY_TYPE_OFFSET_HOLE");
                }
                12
            }
            wire::NBD_REPLY_TYPE_BLOCK_STATUS => {
                if !is_status {
                    return wrong();
                }
                if len > wire::MAX_BLOCK_STATUS_PAYLOAD {
                    return Err(Violation::Oversized {
                        what: "NBD_REPLY_TYPE_BLOCK_STATUS",
                        len: len.into(),
                        max: wire::MAX_BLOCK_STATUS_PAYLOAD.into(),
                    }
                    .into());
                }
                if len < 12 || (len - 4) % 8 != 0 {
                    return bad_len("NBD_REPLY_TYPE_BLOCK_STATUS");
                }
                len
            }
            wire::NBD_REPLY_TYPE_ERROR | wire::NBD_REPLY_TYPE_ERROR_OFFSET => {
                let fixed = if ty == wire::NBD_REPLY_TYPE_ERROR {
                    6
                } else {
                    14
                };
                if len < fixed || len > fixed + wire::sat_u32(tuning::MAX_STRING_LEN as u64) {
                    return bad_len("error chunk");
                }
                len
            }
            t if t & wire::NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                // Unknown error type: the reply has failed, but the stream
                // stays in sync if the length is sane.
                if !(6..=tuning::MAX_UNKNOWN_ERROR_CHUNK).contains(&len) {
                    return bad_len("unknown error chunk");
                }
                len
            }
            t => return Err(Violation::UnknownReplyType(t).into()),
        };
        if need == 0 {
            self.rx = Rx::Prefix { filled: 0 };
            return self.finish_chunk(h);
        }
        // need ≤ MAX_BLOCK_STATUS_PAYLOAD (~8 MiB), checked above.
        let need = need as usize;
        if self.scratch.len() < need {
            self.scratch.resize(need, 0);
        }
        self.rx = Rx::Fixed { h, need, filled: 0 };
        Ok(())
    }

    fn on_payload(&mut self, h: ChunkHeader) -> Result<()> {
        let cookie = h.cookie.get();
        let ty = h.reply_type.get();
        let size = self.info.size;
        let Some(p) = self.pending.get_mut(&cookie) else {
            return Err(Violation::UnknownCookie(cookie).into());
        };
        let req_off = p.offset;
        let req_len = u64::from(p.len);
        match ty {
            wire::NBD_REPLY_TYPE_OFFSET_DATA => {
                let off = u64::from_be_bytes(
                    self.scratch[..8]
                        .try_into()
                        .map_err(|_| Violation::Malformed("short data offset".into()))?,
                );
                let dlen = u64::from(h.length.get() - 8);
                let (buf, pos) = place_piece(p, off, dlen, "data")?;
                self.rx = Rx::Data {
                    h,
                    buf,
                    pos,
                    end: pos + wire::sat_usize(dlen),
                };
                Ok(())
            }
            wire::NBD_REPLY_TYPE_OFFSET_HOLE => {
                let hp = wire::HolePayload::read_from_bytes(&self.scratch[..12])
                    .map_err(|_| Violation::Malformed("short hole payload".into()))?;
                let off = hp.offset.get();
                let hlen = u64::from(hp.size.get());
                if hlen == 0 {
                    return Err(Violation::Malformed("zero-length hole".into()).into());
                }
                // The hole's bytes are zero: write them, so the result never
                // depends on what the buffer held (e.g. a failed earlier try).
                let (buf, pos) = place_piece(p, off, hlen, "hole")?;
                if let Some(d) = self.slots.get_mut(buf.0).and_then(|s| s.data.as_mut()) {
                    if let Some(z) = d.get_mut(pos..pos + wire::sat_usize(hlen)) {
                        z.fill(0);
                    }
                }
                self.stats.hole_bytes += hlen;
                self.finish_chunk(h)
            }
            wire::NBD_REPLY_TYPE_BLOCK_STATUS => {
                let need = h.length.get() as usize;
                let (ctx, descs) = wire::decode_block_status(&self.scratch[..need])?;
                let idx = self
                    .info
                    .contexts
                    .iter()
                    .position(|c| c.id == ctx)
                    .ok_or(Violation::UnknownContext(ctx))?;
                let extents = plan::validate_descriptors(ctx, descs, req_off, req_len, size)?;
                let Kind::BlockStatus { got } = &mut p.kind else {
                    return Err(Violation::Malformed("status chunk for non-status".into()).into());
                };
                if got[idx].is_some() {
                    return Err(Violation::DuplicateContext(ctx).into());
                }
                got[idx] = Some(extents);
                self.finish_chunk(h)
            }
            t => {
                // Error chunk (known or unknown type with bit 15).
                let need = h.length.get() as usize;
                let e = wire::decode_error_chunk(t, &self.scratch[..need])?;
                if let Some(off) = e.offset {
                    if off < req_off || off >= req_off + req_len {
                        return Err(Violation::ChunkOutOfRange {
                            offset: off,
                            len: 0,
                            req_offset: req_off,
                            req_len,
                        }
                        .into());
                    }
                }
                let keep = match &p.error {
                    None => true,
                    Some(prev) => match (prev.offset, e.offset) {
                        (Some(a), Some(b)) => b < a,
                        (Some(_), None) => true,
                        _ => false,
                    },
                };
                if keep {
                    p.error = Some(e);
                }
                self.finish_chunk(h)
            }
        }
    }

    fn finish_chunk(&mut self, h: ChunkHeader) -> Result<()> {
        if !h.is_done() {
            return Ok(());
        }
        let cookie = h.cookie.get();
        let Some(p) = self.pending.remove(&cookie) else {
            return Err(Violation::UnknownCookie(cookie).into());
        };
        let command = p.command();
        let result = match (p.kind, p.error) {
            (kind, Some(e)) => {
                if let Kind::Read { buf, .. } = kind {
                    self.release_read(buf, p.len);
                }
                Err(Error::Command {
                    command,
                    offset: e.offset.unwrap_or(p.offset),
                    req_offset: p.offset,
                    req_len: p.len,
                    errno: e.errno,
                    message: e.message,
                })
            }
            (Kind::Read { buf, coverage, .. }, None) => {
                self.release_read(buf, p.len);
                if coverage.covered != u64::from(p.len) {
                    return Err(Violation::IncompleteRead {
                        covered: coverage.covered,
                        len: p.len.into(),
                    }
                    .into());
                }
                Ok(DoneOk::Read)
            }
            (Kind::BlockStatus { got }, None) => {
                let mut out = Vec::with_capacity(got.len());
                for (i, g) in got.into_iter().enumerate() {
                    let c = &self.info.contexts[i];
                    let extents = g.ok_or(Violation::MissingContext(c.id))?;
                    out.push(ContextExtents {
                        context: c.name.clone(),
                        extents,
                    });
                }
                Ok(DoneOk::BlockStatus(out))
            }
            (Kind::Trim, None) => Ok(DoneOk::Trim),
        };
        self.done.push(Done {
            tag: p.tag,
            offset: p.offset,
            len: p.len,
            result,
        });
        Ok(())
    }

    fn release_read(&mut self, buf: BufId, len: u32) {
        self.bytes_in_flight -= u64::from(len);
        if let Some(s) = self.slots.get_mut(buf.0) {
            s.refs = s.refs.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{ExportFlags, MetaContext};
    use zerocopy::IntoBytes;

    fn info(contexts: &[&str]) -> Arc<ExportInfo> {
        Arc::new(ExportInfo {
            name: String::new(),
            size: 1 << 20,
            flags: ExportFlags(wire::NBD_FLAG_HAS_FLAGS),
            block_sizes: None,
            contexts: contexts
                .iter()
                .enumerate()
                .map(|(i, n)| MetaContext {
                    id: u32::try_from(i).unwrap() + 10,
                    name: n.to_string(),
                })
                .collect(),
        })
    }

    /// Feeds `bytes` in pieces of at most `step` bytes.
    fn feed(c: &mut Conn, bytes: &[u8], step: usize) -> Result<()> {
        let mut pos = 0;
        while pos < bytes.len() {
            let Some(mut b) = c.rx_begin() else {
                return Err(Error::InvalidArgument("no rx".into()));
            };
            let n = b.len().min(step).min(bytes.len() - pos);
            b.data[b.start..b.start + n].copy_from_slice(&bytes[pos..pos + n]);
            pos += n;
            c.rx_end(b, n)?;
        }
        Ok(())
    }

    /// Appends an `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `data` at `offset`.
    fn offset_data(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(data);
        wire::encode_chunk(
            out,
            flags,
            wire::NBD_REPLY_TYPE_OFFSET_DATA,
            cookie,
            &payload,
        );
    }

    fn cookies(c: &mut Conn) -> Vec<u64> {
        let b = c.tx_begin().unwrap();
        let mut out = Vec::new();
        for r in b.data[..b.end].chunks(28) {
            out.push(wire::Request::read_from_bytes(r).unwrap().cookie.get());
        }
        let n = b.len();
        c.tx_end(b, n);
        out
    }

    #[test]
    fn out_of_order_fragmented_read() {
        let mut c = Conn::new(info(&[]));
        let buf = c.add_buf(vec![0xee; 8192]);
        c.submit_read(1, 0, 4096, buf, 0).unwrap();
        c.submit_read(2, 4096, 4096, buf, 4096).unwrap();
        let ck = cookies(&mut c);
        let mut s = Vec::new();
        // Second request first, in two pieces: hole then data.
        wire::encode_chunk(
            &mut s,
            0,
            wire::NBD_REPLY_TYPE_OFFSET_HOLE,
            ck[1],
            &wire::encode_hole(4096, 1024),
        );
        offset_data(&mut s, wire::NBD_REPLY_FLAG_DONE, ck[1], 5120, &[7u8; 3072]);
        offset_data(&mut s, 0, ck[0], 0, &[9u8; 4096]);
        wire::encode_chunk(
            &mut s,
            wire::NBD_REPLY_FLAG_DONE,
            wire::NBD_REPLY_TYPE_NONE,
            ck[0],
            &[],
        );
        for step in [1, 7, 1 << 20] {
            let mut c2 = Conn::new(info(&[]));
            let b2 = c2.add_buf(vec![0xee; 8192]);
            c2.submit_read(1, 0, 4096, b2, 0).unwrap();
            c2.submit_read(2, 4096, 4096, b2, 4096).unwrap();
            let _ = cookies(&mut c2);
            feed(&mut c2, &s, step).unwrap();
            let done: Vec<_> = c2.take_done().collect();
            assert_eq!(done.iter().map(|d| d.tag).collect::<Vec<_>>(), vec![2, 1]);
            assert!(done.iter().all(|d| d.result.is_ok()));
            let data = c2.take_buf(b2).unwrap();
            assert!(data[..4096].iter().all(|&b| b == 9));
            assert!(data[4096..5120].iter().all(|&b| b == 0), "hole zero-filled");
            assert!(data[5120..].iter().all(|&b| b == 7));
            assert_eq!(c2.stats.data_bytes, 4096 + 3072);
            assert_eq!(c2.in_flight(), 0);
        }
        let _ = buf;
    }

    /// The second read of a chunk may be queued while the buffer is lent
    /// to the engine for the first one's reply data (a rate limit or the
    /// bytes-in-flight bound held it back). Before the fix this failed
    /// with "read destination out of bounds" and broke `--bwlimit`
    /// backups under io_uring.
    #[test]
    fn read_queued_while_its_buffer_is_lent_lands_in_place() {
        let mut c = Conn::new(info(&[]));
        let buf = c.add_buf(vec![0xee; 8192]);
        c.submit_read(1, 0, 4096, buf, 0).unwrap();
        let ck1 = cookies(&mut c)[0];
        let mut first = Vec::new();
        offset_data(&mut first, wire::NBD_REPLY_FLAG_DONE, ck1, 0, &[9u8; 4096]);
        // Header and offset first (staged), then the data part is due and
        // the chunk buffer itself is lent for it.
        let head = HDR_LEN + 8;
        feed(&mut c, &first[..head], 1 << 20).unwrap();
        let lent = c.rx_begin().unwrap();
        assert!(
            lent.exact,
            "the data part goes straight into the chunk buffer"
        );
        c.submit_read(2, 4096, 4096, buf, 4096).unwrap();
        // A buffer taken back, or a range past its end, is still refused.
        assert!(c.submit_read(3, 0, 8192, buf, 4096).is_err());
        let n = lent.len();
        let mut lent = lent;
        let start = lent.start;
        lent.data[start..start + n].copy_from_slice(&first[head..head + n]);
        c.rx_end(lent, n).unwrap();
        let ck2 = cookies(&mut c)[0];
        let mut second = Vec::new();
        offset_data(
            &mut second,
            wire::NBD_REPLY_FLAG_DONE,
            ck2,
            4096,
            &[7u8; 4096],
        );
        feed(&mut c, &second, 1 << 20).unwrap();
        let done: Vec<_> = c.take_done().collect();
        assert_eq!(done.iter().map(|d| d.tag).collect::<Vec<_>>(), vec![1, 2]);
        assert!(done.iter().all(|d| d.result.is_ok()));
        let data = c.take_buf(buf).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 9));
        assert!(data[4096..].iter().all(|&b| b == 7));
        assert!(c.submit_read(4, 0, 4096, buf, 0).is_err(), "taken back");
    }

    #[test]
    fn read_error_is_an_error_not_zeroes() {
        let mut c = Conn::new(info(&[]));
        let buf = c.add_buf(vec![0; 4096]);
        c.submit_read(1, 0, 4096, buf, 0).unwrap();
        let ck = cookies(&mut c);
        let mut s = Vec::new();
        wire::encode_chunk(
            &mut s,
            0,
            wire::NBD_REPLY_TYPE_OFFSET_HOLE,
            ck[0],
            &wire::encode_hole(0, 2048),
        );
        wire::encode_chunk(
            &mut s,
            wire::NBD_REPLY_FLAG_DONE,
            wire::NBD_REPLY_TYPE_ERROR_OFFSET,
            ck[0],
            &wire::encode_error(wire::NBD_EIO, "bad sector", Some(2048)),
        );
        feed(&mut c, &s, 1000).unwrap();
        let d: Vec<_> = c.take_done().collect();
        match &d[0].result {
            Err(Error::Command {
                offset,
                errno,
                message,
                ..
            }) => {
                assert_eq!(
                    (*offset, *errno, message.as_str()),
                    (2048, wire::NBD_EIO, "bad sector")
                );
            }
            other => panic!("{other:?}"),
        }
        // The connection stays usable after a server error.
        c.submit_read(2, 0, 512, buf, 0).unwrap();
    }

    #[test]
    fn trim_needs_a_writable_export_and_takes_simple_or_structured_replies() {
        // Read-only (no SEND_TRIM): refused before anything is sent.
        let mut ro = Conn::new(info(&["base:allocation"]));
        assert!(matches!(
            ro.submit_trim(1, 0, 4096),
            Err(Error::InvalidArgument(_))
        ));
        assert!(!ro.wants_tx());
        let mut i = (*info(&["base:allocation"])).clone();
        i.flags = ExportFlags(wire::NBD_FLAG_HAS_FLAGS | wire::NBD_FLAG_SEND_TRIM);
        let mut c = Conn::new(Arc::new(i));
        c.submit_trim(1, 0, 4096).unwrap();
        c.submit_trim(2, 4096, 4096).unwrap();
        c.submit_trim(3, 8192, 4096).unwrap();
        // Out of range is refused locally.
        c.submit_trim(9, 1 << 20, 4096).unwrap_err();
        let ck = cookies(&mut c);
        let mut s = wire::SimpleReply::new(0, ck[0]).as_bytes().to_vec();
        s.extend_from_slice(wire::SimpleReply::new(wire::NBD_EIO, ck[1]).as_bytes());
        wire::encode_chunk(
            &mut s,
            wire::NBD_REPLY_FLAG_DONE,
            wire::NBD_REPLY_TYPE_ERROR,
            ck[2],
            &wire::encode_error(wire::NBD_EINVAL, "no", None),
        );
        feed(&mut c, &s, 7).unwrap();
        let d: Vec<_> = c.take_done().collect();
        assert_eq!(d.len(), 3);
        assert!(matches!(d[0].result, Ok(DoneOk::Trim)));
        assert!(matches!(
            d[1].result,
            Err(Error::Command { command: "NBD_CMD_TRIM", errno, .. }) if errno == wire::NBD_EIO
        ));
        assert!(matches!(
            d[2].result,
            Err(Error::Command { errno, .. }) if errno == wire::NBD_EINVAL
        ));
        // A block status chunk answering a trim is a violation.
        c.submit_trim(4, 0, 4096).unwrap();
        let ck = cookies(&mut c);
        let mut s = Vec::new();
        wire::encode_chunk(
            &mut s,
            wire::NBD_REPLY_FLAG_DONE,
            wire::NBD_REPLY_TYPE_BLOCK_STATUS,
            ck[0],
            &wire::encode_block_status(10, &[(4096, 0)]),
        );
        let err = feed(&mut c, &s, 100).unwrap_err();
        assert!(
            matches!(err.violation(), Some(Violation::UnexpectedReplyType { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn violations() {
        let check = |build: &dyn Fn(&[u64]) -> Vec<u8>, want: &dyn Fn(&Violation) -> bool| {
            let mut c = Conn::new(info(&["base:allocation"]));
            let buf = c.add_buf(vec![0; 8192]);
            c.submit_read(1, 4096, 4096, buf, 0).unwrap();
            c.submit_block_status(2, 0, 8192).unwrap();
            let ck = cookies(&mut c);
            let err = feed(&mut c, &build(&ck), 5).unwrap_err();
            let v = err.violation().cloned();
            assert!(v.as_ref().is_some_and(want), "{err:?}");
            assert!(c.rx_begin().is_none(), "connection is dead");
        };
        let chunk = |flags, ty, cookie, payload: &[u8]| {
            let mut s = Vec::new();
            wire::encode_chunk(&mut s, flags, ty, cookie, payload);
            s
        };
        let data = |off: u64, n: usize| {
            let mut d = off.to_be_bytes().to_vec();
            d.extend(std::iter::repeat_n(1u8, n));
            d
        };
        check(&|_| vec![0x12; 16], &|v| {
            matches!(v, Violation::BadMagic { .. })
        });
        check(&|ck| chunk(1, 0, ck[0] + 100, &[]), &|v| {
            matches!(v, Violation::UnknownCookie(_))
        });
        check(&|ck| chunk(1, 77, ck[0], &[]), &|v| {
            matches!(v, Violation::UnknownReplyType(77))
        });
        check(&|ck| chunk(1, 1, ck[0], &data(4096, 4097)), &|v| {
            matches!(v, Violation::Oversized { .. })
        });
        check(&|ck| chunk(1, 1, ck[0], &data(0, 10)), &|v| {
            matches!(v, Violation::ChunkOutOfRange { .. })
        });
        check(&|ck| chunk(1, 1, ck[0], &data(4096, 100)), &|v| {
            matches!(v, Violation::IncompleteRead { .. })
        });
        check(
            &|ck| {
                let mut s = chunk(0, 1, ck[0], &data(4096, 100));
                s.extend(chunk(1, 1, ck[0], &data(4100, 100)));
                s
            },
            &|v| matches!(v, Violation::OverlappingChunk { .. }),
        );
        check(&|ck| chunk(0, 0, ck[0], &[]), &|v| {
            matches!(v, Violation::Malformed(_))
        });
        check(
            &|ck| wire::SimpleReply::new(0, ck[0]).as_bytes().to_vec(),
            &|v| matches!(v, Violation::UnexpectedSimpleReply(_)),
        );
        check(
            &|ck| chunk(1, 5, ck[0], &wire::encode_block_status(10, &[(1, 0)])),
            &|v| matches!(v, Violation::UnexpectedReplyType { .. }),
        );
        check(
            &|ck| chunk(1, 5, ck[1], &wire::encode_block_status(10, &[(0, 0)])),
            &|v| matches!(v, Violation::ZeroLengthExtent(10)),
        );
        check(
            &|ck| chunk(1, 5, ck[1], &wire::encode_block_status(10, &[(2 << 20, 0)])),
            &|v| matches!(v, Violation::ExtentPastEof { .. }),
        );
        check(
            &|ck| {
                chunk(
                    1,
                    5,
                    ck[1],
                    &wire::encode_block_status(10, &[(8192, 0), (512, 0)]),
                )
            },
            &|v| matches!(v, Violation::ExtentsBeyondRequest(10)),
        );
        check(
            &|ck| chunk(1, 5, ck[1], &wire::encode_block_status(99, &[(512, 0)])),
            &|v| matches!(v, Violation::UnknownContext(99)),
        );
        check(
            &|ck| {
                let mut s = chunk(0, 5, ck[1], &wire::encode_block_status(10, &[(512, 0)]));
                s.extend(chunk(
                    1,
                    5,
                    ck[1],
                    &wire::encode_block_status(10, &[(512, 0)]),
                ));
                s
            },
            &|v| matches!(v, Violation::DuplicateContext(10)),
        );
        check(&|ck| chunk(1, 0, ck[1], &[]), &|v| {
            matches!(v, Violation::MissingContext(10))
        });
        check(
            &|ck| chunk(1, 5, ck[1], &[0u8; 4 + 8 * (1 << 20) + 8][..]),
            &|v| matches!(v, Violation::Oversized { .. }),
        );
        check(&|ck| chunk(1, 0x8009, ck[0], &vec![0u8; 20000]), &|v| {
            matches!(v, Violation::BadLength { .. })
        });
    }

    #[test]
    fn unknown_error_type_fails_reply_but_keeps_stream() {
        let mut c = Conn::new(info(&["base:allocation"]));
        c.submit_block_status(2, 0, 8192).unwrap();
        let ck = cookies(&mut c);
        let mut s = Vec::new();
        let mut p = wire::encode_error(wire::NBD_EINVAL, "nope", None);
        p.extend_from_slice(&[1, 2, 3]);
        wire::encode_chunk(&mut s, wire::NBD_REPLY_FLAG_DONE, 0x8042, ck[0], &p);
        feed(&mut c, &s, 3).unwrap();
        let d: Vec<_> = c.take_done().collect();
        assert!(matches!(
            d[0].result,
            Err(Error::Command {
                errno: wire::NBD_EINVAL,
                ..
            })
        ));
    }

    #[test]
    fn block_status_two_contexts() {
        let mut c = Conn::new(info(&["base:allocation", "qemu:dirty-bitmap:b"]));
        c.submit_block_status(7, 4096, 8192).unwrap();
        let ck = cookies(&mut c);
        let mut s = Vec::new();
        wire::encode_chunk(
            &mut s,
            0,
            5,
            ck[0],
            &wire::encode_block_status(11, &[(4096, 1)]),
        );
        wire::encode_chunk(
            &mut s,
            wire::NBD_REPLY_FLAG_DONE,
            5,
            ck[0],
            &wire::encode_block_status(10, &[(4096, 0), (65536, 3)]),
        );
        feed(&mut c, &s, 64).unwrap();
        let d: Vec<_> = c.take_done().collect();
        let Ok(DoneOk::BlockStatus(ctx)) = &d[0].result else {
            panic!("{d:?}")
        };
        assert_eq!(ctx[0].context, "base:allocation");
        assert_eq!(
            ctx[0].extents,
            vec![
                Extent {
                    offset: 4096,
                    len: 4096,
                    flags: 0
                },
                Extent {
                    offset: 8192,
                    len: 4096,
                    flags: 3
                },
            ]
        );
        assert_eq!(
            ctx[1].extents,
            vec![Extent {
                offset: 4096,
                len: 4096,
                flags: 1
            }]
        );
    }

    #[test]
    fn eof_and_bounds() {
        let mut c = Conn::new(info(&[]));
        let buf = c.add_buf(vec![0; 4096]);
        c.submit_read(1, (1 << 20) - 512, 4096, buf, 0).unwrap_err();
        c.submit_read(1, 0, 8192, buf, 0)
            .expect_err("beyond buffer");
        c.submit_block_status(1, 0, 512).expect_err("no contexts");
        c.submit_read(1, 0, 4096, buf, 0).unwrap();
        let _ = cookies(&mut c);
        assert!(
            c.take_buf(buf).is_none(),
            "buffer busy while read in flight"
        );
        let b = c.rx_begin().unwrap();
        assert!(matches!(c.rx_end(b, 0), Err(Error::Disconnected { .. })));
    }

    #[test]
    fn coverage_merges_and_bounds() {
        let mut cv = Coverage::default();
        cv.insert(10, 10).unwrap();
        cv.insert(30, 10).unwrap();
        cv.insert(20, 10).unwrap();
        assert_eq!(cv.spans, vec![(10, 40)]);
        cv.insert(39, 2).unwrap_err();
        cv.insert(5, 6).unwrap_err();
        let mut cv = Coverage::default();
        for i in 0..tuning::MAX_READ_FRAGMENTS as u64 {
            cv.insert(i * 2, 1).unwrap();
        }
        assert!(matches!(
            cv.insert(1 << 30, 1),
            Err(Violation::TooFragmented(_))
        ));
    }
}

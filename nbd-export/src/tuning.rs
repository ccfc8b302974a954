//! Every knob of the read path, in one place, each with the reason for its
//! value. The crate docs ("Threads, connections, requests") explain how they
//! fit together.

use std::time::Duration;

const MIB: u32 = 1 << 20;

/// Largest chunk the reader accepts. A chunk is one allocation; 64 MiB keeps
/// a single item far below any sane byte budget.
pub const MAX_CHUNK_SIZE: u32 = 64 * MIB;

/// Hard ceiling for any request length (F-20): the spec's interoperable
/// maximum payload (2^25). Servers advertising less get less.
pub const MAX_REQUEST_LEN: u32 = 32 * MIB;

/// Default length of one `NBD_CMD_READ`: 256 KiB, nbdcopy's default too.
/// QEMU's server works on each request in its own coroutine, so smaller
/// requests overlap better: on a qcow2 behind qemu-nbd, 256 KiB read the
/// test export in 0.20 s, 1 MiB in 0.29 s, 4 MiB in 0.36 s
/// (`scripts/bench-nbd`); nbdkit was within noise from 256 KiB to 1 MiB.
pub const DEFAULT_READ_REQUEST_LEN: u32 = 256 * 1024;

/// Requests in flight per connection. nbdcopy's default (64) saturates qemu
/// and nbdkit; each costs only a 28-byte header and a small table entry, and
/// the 64 × 28 bytes always fit in the socket send buffer, so a blocking
/// write can never deadlock against a server busy sending replies.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 64;

/// Read bytes in flight per connection. Reads land in chunk buffers that are
/// already paid for by the byte budget; this cap only keeps one connection
/// from owning the whole budget when several share it.
pub const MAX_BYTES_IN_FLIGHT: u64 = 64 * MIB as u64;

/// A connection takes this much of the export at a time (a whole number of
/// chunks), like nbdcopy's work ranges: big enough that block status is one
/// request per range, small enough that N connections share the tail evenly.
pub const WORK_RANGE_LEN: u64 = 64 * MIB as u64;

/// Block status is asked for at most this much at once: 4 GiB - 64 KiB,
/// the largest 32-bit length aligned to any minimum block size. The
/// payload limit (`MAX_REQUEST_LEN`) is for data; a block status request
/// carries none and the spec lets it exceed the maximum payload size
/// (nbd proto.md since commit 9f30fedb; QEMU answers it, `nbdinfo --map`
/// asks up to 4 GiB too). What bounds memory is the reply: at most
/// `MAX_EXTENTS_PER_CHUNK` validated extents per context, one chunk per
/// context (F-20), whatever the length asked. Asking 32 MiB at a time
/// made mapping a 1 TiB sparse disk 32768 round trips (3.98 s).
pub const BLOCK_STATUS_MAX_LEN: u32 = 0xFFFF_0000;

/// Largest `NBD_CMD_TRIM` sent at once (1 GiB). A trim carries no
/// payload, so the payload limit does not apply; QEMU splits a discard
/// by its node's limits itself. 1 GiB keeps the range of one failed trim
/// (and the server's work per request) modest, and frees a 1 TiB sparse
/// disk in 1024 requests.
pub const TRIM_MAX_LEN: u32 = 1 << 30;

/// Block status requests `Client::map` keeps in flight. QEMU answers each
/// in its own coroutine, so a few overlap its work with ours; each reply
/// may hold up to `MAX_EXTENTS_PER_CHUNK` extents per context, so few keep
/// a hostile server's worst case small.
pub const MAP_REQUESTS_IN_FLIGHT: usize = 4;

/// Chunks planned but still waiting for budget, per connection. Planning is
/// cheap, but without a cap a connection would query block status for the
/// whole disk while the budget is exhausted.
pub const MAX_PLANNED_AHEAD: usize = 32;

/// The spec says a server SHOULD NOT send more than 2^20 extents in one
/// block status chunk; anything bigger is refused before it is allocated.
pub const MAX_EXTENTS_PER_CHUNK: usize = 1 << 20;

/// Strings (names, messages) are at most 4096 bytes by the spec.
pub const MAX_STRING_LEN: usize = 4096;

/// Option replies are at most a string plus a few fixed fields; 4096 + 64
/// covers every reply this client asks for.
pub const MAX_OPTION_REPLY_LEN: u32 = 4096 + 64;

/// Option replies per option before we give up (a server sending endless
/// `NBD_REP_INFO` or `NBD_REP_META_CONTEXT` replies).
pub const MAX_OPTION_REPLIES: usize = 64;

/// Payload cap for error chunks of unknown type (bit 15 set): the error and
/// message fields plus generous room for trailing fields.
pub const MAX_UNKNOWN_ERROR_CHUNK: u32 = 6 + 4096 + 64;

/// A read reply may arrive in many pieces; we track which bytes are covered
/// as sorted disjoint intervals (adjacent pieces merge). A hostile server
/// could otherwise grow the interval list without limit.
pub const MAX_READ_FRAGMENTS: usize = 4096;

/// Connect deadline (TCP; a unix connect to a live listener is immediate).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Each handshake read/write must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest silence from the server while requests are in flight (F-19).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default number of connections when the server allows multi-conn. On
/// the 2-core machines here, 1-2 connections were fastest in
/// `scripts/bench-nbd` (qemu-nbd: 0.22 s with 1 or 2, 0.25 s with 4; with
/// nbdkit 4 was the slowest): more connections mean more server threads
/// competing with ours for two cores. Two keep one request stream busy
/// while the other's replies are parsed.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Upper bound on connections.
pub const MAX_CONNECTIONS: usize = 16;

/// Default byte budget: 256 MiB (64 chunks of 4 MiB). Plenty for the
/// pipeline to stay full with 4 connections × 64 MiB in flight.
pub const DEFAULT_BYTE_BUDGET: u64 = 256 * MIB as u64;

/// Chunk buffers given back by the consumer and kept for reuse. Reusing a
/// buffer saves clearing (or page-faulting) 4 MiB per chunk, which was a
/// fifth of the reader's CPU time. Reads are issued in bursts (a block
/// status reply plans a whole work range), so the pool must absorb a burst:
/// with 4 buffers only half the chunks were built in reused ones, with 16
/// nearly all (`scripts/bench-nbd`). This is the only memory outside the
/// byte budget (64 MiB at 4 MiB chunks).
pub const MAX_POOLED_BUFFERS: usize = 16;

/// Server errors on a read are retried this many times at the same offset
/// before the chunk fails (F-18).
pub const READ_RETRIES: u32 = 2;

/// Items (of any kind) queued between the reader and its consumer. Data
/// chunks are bounded by the byte budget; this bounds the tiny zero/clean
/// items too.
pub const CHANNEL_CAPACITY: usize = 256;

/// io_uring waits in slices this long so cancellation is noticed promptly.
pub const URING_WAIT_SLICE: Duration = Duration::from_millis(200);

/// On teardown, how long to wait for the kernel to hand back buffers of
/// cancelled operations before leaking them rather than freeing memory the
/// kernel may still write.
pub const URING_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

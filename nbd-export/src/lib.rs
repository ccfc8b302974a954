//! NBD client for reading point-in-time images exported by QEMU.
//!
//! The data plane's source: QEMU exports the frozen image over NBD (a unix
//! socket, read-only); shear reads it here. No backup policy lives in this
//! crate.
//!
//! # Layers
//!
//! - [`wire`]: the NBD wire format, fixed parts as `zerocopy` structs with
//!   explicit big-endian fields, every message validated before use. Encoders
//!   and decoders for both directions, so a future server (instant restore)
//!   can share it.
//! - handshake: fixed newstyle negotiation with `NBD_OPT_STRUCTURED_REPLY`,
//!   `NBD_OPT_SET_META_CONTEXT` (`base:allocation`,
//!   `qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`) and `NBD_OPT_GO`
//!   with `NBD_INFO_BLOCK_SIZE`. Blocking, every read under a deadline.
//! - conn: the transmission phase without I/O. Requests are pipelined,
//!   replies matched by cookie in any order; structured reply chunks are
//!   checked for range, overlap, coverage and size before a byte is
//!   trusted. A read error is an error for its range, never zeroes
//!   (CVE-2022-0485, F-18).
//! - [`plan`]: the extent planner (data / zero / clean runs, per-chunk
//!   read plans).
//! - engines: [`EngineKind::Uring`] (io_uring; the only `unsafe` code) and
//!   [`EngineKind::Sync`] (portable blocking I/O) behind one trait;
//!   [`EngineChoice`] picks one (the crate reads no environment), and
//!   `Auto` falls back to the portable engine when `io_uring_setup` fails.
//! - [`Client`]: one connection, blocking calls (maps, reads).
//! - [`ChunkReader`]: what the backup job calls.
//! - [`server`]: the server half (`shear serve`), sharing [`wire`]: serves
//!   any [`server::BlockSource`] (size, reads, extents, optional writes),
//!   knowing nothing of what it serves.
//!
//! # Reading an export
//!
//! ```no_run
//! use nbd_export::{ChunkKind, ChunkReader, ExportSource, ReaderConfig};
//!
//! let src = ExportSource::unix("/run/shear/vm100/nbd.sock", "drive0")
//!     .with_dirty_bitmap("shear-tmp"); // omit for a full backup
//! let mut chunks = ChunkReader::start(&src, &ReaderConfig::new(4 << 20))?; // 4 MiB chunks
//! let recycler = chunks.recycler(); // optional: reuse chunk buffers
//! for item in &mut chunks {
//!     let chunk = item?; // errors carry the chunk index and offset
//!     match chunk.kind {
//!         ChunkKind::Data(bytes) => {
//!             /* hash, compress, store */
//!             recycler.recycle(bytes);
//!         }
//!         ChunkKind::Zero => { /* record a zero chunk */ }
//!         ChunkKind::Clean => { /* reuse the previous snapshot's chunk */ }
//!     }
//! }
//! println!("read {} bytes", chunks.stats().bytes_read);
//! # Ok::<(), nbd_export::Error>(())
//! ```
//!
//! # Threads, connections, requests
//!
//! The reader opens `connections` sockets (one if the server does not
//! advertise `NBD_FLAG_CAN_MULTI_CONN`). With io_uring one thread drives
//! them all from one ring; with the portable engine each connection has its
//! own thread. Either way the same loop runs: each connection takes a work
//! range of [`tuning::WORK_RANGE_LEN`] (whole chunks), asks block status for
//! it (at most 32 MiB per request), plans each chunk as soon as its extents
//! are known, and sends zero/clean chunks at once. A data chunk first takes
//! its size from the byte budget, then its reads (at most
//! `read_request_len` each, aligned to the server's minimum block size) go
//! out, bounded per connection by [`tuning::MAX_REQUESTS_IN_FLIGHT`]
//! requests and [`tuning::MAX_BYTES_IN_FLIGHT`] bytes. Reply payloads are
//! received straight into the chunk buffer. A finished chunk goes to a
//! bounded channel; the consumer's receive returns its bytes to the budget.
//! A thread blocks on the budget only when it has nothing in flight, so a
//! full budget never stalls replies. Buffers given back through a
//! [`Recycler`] are reused (at most [`tuning::MAX_POOLED_BUFFERS`] wait),
//! which saves clearing 4 MiB per chunk. Memory held by the reader: at most
//! `byte_budget` plus the pool, whatever the disk size. All knobs and their
//! reasons are in [`tuning`].
//!
//! # Errors
//!
//! One error type, [`Error`], with [`Error::kind`] (Temporary or Permanent)
//! and [`Error::offset`]. Protocol violations by the server
//! ([`Violation`]) end the connection; a server error on a read is retried
//! at the same offset [`tuning::READ_RETRIES`] times, then fails the
//! stream with the offset. Deadlines: handshake, and an idle deadline
//! whenever requests are in flight (F-19).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod conn;
mod driver;
mod engine;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
pub mod plan;
mod reader;
pub mod server;
mod transport;
pub mod tuning;
mod violation;
pub mod wire;

pub use client::{Client, ClientOptions};
pub use conn::ContextExtents;
pub use engine::{EngineChoice, EngineKind};
pub use error::{Error, ErrorKind, Result};
pub use handshake::{BlockSizes, ExportFlags, ExportInfo, MetaContext};
pub use plan::{ChunkPlan, Extent, Run, RunKind};
pub use reader::{
    Chunk, ChunkKind, ChunkReader, ChunkStream, ReadStats, ReaderConfig, Recycler, ThreadHook,
};
pub use transport::{Endpoint, ExportSource, Stream};
pub use violation::Violation;

//! NBD server half: serves [`BlockSource`]s over fixed newstyle NBD.
//!
//! Shares [`crate::wire`] with the client and knows nothing of what it
//! serves (a backup, a file): a source has a size, reads at any offset,
//! reports extents (holes stay holes), and may accept writes.
//!
//! TLS (optional, then required): `NBD_OPT_STARTTLS` with x509
//! credentials in QEMU's `tls-creds-x509` layout; see [`ServerTls`].
//!
//! Negotiation: fixed newstyle only, `NBD_OPT_LIST`, `NBD_OPT_INFO`/`GO`
//! (export, block size and name info), `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT`/
//! `SET_META_CONTEXT` (`base:allocation`), `NBD_OPT_ABORT`; anything else
//! gets `NBD_REP_ERR_UNSUP`. Transmission: `READ` (structured replies with
//! `OFFSET_DATA`/`OFFSET_HOLE` chunks, or simple replies), `BLOCK_STATUS`,
//! `FLUSH`, `DISC`, and on a writable source `WRITE`, `TRIM`,
//! `WRITE_ZEROES` (with FUA). Exports advertise `NBD_FLAG_CAN_MULTI_CONN`:
//! all connections share one source, and a flush makes every completed
//! write durable whichever connection sent it.
//!
//! Hostile clients: the whole handshake runs under one deadline (a client
//! sending a byte at a time cannot hold a slot), option data and request
//! payloads are bounded before anything is allocated, a request past the
//! end, overflowing, too long or of an unknown kind gets an error reply and
//! the connection goes on; a bad magic ends the connection (the stream
//! cannot be resynchronised). Connections above [`ServerConfig::max_connections`]
//! are closed at once. Replies are written under a write deadline, so a
//! client that stops reading frees its worker. Reply buffers are taken
//! from a byte budget shared by all connections ([`ServerConfig::buffer_budget`]).
//! Each connection has a reader thread and [`ServerConfig::workers_per_connection`]
//! workers: decoding never runs on an async executor. A read the source
//! holds ready ([`BlockSource::read_ready`]) is answered by the reader
//! thread itself, without waking a worker.

mod conn;
mod handshake;
mod listener;
mod tls;

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub use listener::{Listener, StopHandle};
pub use tls::{ServerTls, CA_CERT, PSK_FILE, SERVER_CERT, SERVER_KEY};

/// One extent of a source: `length` bytes that are data, or a hole
/// (reads as zeroes, not allocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceExtent {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// Reads as zeroes and is not allocated.
    pub hole: bool,
}

/// What a server serves. Implementations must be safe to call from many
/// threads at once (connections and workers share one source).
pub trait BlockSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset` (the range is within [`Self::size`]).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Extents from `offset` covering at least one byte and at most `len`
    /// bytes (the range is within [`Self::size`]), in order, contiguous.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<SourceExtent>>;

    /// The `len` bytes at `offset` (within the size) as a view of memory
    /// the source already holds, when it does (e.g. a decoded chunk in a
    /// cache): the reply is written from it with no copy. `None`: the
    /// server calls [`Self::read_at`] instead.
    fn read_shared(&self, _offset: u64, _len: usize) -> io::Result<Option<SharedBytes>> {
        Ok(None)
    }

    /// The `len` bytes at `offset` only if the source holds them already,
    /// all data, and can hand them over at once (no I/O, no decoding, no
    /// waiting for another reader): the connection's reader thread then
    /// answers the read itself instead of waking a worker. `None` (the
    /// default, and for any range out of bounds): the read goes to a
    /// worker as usual.
    fn read_ready(&self, _offset: u64, _len: usize) -> Option<SharedBytes> {
        None
    }

    /// Preferred I/O size (a power of two ≥ 512).
    fn preferred_block_size(&self) -> u32 {
        4096
    }

    /// Whether writes are accepted.
    fn writable(&self) -> bool {
        false
    }

    /// Writes `data` at `offset` (within the size).
    fn write_at(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }

    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Zeroes a range (`trim`: may deallocate; reads return zeroes after).
    fn write_zeroes(&self, _offset: u64, _len: u64, _trim: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
}

/// A range of a shared, immutable buffer ([`BlockSource::read_shared`]).
#[derive(Debug, Clone)]
pub struct SharedBytes {
    data: Arc<Vec<u8>>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// `data[start..start + len]`; `None` if that is out of bounds.
    pub fn new(data: Arc<Vec<u8>>, start: usize, len: usize) -> Option<SharedBytes> {
        (start.checked_add(len)? <= data.len()).then_some(SharedBytes { data, start, len })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
}

/// One named export.
#[derive(Clone)]
pub struct Export {
    /// Export name (what clients ask for).
    pub name: String,
    /// Human description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// The data.
    pub source: Arc<dyn BlockSource>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.source.size())
            .field("writable", &self.source.writable())
            .finish()
    }
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Deadline of the whole handshake (greeting to `GO`).
    pub handshake_timeout: Duration,
    /// A reply write that makes no progress for this long ends the
    /// connection (a client that stopped reading).
    pub write_timeout: Duration,
    /// Largest read or write payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Request worker threads per connection.
    pub workers_per_connection: usize,
    /// Bytes of request/reply buffers held by all connections together.
    pub buffer_budget: u64,
    /// Largest option data accepted (larger: the connection is closed).
    pub max_option_len: u32,
    /// Options per handshake.
    pub max_options: usize,
    /// TLS credentials: when set, TLS is required (`NBD_OPT_STARTTLS`
    /// before anything else; see [`ServerTls`]).
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 128,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            max_payload: 32 << 20,
            workers_per_connection: 2,
            buffer_budget: 256 << 20,
            max_option_len: 64 << 10,
            max_options: 256,
            tls: None,
        }
    }
}

/// Exports and limits shared by all connections.
pub struct Server {
    exports: Vec<Export>,
    config: ServerConfig,
    budget: Budget,
    active: Mutex<usize>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.exports)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `exports` (names must be unique, at most 4096 bytes).
    pub fn new(exports: Vec<Export>, mut config: ServerConfig) -> io::Result<Arc<Server>> {
        for (i, e) in exports.iter().enumerate() {
            if e.name.len() > crate::tuning::MAX_STRING_LEN
                || exports[..i].iter().any(|o| o.name == e.name)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("export name {:?} is too long or not unique", e.name),
                ));
            }
        }
        config.max_payload = config.max_payload.clamp(4096, 1 << 30);
        config.buffer_budget = config.buffer_budget.max(u64::from(config.max_payload));
        config.workers_per_connection = config.workers_per_connection.clamp(1, 64);
        config.max_connections = config.max_connections.max(1);
        Ok(Arc::new(Server {
            budget: Budget::new(config.buffer_budget),
            exports,
            config,
            active: Mutex::new(0),
        }))
    }

    /// The exports.
    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// The limits.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        *self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn export(&self, name: &str) -> Option<&Export> {
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// Takes a connection slot, or None at the cap.
    fn enter(self: &Arc<Self>) -> Option<SlotGuard> {
        let mut n = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if *n >= self.config.max_connections {
            return None;
        }
        *n += 1;
        Some(SlotGuard(Arc::clone(self)))
    }

    /// Serves one connection to its end on the calling thread (handshake,
    /// then transmission). Errors are the connection's, already logged.
    pub fn serve_stream(self: &Arc<Self>, stream: Box<dyn Stream>) -> io::Result<()> {
        let Some(_slot) = self.enter() else {
            tracing::warn!(
                max = self.config.max_connections,
                "NBD connection refused: connection limit reached"
            );
            let _ = stream.shutdown();
            return Err(io::Error::other("connection limit reached"));
        };
        let r = self.serve_inner(stream);
        if let Err(e) = &r {
            tracing::debug!(error = %e, "NBD connection ended with an error");
        }
        r
    }

    fn serve_inner(self: &Arc<Self>, mut stream: Box<dyn Stream>) -> io::Result<()> {
        let Some(neg) = handshake::negotiate(self, &mut stream)? else {
            return Ok(());
        };
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(Some(self.config.write_timeout))?;
        let closer = stream.try_clone_box()?;
        conn::transmission(self, stream, &neg)?;
        // Best effort (the client may be gone already).
        let _ = closer.close();
        Ok(())
    }
}

struct SlotGuard(Arc<Server>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut n = self.0.active.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
    }
}

/// A connected byte stream (unix or TCP socket).
pub trait Stream: io::Read + io::Write + Send + 'static {
    /// A second handle to the same socket (for the writer).
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>>;
    /// `SO_RCVTIMEO`.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// `SO_SNDTIMEO`.
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down.
    fn shutdown(&self) -> io::Result<()>;
    /// Ends the session cleanly after the last reply (TLS: `close_notify`).
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, t)
    }
    fn shutdown(&self) -> io::Result<()> {
        std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
}

impl Stream for std::net::TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
    fn shutdown(&self) -> io::Result<()> {
        std::net::TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
}

/// A byte budget shared by connections: a request waits until its buffer
/// fits.
struct Budget {
    free: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    fn new(total: u64) -> Self {
        Budget {
            free: Mutex::new(total),
            cv: Condvar::new(),
        }
    }

    /// Takes `n` bytes (n ≤ the total), waiting as needed.
    fn take(&self, n: u64) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < n {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
        Permit { budget: self, n }
    }
}

struct Permit<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut free = self.budget.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += self.n;
        self.budget.cv.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;

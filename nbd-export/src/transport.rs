//! Where an export lives and the socket to it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::tuning;

/// How to reach an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path (what QEMU's server uses in shear).
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// One export: where, which name, and optionally which dirty bitmap to read
/// for an incremental backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSource {
    /// Server address.
    pub endpoint: Endpoint,
    /// Export name (may be empty for the default export).
    pub export_name: String,
    /// Name of the dirty bitmap, read as `qemu:dirty-bitmap:NAME`. When set,
    /// the context is required (its absence is an error, F-20).
    pub dirty_bitmap: Option<String>,
}

impl ExportSource {
    /// An export on a unix socket.
    pub fn unix(path: impl Into<PathBuf>, export_name: impl Into<String>) -> Self {
        ExportSource {
            endpoint: Endpoint::Unix(path.into()),
            export_name: export_name.into(),
            dirty_bitmap: None,
        }
    }

    /// An export over TCP (`host:port`).
    pub fn tcp(addr: impl Into<String>, export_name: impl Into<String>) -> Self {
        ExportSource {
            endpoint: Endpoint::Tcp(addr.into()),
            export_name: export_name.into(),
            dirty_bitmap: None,
        }
    }

    /// Also read this dirty bitmap.
    pub fn with_dirty_bitmap(mut self, name: impl Into<String>) -> Self {
        self.dirty_bitmap = Some(name.into());
        self
    }
}

/// A connected socket, unix or TCP.
#[derive(Debug)]
pub enum Stream {
    /// Unix domain stream socket.
    Unix(UnixStream),
    /// TCP stream.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects with a deadline.
    pub fn connect(endpoint: &Endpoint) -> Result<Stream> {
        let err = |source| Error::Connect {
            endpoint: endpoint.to_string(),
            source,
        };
        match endpoint {
            // A unix connect to a live listener completes at once; one with a
            // full backlog fails with EAGAIN only for non-blocking sockets, so
            // the handshake deadline is what bounds a stuck server.
            Endpoint::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(err),
            Endpoint::Tcp(addr) => {
                let addrs = addr.to_socket_addrs().map_err(err)?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, tuning::CONNECT_TIMEOUT) {
                        Ok(s) => {
                            // Requests are 28 bytes: never wait for Nagle.
                            s.set_nodelay(true).map_err(err)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(err(last))
            }
        }
    }

    /// Sets both socket timeouts (`None` = block forever; used by io_uring,
    /// which keeps its own deadlines).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Shuts the socket down in both directions (wakes blocked readers).
    pub fn shutdown(&self) {
        // Errors only mean it is already down.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

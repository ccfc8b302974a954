//! I/O engines: move bytes between sockets and [`Conn`](crate::conn::Conn)
//! buffers. Two implementations behind one trait, [`SocketIo`]:
//!
//! - [`uring`]: one io_uring drives every connection from one thread; the
//!   only module with `unsafe`.
//! - [`sync`]: portable blocking `read`/`write` with socket timeouts; one
//!   thread per connection. It is the reference, the fallback when
//!   `io_uring_setup` fails, and the oracle in differential tests.
//!
//! Both follow the same contract: [`SocketIo::start`] takes ownership of a
//! buffer; it comes back, always, through a [`Completion`] from
//! [`SocketIo::wait`] (failures to start included), so no buffer is ever
//! lost or freed while the kernel may write into it.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::conn::IoBuf;
use crate::error::{Error, Result};
use crate::transport::Stream;

pub(crate) mod sync;
#[allow(unsafe_code)]
pub(crate) mod uring;

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else the portable engine.
    #[default]
    Auto,
    /// io_uring; fail if unavailable.
    Uring,
    /// The portable blocking engine.
    Sync,
}

/// The engine actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring.
    Uring,
    /// Portable blocking I/O.
    Sync,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        })
    }
}

impl EngineChoice {
    /// Parses `uring`, `sync` or `auto`.
    pub fn parse(s: &str) -> Result<EngineChoice> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uring" | "io_uring" | "io-uring" => Ok(EngineChoice::Uring),
            "sync" | "std" => Ok(EngineChoice::Sync),
            "auto" | "" => Ok(EngineChoice::Auto),
            other => Err(Error::InvalidArgument(format!(
                "I/O engine {other:?}: expected uring, sync or auto"
            ))),
        }
    }

    /// Picks the engine: an explicit choice wins, else io_uring if a probe
    /// ring can be created (`io_uring_setup`). The crate reads no
    /// environment: a program that lets users pick (shear's
    /// `SHEAR_IO_ENGINE`) parses it with [`EngineChoice::parse`].
    pub fn resolve(self) -> Result<EngineKind> {
        resolve_with(self, uring::probe)
    }
}

/// Resolution with an injectable probe (tests feed a failing setup).
pub(crate) fn resolve_with(
    choice: EngineChoice,
    probe: impl FnOnce() -> io::Result<()>,
) -> Result<EngineKind> {
    match choice {
        EngineChoice::Sync => Ok(EngineKind::Sync),
        EngineChoice::Uring => probe()
            .map(|()| EngineKind::Uring)
            .map_err(|source| Error::Uring {
                step: "io_uring_setup",
                source,
            }),
        EngineChoice::Auto => match probe() {
            Ok(()) => Ok(EngineKind::Uring),
            Err(e) => {
                tracing::info!(error = %e, "io_uring unavailable; using the portable engine");
                Ok(EngineKind::Sync)
            }
        },
    }
}

/// Direction of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Send,
    Recv,
}

/// A finished (or refused) operation, with its buffer handed back.
#[derive(Debug)]
pub(crate) struct Completion {
    pub conn: usize,
    pub dir: Dir,
    pub buf: IoBuf,
    /// Bytes moved; `Ok(0)` on receive is end of stream.
    pub result: io::Result<usize>,
    /// The operation was never started (a full submission queue): give the
    /// buffer back and start it again.
    pub retry: bool,
}

/// The engine interface.
pub(crate) trait SocketIo: Send {
    /// Starts moving `buf.data[buf.start..buf.end]` on socket `conn`. The
    /// buffer always comes back through [`SocketIo::wait`]. A receive may
    /// return fewer bytes than asked only at end of stream or on error.
    fn start(&mut self, conn: usize, dir: Dir, buf: IoBuf);

    /// Waits up to `timeout` for completions and appends them to `out`.
    fn wait(&mut self, timeout: Duration, out: &mut Vec<Completion>) -> io::Result<()>;

    /// Operations started and not yet returned.
    fn outstanding(&self) -> usize;

    /// Which engine this is.
    fn kind(&self) -> EngineKind;
}

/// Builds an engine of `kind` over `streams` (connection i = streams[i]).
pub(crate) fn build(
    kind: EngineKind,
    streams: Vec<Stream>,
    idle_timeout: Duration,
) -> Result<Box<dyn SocketIo>> {
    match kind {
        EngineKind::Sync => Ok(Box::new(sync::SyncIo::new(streams, idle_timeout)?)),
        EngineKind::Uring => Ok(Box::new(uring::UringIo::new(streams)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_choices() {
        assert_eq!(EngineChoice::parse("uring").unwrap(), EngineChoice::Uring);
        assert_eq!(EngineChoice::parse(" SYNC ").unwrap(), EngineChoice::Sync);
        assert_eq!(EngineChoice::parse("auto").unwrap(), EngineChoice::Auto);
        EngineChoice::parse("aio").unwrap_err();
    }

    #[test]
    fn fallback_when_setup_fails() {
        let failing = || Err(io::Error::from_raw_os_error(libc::ENOSYS));
        assert_eq!(
            resolve_with(EngineChoice::Auto, failing).unwrap(),
            EngineKind::Sync
        );
        assert!(matches!(
            resolve_with(EngineChoice::Uring, failing),
            Err(Error::Uring { .. })
        ));
        assert_eq!(
            resolve_with(EngineChoice::Sync, || panic!("not probed")).unwrap(),
            EngineKind::Sync
        );
    }

    /// A real io_uring_setup failure (more entries than the kernel allows)
    /// takes the same fallback path.
    #[test]
    fn fallback_on_real_setup_failure() {
        let kind = resolve_with(EngineChoice::Auto, || uring::probe_entries(1 << 20)).unwrap();
        assert_eq!(kind, EngineKind::Sync);
    }
}

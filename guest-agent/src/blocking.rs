//! A minimal blocking (std-only, no tokio) client used where no async
//! runtime can be relied on: the thaw that a dropped [`crate::FreezeGuard`]
//! runs on its own thread, and [`crate::thaw_blocking`] for an
//! out-of-process watchdog that thaws the guest when the agent itself dies
//! (F-04). The thaw loop itself is in `thaw.rs`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::ReadFail;
use crate::commands::Command;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::wire::{Session, SYNC_COMMAND};

const READ_CHUNK: usize = 16 << 10;

/// Connects within the deadline. `connect(2)` on a unix socket blocks when
/// the listener's backlog is full (QEMU listens with a backlog of 1), and
/// std offers no connect timeout, so the connect runs on a helper thread.
/// If it never completes, that thread stays parked in `connect(2)`; a late
/// stream is dropped (closed) at once.
fn connect(path: &Path, deadline: Instant, budget: Duration) -> Result<UnixStream> {
    let (tx, rx) = mpsc::sync_channel(1);
    let target = path.to_path_buf();
    thread::Builder::new()
        .name("qga-connect".into())
        .spawn(move || {
            // The receiver may be gone (deadline passed): then the stream is
            // dropped here, which closes it.
            let _ = tx.send(UnixStream::connect(target));
        })
        .map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(remaining) {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(Error::Connect {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Err(Error::ConnectTimeout {
            path: path.to_path_buf(),
            timeout: budget,
        }),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Why a blocking read stopped.
enum BlockingFail {
    Deadline,
    Read(ReadFail),
}

/// One blocking connection.
pub(crate) struct BlockingConn {
    stream: UnixStream,
    session: Session,
    chunk: Box<[u8]>,
}

impl std::fmt::Debug for BlockingConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingConn").finish_non_exhaustive()
    }
}

impl BlockingConn {
    /// Connects and syncs before `deadline`.
    pub(crate) fn connect(
        path: &Path,
        config: &Config,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Self> {
        let stream = connect(path, deadline, budget)?;
        let mut conn = BlockingConn {
            stream,
            session: Session::new(config),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
        };
        let (request, pending) = conn.session.start_sync();
        conn.write(SYNC_COMMAND, &request, deadline, budget)?;
        loop {
            let line = match conn.read_line(deadline) {
                Ok(line) => line,
                Err(BlockingFail::Deadline) => {
                    return Err(Error::SyncTimeout {
                        path: path.to_path_buf(),
                        timeout: budget,
                    })
                }
                Err(BlockingFail::Read(fail)) => return Err(fail.into_error(SYNC_COMMAND)),
            };
            if conn.session.on_sync_line(&pending, &line)? {
                return Ok(conn);
            }
        }
    }

    fn write(
        &mut self,
        command: &'static str,
        bytes: &[u8],
        deadline: Instant,
        budget: Duration,
    ) -> Result<()> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::Timeout {
                command,
                timeout: budget,
            });
        }
        self.stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| self.stream.write_all(bytes))
            .map_err(|source| {
                if is_timeout(&source) {
                    Error::Timeout {
                        command,
                        timeout: budget,
                    }
                } else {
                    Error::Send { command, source }
                }
            })
    }

    /// Reads one line; the deadline covers the whole line, not each read.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, BlockingFail> {
        loop {
            if let Some(frame) = self.session.framer.next_frame() {
                return frame.map_err(|f| BlockingFail::Read(ReadFail::Frame(f)));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BlockingFail::Deadline);
            }
            self.stream
                .set_read_timeout(Some(remaining))
                .map_err(|e| BlockingFail::Read(ReadFail::Io(e)))?;
            match self.stream.read(&mut self.chunk) {
                Ok(0) => return Err(BlockingFail::Read(ReadFail::Eof)),
                Ok(n) => self.session.framer.push(&self.chunk[..n]),
                Err(e) if is_timeout(&e) => return Err(BlockingFail::Deadline),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BlockingFail::Read(ReadFail::Io(e))),
            }
        }
    }

    /// Runs one typed command before `deadline`.
    pub(crate) fn execute<C: Command>(
        &mut self,
        command: &C,
        deadline: Instant,
        budget: Duration,
    ) -> Result<C::Ok> {
        let (request, mut pending) = self.session.start_command(C::NAME, command)?;
        self.write(C::NAME, &request, deadline, budget)?;
        let raw = loop {
            let line = match self.read_line(deadline) {
                Ok(line) => line,
                Err(BlockingFail::Deadline) => {
                    return Err(Error::Timeout {
                        command: C::NAME,
                        timeout: budget,
                    })
                }
                Err(BlockingFail::Read(fail)) => return Err(fail.into_error(C::NAME)),
            };
            if let Some(value) = self.session.on_reply_line(&mut pending, &line)? {
                break value;
            }
        };
        crate::client::decode::<C>(&raw)
    }
}

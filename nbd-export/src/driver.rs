//! Glue between a [`Conn`] (protocol) and a [`SocketIo`] (bytes): start the
//! I/O a connection wants, apply completions, keep the idle deadline.
//! Shared by [`Client`](crate::Client) and the chunk reader, for both
//! engines.

use std::io;
use std::time::Duration;

use crate::conn::Conn;
use crate::engine::{Completion, Dir, SocketIo};
use crate::error::{Error, Result};

/// A connection plus its I/O bookkeeping.
#[derive(Debug)]
pub(crate) struct Link {
    pub conn: Conn,
    /// Index of the socket in the engine.
    pub idx: usize,
    /// Time spent waiting for this busy link without any completion. Only
    /// time inside the engine's wait counts, so a slow consumer (which
    /// keeps us from reaping) never looks like a silent server.
    pub idle_for: Duration,
    pub idle_timeout: Duration,
}

impl Link {
    pub fn new(conn: Conn, idx: usize, idle_timeout: Duration) -> Link {
        Link {
            conn,
            idx,
            idle_for: Duration::ZERO,
            idle_timeout,
        }
    }

    /// Starts whatever I/O the connection wants and is not already running.
    pub fn start_io(&mut self, io: &mut dyn SocketIo) -> Result<()> {
        if let Some(b) = self.conn.tx_begin() {
            io.start(self.idx, Dir::Send, b);
        }
        if self.conn.wants_rx() {
            let b = self
                .conn
                .rx_begin()
                .ok_or_else(|| Error::Internal("receive buffer unavailable".into()))?;
            io.start(self.idx, Dir::Recv, b);
        }
        Ok(())
    }

    /// Applies one completion. Errors are fatal for the connection.
    pub fn complete(&mut self, c: Completion) -> Result<()> {
        if c.retry {
            match c.dir {
                Dir::Send => self.conn.tx_end(c.buf, 0),
                Dir::Recv => self.conn.rx_return(c.buf),
            }
            return Ok(());
        }
        let step = match c.dir {
            Dir::Send => "sending requests",
            Dir::Recv => "reading replies",
        };
        match (c.dir, c.result) {
            (Dir::Send, Ok(n)) => {
                let wanted = c.buf.len();
                self.conn.tx_end(c.buf, n);
                if n == 0 && wanted > 0 {
                    self.conn.kill();
                    return Err(Error::Disconnected { step });
                }
                Ok(())
            }
            (Dir::Recv, Ok(n)) => self.conn.rx_end(c.buf, n),
            (dir, Err(e)) => {
                match dir {
                    Dir::Send => self.conn.tx_end(c.buf, 0),
                    Dir::Recv => self.conn.rx_return(c.buf),
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    return Ok(());
                }
                self.conn.kill();
                Err(Error::io(step, e, self.idle_timeout))
            }
        }
    }

    fn busy(&self) -> bool {
        self.conn.in_flight() > 0 || self.conn.io_outstanding()
    }

    /// How long the next wait may last before this link's deadline.
    pub fn wait_allowance(&self) -> Option<Duration> {
        self.busy()
            .then(|| self.idle_timeout.saturating_sub(self.idle_for))
    }

    /// Accounts a wait of `waited`; `progressed` if the link had a
    /// completion. Fails once a busy link has waited past its deadline
    /// without progress (F-19). The sync engine gets the same from its
    /// socket timeouts and never accumulates here.
    pub fn account_wait(&mut self, waited: Duration, progressed: bool) -> Result<()> {
        if progressed || !self.busy() {
            self.idle_for = Duration::ZERO;
            return Ok(());
        }
        self.idle_for += waited;
        if self.idle_for >= self.idle_timeout {
            return Err(Error::Timeout {
                step: "waiting for replies",
                timeout: self.idle_timeout,
            });
        }
        Ok(())
    }
}

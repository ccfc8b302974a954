//! The one thaw retry loop: reconnect, resync, thaw, until
//! `guest-fsfreeze-status` says `thawed` or the caller's deadline passes.
//!
//! It drives a [`ThawConn`]: the freeze guard's async connection
//! ([`crate::FreezeGuard::thaw`] and a failed freeze) or a blocking std
//! connection (a dropped guard's thread, [`thaw_blocking`]). The blocking
//! one's futures never pend, so [`block_on`] runs the same loop on a plain
//! thread, without a runtime.

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use crate::blocking::BlockingConn;
use crate::commands::{self, Command, FsFreezeStatus};
use crate::config::Config;
use crate::error::{Error, Result};

/// Freeze windows above this are logged as warnings (F-07 alarm level).
const WINDOW_ALARM: Duration = Duration::from_secs(5);

/// First pause between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The outcome of a successful thaw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThawReport {
    /// Filesystems the answered thaw reported (a retry after a lost reply
    /// may report 0).
    pub thawed_filesystems: u32,
    /// Thaw attempts made (1 when nothing went wrong).
    pub attempts: u32,
    /// Freeze sent → first thaw answered; `None` for
    /// [`crate::thaw_blocking`], which does not know when the freeze was
    /// sent.
    pub freeze_window: Option<Duration>,
}

/// A connection to the agent that the thaw loop can drive.
pub(crate) trait ThawConn {
    /// The agent's socket (for logs).
    fn socket(&self) -> &Path;

    /// Runs `command` before `deadline`, connecting and syncing first if
    /// there is no connection.
    async fn execute<C: Command>(
        &mut self,
        command: &C,
        deadline: Instant,
        budget: Duration,
    ) -> Result<C::Ok>;

    /// Drops the connection: the next [`ThawConn::execute`] reconnects
    /// (new connection, new sync id, so a late reply is discarded).
    fn disconnect(&mut self);

    /// Waits `pause` before the next attempt.
    async fn sleep(&mut self, pause: Duration);
}

/// One attempt: thaw, then check the status. Records when the first thaw
/// was answered (the end of the freeze window).
async fn attempt<T: ThawConn>(
    conn: &mut T,
    deadline: Instant,
    budget: Duration,
    first_thaw_answer: &mut Option<Instant>,
) -> Result<u32> {
    let thawed = conn
        .execute(&commands::FsFreezeThaw {}, deadline, budget)
        .await?;
    first_thaw_answer.get_or_insert_with(Instant::now);
    match conn
        .execute(&commands::FsFreezeStatusCmd {}, deadline, budget)
        .await?
    {
        FsFreezeStatus::Thawed => Ok(thawed),
        FsFreezeStatus::Frozen => Err(Error::StillFrozen),
    }
}

/// Thaws through `conn` until the agent reports `thawed` or `deadline`
/// passes ([`Error::ThawFailed`], also logged at error level). Each attempt
/// has at most `attempt_timeout`; after any failure that leaves the stream
/// in doubt the connection is dropped and the next attempt reconnects.
/// `freeze_sent`, when known, gives the report its freeze window.
pub(crate) async fn thaw_until<T: ThawConn>(
    conn: &mut T,
    attempt_timeout: Duration,
    deadline: Instant,
    freeze_sent: Option<Instant>,
) -> Result<ThawReport> {
    let start = Instant::now();
    let mut attempts = 0u32;
    let mut first_thaw_answer = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        attempts += 1;
        let now = Instant::now();
        let attempt_deadline = (now + attempt_timeout).min(deadline);
        let budget = attempt_deadline.saturating_duration_since(now);
        let last = match attempt(conn, attempt_deadline, budget, &mut first_thaw_answer).await {
            Ok(thawed_filesystems) => {
                let report = ThawReport {
                    thawed_filesystems,
                    attempts,
                    freeze_window: freeze_sent.map(|sent| {
                        first_thaw_answer
                            .unwrap_or_else(Instant::now)
                            .saturating_duration_since(sent)
                    }),
                };
                log_thawed(conn.socket(), &report);
                return Ok(report);
            }
            Err(e) => {
                tracing::warn!(
                    socket = %conn.socket().display(),
                    attempt = attempts,
                    error = %e,
                    "thaw attempt failed; reconnecting and retrying"
                );
                if e.desyncs_connection() {
                    conn.disconnect();
                }
                e
            }
        };
        let now = Instant::now();
        if now >= deadline {
            let elapsed = now.saturating_duration_since(start);
            tracing::error!(
                socket = %conn.socket().display(),
                attempts,
                elapsed_ms = elapsed.as_millis(),
                error = %last,
                "COULD NOT THAW THE GUEST: its filesystems may still be frozen"
            );
            return Err(Error::ThawFailed {
                attempts,
                elapsed,
                last: Box::new(last),
            });
        }
        conn.sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn log_thawed(socket: &Path, report: &ThawReport) {
    let window_ms = report.freeze_window.map(|w| w.as_millis());
    if report.freeze_window.is_some_and(|w| w > WINDOW_ALARM) {
        tracing::warn!(
            socket = %socket.display(),
            freeze_window_ms = window_ms,
            attempts = report.attempts,
            "guest thawed, but the freeze window was long"
        );
    } else {
        tracing::info!(
            socket = %socket.display(),
            freeze_window_ms = window_ms,
            attempts = report.attempts,
            thawed_filesystems = report.thawed_filesystems,
            "guest thawed"
        );
    }
}

/// The blocking std connection as a [`ThawConn`]: its futures do all their
/// work in the first poll.
struct Blocking<'a> {
    path: &'a Path,
    config: &'a Config,
    conn: Option<BlockingConn>,
}

impl ThawConn for Blocking<'_> {
    fn socket(&self) -> &Path {
        self.path
    }

    async fn execute<C: Command>(
        &mut self,
        command: &C,
        deadline: Instant,
        budget: Duration,
    ) -> Result<C::Ok> {
        if self.conn.is_none() {
            self.conn = Some(BlockingConn::connect(
                self.path,
                self.config,
                deadline,
                budget,
            )?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::Eof {
                command: crate::wire::SYNC_COMMAND,
            });
        };
        conn.execute(command, deadline, budget)
    }

    fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn sleep(&mut self, pause: Duration) {
        thread::sleep(pause);
    }
}

/// Runs a future to completion on this thread (parking it while the future
/// is pending). Used for the blocking [`ThawConn`], whose futures never
/// pend.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

/// [`thaw_until`] over a blocking std connection, on the calling thread.
pub(crate) fn thaw_until_blocking(
    path: &Path,
    config: &Config,
    deadline: Instant,
    freeze_sent: Option<Instant>,
) -> Result<ThawReport> {
    let mut conn = Blocking {
        path,
        config,
        conn: None,
    };
    block_on(thaw_until(
        &mut conn,
        config.thaw_attempt_timeout,
        deadline,
        freeze_sent,
    ))
}

/// Thaws the guest behind `socket_path`, blocking the calling thread, and
/// keeps trying (reconnecting and resyncing after every failure) until
/// `guest-fsfreeze-status` reports `thawed` or `deadline` passes.
///
/// Meant for a watchdog process that outlives the agent: when the agent
/// dies holding a freeze (SIGKILL, abort), the watchdog calls this. It uses
/// only std (no async runtime). It sends a thaw even if nothing is frozen;
/// callers must only use it for a freeze they made.
pub fn thaw_blocking(socket_path: impl AsRef<Path>, deadline: Instant) -> Result<ThawReport> {
    thaw_until_blocking(socket_path.as_ref(), &Config::default(), deadline, None)
}

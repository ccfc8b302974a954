//! The freeze guard (see [`FreezeGuard`]).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::GuestAgent;
use crate::commands::{self, Command, FsFreezeStatus};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::thaw::{self, ThawConn, ThawReport};

/// What to freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeScope {
    /// Every freezable filesystem (`guest-fsfreeze-freeze`).
    All,
    /// These mountpoints (`guest-fsfreeze-freeze-list`).
    Mountpoints(Vec<String>),
}

/// Drop-path thaws still running on their threads.
static DROP_THAWS: Mutex<usize> = Mutex::new(0);
static DROP_THAWS_DONE: Condvar = Condvar::new();

/// Number of thaws started by dropped guards that are still running.
pub fn pending_drop_thaws() -> usize {
    *DROP_THAWS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Blocks until every thaw started by a dropped guard has finished, or
/// `timeout` passes. Returns true if none is left. Call it before a process
/// exits on purpose, so a background thaw is not cut short.
pub fn wait_for_drop_thaws(timeout: Duration) -> bool {
    let guard = DROP_THAWS.lock().unwrap_or_else(PoisonError::into_inner);
    let (left, _) = DROP_THAWS_DONE
        .wait_timeout_while(guard, timeout, |n| *n > 0)
        .unwrap_or_else(PoisonError::into_inner);
    *left == 0
}

fn drop_thaw_started() {
    *DROP_THAWS.lock().unwrap_or_else(PoisonError::into_inner) += 1;
}

fn drop_thaw_finished() {
    let mut n = DROP_THAWS.lock().unwrap_or_else(PoisonError::into_inner);
    *n = n.saturating_sub(1);
    DROP_THAWS_DONE.notify_all();
}

/// Thaw responsibility: exists from the moment a freeze is about to be sent
/// until the guest is confirmed thawed (or the thaw loop gave up loudly).
/// Its `Drop` is the backstop for every path that forgets or is cancelled.
#[derive(Debug)]
struct Armed {
    path: PathBuf,
    config: Config,
    agent: Option<GuestAgent>,
    freeze_sent: std::time::Instant,
    done: bool,
}

impl Armed {
    async fn agent(&mut self, deadline: Instant, budget: Duration) -> Result<&mut GuestAgent> {
        if self.agent.is_none() {
            self.agent = Some(
                GuestAgent::connect_until(&self.path, self.config.clone(), deadline, budget)
                    .await?,
            );
        }
        self.agent.as_mut().ok_or(Error::Eof {
            command: "guest-sync-delimited",
        })
    }

    /// Thaws until `thawed` or [`Config::thaw_deadline`] (the one retry
    /// loop, [`thaw::thaw_until`], over this connection). Either way the
    /// outcome is final: the drop path must not start over.
    async fn thaw_loop(&mut self) -> Result<ThawReport> {
        let deadline = std::time::Instant::now() + self.config.thaw_deadline;
        let attempt_timeout = self.config.thaw_attempt_timeout;
        let freeze_sent = Some(self.freeze_sent);
        let result = thaw::thaw_until(self, attempt_timeout, deadline, freeze_sent).await;
        self.done = true;
        result
    }
}

impl ThawConn for Armed {
    fn socket(&self) -> &Path {
        &self.path
    }

    async fn execute<C: Command>(
        &mut self,
        command: &C,
        deadline: std::time::Instant,
        budget: Duration,
    ) -> Result<C::Ok> {
        let deadline = Instant::from_std(deadline);
        self.agent(deadline, budget)
            .await?
            .execute_until(command, deadline, budget)
            .await
    }

    fn disconnect(&mut self) {
        self.agent = None;
    }

    async fn sleep(&mut self, pause: Duration) {
        tokio::time::sleep(pause).await;
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // Release our socket first: QEMU serves one client at a time and the
        // thaw thread connects anew.
        self.agent = None;
        tracing::warn!(
            socket = %self.path.display(),
            "freeze guard dropped without thaw; thawing from a background thread"
        );
        let deadline = std::time::Instant::now() + self.config.thaw_deadline;
        let wait = self.config.drop_wait;
        let (path, config, freeze_sent) =
            (self.path.clone(), self.config.clone(), self.freeze_sent);
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        drop_thaw_started();
        let job = {
            let (path, config) = (path.clone(), config.clone());
            move || {
                // The loop logs its own outcome (error level on failure).
                let _ = thaw::thaw_until_blocking(&path, &config, deadline, Some(freeze_sent));
                drop_thaw_finished();
                let _ = tx.send(());
            }
        };
        match thread::Builder::new()
            .name("qga-drop-thaw".into())
            .spawn(job)
        {
            Ok(_) => {
                if rx.recv_timeout(wait).is_err() {
                    tracing::warn!(
                        socket = %path.display(),
                        "thaw still running in the background after the drop wait"
                    );
                }
            }
            Err(e) => {
                // No thread to be had: thaw here, blocking, rather than not
                // at all.
                tracing::error!(error = %e, "cannot spawn the thaw thread; thawing inline");
                let _ = thaw::thaw_until_blocking(&path, &config, deadline, Some(freeze_sent));
                drop_thaw_finished();
            }
        }
    }
}

/// Owns a freeze this process made, and thaws it on every path: an explicit
/// [`FreezeGuard::thaw`], any error, drop, or task cancellation.
///
/// # Paths and who thaws
///
/// | path | thaw runs |
/// |---|---|
/// | [`FreezeGuard::thaw`] | inline, async, reusing the guard's connection |
/// | freeze failed / timed out / froze nothing | inline inside [`FreezeGuard::freeze`] before it returns the error |
/// | guard dropped (error path, panic unwind, task cancelled, runtime shutting down) | a dedicated OS thread with a blocking std socket; `Drop` waits up to [`Config::drop_wait`] for it |
/// | the whole process dies (SIGKILL) | nothing in-process can: a watchdog process calls [`crate::thaw_blocking`] (F-04) |
///
/// Why a thread and not `Handle::spawn` for `Drop`: a task spawned onto the
/// runtime is cancelled when the runtime shuts down (e.g. `main` returning
/// with an error right after the guard is dropped), and a current-thread
/// runtime blocked in the dropping code could never run it. A std thread
/// with socket timeouts needs neither. `Drop` blocks for a bounded time so
/// that, in the common case (thaw takes ~10 ms), the guest is thawed when
/// `drop` returns; if the agent is hung the thread keeps trying in the
/// background until [`Config::thaw_deadline`], and
/// [`crate::wait_for_drop_thaws`] lets a shutting-down process wait for it.
///
/// # Never thaw someone else's freeze (F-05)
///
/// Before freezing, the guard asks `guest-fsfreeze-status`. `frozen` means
/// another party holds a freeze: the guard returns
/// [`Error::AlreadyFrozen`] and neither freezes nor thaws. The status check
/// and the freeze go over one connection, and QEMU serves one client per
/// socket at a time, so no other host client can freeze in between. Once
/// our freeze has been *sent*, its outcome is unknown until proven, so every
/// later path thaws (F-02, F-03, F-06, F-08: nothing the guest says skips
/// the thaw).
#[derive(Debug)]
#[must_use = "a dropped guard thaws from a background thread; call thaw().await to get the report"]
pub struct FreezeGuard {
    armed: Armed,
    frozen_filesystems: u32,
    freeze_latency: Duration,
}

impl FreezeGuard {
    /// Freezes the guest through `agent` (which the guard takes over).
    ///
    /// - `guest-fsfreeze-status` is `frozen` → [`Error::AlreadyFrozen`];
    ///   nothing is frozen or thawed (F-05).
    /// - The freeze fails, times out ([`Config::freeze_timeout`]), the
    ///   connection drops, the reply is not a sane count, or it froze
    ///   nothing → the thaw loop runs, then [`Error::FreezeFailed`] says
    ///   whether the guest is confirmed thawed (F-02, F-03, F-06, F-08).
    pub async fn freeze(mut agent: GuestAgent, scope: FreezeScope) -> Result<FreezeGuard> {
        match agent.fsfreeze_status().await? {
            FsFreezeStatus::Thawed => {}
            FsFreezeStatus::Frozen => {
                tracing::warn!(
                    socket = %agent.socket_path().display(),
                    "guest already frozen by someone else; not freezing, not thawing"
                );
                return Err(Error::AlreadyFrozen);
            }
        }
        let mut armed = Armed {
            path: agent.socket_path().to_path_buf(),
            config: agent.config().clone(),
            agent: None,
            freeze_sent: std::time::Instant::now(),
            done: false,
        };
        // From here on `armed` is responsible: if this future is dropped at
        // any await below, its Drop thaws.
        let agent = armed.agent.insert(agent);
        let sent = std::time::Instant::now();
        let result = match &scope {
            FreezeScope::All => agent.fsfreeze_freeze().await,
            FreezeScope::Mountpoints(m) => agent.fsfreeze_freeze_list(m).await,
        };
        let freeze_latency = sent.elapsed();
        armed.freeze_sent = sent;
        let cause = match result {
            Ok(frozen_filesystems) if frozen_filesystems > 0 => {
                tracing::info!(
                    frozen_filesystems,
                    freeze_latency_ms = freeze_latency.as_millis(),
                    "guest filesystems frozen"
                );
                return Ok(FreezeGuard {
                    armed,
                    frozen_filesystems,
                    freeze_latency,
                });
            }
            Ok(_) => Error::NoFilesystemFrozen,
            Err(e) => e,
        };
        tracing::warn!(error = %cause, "freeze failed; thawing to be safe");
        if cause.desyncs_connection() {
            armed.agent = None;
        }
        let thaw_error = armed.thaw_loop().await.err().map(Box::new);
        Err(Error::FreezeFailed {
            source: Box::new(cause),
            thaw_error,
        })
    }

    /// Filesystems the freeze reported.
    pub fn frozen_filesystems(&self) -> u32 {
        self.frozen_filesystems
    }

    /// Freeze sent → freeze answered.
    pub fn freeze_latency(&self) -> Duration {
        self.freeze_latency
    }

    /// Time since the freeze was sent.
    pub fn frozen_for(&self) -> Duration {
        self.armed.freeze_sent.elapsed()
    }

    /// `guest-fsfreeze-status` through the guard's connection (reconnecting
    /// if needed). qemu-ga refuses most other commands while frozen.
    pub async fn status(&mut self) -> Result<FsFreezeStatus> {
        let budget = self.armed.config.command_timeout;
        let deadline = Instant::now() + budget;
        let agent = self.armed.agent(deadline, budget).await?;
        let result = agent
            .execute_until(&commands::FsFreezeStatusCmd {}, deadline, budget)
            .await;
        if matches!(&result, Err(e) if e.desyncs_connection()) {
            self.armed.agent = None;
        }
        result
    }

    /// Thaws, retrying (with reconnect and resync) until the agent reports
    /// `thawed` or [`Config::thaw_deadline`] passes ([`Error::ThawFailed`],
    /// also logged at error level). Cancelling this future leaves the thaw
    /// to the drop path.
    pub async fn thaw(mut self) -> Result<ThawReport> {
        self.armed.thaw_loop().await
    }
}

impl GuestAgent {
    /// Shorthand for [`FreezeGuard::freeze`].
    pub async fn freeze(self, scope: FreezeScope) -> Result<FreezeGuard> {
        FreezeGuard::freeze(self, scope).await
    }
}

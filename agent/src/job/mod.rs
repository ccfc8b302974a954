//! Backup jobs on running VMs: the QEMU graph changes, the freeze, the data
//! path from NBD into the repository, and cleanup on every path.
//!
//! Where things live (module dependencies go one way: no cycles):
//! - [`options`]: what a run is asked to do (mode, options, test hooks);
//! - [`backup`]: [`backup::run_backup`] and the `BackupRun` type with one
//!   method per phase (prepare, hold, insert, release, export, read,
//!   teardown, commit);
//! - [`monitor`]: QEMU's QMP monitor, held only while the graph changes;
//! - [`definition`]: the VM definition captured into every backup;
//! - [`identity`]: which VM is behind a QMP socket;
//! - [`fleece`]: where fleecing images may go (not RAM, enough space);
//! - [`cleanup`]: taking back a killed run's changes (`shear cleanup`);
//! - `lock`: one backup, snapshot or cleanup per VM at a time;
//! - [`hold`]: freezing, pausing or shutting the guest down, and releasing it;
//! - [`graph`]: QEMU block-graph changes and their undo;
//! - [`incremental`]: dirty-bitmap change tracking, per disk per repository;
//! - [`record`]: the write-ahead run record that makes undo survive SIGKILL;
//! - [`watchdog`]: the child process that releases the guest if we die;
//! - [`events`]: progress and warnings leave the job as [`events::JobEvent`]s
//!   (the CLI draws bars from them; a daemon logs them);
//! - [`nbd_source`]: `shear backup --nbd`: any NBD export, no QEMU changes;
//! - `datapath`: NBD export → chunks → repository on dedicated threads;
//! - [`priority`]: the data path's CPU and I/O priority (nice,
//!   `SCHED_BATCH`, ionice), on its threads only;
//! - `release`: discarding stored ranges from the snapshot (`NBD_CMD_TRIM`)
//!   and sampling the fleece images' peak allocation;
//! - [`report`]: what a finished backup reports.
//!
//! Thread model: the control plane (QMP, qemu-ga, signals, timers) runs on
//! tokio; the data plane (NBD reads, hashing, compression, chunk writes)
//! runs on dedicated threads connected by bounded channels, so memory stays
//! bounded whatever the disk size.
//!
//! Crash and concurrency rules:
//! - every change to the guest or QEMU's graph is written to the run record
//!   *before* it is made; teardown undoes the record in reverse, on success,
//!   error and signal alike, and a later run (or the watchdog) replays the
//!   same undo after SIGKILL;
//! - one backup per VM at a time (an flock in the run directory);
//! - the manifest is written only after teardown, so a backup whose guest
//!   could not be released or whose graph could not be restored is never
//!   recorded as good.

pub mod backup;
pub mod cancel;
pub mod cleanup;
pub(crate) mod datapath;
pub mod definition;
mod diagnose;
pub mod events;
pub mod fleece;
pub mod freeze;
pub mod graph;
pub mod hold;
pub mod identity;
pub mod incremental;
pub(crate) mod lock;
pub mod monitor;
pub mod nbd_source;
pub mod options;
pub mod priority;
pub mod record;
mod release;
pub mod report;
mod select;
pub mod watchdog;

pub use crate::chain;

/// What kind of failure a [`JobError`] is: what a caller (the CLI, a
/// scheduler) should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Temporary: the same job may succeed if retried later unchanged
    /// (a lost connection, a timeout, another backup of the VM running).
    Retryable,
    /// Will fail again until something changes (configuration, input, the
    /// VM's layout, the repository's state).
    Permanent,
    /// QEMU is no longer there (its process ended or its socket is gone):
    /// nodes, exports and filters died with it; nothing to undo.
    QemuGone,
    /// Cancelled by a signal or the caller; everything was rolled back.
    Interrupted,
}

/// What a backup job can fail with. Each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A QMP command failed.
    #[error("QMP: {step}")]
    Qmp {
        /// The step (command and object).
        step: String,
        /// Cause.
        #[source]
        source: qmp::Error,
    },
    /// No QMP connection to undo a graph step with.
    #[error("QMP is not connected; cannot {what}")]
    QmpNotConnected {
        /// What could not be done.
        what: &'static str,
    },
    /// A qemu-ga command failed.
    #[error("guest agent: {step}")]
    Qga {
        /// The step.
        step: String,
        /// Cause.
        #[source]
        source: guest_agent::Error,
    },
    /// Reading the export failed.
    #[error("NBD: {step}")]
    Nbd {
        /// The step.
        step: String,
        /// Cause.
        #[source]
        source: nbd_export::Error,
    },
    /// Reading a disk's export failed; `cause` is what was found out about
    /// why (QEMU gone, fleecing storage full, …), see `diagnose`.
    #[error(
        "reading {disk} failed{}{}",
        .offset.map(|o| format!(" at offset {o}")).unwrap_or_default(),
        .cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
    )]
    ReadFailed {
        /// The disk.
        disk: String,
        /// The export offset that failed (the chunk being read, or the
        /// server's error offset).
        offset: Option<u64>,
        /// The cause found after the failure.
        cause: Option<String>,
        /// The NBD error (boxed: it is large).
        #[source]
        source: Box<nbd_export::Error>,
    },
    /// The repository refused or failed.
    #[error("repository: {step}")]
    Repo {
        /// The step.
        step: String,
        /// Cause.
        #[source]
        source: crate::repo::RepoError,
    },
    /// The run record could not be written or read.
    #[error("run record")]
    Record(#[source] record::RecordError),
    /// Local I/O.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The fleecing directory was refused (RAM-backed, too little space).
    #[error(transparent)]
    Fleece(#[from] fleece::FleeceError),
    /// The VM is gone (QEMU exited) while we still had something to undo.
    #[error("{0}: the VM is gone (QEMU exited)")]
    VmGone(String),
    /// The guest could not be confirmed released (thawed, resumed): the
    /// backup is not recorded; the watchdog and `shear cleanup` go on.
    #[error(
        "the guest could not be confirmed released (thawed/resumed): {0}; the watchdog keeps \
         trying, `shear cleanup` retries; no backup was recorded"
    )]
    NotReleased(String),
    /// The QMP socket leads to another VM's QEMU: refused before any change.
    #[error(
        "refusing to back up VM {vmid}: {} leads to another VM ({found}); check --qmp or \
         the qmp_socket template ({{vmid}})",
        socket.display()
    )]
    WrongVm {
        /// The VM id asked for.
        vmid: String,
        /// The QMP socket.
        socket: std::path::PathBuf,
        /// What identifies the VM found there.
        found: String,
    },
    /// Another backup of this VM is running.
    #[error("another shear backup of VM {0} is running")]
    Busy(String),
    /// Interrupted by a signal; everything was rolled back.
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    /// The guest could not be confirmed released (thawed or resumed); the
    /// watchdog keeps trying. The cause says why.
    #[error("the guest of VM {vmid} may still be {state}: shear could not confirm its release")]
    GuestNotReleased {
        /// VM id.
        vmid: String,
        /// `frozen` or `paused`.
        state: &'static str,
        /// Why the release could not be confirmed.
        #[source]
        source: Box<JobError>,
    },
    /// QEMU already runs an NBD server that shear did not start.
    #[error(
        "an NBD server shear did not start is running in QEMU (another tool's, or a \
         migration's); shear leaves it and its exports alone and did not touch the guest: \
         stop it (nbd-server-stop) or run the backup when it is gone"
    )]
    ForeignNbdServer,
    /// A libvirt call failed (`shear backup --libvirt`).
    #[error("libvirt: {step}")]
    Libvirt {
        /// The step.
        step: String,
        /// Cause.
        #[source]
        source: crate::libvirt::LibvirtError,
    },
    /// Anything else, said plainly: a permanent condition of the VM or
    /// the input (no disks, a hook that failed, a size mismatch).
    #[error("{0}")]
    Invalid(String),
}

impl JobError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            JobError::Qmp { source, .. } => match source.kind() {
                qmp::ErrorKind::Disconnected | qmp::ErrorKind::Connect | qmp::ErrorKind::Closed => {
                    ErrorKind::QemuGone
                }
                k if k.is_retryable() => ErrorKind::Retryable,
                _ => ErrorKind::Permanent,
            },
            JobError::QmpNotConnected { .. } => ErrorKind::QemuGone,
            JobError::Qga { source, .. } => match source.kind() {
                guest_agent::ErrorKind::Temporary => ErrorKind::Retryable,
                _ => ErrorKind::Permanent,
            },
            JobError::ForeignNbdServer => ErrorKind::Retryable,
            JobError::ReadFailed { source, .. } => match source.kind() {
                nbd_export::ErrorKind::Temporary => ErrorKind::Retryable,
                _ => ErrorKind::Permanent,
            },
            JobError::Nbd { source, .. } => match source.kind() {
                nbd_export::ErrorKind::Temporary => ErrorKind::Retryable,
                _ => ErrorKind::Permanent,
            },
            JobError::Repo { source, .. } => match source.kind() {
                crate::repo::ErrorKind::Io | crate::repo::ErrorKind::Busy => ErrorKind::Retryable,
                _ => ErrorKind::Permanent,
            },
            JobError::Record(_) | JobError::Io { .. } => ErrorKind::Retryable,
            JobError::Libvirt { source, .. } if source.is_retryable() => ErrorKind::Retryable,
            JobError::Libvirt { .. } => ErrorKind::Permanent,
            JobError::Busy(_) => ErrorKind::Retryable,
            JobError::Interrupted(_) => ErrorKind::Interrupted,
            JobError::VmGone(_) => ErrorKind::QemuGone,
            JobError::Fleece(_) | JobError::WrongVm { .. } => ErrorKind::Permanent,
            JobError::NotReleased(_) => ErrorKind::Permanent,
            JobError::GuestNotReleased { .. } | JobError::Invalid(_) => ErrorKind::Permanent,
        }
    }

    /// Whether retrying the job later unchanged may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Retryable
    }

    /// `map_err` adapter for a QMP step.
    pub fn qmp(step: &str) -> impl FnOnce(qmp::Error) -> JobError + '_ {
        move |source| JobError::Qmp {
            step: step.to_string(),
            source,
        }
    }
    /// `map_err` adapter for a QMP step on one object.
    pub fn qmp_at<'a>(step: &'a str, what: &'a str) -> impl FnOnce(qmp::Error) -> JobError + 'a {
        move |source| JobError::Qmp {
            step: format!("{step} ({what})"),
            source,
        }
    }
    /// `map_err` adapter for a qemu-ga step.
    pub fn qga(step: &str) -> impl FnOnce(guest_agent::Error) -> JobError + '_ {
        move |source| JobError::Qga {
            step: step.to_string(),
            source,
        }
    }
    /// `map_err` adapter for a repository step.
    pub fn repo(step: impl Into<String>) -> impl FnOnce(crate::repo::RepoError) -> JobError {
        let step = step.into();
        move |source| JobError::Repo { step, source }
    }
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> JobError {
        JobError::Io {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_gone_is_decided_by_kind_not_text() {
        let gone = JobError::Qmp {
            step: "query-status".into(),
            source: qmp::Error::Eof,
        };
        assert_eq!(gone.kind(), ErrorKind::QemuGone);
        let nc = JobError::QmpNotConnected { what: "undo" };
        assert_eq!(nc.kind(), ErrorKind::QemuGone);
        // A message that merely mentions QMP is not "QEMU gone".
        let text = JobError::Invalid("QMP is not connected".into());
        assert_eq!(text.kind(), ErrorKind::Permanent);
        assert!(JobError::Busy("100".into()).is_retryable());
        assert_eq!(
            JobError::Interrupted("SIGINT").kind(),
            ErrorKind::Interrupted
        );
    }

    #[test]
    fn guest_not_released_prints_its_cause() {
        let e = JobError::GuestNotReleased {
            vmid: "100".into(),
            state: "frozen",
            source: Box::new(JobError::Invalid("qemu-ga did not answer the thaw".into())),
        };
        let s = chain(&e);
        assert!(s.contains("may still be frozen"), "{s}");
        assert!(s.ends_with("qemu-ga did not answer the thaw"), "{s}");
    }
}

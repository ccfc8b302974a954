//! Backup jobs on running VMs: the QEMU graph changes, the freeze, the data
//! path from NBD into the repository, and cleanup on every path.
//!
//! Thread model: the control plane (QMP, qemu-ga, signals, timers) runs on
//! tokio; the data plane (NBD reads, hashing, compression, chunk writes)
//! runs on dedicated threads connected by bounded channels, so memory stays
//! bounded whatever the disk size.

pub mod backup;
pub mod cleanup;
mod datapath;
pub mod fleece;
pub mod freeze;
pub mod graph;
pub mod identity;
pub mod record;
pub mod watchdog;

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
    /// Anything else, said plainly.
    #[error("{0}")]
    Invalid(String),
}

impl JobError {
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

/// The error and its causes on one line: `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

//! What a running job tells the outside world while it runs: phases,
//! progress and warnings, as [`JobEvent`]s sent to a [`JobObserver`].
//!
//! The job layer never draws on a terminal: the CLI's observer turns
//! progress into bars, a daemon's logs and publishes the same events. The
//! observer is called from the control plane (tokio) and from the data
//! plane's threads, so it must be cheap and must not block.

use std::sync::Arc;

/// A phase of a backup run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Lock, connect, discover disks, fleece images, watchdog.
    Prepare,
    /// Freeze / pause / shut down the guest.
    Hold,
    /// Filters and snapshot-access nodes go in.
    Insert,
    /// Thaw / resume the guest.
    Release,
    /// NBD server and exports.
    Export,
    /// The data path.
    Read,
    /// Undo of the graph changes.
    Teardown,
    /// The manifest is written.
    Commit,
}

impl Phase {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Hold => "hold",
            Phase::Insert => "insert",
            Phase::Release => "release",
            Phase::Export => "export",
            Phase::Read => "read",
            Phase::Teardown => "teardown",
            Phase::Commit => "commit",
        }
    }
}

/// One event of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent<'a> {
    /// A phase begins.
    Phase {
        /// VM id.
        vmid: &'a str,
        /// The phase.
        phase: Phase,
    },
    /// Something the user should know (also listed in the final report).
    Warning {
        /// VM id.
        vmid: &'a str,
        /// The warning.
        message: &'a str,
    },
    /// The data path starts reading a disk.
    DiskStarted {
        /// Disk name.
        disk: &'a str,
        /// Virtual size in bytes (what the progress positions cover).
        virtual_size: u64,
        /// Bytes that will be read, when known before the read (the dirty
        /// bytes of an incremental read); a full read learns what is
        /// allocated as it goes.
        to_read: Option<u64>,
    },
    /// Progress on a disk: `bytes` more of its virtual size are done
    /// (read, or known to be a hole or unchanged), of which `read` bytes
    /// were actually read from the export.
    DiskProgress {
        /// Disk name.
        disk: &'a str,
        /// Bytes of the virtual size done since the last event.
        bytes: u64,
        /// Bytes read from the export since the last event.
        read: u64,
    },
    /// The data path finished a disk (or gave up on it).
    DiskFinished {
        /// Disk name.
        disk: &'a str,
    },
}

/// Receives a job's events.
pub trait JobObserver: Send + Sync + std::fmt::Debug {
    /// Called for each event, in order per thread.
    fn event(&self, event: &JobEvent<'_>);
}

/// An observer that logs through `tracing` (phases at debug, warnings at
/// warn) and ignores progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogObserver;

impl JobObserver for LogObserver {
    fn event(&self, event: &JobEvent<'_>) {
        match event {
            JobEvent::Phase { vmid, phase } => {
                tracing::debug!(vmid, phase = phase.as_str(), "backup phase");
            }
            JobEvent::Warning { vmid, message } => tracing::warn!(vmid, "{message}"),
            JobEvent::DiskStarted { .. }
            | JobEvent::DiskProgress { .. }
            | JobEvent::DiskFinished { .. } => {}
        }
    }
}

/// A shared observer.
pub type Observer = Arc<dyn JobObserver>;

//! What the daemon tells the outside world when something happens: job
//! finished or failed, a VM missed its RPO, verify found damage, a
//! repository is low on space. Each [`Event`] goes to every [`EventSink`]
//! (the log, `state_dir/events.log`, and the notification targets:
//! [`super::notify_sink`]). Sinks are called from the daemon's tasks and must not
//! block for long.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// How bad an event is (Proxmox's notification severities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// All went well.
    Info,
    /// Something needs attention soon.
    Warning,
    /// Something failed.
    Error,
}

/// One VM's result in a backup job run.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct VmResult {
    /// VM id.
    pub vmid: String,
    /// `ok`, `failed` or `cancelled`.
    pub status: String,
    /// The committed backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Seconds the backup took.
    pub duration_s: f64,
    /// Bytes read from the VM's disks.
    pub bytes_read: u64,
    /// Bytes the backup added to the repository.
    pub bytes_stored: u64,
    /// `application` or `crash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// Milliseconds the guest was held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<u64>,
    /// Backups prune removed after this one.
    #[serde(default)]
    pub pruned: usize,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Warnings of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Something the daemon reports.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A job run ended with every VM (or the whole verify/gc) fine.
    JobFinished {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
        /// Per VM (backup jobs).
        vms: Vec<VmResult>,
        /// One-line summary.
        summary: String,
    },
    /// A job run ended with at least one failure, or was cancelled.
    JobFailed {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
        /// Per VM (backup jobs).
        vms: Vec<VmResult>,
        /// What went wrong.
        summary: String,
    },
    /// The newest good backup of a VM is older than its RPO (or absent).
    RpoMissed {
        /// VM id.
        vmid: String,
        /// Age of the newest good backup (None: no backup).
        age_s: Option<u64>,
        /// The policy's RPO.
        rpo_s: u64,
    },
    /// A VM has snapshots made by `shear snapshot` older than the limit
    /// (`snapshot_max_age`): snapshots left for days slow the VM down and
    /// hold space; they should go.
    SnapshotOld {
        /// VM id.
        vmid: String,
        /// Snapshots over the limit.
        count: usize,
        /// Age of the oldest.
        oldest_age_s: u64,
        /// The limit.
        limit_s: u64,
    },
    /// Verify found damaged backups or chunks.
    VerifyDamage {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
        /// Repository.
        repo: String,
        /// Backups with problems.
        backups: Vec<String>,
        /// Bad chunks.
        bad_chunks: usize,
    },
    /// A repository's filesystem has less than the configured free space.
    SpaceLow {
        /// Repository.
        repo: String,
        /// Free bytes.
        free_bytes: u64,
        /// Total bytes.
        total_bytes: u64,
        /// The threshold.
        threshold_percent: u8,
    },
}

impl Event {
    /// Severity for matchers.
    pub fn severity(&self) -> Severity {
        match self {
            Event::JobFinished { .. } => Severity::Info,
            Event::SpaceLow { .. } | Event::RpoMissed { .. } | Event::SnapshotOld { .. } => {
                Severity::Warning
            }
            Event::JobFailed { .. } | Event::VerifyDamage { .. } => Severity::Error,
        }
    }

    /// The job it is about, if any.
    pub fn job(&self) -> Option<&str> {
        match self {
            Event::JobFinished { job, .. }
            | Event::JobFailed { job, .. }
            | Event::VerifyDamage { job, .. } => Some(job),
            Event::RpoMissed { .. } | Event::SpaceLow { .. } | Event::SnapshotOld { .. } => None,
        }
    }

    /// The VMs it is about.
    pub fn vmids(&self) -> Vec<&str> {
        match self {
            Event::JobFinished { vms, .. } | Event::JobFailed { vms, .. } => {
                vms.iter().map(|v| v.vmid.as_str()).collect()
            }
            Event::RpoMissed { vmid, .. } | Event::SnapshotOld { vmid, .. } => {
                vec![vmid.as_str()]
            }
            Event::VerifyDamage { .. } | Event::SpaceLow { .. } => Vec::new(),
        }
    }
}

/// Receives events (a notifier, the log).
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Handle one event; `notify` are the targets the job names.
    fn emit(&self, event: &Event, notify: &[String]);
}

/// Logs each event through `tracing`.
#[derive(Debug, Default)]
pub struct LogSink;

impl EventSink for LogSink {
    fn emit(&self, event: &Event, _notify: &[String]) {
        let json = serde_json::to_string(event).unwrap_or_default();
        match event.severity() {
            Severity::Info => tracing::info!(target: "shear::events", "{json}"),
            Severity::Warning => tracing::warn!(target: "shear::events", "{json}"),
            Severity::Error => tracing::error!(target: "shear::events", "{json}"),
        }
    }
}

/// Appends each event as one JSON line (with time, severity and the
/// targets it was meant for) to a file: `state_dir/events.log`.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    lock: Mutex<()>,
}

impl FileSink {
    /// A sink appending to `path`.
    pub fn new(path: PathBuf) -> FileSink {
        FileSink {
            path,
            lock: Mutex::new(()),
        }
    }
}

impl EventSink for FileSink {
    fn emit(&self, event: &Event, notify: &[String]) {
        let line = serde_json::json!({
            "time": jiff::Timestamp::now().to_string(),
            "severity": event.severity(),
            "notify": notify,
            "body": event,
        });
        let _g = self.lock.lock();
        use std::os::unix::fs::OpenOptionsExt;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .mode(0o600)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = r {
            tracing::warn!("cannot append to {}: {e}", self.path.display());
        }
    }
}

/// Every sink an event goes to.
#[derive(Debug, Clone, Default)]
pub struct Events {
    sinks: Vec<Arc<dyn EventSink>>,
}

impl Events {
    /// Add a sink.
    pub fn with(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Send `event` to every sink.
    pub fn emit(&self, event: &Event, notify: &[String]) {
        for s in &self.sinks {
            s.emit(event, notify);
        }
    }
}

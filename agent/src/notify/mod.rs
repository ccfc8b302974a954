//! Notifications: what happened to a job, sent to mail (SMTP, sendmail)
//! and webhook targets ([`config`]: `[[notify_target]]`,
//! `[[notify_matcher]]`).
//!
//! A [`Notification`] has a text rendering (the mail body,
//! [`Notification::subject`] + [`Notification::render_text`]) and a JSON
//! rendering (the webhook body, [`Notification::render_json`];
//! docs/json.md). [`notify`] sends one to every routed target at once,
//! each send under its own deadline: a target that is down or slow costs
//! at most its timeout and never stops the others.

pub mod config;
mod mail;
mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use config::{MatcherConfig, TargetConfig, TargetKind};
pub use webhook::{signature as webhook_signature, SIGNATURE_HEADER};

/// Version of the JSON rendering (`"version"`); bumped on incompatible
/// changes.
pub const JSON_VERSION: u32 = 1;

/// How bad it is (Proxmox's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// All went well.
    Info,
    /// Done, but someone should look (a crash-consistent fallback…).
    Warning,
    /// Something failed.
    Error,
}

impl Severity {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A backup job finished; every VM backed up.
    JobFinished,
    /// A backup job failed (for one VM or all).
    JobFailed,
    /// A VM's newest good backup is older than its RPO.
    RpoMissed,
    /// Verify found damaged backups.
    VerifyDamage,
    /// A repository's free space is low.
    SpaceLow,
    /// A VM has snapshots older than the limit.
    SnapshotOld,
}

impl Kind {
    /// Kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::JobFinished => "job-finished",
            Kind::JobFailed => "job-failed",
            Kind::RpoMissed => "rpo-missed",
            Kind::VerifyDamage => "verify-damage",
            Kind::SpaceLow => "space-low",
            Kind::SnapshotOld => "snapshot-old",
        }
    }
}

/// One VM's row of a notification.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmRow {
    /// VM id.
    pub vmid: String,
    /// `ok`, `failed`, `missed` (RPO), `damaged` (verify)…
    pub status: String,
    /// How long its backup took, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes read from its disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// `application` or `crash`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// How long the guest was held, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<u64>,
    /// The committed backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Warnings of its run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// JSON rendering version ([`JSON_VERSION`]).
    pub version: u32,
    /// How bad.
    pub severity: Severity,
    /// What happened.
    pub kind: Kind,
    /// The job (a daemon job id; `cli` for `shear backup --notify`).
    pub job: String,
    /// The host that sends it.
    pub host: String,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// One line saying what happened (the mail subject).
    pub title: String,
    /// More text (a repository's free space, …); may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Per VM.
    pub vms: Vec<VmRow>,
}

impl Notification {
    /// A notification stamped now.
    pub fn new(severity: Severity, kind: Kind, job: &str, host: &str, title: String) -> Self {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Notification {
            version: JSON_VERSION,
            severity,
            kind,
            job: job.to_string(),
            host: host.to_string(),
            time,
            title,
            message: String::new(),
            vms: Vec::new(),
        }
    }

    /// The job-finished or job-failed notification of a backup job with
    /// these rows: error if any VM failed, warning if any has warnings
    /// (or is crash-consistent), else info.
    pub fn for_job(job: &str, host: &str, vms: Vec<VmRow>) -> Self {
        let failed = vms.iter().filter(|v| v.status != "ok").count();
        let warned = vms
            .iter()
            .any(|v| !v.warnings.is_empty() || v.consistency.as_deref() == Some("crash"));
        let (severity, kind, title) = if failed > 0 {
            (
                Severity::Error,
                Kind::JobFailed,
                format!(
                    "shear backup job {job} on {host}: {failed} of {} VM(s) FAILED",
                    vms.len()
                ),
            )
        } else {
            (
                if warned {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                Kind::JobFinished,
                format!(
                    "shear backup job {job} on {host}: {} VM(s) backed up{}",
                    vms.len(),
                    if warned { ", with warnings" } else { "" }
                ),
            )
        };
        let mut n = Notification::new(severity, kind, job, host, title);
        n.vms = vms;
        n
    }

    /// The mail subject.
    pub fn subject(&self) -> String {
        format!("[shear {}] {}", self.severity.as_str(), self.title)
    }

    /// The JSON rendering (the webhook body; docs/json.md).
    pub fn render_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The text rendering (the mail body): a header, then a table of the
    /// VMs, then each VM's error and warnings.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.title);
        let _ = writeln!(s);
        let _ = writeln!(s, "Job:      {}", self.job);
        let _ = writeln!(s, "Event:    {}", self.kind.as_str());
        let _ = writeln!(s, "Severity: {}", self.severity.as_str());
        let _ = writeln!(s, "Host:     {}", self.host);
        let _ = writeln!(s, "Time:     {}", self.time);
        if !self.message.is_empty() {
            let _ = writeln!(s, "\n{}", self.message);
        }
        if !self.vms.is_empty() {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "{:<10} {:<8} {:>10} {:>11} {:<12} {:>9}",
                "VMID", "STATUS", "DURATION", "SIZE", "CONSISTENCY", "FREEZE"
            );
            for v in &self.vms {
                let _ = writeln!(
                    s,
                    "{:<10} {:<8} {:>10} {:>11} {:<12} {:>9}",
                    v.vmid,
                    v.status,
                    v.duration_ms.map_or("-".into(), secs),
                    v.size_bytes.map_or("-".into(), crate::units::human_bytes),
                    v.consistency.as_deref().unwrap_or("-"),
                    v.freeze_window_ms
                        .map_or("-".into(), |ms| format!("{ms} ms")),
                );
            }
            let _ = writeln!(s);
            for v in &self.vms {
                if let Some(b) = &v.backup_id {
                    let _ = writeln!(s, "VM {} backup: {b}", v.vmid);
                }
                if let Some(e) = &v.error {
                    let _ = writeln!(s, "VM {} error: {e}", v.vmid);
                }
                for w in &v.warnings {
                    let _ = writeln!(s, "VM {} warning: {w}", v.vmid);
                }
            }
        }
        wrap(&s, TEXT_WIDTH)
    }
}

/// Longest line of the text rendering: mail bodies with shorter lines go
/// out as plain 7bit/8bit text, readable in any client and raw mailbox.
pub const TEXT_WIDTH: usize = 76;

/// Wrap lines longer than `width` at spaces (continuations indented by
/// two spaces); a word longer than a line is cut.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        let mut rest = line;
        let mut first = true;
        loop {
            let room = if first { width } else { width - 2 };
            if !first {
                out.push_str("  ");
            }
            if rest.chars().count() <= room {
                out.push_str(rest);
                out.push('\n');
                break;
            }
            let cut_at = rest.char_indices().nth(room).map_or(rest.len(), |(i, _)| i);
            let head = &rest[..cut_at];
            let (take, skip) = match head.rfind(' ') {
                Some(sp) if sp > 0 => (sp, sp + 1),
                _ => (cut_at, cut_at),
            };
            out.push_str(&rest[..take]);
            out.push('\n');
            rest = &rest[skip..];
            first = false;
        }
    }
    out
}

fn secs(ms: u64) -> String {
    format!("{}.{:02} s", ms / 1000, (ms % 1000) / 10)
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The target did not finish within its deadline.
    #[error("{kind} target {target:?} did not answer within {secs} s")]
    Timeout {
        /// Target name.
        target: String,
        /// Target type.
        kind: &'static str,
        /// The deadline.
        secs: u64,
    },
    /// The webhook could not be reached or refused the POST.
    #[error("webhook {url}: {message}")]
    Webhook {
        /// The URL (without credentials).
        url: String,
        /// What went wrong (connection refused, HTTP status and body…).
        message: String,
    },
    /// The mail could not be built (a bad address…).
    #[error("building the mail: {0}")]
    Message(String),
    /// The SMTP server could not be reached or refused the mail.
    #[error("SMTP server {server}: {message}")]
    Smtp {
        /// `host:port`.
        server: String,
        /// What went wrong.
        message: String,
    },
    /// sendmail failed.
    #[error("sendmail {command}: {message}")]
    Sendmail {
        /// The program.
        command: String,
        /// What went wrong.
        message: String,
    },
    /// A password file could not be read.
    #[error("reading {path}: {source}")]
    Secret {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The send task panicked or was cancelled.
    #[error("send task of target {0:?} ended abnormally")]
    Task(String),
}

/// Send `n` to every target of `targets` that the matchers route it to
/// ([`config::routed`]), all at once, each within its own timeout. Returns
/// one entry per routed target, in `targets`' order; one failing target
/// does not stop the others.
pub async fn notify(
    targets: &[TargetConfig],
    matchers: &[MatcherConfig],
    n: &Notification,
) -> Vec<(String, Result<(), NotifyError>)> {
    let mut set = tokio::task::JoinSet::new();
    let mut order = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        if !config::routed(t, matchers, n) {
            continue;
        }
        order.push((i, t.name.clone()));
        let t = t.clone();
        let n = n.clone();
        set.spawn(async move { (i, send(&t, &n).await) });
    }
    let mut results: Vec<Option<Result<(), NotifyError>>> = std::iter::repeat_with(|| None)
        .take(targets.len())
        .collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, r)) = joined {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(r);
            }
        }
    }
    order
        .into_iter()
        .map(|(i, name)| {
            let r = results
                .get_mut(i)
                .and_then(Option::take)
                .unwrap_or_else(|| Err(NotifyError::Task(name.clone())));
            (name, r)
        })
        .collect()
}

/// Send `n` to one target, within its timeout.
pub async fn send(t: &TargetConfig, n: &Notification) -> Result<(), NotifyError> {
    let deadline = Duration::from_secs(t.timeout);
    let fut = async {
        match &t.kind {
            TargetKind::Webhook {
                url,
                headers,
                secret,
            } => webhook::post(url, headers, secret.as_deref(), n, deadline).await,
            TargetKind::Smtp { .. } | TargetKind::Sendmail { .. } => {
                mail::send(&t.kind, n, deadline).await
            }
        }
    };
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(NotifyError::Timeout {
            target: t.name.clone(),
            kind: t.kind.type_name(),
            secs: t.timeout,
        }),
    }
}

/// Look up the named targets; an unknown name is an error naming it.
pub fn select<'a>(
    targets: &'a [TargetConfig],
    names: &[String],
) -> Result<Vec<TargetConfig>, String> {
    names
        .iter()
        .map(|name| {
            targets
                .iter()
                .find(|t| t.name == *name)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&'a str> = targets.iter().map(|t| t.name.as_str()).collect();
                    format!(
                        "no [[notify_target]] named {name:?} in the config (known: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests;

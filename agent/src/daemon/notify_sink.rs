//! The event sink that sends the daemon's events to the notification
//! targets a job (or RPO policy) names, through [`crate::notify`]: the
//! same targets, matchers and renderings as `shear backup --notify`.
//! Sends run in the background, each within its target's deadline, so a
//! slow mail server never holds up a job; the outcome of every send is
//! logged.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::events::{Event, EventSink, VmResult};
use crate::config::Config;
use crate::notify::{Kind, Notification, Severity, VmRow};

/// Sends events to `[[notify_target]]`s; follows config reloads.
#[derive(Debug)]
pub struct NotifySink {
    config: RwLock<Arc<Config>>,
    rt: tokio::runtime::Handle,
}

impl NotifySink {
    /// A sink sending on `rt` with the targets and matchers of `config`.
    pub fn new(config: Arc<Config>, rt: tokio::runtime::Handle) -> NotifySink {
        NotifySink {
            config: RwLock::new(config),
            rt,
        }
    }

    /// Use the targets and matchers of a reloaded config from now on.
    pub fn set_config(&self, config: Arc<Config>) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }
}

fn row(v: &VmResult) -> VmRow {
    VmRow {
        vmid: v.vmid.clone(),
        status: v.status.clone(),
        duration_ms: Some(secs_to_ms(v.duration_s)),
        size_bytes: (v.status == "ok").then_some(v.bytes_read),
        consistency: v.consistency.clone(),
        freeze_window_ms: v.freeze_window_ms,
        backup_id: v.backup_id.clone(),
        error: v.error.clone(),
        warnings: v.warnings.clone(),
    }
}

fn secs_to_ms(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        // Durations of runs: far below u64::MAX ms.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = (s * 1000.0).round() as u64;
        ms
    } else {
        0
    }
}

/// The notification of a daemon event, sent by host `host`.
pub fn notification(event: &Event, host: &str) -> Notification {
    match event {
        Event::JobFinished {
            job, vms, summary, ..
        }
        | Event::JobFailed {
            job, vms, summary, ..
        } => {
            let failed = matches!(event, Event::JobFailed { .. });
            let mut n = if vms.is_empty() {
                // Verify and gc jobs: no VM rows.
                let (sev, kind, state) = if failed {
                    (Severity::Error, Kind::JobFailed, "FAILED")
                } else {
                    (Severity::Info, Kind::JobFinished, "finished")
                };
                Notification::new(
                    sev,
                    kind,
                    job,
                    host,
                    format!("shear job {job} on {host}: {state}"),
                )
            } else {
                Notification::for_job(job, host, vms.iter().map(row).collect())
            };
            if failed && n.kind != Kind::JobFailed {
                // Cancelled runs: every VM row may say so, the job failed.
                n.kind = Kind::JobFailed;
                n.severity = Severity::Error;
                n.title = format!("shear job {job} on {host}: FAILED");
            }
            n.message.clone_from(summary);
            n
        }
        Event::RpoMissed { vmid, age_s, rpo_s } => {
            let mut n = Notification::new(
                Severity::Warning,
                Kind::RpoMissed,
                "",
                host,
                format!("shear on {host}: VM {vmid} missed its RPO"),
            );
            n.message = match age_s {
                Some(a) => format!("the newest good backup is {a} s old; the RPO is {rpo_s} s"),
                None => format!("there is no good backup; the RPO is {rpo_s} s"),
            };
            n.vms = vec![VmRow {
                vmid: vmid.clone(),
                status: "missed".into(),
                ..VmRow::default()
            }];
            n
        }
        Event::SnapshotOld {
            vmid,
            count,
            oldest_age_s,
            limit_s,
        } => {
            let mut n = Notification::new(
                Severity::Warning,
                Kind::SnapshotOld,
                "",
                host,
                format!("shear on {host}: VM {vmid} has snapshots past their age limit"),
            );
            n.message = format!(
                "{count} snapshot(s) older than {}, the oldest {}: remove them \
                 (`shear snapshot {vmid} delete NAME`, or `shear snapshot prune`)",
                crate::units::human_duration(Duration::from_secs(*limit_s)),
                crate::units::human_duration(Duration::from_secs(*oldest_age_s)),
            );
            n.vms = vec![VmRow {
                vmid: vmid.clone(),
                status: "snapshot-old".into(),
                ..VmRow::default()
            }];
            n
        }
        Event::VerifyDamage {
            job,
            repo,
            backups,
            bad_chunks,
            ..
        } => {
            let mut n = Notification::new(
                Severity::Error,
                Kind::VerifyDamage,
                job,
                host,
                format!("shear verify job {job} on {host}: DAMAGE found in {repo}"),
            );
            n.message = format!(
                "{} damaged backup(s): {}; {bad_chunks} bad chunk(s)",
                backups.len(),
                backups.join(", ")
            );
            n
        }
        Event::SpaceLow {
            repo,
            free_bytes,
            total_bytes,
            threshold_percent,
        } => {
            let mut n = Notification::new(
                Severity::Warning,
                Kind::SpaceLow,
                "",
                host,
                format!("shear on {host}: repository {repo} is low on space"),
            );
            n.message =
                format!("{free_bytes} of {total_bytes} bytes free (below {threshold_percent} %)");
            n
        }
    }
}

impl EventSink for NotifySink {
    fn emit(&self, event: &Event, notify: &[String]) {
        if notify.is_empty() {
            return;
        }
        let config = self
            .config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let targets = match crate::notify::select(&config.notify_target, notify) {
            Ok(t) => t,
            Err(e) => {
                // Validated at load; a reload cannot leave a dangling name.
                tracing::error!("notification not sent: {e}");
                return;
            }
        };
        let n = notification(event, &config.node_name());
        let matchers = config.notify_matcher.clone();
        self.rt.spawn(async move {
            for (name, r) in crate::notify::notify(&targets, &matchers, &n).await {
                match r {
                    Ok(()) => {
                        tracing::info!(notify_target = %name, kind = n.kind.as_str(), "notification sent");
                    }
                    Err(e) => tracing::warn!(
                        notify_target = %name,
                        kind = n.kind.as_str(),
                        "notification FAILED: {}",
                        crate::chain(&e)
                    ),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(vmid: &str, status: &str) -> VmResult {
        VmResult {
            vmid: vmid.into(),
            status: status.into(),
            backup_id: (status == "ok").then(|| format!("vm/{vmid}/2026-11-30T00:00:00Z")),
            duration_s: 1.5,
            bytes_read: 42,
            bytes_stored: 7,
            consistency: (status == "ok").then(|| "application".into()),
            freeze_window_ms: Some(12),
            pruned: 0,
            error: (status != "ok").then(|| "boom".into()),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn job_events_become_job_notifications_with_rows() {
        let ok = Event::JobFinished {
            job: "nightly".into(),
            task: "t1".into(),
            vms: vec![vm("100", "ok")],
            summary: "1 of 1 VM(s) backed up".into(),
        };
        let n = notification(&ok, "host1");
        assert_eq!((n.kind, n.severity), (Kind::JobFinished, Severity::Info));
        assert_eq!(n.job, "nightly");
        assert_eq!(n.vms.len(), 1);
        assert_eq!(n.vms[0].duration_ms, Some(1500));
        assert_eq!(n.vms[0].size_bytes, Some(42));

        let bad = Event::JobFailed {
            job: "nightly".into(),
            task: "t2".into(),
            vms: vec![vm("100", "ok"), vm("999", "failed")],
            summary: "1 of 2".into(),
        };
        let n = notification(&bad, "host1");
        assert_eq!((n.kind, n.severity), (Kind::JobFailed, Severity::Error));
        assert_eq!(n.vms[1].error.as_deref(), Some("boom"));

        let cancelled = Event::JobFailed {
            job: "nightly".into(),
            task: "t3".into(),
            vms: vec![VmResult {
                status: "cancelled".into(),
                ..vm("100", "failed")
            }],
            summary: "cancelled".into(),
        };
        assert_eq!(notification(&cancelled, "h").kind, Kind::JobFailed);
    }

    #[test]
    fn other_events_keep_their_kind_and_say_why() {
        let rpo = notification(
            &Event::RpoMissed {
                vmid: "101".into(),
                age_s: None,
                rpo_s: 86400,
            },
            "h",
        );
        assert_eq!(
            (rpo.kind, rpo.severity),
            (Kind::RpoMissed, Severity::Warning)
        );
        assert!(rpo.message.contains("no good backup"), "{}", rpo.message);
        let dmg = notification(
            &Event::VerifyDamage {
                job: "v".into(),
                task: "t".into(),
                repo: "/r".into(),
                backups: vec!["vm/1/x".into()],
                bad_chunks: 3,
            },
            "h",
        );
        assert_eq!(
            (dmg.kind, dmg.severity),
            (Kind::VerifyDamage, Severity::Error)
        );
        assert!(dmg.message.contains("vm/1/x") && dmg.message.contains("3 bad chunk"));
        let low = notification(
            &Event::SpaceLow {
                repo: "/r".into(),
                free_bytes: 1,
                total_bytes: 100,
                threshold_percent: 10,
            },
            "h",
        );
        assert_eq!(low.kind, Kind::SpaceLow);
    }
}

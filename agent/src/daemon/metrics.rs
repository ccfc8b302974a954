//! `GET /metrics`: Prometheus text format (version 0.0.4).

use std::collections::BTreeSet;
use std::fmt::Write;

use super::Shared;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(shared: &Shared) -> String {
    let cfg = shared.config();
    let state = shared.lock_state().clone();
    let repos = shared.repo_status();
    let now = jiff::Timestamp::now().as_second();
    let mut vmids: BTreeSet<String> = state.vms.keys().cloned().collect();
    for p in &cfg.policies {
        vmids.extend(p.vmids.iter().cloned());
    }
    for r in repos.values() {
        vmids.extend(r.newest_good.keys().cloned());
    }
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            if labels.is_empty() {
                let _ = writeln!(o, "{name} {value}");
            } else {
                let _ = writeln!(o, "{name}{{{labels}}} {value}");
            }
        }
    };
    let vm_rows = |f: &dyn Fn(&str) -> Option<String>| -> Vec<(String, String)> {
        vmids
            .iter()
            .filter_map(|v| f(v).map(|x| (format!("vmid=\"{}\"", esc(v)), x)))
            .collect()
    };
    family(
        "shear_backup_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the newest good backup of the VM.",
        vm_rows(&|v| shared.newest_good(v).map(|t| t.to_string())),
    );
    family(
        "shear_backup_last_duration_seconds",
        "gauge",
        "Duration of the VM's last backup run by the daemon.",
        vm_rows(&|v| {
            state
                .vms
                .get(v)
                .and_then(|s| s.last_duration_s)
                .map(|d| format!("{d:.3}"))
        }),
    );
    family(
        "shear_backup_freeze_window_seconds",
        "gauge",
        "Time the guest was held (frozen or paused) in the VM's last good backup.",
        vm_rows(&|v| {
            state
                .vms
                .get(v)
                .and_then(|s| s.freeze_window_s)
                .map(|d| format!("{d:.3}"))
        }),
    );
    family(
        "shear_backup_bytes_read_total",
        "counter",
        "Bytes read from the VM's disks by the daemon's backups.",
        vm_rows(&|v| {
            Some(
                state
                    .vms
                    .get(v)
                    .map_or(0, |s| s.bytes_read_total)
                    .to_string(),
            )
        }),
    );
    family(
        "shear_backup_failures_total",
        "counter",
        "Failed backups of the VM run by the daemon.",
        vm_rows(&|v| Some(state.vms.get(v).map_or(0, |s| s.failures_total).to_string())),
    );
    family(
        "shear_rpo_seconds",
        "gauge",
        "Age of the newest good backup of the VM.",
        vm_rows(&|v| shared.newest_good(v).map(|t| (now - t).max(0).to_string())),
    );
    family(
        "shear_rpo_breached",
        "gauge",
        "1 when the newest good backup is older than the VM's RPO policy (or absent).",
        vm_rows(&|v| {
            let rpo = cfg.rpo_of(v)?;
            let rpo = i64::try_from(rpo.as_secs()).unwrap_or(i64::MAX);
            let over = shared.newest_good(v).is_none_or(|t| now - t > rpo);
            Some(u8::from(over).to_string())
        }),
    );
    family(
        "shear_repo_bytes",
        "gauge",
        "Bytes the repository's files take on disk.",
        repos
            .iter()
            .map(|(p, s)| {
                (
                    format!("repo=\"{}\"", esc(&p.display().to_string())),
                    s.bytes.to_string(),
                )
            })
            .collect(),
    );
    let snaps = crate::snapshot::ops::recorded_ages(&cfg.state_dir, now);
    family(
        "shear_snapshot_oldest_age_seconds",
        "gauge",
        "Age of the VM's oldest snapshot made by `shear snapshot` (from its record; snapshots \
         should go within 48 h).",
        snaps
            .iter()
            .map(|(v, _, age)| (format!("vmid=\"{}\"", esc(v)), age.to_string()))
            .collect(),
    );
    family(
        "shear_snapshots",
        "gauge",
        "Snapshots of the VM made by `shear snapshot` (from its record).",
        snaps
            .iter()
            .map(|(v, n, _)| (format!("vmid=\"{}\"", esc(v)), n.to_string()))
            .collect(),
    );
    family(
        "shear_jobs_running",
        "gauge",
        "Job runs in progress.",
        vec![(String::new(), shared.running().len().to_string())],
    );
    o
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd{}"), "a\\\"b\\\\c\\nd{}");
    }
}

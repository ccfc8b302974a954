//! `shear report`: the compliance table — per VM, the newest good backup,
//! its age against the RPO policy, the last verify and the last restore
//! test (when one was recorded). Read from the repositories and the
//! daemon's state file; the daemon need not run.

use std::collections::BTreeMap;

use serde::Serialize;

use super::config::{DaemonConfig, Selection};
use super::state::State;
use crate::repo::ManifestState;

/// One VM's row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmReport {
    /// VM id.
    pub vmid: String,
    /// The newest good backup (manifest readable or locked, verify not failed).
    pub newest_good_backup: Option<String>,
    /// Its repository.
    pub repo: Option<String>,
    /// Its age in seconds.
    pub age_seconds: Option<i64>,
    /// The VM's RPO (strictest policy).
    pub rpo_seconds: Option<u64>,
    /// `ok`, `breached`, or `no-policy`.
    pub rpo_status: String,
    /// The newest verify of any of its backups: time and result.
    pub last_verify: Option<String>,
    /// Its result (`ok`, `failed`).
    pub last_verify_state: Option<String>,
    /// Last restore test (unix s), when recorded (the newest of the
    /// repositories' `verify --boot` records and the daemon's state).
    pub last_restore_test: Option<i64>,
    /// Its result (`ok`, `failed`), when it came from a repository record.
    pub last_restore_test_state: Option<String>,
    /// Status of the daemon's last backup of it.
    pub last_daemon_status: Option<String>,
    /// Repository errors met while reading.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Build the report (blocking).
pub fn build(cfg: &DaemonConfig) -> Vec<VmReport> {
    let now = jiff::Timestamp::now().as_second();
    let state = State::load(&cfg.state_dir).unwrap_or_default();
    let mut rows: BTreeMap<String, VmReport> = BTreeMap::new();
    let row = |v: &str| -> VmReport {
        VmReport {
            vmid: v.to_owned(),
            ..VmReport::default()
        }
    };
    for j in &cfg.jobs {
        if let Some(Selection::List(v)) = j.backup.as_ref().map(|b| &b.vms) {
            for id in v {
                rows.entry(id.clone()).or_insert_with(|| row(id));
            }
        }
    }
    for p in &cfg.policies {
        for id in &p.vmids {
            rows.entry(id.clone()).or_insert_with(|| row(id));
        }
    }
    let mut repo_errors = Vec::new();
    for path in cfg.repos() {
        let repo = match cfg.open_repo(&path) {
            Ok(r) => r,
            Err(e) => {
                repo_errors.push(e);
                continue;
            }
        };
        let list = match repo.list_backups(None) {
            Ok(l) => l,
            Err(e) => {
                repo_errors.push(format!("{}: {}", path.display(), crate::chain(&e)));
                continue;
            }
        };
        for b in list {
            let vm = b.id.vmid().as_str().to_owned();
            let r = rows.entry(vm.clone()).or_insert_with(|| row(&vm));
            if let Some(v) = &b.verify {
                if r.last_verify.as_deref().is_none_or(|t| t < v.time.as_str()) {
                    r.last_verify = Some(v.time.clone());
                    r.last_verify_state = Some(v.state.clone());
                }
            }
            if let Some(rt) = &b.restore_test {
                if let Ok(t) = crate::repo::names::parse_time(&rt.time) {
                    let t = t.unix_timestamp();
                    if r.last_restore_test.is_none_or(|x| x < t) {
                        r.last_restore_test = Some(t);
                        r.last_restore_test_state = Some(rt.state.clone());
                    }
                }
            }
            let good = b.manifest != ManifestState::Damaged
                && b.verify.as_ref().is_none_or(|v| v.state != "failed");
            let t = b.id.time().unix_timestamp();
            if good && r.age_seconds.is_none_or(|a| now - t < a) {
                r.newest_good_backup = Some(b.id.to_string());
                r.repo = Some(path.display().to_string());
                r.age_seconds = Some((now - t).max(0));
            }
        }
    }
    rows.into_values()
        .map(|mut r| {
            r.rpo_seconds = cfg.rpo_of(&r.vmid).map(|d| d.as_secs());
            r.rpo_status = match (r.rpo_seconds, r.age_seconds) {
                (None, _) => "no-policy".into(),
                (Some(rpo), Some(age)) if u64::try_from(age).unwrap_or(u64::MAX) <= rpo => {
                    "ok".into()
                }
                (Some(_), _) => "breached".into(),
            };
            if let Some(s) = state.vms.get(&r.vmid) {
                if s.last_restore_test > r.last_restore_test {
                    r.last_restore_test = s.last_restore_test;
                    r.last_restore_test_state = None;
                }
                r.last_daemon_status.clone_from(&s.last_status);
            }
            r.errors.clone_from(&repo_errors);
            r
        })
        .collect()
}

fn age(s: Option<i64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 3600 => format!("{}m", s / 60),
        Some(s) if s < 2 * 86400 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86400),
    }
}

/// Human table lines.
pub fn table(rows: &[VmReport]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<10} {:<36} {:>6} {:>6} {:<9} {:<22} {:<12}",
        "VM", "NEWEST GOOD BACKUP", "AGE", "RPO", "STATUS", "LAST VERIFY", "RESTORE TEST"
    )];
    for r in rows {
        out.push(format!(
            "{:<10} {:<36} {:>6} {:>6} {:<9} {:<22} {}",
            r.vmid,
            r.newest_good_backup.as_deref().unwrap_or("none"),
            age(r.age_seconds),
            r.rpo_seconds
                .map_or("-".into(), |s| age(i64::try_from(s).ok())),
            r.rpo_status,
            match (&r.last_verify, &r.last_verify_state) {
                (Some(t), Some(s)) => format!("{} {s}", t.get(..16).unwrap_or(t)),
                _ => "never".into(),
            },
            r.last_restore_test
                .and_then(|t| jiff::Timestamp::from_second(t).ok())
                .map_or("not recorded".into(), |t| format!(
                    "{} {}",
                    t.strftime("%Y-%m-%d"),
                    r.last_restore_test_state.as_deref().unwrap_or("")
                )
                .trim_end()
                .to_owned()),
        ));
    }
    out
}

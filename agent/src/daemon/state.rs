//! What the daemon remembers across restarts, in `state_dir/state.json`
//! (written atomically through [`crate::fsutil::write_atomic`]): each
//! job's last run (for `repeat_missed`) and each VM's last results (for
//! the metrics and RPO checks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::events::VmResult;
use crate::fsutil::{write_atomic, Existing};

/// A job's last run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// The last slot the job ran for (RFC 3339 with zone), or the start
    /// time of a run on request.
    pub last_slot: Option<String>,
    /// When the last run started (unix seconds).
    pub last_start: Option<i64>,
    /// Its task.
    pub last_task: Option<String>,
    /// Its status.
    pub last_status: Option<String>,
}

/// A VM's last results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Unix seconds of the last successful backup's end.
    pub last_success: Option<i64>,
    /// Its backup id.
    pub last_backup_id: Option<String>,
    /// Its repository.
    pub last_repo: Option<String>,
    /// Seconds the last backup (good or bad) took.
    pub last_duration_s: Option<f64>,
    /// Seconds the guest was held in the last successful backup.
    pub freeze_window_s: Option<f64>,
    /// Bytes read by every backup of this VM the daemon ran.
    pub bytes_read_total: u64,
    /// Failed backups the daemon ran.
    pub failures_total: u64,
    /// Status of the last backup.
    pub last_status: Option<String>,
    /// Its error.
    pub last_error: Option<String>,
    /// Unix seconds of the last restore test, when one was recorded.
    pub last_restore_test: Option<i64>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// By job id.
    #[serde(default)]
    pub jobs: BTreeMap<String, JobState>,
    /// By VM id.
    #[serde(default)]
    pub vms: BTreeMap<String, VmState>,
}

/// Largest state file read (it holds a few hundred bytes per VM and job).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Where it lives.
pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

impl State {
    /// Load; a missing file is an empty state, a damaged one is an error
    /// (the daemon refuses to start rather than forget the RPO history).
    pub fn load(state_dir: &Path) -> anyhow::Result<State> {
        use std::io::Read;
        let path = state_path(state_dir);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        let mut text = String::new();
        f.take(MAX_STATE_BYTES).read_to_string(&mut text)?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("damaged state file {}: {e}", path.display()))
    }

    /// Save atomically.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(self)?;
        write_atomic(&state_path(state_dir), &data, Existing::Replace)?;
        Ok(())
    }

    /// Fold one VM's backup result in; `now` in unix seconds.
    pub fn record_vm(&mut self, r: &VmResult, repo: &Path, now: i64) {
        let v = self.vms.entry(r.vmid.clone()).or_default();
        v.last_duration_s = Some(r.duration_s);
        v.bytes_read_total = v.bytes_read_total.saturating_add(r.bytes_read);
        v.last_status = Some(r.status.clone());
        v.last_error.clone_from(&r.error);
        if r.status == "ok" {
            v.last_success = Some(now);
            v.last_backup_id.clone_from(&r.backup_id);
            v.last_repo = Some(repo.display().to_string());
            #[allow(clippy::cast_precision_loss)]
            {
                v.freeze_window_s = r.freeze_window_ms.map(|ms| ms as f64 / 1000.0);
            }
        } else {
            v.failures_total = v.failures_total.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::load(dir.path()).unwrap();
        let mut r = VmResult {
            vmid: "100".into(),
            status: "ok".into(),
            backup_id: Some("vm/100/x".into()),
            duration_s: 2.5,
            bytes_read: 10,
            bytes_stored: 5,
            consistency: None,
            freeze_window_ms: Some(120),
            pruned: 0,
            error: None,
            warnings: Vec::new(),
        };
        s.record_vm(&r, Path::new("/r"), 1000);
        r.status = "failed".into();
        r.error = Some("boom".into());
        s.record_vm(&r, Path::new("/r"), 2000);
        s.save(dir.path()).unwrap();
        let l = State::load(dir.path()).unwrap();
        assert_eq!(l, s);
        let v = &l.vms["100"];
        assert_eq!(v.last_success, Some(1000));
        assert_eq!(v.failures_total, 1);
        assert_eq!(v.bytes_read_total, 20);
        assert_eq!(v.freeze_window_s, Some(0.12));
        std::fs::write(state_path(dir.path()), b"{").unwrap();
        State::load(dir.path()).unwrap_err();
    }
}

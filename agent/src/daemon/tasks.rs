//! Runs of jobs as tasks: an id, a status and a log file, in
//! `state_dir/tasks/<id>.json` and `<id>.log`, kept for the configured
//! retention. A task left `running` by a daemon that died is marked
//! `aborted` at the next start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::events::VmResult;
use crate::fsutil::{write_atomic, Existing};
use crate::job::events::{JobEvent, JobObserver};

/// One task's status (the API's task object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Id: `<UTC time>-<job>-<random>`.
    pub id: String,
    /// Job id.
    pub job: String,
    /// `backup`, `verify`, `gc`.
    pub kind: String,
    /// `schedule`, `missed`, `api`.
    pub trigger: String,
    /// `running`, `ok`, `failed`, `cancelled`, `aborted`.
    pub status: String,
    /// Start (RFC 3339 UTC).
    pub started: String,
    /// End.
    #[serde(default)]
    pub ended: Option<String>,
    /// Per VM (backup jobs).
    #[serde(default)]
    pub vms: Vec<VmResult>,
    /// One line on the outcome.
    #[serde(default)]
    pub summary: Option<String>,
}

/// Largest task file read back.
const MAX_TASK_BYTES: u64 = 4 << 20;

/// The task registry.
#[derive(Debug)]
pub struct Tasks {
    dir: PathBuf,
    map: Mutex<BTreeMap<String, TaskInfo>>,
}

fn now_utc() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

/// Whether `id` can name a task file (no path tricks).
pub fn valid_task_id(id: &str) -> bool {
    crate::repo::names::validate_name("task id", id).is_ok() || {
        // Ids are longer than VM names: same rule, longer limit.
        let b = id.as_bytes();
        !b.is_empty()
            && b.len() <= 160
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
            && !id.contains("..")
    }
}

impl Tasks {
    /// Open (create) `dir` and load every task in it.
    pub fn open(dir: &Path) -> anyhow::Result<Tasks> {
        use std::io::Read;
        super::private_dir(dir)?;
        let mut map = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if !valid_task_id(id) || crate::fsutil::is_temp_name(&name) {
                continue;
            }
            let mut text = String::new();
            let read = std::fs::File::open(e.path())
                .and_then(|f| f.take(MAX_TASK_BYTES).read_to_string(&mut text));
            match read.map(|_| serde_json::from_str::<TaskInfo>(&text)) {
                Ok(Ok(mut t)) => {
                    if t.status == "running" {
                        t.status = "aborted".into();
                        t.summary = Some("the daemon stopped while this task ran".into());
                        t.ended = Some(now_utc());
                        let _ = save(dir, &t);
                    }
                    map.insert(t.id.clone(), t);
                }
                _ => tracing::warn!("ignoring unreadable task file {}", e.path().display()),
            }
        }
        Ok(Tasks {
            dir: dir.to_owned(),
            map: Mutex::new(map),
        })
    }

    /// A new running task for `job`.
    pub fn create(
        &self,
        job: &str,
        kind: &str,
        trigger: &str,
    ) -> anyhow::Result<(TaskInfo, TaskLog)> {
        use rand::RngCore;
        let ts = jiff::Timestamp::now()
            .strftime("%Y%m%dT%H%M%SZ")
            .to_string();
        let mut r = [0u8; 3];
        rand::rng().fill_bytes(&mut r);
        let id = format!("{ts}-{job}-{}", hex::encode(r));
        let t = TaskInfo {
            id: id.clone(),
            job: job.to_owned(),
            kind: kind.to_owned(),
            trigger: trigger.to_owned(),
            status: "running".into(),
            started: now_utc(),
            ended: None,
            vms: Vec::new(),
            summary: None,
        };
        let log = TaskLog::create(&self.dir.join(format!("{id}.log")))?;
        self.update(&t)?;
        Ok((t, log))
    }

    /// Store a task's new status (file first, then memory).
    pub fn update(&self, t: &TaskInfo) -> anyhow::Result<()> {
        save(&self.dir, t)?;
        if let Ok(mut m) = self.map.lock() {
            m.insert(t.id.clone(), t.clone());
        }
        Ok(())
    }

    /// Finish a task.
    pub fn finish(&self, t: &mut TaskInfo, status: &str, summary: String) -> anyhow::Result<()> {
        t.status = status.to_owned();
        t.summary = Some(summary);
        t.ended = Some(now_utc());
        self.update(t)
    }

    /// Every task, newest first.
    pub fn list(&self) -> Vec<TaskInfo> {
        let mut v: Vec<TaskInfo> = self
            .map
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| b.started.cmp(&a.started).then(b.id.cmp(&a.id)));
        v
    }

    /// One task.
    pub fn get(&self, id: &str) -> Option<TaskInfo> {
        self.map.lock().ok()?.get(id).cloned()
    }

    /// The log file of a known task.
    pub fn log_path(&self, id: &str) -> Option<PathBuf> {
        let known = self.map.lock().ok()?.contains_key(id);
        (known && valid_task_id(id)).then(|| self.dir.join(format!("{id}.log")))
    }

    /// Remove finished tasks that ended more than `retention` ago.
    pub fn expire(&self, retention: Duration) -> usize {
        let cutoff = jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(
                i64::try_from(retention.as_secs()).unwrap_or(i64::MAX / 2),
            ))
            .unwrap_or(jiff::Timestamp::MIN);
        let Ok(mut m) = self.map.lock() else { return 0 };
        let old: Vec<String> = m
            .values()
            .filter(|t| t.status != "running")
            .filter(|t| {
                t.ended
                    .as_deref()
                    .and_then(|e| e.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|e| e < cutoff)
            })
            .map(|t| t.id.clone())
            .collect();
        for id in &old {
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.log")));
            m.remove(id);
        }
        old.len()
    }
}

fn save(dir: &Path, t: &TaskInfo) -> anyhow::Result<()> {
    let data = serde_json::to_vec_pretty(t)?;
    write_atomic(
        &dir.join(format!("{}.json", t.id)),
        &data,
        Existing::Replace,
    )?;
    Ok(())
}

/// A task's log file: time-stamped lines.
#[derive(Debug, Clone)]
pub struct TaskLog(Arc<Mutex<std::fs::File>>);

impl TaskLog {
    fn create(path: &Path) -> anyhow::Result<TaskLog> {
        let f = crate::fsutil::create_private(path)
            .map_err(|e| anyhow::anyhow!("cannot create task log {}: {e}", path.display()))?;
        Ok(TaskLog(Arc::new(Mutex::new(f))))
    }

    /// Append one line (and log it at info).
    pub fn line(&self, msg: &str) {
        tracing::info!("{msg}");
        if let Ok(mut f) = self.0.lock() {
            let _ = writeln!(f, "{} {msg}", now_utc());
        }
    }
}

/// A job observer writing phases and warnings into a task log.
#[derive(Debug)]
pub struct TaskObserver(pub TaskLog);

impl JobObserver for TaskObserver {
    fn event(&self, event: &JobEvent<'_>) {
        match event {
            JobEvent::Phase { vmid, phase } => {
                self.0.line(&format!("VM {vmid}: {}", phase.as_str()));
            }
            JobEvent::Warning { vmid, message } => {
                self.0.line(&format!("VM {vmid}: warning: {message}"));
            }
            JobEvent::DiskStarted { disk, .. } => self.0.line(&format!("reading disk {disk}")),
            JobEvent::DiskFinished { disk } => self.0.line(&format!("disk {disk} done")),
            JobEvent::DiskProgress { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_persist_abort_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let tasks = Tasks::open(dir.path()).unwrap();
        let (mut a, log) = tasks.create("nightly", "backup", "schedule").unwrap();
        log.line("hello");
        let (b, _) = tasks.create("nightly", "backup", "api").unwrap();
        tasks.finish(&mut a, "ok", "1 VM".into()).unwrap();
        assert_eq!(tasks.list().len(), 2);
        let log_text = std::fs::read_to_string(tasks.log_path(&a.id).unwrap()).unwrap();
        assert!(log_text.contains("hello"));
        assert!(tasks.log_path("../state").is_none());
        assert!(!valid_task_id("../x"));
        // Reopened: the running one was aborted by a daemon that died.
        let again = Tasks::open(dir.path()).unwrap();
        assert_eq!(again.get(&b.id).unwrap().status, "aborted");
        assert_eq!(again.get(&a.id).unwrap().status, "ok");
        assert_eq!(again.expire(Duration::from_secs(3600)), 0);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(again.expire(Duration::ZERO), 2);
        assert!(again.list().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

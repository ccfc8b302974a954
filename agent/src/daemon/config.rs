//! The daemon's part of `shear.toml`: `[[job]]`, `[[verify]]`, `[[gc]]`,
//! `[[policy]]`, `[api]` and a few top-level keys (see docs/daemon.md).
//!
//! The raw TOML types live here and are fields of [`crate::config::Config`];
//! [`validate`] checks everything at load time (and on SIGHUP) and turns it
//! into a [`DaemonConfig`] the daemon runs from. A config that does not
//! validate is never run: at start the daemon exits, on reload the old
//! config stays.

pub use crate::units::parse_duration;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::schedule::Schedule;
use crate::config::Config;
use crate::job::backup::Mode;
use crate::repo::{KeepOptions, VmId};

/// Default state directory (tasks, last results, tokens).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/shear";
/// Default API socket.
pub const DEFAULT_API_SOCKET: &str = "/run/shear/api.sock";
/// Default task retention.
pub const DEFAULT_TASK_RETENTION: Duration = Duration::from_secs(30 * 86400);
/// Most VMs one job backs up in parallel.
pub const MAX_WORKERS: usize = 64;

/// A VM id written as a string or a bare integer (`vmids = [100, "101"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VmIdValue {
    /// `"100"`.
    Text(String),
    /// `100`.
    Number(u64),
}

impl VmIdValue {
    /// As a string.
    pub fn as_string(&self) -> String {
        match self {
            VmIdValue::Text(s) => s.clone(),
            VmIdValue::Number(n) => n.to_string(),
        }
    }
}

/// `[[job]]`: a scheduled backup job (vzdump's vocabulary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobToml {
    /// Job id.
    pub id: String,
    /// systemd calendar event, local time zone.
    pub schedule: String,
    /// VMs to back up (or `all = true`).
    #[serde(default)]
    pub vmids: Vec<VmIdValue>,
    /// Every VM known to the host.
    #[serde(default)]
    pub all: bool,
    /// With `all`: VMs left out.
    #[serde(default)]
    pub exclude: Vec<VmIdValue>,
    /// snapshot (default), suspend, stop.
    pub mode: Option<String>,
    /// Repository directory.
    pub repo: PathBuf,
    /// Prune after each run (no keep: no prune).
    pub keep: Option<KeepOptions>,
    /// Notification targets (`[[notify_target]]` names).
    #[serde(default)]
    pub notify: Vec<String>,
    /// Run once at start when a slot was missed while the daemon was down.
    #[serde(default)]
    pub repeat_missed: bool,
    /// VMs backed up in parallel (default 1).
    pub max_workers: Option<usize>,
    /// KiB/s read limit per VM (0: none).
    #[serde(default)]
    pub bwlimit: u64,
    /// vzdump-compatible hook script.
    pub script: Option<PathBuf>,
    /// A disabled job runs only when asked (`shear job run`).
    pub enabled: Option<bool>,
    /// Back the job's VMs up as libvirt domains through this connection
    /// URI (e.g. `qemu:///system`): the VM ids are domain names.
    pub libvirt: Option<String>,
}

/// `[[verify]]`: re-read backups whose last verify is older than
/// `outdated_after` (or that were never verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyToml {
    /// Job id.
    pub id: String,
    /// Calendar event.
    pub schedule: String,
    /// Repository.
    pub repo: PathBuf,
    /// Re-verify after this long (`"30d"`; default: every run verifies all).
    pub outdated_after: Option<String>,
    /// Notification targets.
    #[serde(default)]
    pub notify: Vec<String>,
}

/// `[[gc]]`: garbage collection of a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcToml {
    /// Job id.
    pub id: String,
    /// Calendar event.
    pub schedule: String,
    /// Repository.
    pub repo: PathBuf,
    /// Notification targets.
    #[serde(default)]
    pub notify: Vec<String>,
}

/// `[[sync]]`: copy backups from one repository to another
/// (`shear sync`), e.g. to an off-site or S3 repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncToml {
    /// Job id.
    pub id: String,
    /// Calendar event.
    pub schedule: String,
    /// Source repository (absolute path or `s3://BUCKET/PREFIX`).
    pub from: PathBuf,
    /// Target repository (absolute path or `s3://BUCKET/PREFIX`).
    pub to: PathBuf,
    /// Only these VMs (default: all).
    #[serde(default)]
    pub vmids: Vec<VmIdValue>,
    /// Forget backups in the target that the source no longer has.
    #[serde(default)]
    pub remove_vanished: bool,
    /// Decode every copied chunk and check its digest.
    #[serde(default)]
    pub verify: bool,
    /// Chunks copied in parallel (default 4).
    pub streams: Option<usize>,
    /// Notification targets.
    #[serde(default)]
    pub notify: Vec<String>,
    /// Scheduled (false: only on request).
    pub enabled: Option<bool>,
}

/// What a sync job does (its target is [`Job::repo`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncJob {
    /// Source repository.
    pub from: PathBuf,
    /// Only these VMs (empty: all).
    pub vmids: Vec<String>,
    /// Forget vanished backups in the target.
    pub remove_vanished: bool,
    /// Check every copied chunk's digest.
    pub verify: bool,
    /// Parallel chunk copies.
    pub streams: usize,
}

/// `[[repo_key]]`: the key of an encrypted repository. The daemon has no
/// terminal, so the key file's passphrase comes from a file (mode 0600,
/// e.g. a systemd credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoKeyToml {
    /// The repository (as the jobs name it).
    pub repo: PathBuf,
    /// Its key file (`shear key create`).
    pub keyfile: PathBuf,
    /// A file holding the key file's passphrase (one line).
    pub passphrase_file: PathBuf,
}

/// `[[policy]]`: a recovery point objective for some VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyToml {
    /// VMs the policy covers.
    pub vmids: Vec<VmIdValue>,
    /// Longest acceptable age of the newest good backup (`"24h"`).
    pub rpo: String,
}

/// `[api]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiToml {
    /// Unix socket (default /run/shear/api.sock), mode 0600.
    pub socket: Option<PathBuf>,
    /// TCP addresses (`"127.0.0.1:8007"`); API tokens required.
    pub listen: Vec<String>,
}

/// Which kind of work a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// `[[job]]`.
    Backup,
    /// `[[verify]]`.
    Verify,
    /// `[[gc]]`.
    Gc,
    /// `[[sync]]`.
    Sync,
}

impl JobKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Verify => "verify",
            JobKind::Gc => "gc",
            JobKind::Sync => "sync",
        }
    }
}

/// Which VMs a backup job covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// These.
    List(Vec<String>),
    /// Every VM known to the host, minus these.
    All {
        /// Left out.
        exclude: Vec<String>,
    },
}

/// A validated job of any kind.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Id (unique across kinds).
    pub id: String,
    /// Kind.
    pub kind: JobKind,
    /// When it runs.
    #[serde(serialize_with = "ser_schedule")]
    pub schedule: Schedule,
    /// Repository.
    pub repo: PathBuf,
    /// Notification targets.
    pub notify: Vec<String>,
    /// Run once at start after a missed slot.
    pub repeat_missed: bool,
    /// Scheduled (false: only on request).
    pub enabled: bool,
    /// Backup jobs: what they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupJob>,
    /// Verify jobs: re-verify after this long (None: always).
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_secs")]
    pub outdated_after: Option<Duration>,
    /// Sync jobs: what they copy (to [`Job::repo`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncJob>,
}

fn ser_schedule<S: serde::Serializer>(s: &Schedule, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str())
}

mod opt_secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_secs()),
            None => s.serialize_none(),
        }
    }
}

/// What a backup job does.
#[derive(Debug, Clone, Serialize)]
pub struct BackupJob {
    /// Which VMs.
    pub vms: Selection,
    /// Mode.
    pub mode: Mode,
    /// Retention applied after each run (None: no prune).
    pub keep: Option<KeepOptions>,
    /// VMs in parallel.
    pub max_workers: usize,
    /// KiB/s.
    pub bwlimit: u64,
    /// vzdump hook script: job phases around the run, VM phases around
    /// each VM (backup-start refuses a VM), stop-mode phases in the job.
    pub script: Option<PathBuf>,
    /// libvirt connection URI: the VMs are libvirt domains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<String>,
}

/// A validated RPO policy.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// VMs.
    pub vmids: Vec<String>,
    /// Seconds.
    #[serde(rename = "rpo_seconds", serialize_with = "ser_secs")]
    pub rpo: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// The validated daemon configuration, with the base config it came from.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The whole file (socket templates, run dir, fleecing…).
    pub base: Arc<Config>,
    /// State directory.
    pub state_dir: PathBuf,
    /// How long a running backup may go on after SIGTERM before it is
    /// cancelled (0: cancelled at once).
    pub shutdown_grace: Duration,
    /// How long finished tasks (status and log) are kept.
    pub task_retention: Duration,
    /// Free space below this percentage of a repository's filesystem
    /// raises a space-low event.
    pub space_low_percent: u8,
    /// Jobs of every kind, in file order.
    pub jobs: Vec<Job>,
    /// RPO policies.
    pub policies: Vec<Policy>,
    /// API socket.
    pub api_socket: PathBuf,
    /// API TCP listeners.
    pub api_listen: Vec<SocketAddr>,
    /// Keys of encrypted repositories, by repository path.
    pub repo_keys: Vec<RepoKeyToml>,
}

impl DaemonConfig {
    /// Open a repository the jobs name, with its `[[repo_key]]` if it has
    /// one (the passphrase file is read at each open: a rotated one is
    /// used without a reload).
    pub fn open_repo(&self, path: &std::path::Path) -> Result<crate::repo::Repository, String> {
        let key = self.key_for(path)?;
        crate::repo::Repository::open(path, key)
            .map_err(|e| format!("repository {}: {}", path.display(), crate::chain(&e)))
    }

    /// The key of a repository from its `[[repo_key]]` (None: none set).
    pub fn key_for(&self, path: &std::path::Path) -> Result<Option<crate::repo::Key>, String> {
        Ok(match self.repo_keys.iter().find(|k| k.repo == path) {
            None => None,
            Some(k) => {
                let pw = std::fs::read(&k.passphrase_file).map_err(|e| {
                    format!(
                        "repository {}: cannot read the passphrase file {}: {e}",
                        path.display(),
                        k.passphrase_file.display()
                    )
                })?;
                let pw = pw.strip_suffix(b"\n").unwrap_or(&pw);
                let pw = pw.strip_suffix(b"\r").unwrap_or(pw);
                Some(crate::repo::Key::load_file(&k.keyfile, pw).map_err(|e| {
                    format!(
                        "repository {}: key file {}: {}",
                        path.display(),
                        k.keyfile.display(),
                        crate::chain(&e)
                    )
                })?)
            }
        })
    }

    /// The job with this id.
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    /// The RPO of a VM (the strictest policy naming it).
    pub fn rpo_of(&self, vmid: &str) -> Option<Duration> {
        self.policies
            .iter()
            .filter(|p| p.vmids.iter().any(|v| v == vmid))
            .map(|p| p.rpo)
            .min()
    }

    /// Every repository the config names, sorted, no duplicates.
    pub fn repos(&self) -> Vec<PathBuf> {
        let set: BTreeSet<PathBuf> = self.jobs.iter().map(|j| j.repo.clone()).collect();
        set.into_iter().collect()
    }
}

/// Every problem of a config, each naming where it is.
#[derive(Debug, thiserror::Error)]
#[error("invalid daemon config: {}", .0.join("; "))]
pub struct ValidationError(pub Vec<String>);

/// Check everything the daemon will run from `base`.
pub fn validate(base: Config) -> Result<DaemonConfig, ValidationError> {
    let mut errs: Vec<String> = Vec::new();
    let mut ids: BTreeSet<String> = BTreeSet::new();
    let mut jobs = Vec::new();

    let mut check_id = |what: &str, id: &str, errs: &mut Vec<String>| {
        if let Err(e) = crate::repo::names::validate_name("job id", id) {
            errs.push(format!("{what} {id:?}: {e}"));
        } else if !ids.insert(id.to_owned()) {
            errs.push(format!(
                "{what} {id:?}: the id is used twice (ids are unique across [[job]], [[verify]], [[gc]] and [[sync]])"
            ));
        }
    };
    let schedule =
        |what: &str, id: &str, s: &str, errs: &mut Vec<String>| match s.parse::<Schedule>() {
            Ok(s) => Some(s),
            Err(e) => {
                errs.push(format!("{what} {id:?}: schedule {s:?}: {e}"));
                None
            }
        };
    let repo_ok = |what: &str, id: &str, p: &std::path::Path, errs: &mut Vec<String>| {
        if !p.is_absolute() {
            errs.push(format!(
                "{what} {id:?}: repo {} must be an absolute path",
                p.display()
            ));
        }
    };
    let vmid_list = |what: &str, id: &str, key: &str, v: &[VmIdValue], errs: &mut Vec<String>| {
        let mut out = Vec::new();
        for x in v {
            let s = x.as_string();
            match VmId::new(&s) {
                Ok(_) if out.contains(&s) => {
                    errs.push(format!("{what} {id:?}: {key} names VM {s} twice"));
                }
                Ok(_) => out.push(s),
                Err(e) => errs.push(format!("{what} {id:?}: {key}: {e}")),
            }
        }
        out
    };

    for j in &base.jobs {
        let what = "[[job]]";
        check_id(what, &j.id, &mut errs);
        let sched = schedule(what, &j.id, &j.schedule, &mut errs);
        repo_ok(what, &j.id, &j.repo, &mut errs);
        let vmids = vmid_list(what, &j.id, "vmids", &j.vmids, &mut errs);
        let exclude = vmid_list(what, &j.id, "exclude", &j.exclude, &mut errs);
        let vms = match (j.all, vmids.is_empty()) {
            (true, true) => Selection::All { exclude },
            (true, false) => {
                errs.push(format!(
                    "{what} {:?}: give either vmids or all = true, not both",
                    j.id
                ));
                Selection::List(vmids)
            }
            (false, true) => {
                errs.push(format!(
                    "{what} {:?}: no VMs: give vmids = [\"100\", …] or all = true",
                    j.id
                ));
                Selection::List(vmids)
            }
            (false, false) => {
                if !exclude.is_empty() {
                    errs.push(format!(
                        "{what} {:?}: exclude is only meaningful with all = true",
                        j.id
                    ));
                }
                Selection::List(vmids)
            }
        };
        let mode = match j.mode.as_deref().unwrap_or("snapshot") {
            "snapshot" => Mode::Snapshot,
            "suspend" => Mode::Suspend,
            "stop" => Mode::Stop,
            m => {
                errs.push(format!(
                    "{what} {:?}: mode {m:?}: use snapshot, suspend or stop",
                    j.id
                ));
                Mode::Snapshot
            }
        };
        let keep = j.keep;
        if let Some(k) = &keep {
            if !k.keeps_something() {
                errs.push(format!(
                    "{what} {:?}: keep would keep nothing (give at least one count > 0, or leave keep out for no prune)",
                    j.id
                ));
            }
        }
        let max_workers = j.max_workers.unwrap_or(1);
        if !(1..=MAX_WORKERS).contains(&max_workers) {
            errs.push(format!(
                "{what} {:?}: max_workers {max_workers} must be 1..={MAX_WORKERS}",
                j.id
            ));
        }
        if j.libvirt.as_deref().is_some_and(|u| u.trim().is_empty()) {
            errs.push(format!(
                "{what} {:?}: libvirt must be a connection URI (e.g. \"qemu:///system\")",
                j.id
            ));
        }
        if let Some(s) = &j.script {
            if !s.is_absolute() {
                errs.push(format!(
                    "{what} {:?}: script {} must be an absolute path",
                    j.id,
                    s.display()
                ));
            }
        }
        check_notify(&base.notify_target, what, &j.id, &j.notify, &mut errs);
        if let Some(schedule) = sched {
            jobs.push(Job {
                id: j.id.clone(),
                kind: JobKind::Backup,
                schedule,
                repo: j.repo.clone(),
                notify: j.notify.clone(),
                repeat_missed: j.repeat_missed,
                enabled: j.enabled.unwrap_or(true),
                backup: Some(BackupJob {
                    vms,
                    mode,
                    keep,
                    max_workers,
                    bwlimit: j.bwlimit,
                    script: j.script.clone(),
                    libvirt: j.libvirt.clone(),
                }),
                outdated_after: None,
                sync: None,
            });
        }
    }
    for v in &base.verify {
        let what = "[[verify]]";
        check_id(what, &v.id, &mut errs);
        let sched = schedule(what, &v.id, &v.schedule, &mut errs);
        repo_ok(what, &v.id, &v.repo, &mut errs);
        check_notify(&base.notify_target, what, &v.id, &v.notify, &mut errs);
        let outdated_after = match v.outdated_after.as_deref().map(parse_duration) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                errs.push(format!("{what} {:?}: outdated_after: {e}", v.id));
                None
            }
        };
        if let Some(schedule) = sched {
            jobs.push(Job {
                id: v.id.clone(),
                kind: JobKind::Verify,
                schedule,
                repo: v.repo.clone(),
                notify: v.notify.clone(),
                repeat_missed: false,
                enabled: true,
                backup: None,
                outdated_after,
                sync: None,
            });
        }
    }
    for g in &base.gc {
        let what = "[[gc]]";
        check_id(what, &g.id, &mut errs);
        let sched = schedule(what, &g.id, &g.schedule, &mut errs);
        repo_ok(what, &g.id, &g.repo, &mut errs);
        check_notify(&base.notify_target, what, &g.id, &g.notify, &mut errs);
        if let Some(schedule) = sched {
            jobs.push(Job {
                id: g.id.clone(),
                kind: JobKind::Gc,
                schedule,
                repo: g.repo.clone(),
                notify: g.notify.clone(),
                repeat_missed: false,
                enabled: true,
                backup: None,
                outdated_after: None,
                sync: None,
            });
        }
    }
    for y in &base.sync {
        let what = "[[sync]]";
        check_id(what, &y.id, &mut errs);
        let sched = schedule(what, &y.id, &y.schedule, &mut errs);
        for (key, p) in [("from", &y.from), ("to", &y.to)] {
            let url = p
                .to_str()
                .and_then(crate::repo::s3::url_scheme)
                .is_some_and(|s| s == "s3");
            if !url && !p.is_absolute() {
                errs.push(format!(
                    "{what} {:?}: {key} {} must be an absolute path or s3://BUCKET/PREFIX",
                    y.id,
                    p.display()
                ));
            }
        }
        if y.from == y.to {
            errs.push(format!("{what} {:?}: from and to are the same", y.id));
        }
        let vmids = vmid_list(what, &y.id, "vmids", &y.vmids, &mut errs);
        check_notify(&base.notify_target, what, &y.id, &y.notify, &mut errs);
        if let Some(schedule) = sched {
            jobs.push(Job {
                id: y.id.clone(),
                kind: JobKind::Sync,
                schedule,
                repo: y.to.clone(),
                notify: y.notify.clone(),
                repeat_missed: false,
                enabled: y.enabled.unwrap_or(true),
                backup: None,
                outdated_after: None,
                sync: Some(SyncJob {
                    from: y.from.clone(),
                    vmids,
                    remove_vanished: y.remove_vanished,
                    verify: y.verify,
                    streams: y.streams.unwrap_or(4).clamp(1, 64),
                }),
            });
        }
    }
    let mut policies = Vec::new();
    for (i, p) in base.policy.iter().enumerate() {
        let what = format!("[[policy]] #{}", i + 1);
        let vmids = vmid_list(&what, "", "vmids", &p.vmids, &mut errs);
        if vmids.is_empty() {
            errs.push(format!("{what}: vmids is empty"));
        }
        match parse_duration(&p.rpo) {
            Ok(d) if d.is_zero() => errs.push(format!("{what}: rpo must be > 0")),
            Ok(rpo) => policies.push(Policy { vmids, rpo }),
            Err(e) => errs.push(format!("{what}: rpo: {e}")),
        }
    }
    let state_dir = base
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if !state_dir.is_absolute() {
        errs.push(format!(
            "state_dir {} must be an absolute path",
            state_dir.display()
        ));
    }
    let dur = |key: &str, v: &Option<String>, default: Duration, errs: &mut Vec<String>| match v
        .as_deref()
        .map(parse_duration)
    {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            errs.push(format!("{key}: {e}"));
            default
        }
    };
    let shutdown_grace = dur(
        "shutdown_grace",
        &base.shutdown_grace,
        Duration::ZERO,
        &mut errs,
    );
    let task_retention = dur(
        "task_retention",
        &base.task_retention,
        DEFAULT_TASK_RETENTION,
        &mut errs,
    );
    let space_low_percent = base.space_low_percent.unwrap_or(10);
    if space_low_percent > 100 {
        errs.push(format!(
            "space_low_percent {space_low_percent} must be 0..=100"
        ));
    }
    let api_socket = base
        .api
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET));
    if !api_socket.is_absolute() {
        errs.push(format!(
            "[api] socket {} must be an absolute path",
            api_socket.display()
        ));
    }
    let mut api_listen = Vec::new();
    for l in &base.api.listen {
        match l.parse::<SocketAddr>() {
            Ok(a) => api_listen.push(a),
            Err(e) => errs.push(format!(
                "[api] listen {l:?}: {e} (use ADDRESS:PORT, e.g. 127.0.0.1:8007)"
            )),
        }
    }
    if !errs.is_empty() {
        return Err(ValidationError(errs));
    }
    let mut repo_keys: Vec<RepoKeyToml> = Vec::new();
    for k in &base.repo_key {
        let what = format!("[[repo_key]] {}", k.repo.display());
        for (name, p) in [
            ("repo", &k.repo),
            ("keyfile", &k.keyfile),
            ("passphrase_file", &k.passphrase_file),
        ] {
            if !p.is_absolute() {
                errs.push(format!(
                    "{what}: {name} {} must be an absolute path",
                    p.display()
                ));
            } else if name != "repo" && !p.is_file() {
                errs.push(format!(
                    "{what}: {name} {} is not a readable file",
                    p.display()
                ));
            }
        }
        if repo_keys.iter().any(|o| o.repo == k.repo) {
            errs.push(format!("{what}: a second key for the same repository"));
        }
        repo_keys.push(k.clone());
    }
    Ok(DaemonConfig {
        base: Arc::new(base),
        state_dir,
        shutdown_grace,
        task_retention,
        space_low_percent,
        jobs,
        policies,
        api_socket,
        api_listen,
        repo_keys,
    })
}

fn check_notify(
    targets: &[crate::notify::TargetConfig],
    what: &str,
    id: &str,
    notify: &[String],
    errs: &mut Vec<String>,
) {
    if let Err(e) = crate::notify::select(targets, notify) {
        errs.push(format!("{what} {id:?}: {e}"));
    }
    for n in notify {
        if n.trim().is_empty() {
            errs.push(format!("{what} {id:?}: notify names an empty target"));
        }
    }
}

/// Load and validate a config file (a missing file is an error here: a
/// daemon without jobs is a mistake worth saying).
pub fn load(path: &std::path::Path) -> anyhow::Result<DaemonConfig> {
    if !path.exists() {
        anyhow::bail!("config file {} does not exist", path.display());
    }
    let base = Config::load_from(path)?;
    Ok(validate(base)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DaemonConfig, ValidationError> {
        let base: Config = toml::from_str(text).expect("toml");
        validate(base)
    }

    #[test]
    fn full_example_validates() {
        let c = parse(
            r#"
state_dir = "/var/lib/shear"
shutdown_grace = "5m"
[[notify_target]]
name = "ops"
type = "webhook"
url = "http://127.0.0.1:9000/shear"
[[job]]
id = "nightly"
schedule = "daily"
vmids = ["100", 101]
repo = "/var/lib/shear/repo"
keep = { last = 3, daily = 7 }
notify = ["ops"]
repeat_missed = true
max_workers = 2
bwlimit = 1024
[[job]]
id = "all"
schedule = "hourly"
all = true
exclude = [105]
repo = "/r"
[[verify]]
id = "v"
schedule = "daily"
repo = "/r"
outdated_after = "30d"
[[gc]]
id = "g"
schedule = "daily"
repo = "/r"
[[policy]]
vmids = ["100"]
rpo = "24h"
[api]
listen = ["127.0.0.1:8007"]
"#,
        )
        .unwrap();
        assert_eq!(c.jobs.len(), 4);
        assert_eq!(c.shutdown_grace, Duration::from_secs(300));
        let b = c.job("nightly").unwrap().backup.as_ref().unwrap();
        assert_eq!(b.vms, Selection::List(vec!["100".into(), "101".into()]));
        assert_eq!(b.max_workers, 2);
        assert_eq!(c.rpo_of("100"), Some(Duration::from_secs(86400)));
        assert_eq!(c.rpo_of("101"), None);
        assert_eq!(
            c.job("v").unwrap().outdated_after,
            Some(Duration::from_secs(30 * 86400))
        );
        assert_eq!(c.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
        assert_eq!(
            c.repos(),
            vec![PathBuf::from("/r"), "/var/lib/shear/repo".into()]
        );
    }

    #[test]
    fn every_mistake_is_named() {
        let e = parse(
            r#"
shutdown_grace = "5 minutes"
[[job]]
id = "a"
schedule = "whenever"
vmids = ["../x"]
repo = "relative"
mode = "fast"
keep = { last = 0 }
max_workers = 0
[[job]]
id = "a"
schedule = "daily"
repo = "/r"
[[policy]]
vmids = []
rpo = "1y"
[api]
listen = ["localhost"]
"#,
        )
        .unwrap_err();
        let all = e.to_string();
        for want in [
            "schedule \"whenever\"",
            "vmids",
            "must be an absolute path",
            "mode \"fast\"",
            "keep would keep nothing",
            "max_workers 0",
            "used twice",
            "no VMs",
            "vmids is empty",
            "rpo",
            "shutdown_grace",
            "[api] listen \"localhost\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in: {all}");
        }
    }

    #[test]
    fn a_job_can_back_up_libvirt_domains() {
        let c = parse(
            r#"
[[job]]
id = "lv"
schedule = "daily"
vmids = ["web", "db"]
repo = "/r"
mode = "suspend"
libvirt = "qemu:///system"
[[job]]
id = "qmp"
schedule = "daily"
vmids = ["100"]
repo = "/r"
"#,
        )
        .unwrap();
        let b = c.jobs[0].backup.as_ref().unwrap();
        assert_eq!(b.libvirt.as_deref(), Some("qemu:///system"));
        assert_eq!(b.mode, Mode::Suspend);
        assert_eq!(c.jobs[1].backup.as_ref().unwrap().libvirt, None);
        assert!(parse("[[job]]\nid = \"x\"\nschedule = \"daily\"\nvmids = [\"a\"]\nrepo = \"/r\"\nlibvirt = \"\"\n")
            .unwrap_err()
            .to_string()
            .contains("libvirt"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let r: Result<Config, _> = toml::from_str("[[job]]\nid = \"a\"\nshedule = \"daily\"\n");
        r.unwrap_err();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86400)
        );
        parse_duration("1y").unwrap_err();
        parse_duration("").unwrap_err();
    }
}

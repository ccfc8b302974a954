//! `shear daemon`: runs backup, verify and gc jobs on their schedules,
//! keeps tasks and per-VM results, serves the HTTP API and metrics.
//!
//! - SIGHUP reloads the config; a config that does not validate is refused
//!   with a log message and the old one stays in force.
//! - SIGTERM/SIGINT stop the daemon: no new run starts, running backups get
//!   `shutdown_grace` to finish, then they are cancelled (the guest is
//!   released, the graph restored, nothing recorded), then it exits.
//!
//! See docs/daemon.md (config) and docs/api.md (HTTP API).

pub mod api;
pub mod client;
pub mod config;
pub mod events;
pub mod metrics;
pub mod notify_sink;
pub mod report;
pub mod repos;
pub mod run;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod tasks;
pub mod tokens;
pub mod vms;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use jiff::Zoned;

use self::config::DaemonConfig;
use self::events::{Event, Events, FileSink, LogSink};
use self::scheduler::{Scheduler, Trigger};
use self::state::State;
use self::tasks::{TaskInfo, Tasks};
use crate::job::backup::Cancel;

/// Create a private (0700) directory and its parents.
pub fn private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

/// A run in progress.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its task id.
    pub task: String,
    /// Cancels it.
    pub cancel: Cancel,
}

/// Why a run could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No job with that id.
    #[error("no job {0:?}")]
    NoSuchJob(String),
    /// It runs already.
    #[error("job {job:?} is already running (task {task})")]
    AlreadyRunning {
        /// Job.
        job: String,
        /// Its task.
        task: String,
    },
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The task could not be created.
    #[error("cannot create the task: {0}")]
    Task(String),
}

/// Everything the daemon's parts share.
#[derive(Debug)]
pub struct Shared {
    config: RwLock<Arc<DaemonConfig>>,
    /// The config file (reloaded on SIGHUP).
    pub config_path: PathBuf,
    /// Tasks.
    pub tasks: Tasks,
    state: Mutex<State>,
    /// Event sinks.
    pub events: Events,
    /// The notification sink (its targets follow config reloads).
    notifier: Arc<notify_sink::NotifySink>,
    running: Mutex<BTreeMap<String, Running>>,
    scheduler: Mutex<Scheduler>,
    shutting_down: AtomicBool,
    repos: Mutex<BTreeMap<PathBuf, repos::RepoStatus>>,
    breached: Mutex<BTreeSet<String>>,
    /// VMs with snapshots past the age limit, already notified.
    snapshots_old: Mutex<BTreeSet<String>>,
    /// Wakes the main loop (a run ended, config changed).
    pub wake: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// The config in force.
    pub fn config(&self) -> Arc<DaemonConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The persisted state (locked).
    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs in progress, by job id.
    pub fn running(&self) -> BTreeMap<String, Running> {
        lock(&self.running).clone()
    }

    /// The next slot of a job.
    pub fn next_of(&self, job: &str) -> Option<Zoned> {
        lock(&self.scheduler).next_of(job).cloned()
    }

    /// Cached repository status.
    pub fn repo_status(&self) -> BTreeMap<PathBuf, repos::RepoStatus> {
        lock(&self.repos).clone()
    }

    /// Whether the daemon is stopping.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Start a run of `job` now (a scheduled slot, a missed slot, or a
    /// request), optionally for some of its VMs only.
    pub fn start_job(
        self: &Arc<Self>,
        job_id: &str,
        trigger: Trigger,
        slot: Option<&Zoned>,
        only: Option<Vec<String>>,
    ) -> Result<TaskInfo, StartError> {
        if self.is_shutting_down() {
            return Err(StartError::ShuttingDown);
        }
        let cfg = self.config();
        let job = cfg
            .job(job_id)
            .cloned()
            .ok_or_else(|| StartError::NoSuchJob(job_id.to_owned()))?;
        let cancel = Cancel::default();
        let (task, log) = {
            let mut running = lock(&self.running);
            if let Some(r) = running.get(job_id) {
                return Err(StartError::AlreadyRunning {
                    job: job_id.to_owned(),
                    task: r.task.clone(),
                });
            }
            let (task, log) = self
                .tasks
                .create(job_id, job.kind.as_str(), trigger.as_str())
                .map_err(|e| StartError::Task(format!("{e:#}")))?;
            running.insert(
                job_id.to_owned(),
                Running {
                    task: task.id.clone(),
                    cancel: cancel.clone(),
                },
            );
            (task, log)
        };
        {
            let mut st = self.lock_state();
            let js = st.jobs.entry(job_id.to_owned()).or_default();
            let now = Zoned::now();
            // What the next start's missed-slot check counts from: the
            // slot that fired; a catch-up run covers every slot up to now;
            // a run on request covers none.
            match trigger {
                Trigger::Schedule => js.last_slot = Some(slot.unwrap_or(&now).to_string()),
                Trigger::Missed => js.last_slot = Some(now.to_string()),
                Trigger::Api => {}
            }
            js.last_start = Some(now.timestamp().as_second());
            js.last_task = Some(task.id.clone());
            js.last_status = Some("running".into());
            let snap = st.clone();
            drop(st);
            if let Err(e) = snap.save(&cfg.state_dir) {
                tracing::error!("cannot save the daemon state: {e:#}");
            }
        }
        tracing::info!(job = job_id, task = %task.id, trigger = trigger.as_str(), "job starts");
        let me = self.clone();
        let t = task.clone();
        let id = job_id.to_owned();
        tokio::spawn(async move {
            let task_id = t.id.clone();
            let inner = tokio::spawn(run::run(me.clone(), cfg, job, only, cancel, t, log));
            if let Err(e) = inner.await {
                tracing::error!(job = id, "job run panicked: {e}");
            }
            me.release_job(&id, &task_id);
            me.wake.notify_one();
        });
        Ok(task)
    }

    /// Mark the run `task` of `job` as ended (a no-op when it is not the
    /// one registered).
    pub fn release_job(&self, job: &str, task: &str) {
        let mut r = lock(&self.running);
        if r.get(job).is_some_and(|x| x.task == task) {
            r.remove(job);
        }
    }

    /// Refresh the cached status of every repository (blocking work on a
    /// worker thread).
    pub async fn refresh_repos(&self, cfg: &DaemonConfig) {
        let paths = cfg.repos();
        let r = tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .map(|p| {
                    let s = repos::RepoStatus::read(&p);
                    (p, s)
                })
                .collect::<BTreeMap<_, _>>()
        })
        .await;
        if let Ok(m) = r {
            *lock(&self.repos) = m;
        }
    }

    /// The newest good backup time (unix s) of a VM: the daemon's own
    /// record or what the repositories hold, whichever is newer.
    pub fn newest_good(&self, vmid: &str) -> Option<i64> {
        let own = self.lock_state().vms.get(vmid).and_then(|v| v.last_success);
        let repo = lock(&self.repos)
            .values()
            .filter_map(|r| r.newest_good.get(vmid).copied())
            .max();
        own.max(repo)
    }

    /// Emit an RPO-missed event for each VM newly over its RPO.
    fn check_rpo(&self) {
        let cfg = self.config();
        let now = jiff::Timestamp::now().as_second();
        let mut breached = lock(&self.breached);
        for p in &cfg.policies {
            for vmid in &p.vmids {
                let age = self.newest_good(vmid).map(|t| now.saturating_sub(t).max(0));
                let rpo = i64::try_from(p.rpo.as_secs()).unwrap_or(i64::MAX);
                let over = age.is_none_or(|a| a > rpo);
                if over && breached.insert(vmid.clone()) {
                    let notify = notify_for_vm(&cfg, vmid);
                    self.events.emit(
                        &Event::RpoMissed {
                            vmid: vmid.clone(),
                            age_s: age.and_then(|a| u64::try_from(a).ok()),
                            rpo_s: p.rpo.as_secs(),
                        },
                        &notify,
                    );
                } else if !over {
                    breached.remove(vmid);
                }
            }
        }
    }

    /// Emit a snapshot-old event for each VM newly holding snapshots made
    /// by `shear snapshot` past `snapshot_max_age` (from the snapshot
    /// records, as the metrics do).
    fn check_snapshots(&self) {
        let cfg = self.config();
        let limit = cfg
            .base
            .snapshot_max_age
            .as_deref()
            .and_then(|s| crate::units::parse_duration(s).ok())
            .unwrap_or(crate::snapshot::ops::DEFAULT_MAX_AGE);
        let limit_s = i64::try_from(limit.as_secs()).unwrap_or(i64::MAX);
        let now = jiff::Timestamp::now().as_second();
        let over: BTreeMap<String, (usize, i64)> =
            crate::snapshot::ops::recorded_created(&cfg.state_dir)
                .into_iter()
                .filter_map(|(vmid, created)| {
                    let ages: Vec<i64> = created
                        .iter()
                        .map(|c| now.saturating_sub(*c))
                        .filter(|a| *a > limit_s)
                        .collect();
                    let oldest = ages.iter().copied().max()?;
                    Some((vmid, (ages.len(), oldest)))
                })
                .collect();
        let mut notified = lock(&self.snapshots_old);
        notified.retain(|v| over.contains_key(v));
        for (vmid, (count, oldest)) in over {
            if notified.insert(vmid.clone()) {
                let notify = notify_for_vm(&cfg, &vmid);
                self.events.emit(
                    &Event::SnapshotOld {
                        vmid,
                        count,
                        oldest_age_s: u64::try_from(oldest).unwrap_or(0),
                        limit_s: limit.as_secs(),
                    },
                    &notify,
                );
            }
        }
    }
}

/// The notification targets of the backup jobs that cover `vmid`.
fn notify_for_vm(cfg: &DaemonConfig, vmid: &str) -> Vec<String> {
    cfg.jobs
        .iter()
        .filter(|j| {
            j.backup.as_ref().is_some_and(|b| match &b.vms {
                config::Selection::List(v) => v.iter().any(|x| x == vmid),
                config::Selection::All { exclude } => !exclude.iter().any(|x| x == vmid),
            })
        })
        .flat_map(|j| j.notify.clone())
        .collect()
}

/// Load and validate the config at `path`, or say why not.
pub fn load_config(path: &Path) -> anyhow::Result<DaemonConfig> {
    config::load(path)
}

/// Run the daemon in the foreground until SIGTERM/SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let cfg = load_config(config_path)?;
    // `[s3]` of the daemon's own config file (sync jobs to s3://).
    crate::repo::s3_settings::install(cfg.base.s3.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(main_loop(cfg, config_path.to_owned()))
}

fn parse_slot(s: &str) -> Option<Zoned> {
    s.parse().ok()
}

async fn main_loop(cfg: DaemonConfig, config_path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    private_dir(&cfg.state_dir)?;
    let tasks = Tasks::open(&cfg.state_dir.join("tasks"))?;
    let state = State::load(&cfg.state_dir)?;
    let notifier = Arc::new(notify_sink::NotifySink::new(
        cfg.base.clone(),
        tokio::runtime::Handle::current(),
    ));
    let events = Events::default()
        .with(Arc::new(LogSink))
        .with(Arc::new(FileSink::new(cfg.state_dir.join("events.log"))))
        .with(notifier.clone());
    let now = Zoned::now();
    let (scheduler, missed) = Scheduler::start(&cfg.jobs, &now, |id| {
        state
            .jobs
            .get(id)
            .and_then(|j| j.last_slot.as_deref())
            .and_then(parse_slot)
    });
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        config: RwLock::new(cfg.clone()),
        config_path: config_path.clone(),
        tasks,
        state: Mutex::new(state),
        events,
        notifier,
        running: Mutex::new(BTreeMap::new()),
        scheduler: Mutex::new(scheduler),
        shutting_down: AtomicBool::new(false),
        repos: Mutex::new(BTreeMap::new()),
        breached: Mutex::new(BTreeSet::new()),
        snapshots_old: Mutex::new(BTreeSet::new()),
        wake: tokio::sync::Notify::new(),
    });
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let servers = api::start(shared.clone(), &cfg).await?;
    tracing::info!(
        config = %config_path.display(),
        jobs = cfg.jobs.len(),
        socket = %cfg.api_socket.display(),
        "shear daemon started"
    );
    for d in missed {
        tracing::info!(job = d.job, slot = %d.slot, "a slot was missed while the daemon was down: running once now");
        if let Err(e) = shared.start_job(&d.job, Trigger::Missed, Some(&d.slot), None) {
            tracing::warn!(job = d.job, "missed run not started: {e}");
        }
    }
    shared.refresh_repos(&cfg).await;
    let mut maintenance = tokio::time::interval(Duration::from_secs(60));
    let mut refresh_every = 0u32;
    let stop_signal = loop {
        let wait = {
            let s = lock(&shared.scheduler);
            let now = Zoned::now();
            s.earliest().map_or(Duration::from_secs(60), |n| {
                let d = n.timestamp().duration_since(now.timestamp());
                Duration::try_from(d)
                    .unwrap_or(Duration::ZERO)
                    .min(Duration::from_secs(60))
            })
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.wake.notified() => {}
            _ = sighup.recv() => reload(&shared).await,
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = maintenance.tick() => {
                let cfg = shared.config();
                let n = shared.tasks.expire(cfg.task_retention);
                if n > 0 {
                    tracing::info!("{n} expired task(s) removed");
                }
                refresh_every += 1;
                if refresh_every.is_multiple_of(10) {
                    shared.refresh_repos(&cfg).await;
                }
                shared.check_rpo();
                shared.check_snapshots();
            }
        }
        let now = Zoned::now();
        let due = lock(&shared.scheduler).due(&now);
        for d in due {
            match shared.start_job(&d.job, Trigger::Schedule, Some(&d.slot), None) {
                Ok(_) => {}
                Err(StartError::AlreadyRunning { task, .. }) => tracing::warn!(
                    job = d.job,
                    slot = %d.slot,
                    "slot skipped: the previous run (task {task}) is still running"
                ),
                Err(e) => tracing::warn!(job = d.job, "run not started: {e}"),
            }
        }
    };
    shutdown(&shared, stop_signal).await;
    drop(servers);
    let sock = &shared.config().api_socket;
    let _ = std::fs::remove_file(sock);
    tracing::info!("shear daemon stopped");
    Ok(())
}

async fn reload(shared: &Arc<Shared>) {
    tracing::info!(config = %shared.config_path.display(), "SIGHUP: reloading the config");
    let path = shared.config_path.clone();
    let new = match tokio::task::spawn_blocking(move || load_config(&path)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::error!(
                "config reload REFUSED, the old config stays in force: {}",
                crate::chain(e.as_ref())
            );
            return;
        }
        Err(e) => {
            tracing::error!("config reload failed: {e}");
            return;
        }
    };
    let old = shared.config();
    if new.api_socket != old.api_socket || new.api_listen != old.api_listen {
        tracing::warn!("[api] changes take effect at the next start of the daemon");
    }
    if new.state_dir != old.state_dir {
        tracing::warn!("state_dir changes take effect at the next start of the daemon");
    }
    lock(&shared.scheduler).reload(&new.jobs, &Zoned::now());
    shared.notifier.set_config(new.base.clone());
    let n = new.jobs.len();
    *shared
        .config
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
    tracing::info!(jobs = n, "config reloaded");
    let cfg = shared.config();
    shared.refresh_repos(&cfg).await;
}

async fn shutdown(shared: &Arc<Shared>, why: &'static str) {
    shared.shutting_down.store(true, Ordering::SeqCst);
    let cfg = shared.config();
    let running = shared.running();
    if running.is_empty() {
        tracing::info!("{why}: stopping");
        return;
    }
    tracing::info!(
        "{why}: stopping; {} run(s) in progress get {:?} to finish",
        running.len(),
        cfg.shutdown_grace
    );
    let deadline = tokio::time::Instant::now() + cfg.shutdown_grace;
    while !shared.running().is_empty() && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout_at(deadline, shared.wake.notified()).await;
    }
    let left = shared.running();
    if left.is_empty() {
        return;
    }
    for (job, r) in &left {
        tracing::warn!(job, task = r.task, "{why}: cancelling the run");
        r.cancel.cancel(why);
    }
    // Cancellation rolls back (thaw, graph, fleece files): bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while !shared.running().is_empty() && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout_at(deadline, shared.wake.notified()).await;
    }
    if !shared.running().is_empty() {
        tracing::error!("runs did not end within 300 s of cancellation; exiting anyway");
    }
}

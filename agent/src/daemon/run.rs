//! Running one job: a backup job backs up its VMs (up to `max_workers` in
//! parallel) through the job layer and prunes each with the job's keep; a
//! verify job re-reads outdated backups; a gc job frees chunks. Each run
//! is a task with a log; per-VM results go into the state file and an
//! event.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{DaemonConfig, Job, JobKind, Selection};
use super::events::{Event, VmResult};
use super::tasks::{TaskInfo, TaskLog, TaskObserver};
use super::Shared;
use crate::hookscript::{HookContext, HookPhase, HookScript, HookSink, VmHooks, VmLog, VmOutcome};
use crate::job::backup::{held_hook_from_env, run_backup, BackupOptions, Cancel};
use crate::job::fleece::FleecePolicy;
use crate::repo::{Repository, VerifyTarget, VmId};

/// What a finished run says.
#[derive(Debug)]
pub struct Outcome {
    /// `ok`, `failed`, `cancelled`.
    pub status: &'static str,
    /// One line.
    pub summary: String,
    /// Per VM.
    pub vms: Vec<VmResult>,
}

/// Run `job` as `task`, then record and report the outcome.
pub async fn run(
    shared: Arc<Shared>,
    cfg: Arc<DaemonConfig>,
    job: Job,
    only: Option<Vec<String>>,
    cancel: Cancel,
    mut task: TaskInfo,
    log: TaskLog,
) {
    log.line(&format!(
        "task {} of {} job {} ({})",
        task.id,
        job.kind.as_str(),
        job.id,
        task.trigger
    ));
    let outcome = match job.kind {
        JobKind::Backup => backup_job(&cfg, &job, only, &cancel, &log).await,
        JobKind::Verify => verify_job(&shared, &job, &task, &log).await,
        JobKind::Gc => gc_job(&cfg, &job, &log).await,
        JobKind::Sync => sync_job(&cfg, &job, &log).await,
    };
    log.line(&format!("{}: {}", outcome.status, outcome.summary));
    task.vms.clone_from(&outcome.vms);
    {
        let now = jiff::Timestamp::now().as_second();
        let mut st = shared.lock_state();
        for r in &outcome.vms {
            st.record_vm(r, &job.repo, now);
        }
        let js = st.jobs.entry(job.id.clone()).or_default();
        js.last_status = Some(outcome.status.to_owned());
        let snapshot = st.clone();
        drop(st);
        if let Err(e) = snapshot.save(&cfg.state_dir) {
            tracing::error!("cannot save the daemon state: {e:#}");
        }
    }
    let ev = if outcome.status == "ok" {
        Event::JobFinished {
            job: job.id.clone(),
            task: task.id.clone(),
            vms: outcome.vms,
            summary: outcome.summary.clone(),
        }
    } else {
        Event::JobFailed {
            job: job.id.clone(),
            task: task.id.clone(),
            vms: outcome.vms,
            summary: outcome.summary.clone(),
        }
    };
    shared.events.emit(&ev, &job.notify);
    shared.refresh_repos(&cfg).await;
    check_space(&shared, &cfg, &job.repo);
    // The job is free again before its task says it ended: a client that
    // sees the end may start the next run at once.
    shared.release_job(&job.id, &task.id);
    if let Err(e) = shared
        .tasks
        .finish(&mut task, outcome.status, outcome.summary)
    {
        tracing::error!("cannot record task {}: {e:#}", task.id);
    }
    shared.wake.notify_one();
}

/// The VMs a backup job covers now.
pub fn job_vms(cfg: &DaemonConfig, sel: &Selection) -> Vec<String> {
    match sel {
        Selection::List(v) => v.clone(),
        Selection::All { exclude } => super::vms::known_vms(cfg)
            .into_iter()
            .filter(|v| v.running && !exclude.contains(&v.vmid))
            .map(|v| v.vmid)
            .collect(),
    }
}

/// The VMs a libvirt backup job covers now: with `all`, every running
/// domain libvirt lists.
async fn libvirt_job_vms(uri: &str, sel: &Selection) -> Result<Vec<String>, String> {
    match sel {
        Selection::List(v) => Ok(v.clone()),
        Selection::All { exclude } => {
            let out = crate::libvirt::virsh::Virsh::new(uri)
                .run(
                    &["list", "--state-running", "--name"],
                    crate::libvirt::virsh::QUERY,
                )
                .await
                .map_err(|e| crate::chain(&e))?;
            Ok(crate::libvirt::xml::parse_name_list(&out)
                .into_iter()
                .filter(|d| !exclude.contains(d))
                .collect())
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("worker failed: {e}"))?
}

async fn backup_job(
    cfg: &Arc<DaemonConfig>,
    job: &Job,
    only: Option<Vec<String>>,
    cancel: &Cancel,
    log: &TaskLog,
) -> Outcome {
    let Some(b) = job.backup.clone() else {
        return Outcome {
            status: "failed",
            summary: "not a backup job".into(),
            vms: Vec::new(),
        };
    };
    let mut vmids = match &b.libvirt {
        None => job_vms(cfg, &b.vms),
        Some(uri) => match libvirt_job_vms(uri, &b.vms).await {
            Ok(v) => v,
            Err(e) => {
                log.line(&format!("cannot list libvirt's domains: {e}"));
                return Outcome {
                    status: "failed",
                    summary: format!("cannot list libvirt's domains: {e}"),
                    vms: Vec::new(),
                };
            }
        },
    };
    if let Some(only) = only {
        vmids.retain(|v| only.contains(v));
    }
    if vmids.is_empty() {
        return Outcome {
            status: "ok",
            summary: "no VM to back up".into(),
            vms: Vec::new(),
        };
    }
    log.line(&format!("VMs: {}", vmids.join(", ")));
    let script = b.script.clone().map(|path| HookScript {
        path,
        timeout: cfg
            .base
            .script_timeout
            .map_or(crate::hookscript::DEFAULT_HOOK_TIMEOUT, Duration::from_secs),
    });
    let job_ctx = HookContext {
        job: job.id.clone(),
        repo: job.repo.display().to_string(),
        hostname: cfg.base.node_name(),
        ..HookContext::default()
    };
    // job-init before the repository is opened, as vzdump does.
    job_hook(script.as_ref(), HookPhase::JobInit, &job_ctx, log).await;
    let repo_path = job.repo.clone();
    let cfg2 = cfg.clone();
    let repo = match blocking(move || cfg2.open_repo(&repo_path)).await {
        Ok(r) => Arc::new(r),
        Err(e) => {
            log.line(&format!("cannot open the repository: {e}"));
            job_hook(script.as_ref(), HookPhase::JobAbort, &job_ctx, log).await;
            let vms = vmids.iter().map(|v| failed(v, 0.0, e.clone())).collect();
            return Outcome {
                status: "failed",
                summary: e,
                vms,
            };
        }
    };
    job_hook(script.as_ref(), HookPhase::JobStart, &job_ctx, log).await;
    let sem = Arc::new(tokio::sync::Semaphore::new(b.max_workers));
    let mut handles = Vec::new();
    for vmid in vmids.clone() {
        let sem = sem.clone();
        let repo = repo.clone();
        let cfg = cfg.clone();
        let b = b.clone();
        let cancel = cancel.clone();
        let log = log.clone();
        let hooks = script.clone().map(|script| VmHooks {
            script,
            ctx: HookContext {
                mode: b.mode.as_str().into(),
                vmid: vmid.clone(),
                ..job_ctx.clone()
            },
        });
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            if cancel.is_cancelled() {
                return VmResult {
                    status: "cancelled".into(),
                    ..failed(&vmid, 0.0, "cancelled before it started".into())
                };
            }
            backup_one(&cfg, &b, repo, &vmid, &cancel, &log, hooks).await
        }));
    }
    let mut vms = Vec::new();
    for (h, vmid) in handles.into_iter().zip(&vmids) {
        vms.push(
            h.await
                .unwrap_or_else(|e| failed(vmid, 0.0, format!("backup task failed: {e}"))),
        );
    }
    // A guard dropped on an error path thaws from a thread: let it finish.
    let _ = tokio::task::spawn_blocking(|| {
        guest_agent::wait_for_drop_thaws(Duration::from_secs(30));
    })
    .await;
    let ok = vms.iter().filter(|v| v.status == "ok").count();
    let cancelled = vms.iter().any(|v| v.status == "cancelled");
    let end = if cancel.is_cancelled() {
        HookPhase::JobAbort
    } else {
        HookPhase::JobEnd
    };
    job_hook(script.as_ref(), end, &job_ctx, log).await;
    let status = if ok == vms.len() {
        "ok"
    } else if cancelled {
        "cancelled"
    } else {
        "failed"
    };
    let failed_list: Vec<&str> = vms
        .iter()
        .filter(|v| v.status != "ok")
        .map(|v| v.vmid.as_str())
        .collect();
    let summary = if failed_list.is_empty() {
        format!("{ok} of {} VM(s) backed up", vms.len())
    } else {
        format!(
            "{ok} of {} VM(s) backed up; not: {}",
            vms.len(),
            failed_list.join(", ")
        )
    };
    Outcome {
        status,
        summary,
        vms,
    }
}

fn failed(vmid: &str, duration_s: f64, error: String) -> VmResult {
    VmResult {
        vmid: vmid.to_owned(),
        status: "failed".into(),
        backup_id: None,
        duration_s,
        bytes_read: 0,
        bytes_stored: 0,
        consistency: None,
        freeze_window_ms: None,
        pruned: 0,
        error: Some(error),
        warnings: Vec::new(),
    }
}

async fn backup_one(
    cfg: &DaemonConfig,
    b: &super::config::BackupJob,
    repo: Arc<Repository>,
    vmid: &str,
    cancel: &Cancel,
    log: &TaskLog,
    hooks: Option<VmHooks>,
) -> VmResult {
    let mut vm_log = VmLog::default();
    let r = backup_vm(cfg, b, repo, vmid, cancel, log, hooks.as_ref(), &mut vm_log).await;
    if let Some(h) = hooks {
        let outcome = match (&r.backup_id, r.status.as_str()) {
            (Some(id), "ok") => VmOutcome::Committed {
                backup_id: id,
                warnings: &r.warnings,
            },
            _ => VmOutcome::Failed {
                error: r.error.as_deref().unwrap_or(&r.status),
            },
        };
        h.after_vm(
            outcome,
            vm_log,
            &cfg.base.run_dir.join("log"),
            &mut TaskLogSink(log),
        )
        .await;
    }
    r
}

/// A job phase of the hook script: a failure is a warning in the task log.
async fn job_hook(script: Option<&HookScript>, phase: HookPhase, ctx: &HookContext, log: &TaskLog) {
    let Some(script) = script else { return };
    match script.run(phase, ctx).await {
        Ok(out) => {
            for l in out.output.lines().filter(|l| !l.trim().is_empty()) {
                log.line(&format!("hook {}: {l}", phase.as_str()));
            }
        }
        Err(e) => log.line(&format!("warning: {}", crate::chain(&e))),
    }
}

/// The task log as the sink of the hook phases after a VM.
struct TaskLogSink<'a>(&'a TaskLog);

impl HookSink for TaskLogSink<'_> {
    fn output(&mut self, vmid: &str, phase: HookPhase, line: &str) {
        self.0
            .line(&format!("VM {vmid}: hook {}: {line}", phase.as_str()));
    }
    fn warning(&mut self, vmid: &str, text: &str) {
        self.0.line(&format!("VM {vmid}: warning: {text}"));
    }
}

#[allow(clippy::too_many_arguments)]
async fn backup_vm(
    cfg: &DaemonConfig,
    b: &super::config::BackupJob,
    repo: Arc<Repository>,
    vmid: &str,
    cancel: &Cancel,
    log: &TaskLog,
    hooks: Option<&VmHooks>,
    vm_log: &mut VmLog,
) -> VmResult {
    let t0 = Instant::now();
    let base = &cfg.base;
    if let Err(e) = VmId::new(vmid) {
        return failed(vmid, 0.0, crate::chain(&e));
    }
    vm_log.line(&format!(
        "shear {}: backup of VM {vmid} ({} mode) starts",
        env!("CARGO_PKG_VERSION"),
        b.mode.as_str()
    ));
    if let Some(h) = hooks {
        // Before anything in the VM is touched: a refusal aborts this VM.
        if let Err(e) = h.script.run(HookPhase::BackupStart, &h.ctx).await {
            let msg = format!(
                "aborted by the hook script (the guest was not touched): {}",
                crate::chain(&e)
            );
            log.line(&format!("VM {vmid}: backup FAILED: {msg}"));
            return failed(vmid, t0.elapsed().as_secs_f64(), msg);
        }
    }
    let min_free = match base.fleecing_min_free() {
        Ok(m) => m,
        Err(e) => return failed(vmid, 0.0, e),
    };
    let opts = BackupOptions {
        vmid: vmid.to_owned(),
        qmp: base.qmp_socket_for(vmid),
        qga: Some(base.qga_socket_for(vmid)),
        mode: b.mode,
        run_dir: base.run_dir.clone(),
        fleecing_dir: base.fleecing_dir(),
        pve_config: base.pve_config_for(vmid),
        fleecing: FleecePolicy {
            allow_tmpfs: base.fleecing_allow_tmpfs,
            min_free,
        },
        zstd_level: None,
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        connections: 2,
        bwlimit_kib: b.bwlimit,
        priority: base.data_priority(None, None).unwrap_or_default(),
        exclude: Vec::new(),
        notes_template: String::new(),
        node: base.node_name(),
        freeze_timeout: Duration::from_secs(10),
        cbw_timeout_s: crate::job::backup::DEFAULT_CBW_TIMEOUT_S,
        stop_timeout: Duration::from_secs(600),
        full: false,
        include_cdrom: false,
        held_hook: held_hook_from_env(),
        script: hooks.cloned(),
    };
    log.line(&format!(
        "VM {vmid}: backup starts ({} mode{})",
        b.mode.as_str(),
        b.libvirt
            .as_deref()
            .map_or(String::new(), |u| format!(", libvirt domain at {u}"))
    ));
    let observer = Arc::new(TaskObserver(log.clone()));
    let result = match &b.libvirt {
        None => run_backup(repo.clone(), opts, cancel.clone(), observer).await,
        Some(uri) => {
            let lv = crate::libvirt::backup::LibvirtBackupOptions {
                domain: vmid.to_owned(),
                uri: uri.clone(),
                run_dir: opts.run_dir,
                fleecing_dir: opts.fleecing_dir,
                fleecing: opts.fleecing,
                zstd_level: opts.zstd_level,
                workers: opts.workers,
                connections: opts.connections,
                bwlimit_kib: opts.bwlimit_kib,
                priority: opts.priority,
                notes: String::new(),
                full: opts.full,
                freeze_timeout: opts.freeze_timeout,
                exclude: opts.exclude,
                held_hook: opts.held_hook,
                mode: opts.mode,
                stop_timeout: opts.stop_timeout,
                script: opts.script,
            };
            crate::libvirt::backup::run_libvirt_backup(repo.clone(), lv, cancel.clone(), observer)
                .await
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let msg = crate::chain(&e);
            log.line(&format!("VM {vmid}: backup FAILED: {msg}"));
            let mut r = failed(vmid, secs, msg);
            if e.kind() == crate::job::ErrorKind::Interrupted {
                r.status = "cancelled".into();
            }
            return r;
        }
    };
    log.line(&format!(
        "VM {vmid}: backup {} committed in {secs:.1} s",
        report.backup_id
    ));
    let mut pruned = 0;
    let mut warnings = report.warnings.clone();
    if let Some(keep) = b.keep {
        let id = vmid.to_owned();
        let r = repo.clone();
        match blocking(move || {
            let v = VmId::new(&id).map_err(|e| e.to_string())?;
            r.prune(&v, &keep, false).map_err(|e| crate::chain(&e))
        })
        .await
        {
            Ok(entries) => {
                pruned = entries.iter().filter(|e| e.removed).count();
                log.line(&format!("VM {vmid}: prune removed {pruned} backup(s)"));
            }
            Err(e) => {
                log.line(&format!("VM {vmid}: prune failed: {e}"));
                warnings.push(format!("prune failed: {e}"));
            }
        }
    }
    VmResult {
        vmid: vmid.to_owned(),
        status: "ok".into(),
        backup_id: Some(report.backup_id.clone()),
        duration_s: secs,
        bytes_read: report.disks.iter().map(|d| d.bytes_read).sum(),
        bytes_stored: report.disks.iter().map(|d| d.bytes_stored).sum(),
        consistency: Some(
            match report.consistency {
                crate::repo::Consistency::Application => "application",
                crate::repo::Consistency::Crash => "crash",
            }
            .into(),
        ),
        freeze_window_ms: report.freeze_window_ms,
        pruned,
        error: None,
        warnings,
    }
}

async fn verify_job(shared: &Arc<Shared>, job: &Job, task: &TaskInfo, log: &TaskLog) -> Outcome {
    let path = job.repo.clone();
    let cfg = shared.config();
    let outdated = job.outdated_after;
    let log2 = log.clone();
    let r = blocking(move || {
        let repo = cfg.open_repo(&path)?;
        let backups = repo.list_backups(None).map_err(|e| crate::chain(&e))?;
        let now = jiff::Timestamp::now();
        let mut reports = Vec::new();
        let mut checked = 0usize;
        for b in backups {
            let due = match (outdated, &b.verify) {
                (None, _) | (_, None) => true,
                (Some(max), Some(v)) => v.time.parse::<jiff::Timestamp>().map_or(true, |t| {
                    now.as_second().saturating_sub(t.as_second())
                        >= i64::try_from(max.as_secs()).unwrap_or(i64::MAX)
                }),
            };
            if !due {
                continue;
            }
            checked += 1;
            log2.line(&format!("verifying {}", b.id));
            let rep = repo
                .verify(&VerifyTarget::Backup(b.id.clone()), 2)
                .map_err(|e| crate::chain(&e))?;
            reports.push(rep);
        }
        Ok((checked, reports))
    })
    .await;
    match r {
        Err(e) => Outcome {
            status: "failed",
            summary: e,
            vms: Vec::new(),
        },
        Ok((checked, reports)) => {
            let bad: Vec<String> = reports
                .iter()
                .flat_map(|r| {
                    r.backups
                        .iter()
                        .filter(|b| !b.ok)
                        .map(|b| b.backup.to_string())
                })
                .collect();
            let bad_chunks: usize = reports.iter().map(|r| r.bad_chunks.len()).sum();
            if bad.is_empty() && bad_chunks == 0 {
                return Outcome {
                    status: "ok",
                    summary: format!("{checked} backup(s) verified, no damage"),
                    vms: Vec::new(),
                };
            }
            shared.events.emit(
                &Event::VerifyDamage {
                    job: job.id.clone(),
                    task: task.id.clone(),
                    repo: job.repo.display().to_string(),
                    backups: bad.clone(),
                    bad_chunks,
                },
                &job.notify,
            );
            Outcome {
                status: "failed",
                summary: format!(
                    "{checked} backup(s) verified: {} damaged ({}), {bad_chunks} bad chunk(s)",
                    bad.len(),
                    bad.join(", ")
                ),
                vms: Vec::new(),
            }
        }
    }
}

async fn gc_job(cfg: &Arc<DaemonConfig>, job: &Job, log: &TaskLog) -> Outcome {
    let path = job.repo.clone();
    let cfg = cfg.clone();
    let r = blocking(move || {
        let repo = cfg.open_repo(&path)?;
        repo.gc(&crate::repo::gc::GcOptions::default())
            .map_err(|e| crate::chain(&e))
    })
    .await;
    match r {
        Ok(g) => {
            log.line(&serde_json::to_string(&g).unwrap_or_default());
            Outcome {
                status: "ok",
                summary: format!(
                    "{} chunk(s) removed, {} bytes freed",
                    g.chunks_removed, g.bytes_removed
                ),
                vms: Vec::new(),
            }
        }
        Err(e) => Outcome {
            status: "failed",
            summary: e,
            vms: Vec::new(),
        },
    }
}

/// A `[[sync]]` run: `shear sync` per selected VM (or once for all), the
/// source opened with its `[[repo_key]]` if any, the target without.
async fn sync_job(cfg: &Arc<DaemonConfig>, job: &Job, log: &TaskLog) -> Outcome {
    let Some(y) = job.sync.clone() else {
        return Outcome {
            status: "failed",
            summary: "not a sync job".into(),
            vms: Vec::new(),
        };
    };
    let to = job.repo.clone();
    let cfg = cfg.clone();
    let log2 = log.clone();
    let r = blocking(move || {
        let src = cfg.open_repo(&y.from)?;
        let dst = Repository::open(&to, None)
            .map_err(|e| format!("repository {}: {}", to.display(), crate::chain(&e)))?;
        let vms: Vec<Option<VmId>> = if y.vmids.is_empty() {
            vec![None]
        } else {
            y.vmids
                .iter()
                .map(|v| VmId::new(v).map(Some).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?
        };
        let mut total = crate::repo::sync::SyncReport::default();
        for vmid in vms {
            let opts = crate::repo::sync::SyncOptions {
                vmid,
                last: None,
                verify: y.verify,
                remove_vanished: y.remove_vanished,
                streams: y.streams,
            };
            let r = crate::repo::sync::sync(&src, &dst, &opts).map_err(|e| crate::chain(&e))?;
            log2.line(&serde_json::to_string(&r).unwrap_or_default());
            total.copied.extend(r.copied);
            total.already_present += r.already_present;
            total.chunks_copied += r.chunks_copied;
            total.chunks_present += r.chunks_present;
            total.bytes_copied += r.bytes_copied;
            total.removed.extend(r.removed);
            total.not_removed.extend(r.not_removed);
        }
        Ok(total)
    })
    .await;
    match r {
        Ok(t) => {
            for w in &t.not_removed {
                log.line(&format!("kept vanished {w}"));
            }
            Outcome {
                status: "ok",
                summary: format!(
                    "{} backup(s) copied, {} already there; {} chunk(s), {} bytes copied; {} vanished removed",
                    t.copied.len(),
                    t.already_present,
                    t.chunks_copied,
                    t.bytes_copied,
                    t.removed.len()
                ),
                vms: Vec::new(),
            }
        }
        Err(e) => Outcome {
            status: "failed",
            summary: e,
            vms: Vec::new(),
        },
    }
}

/// Raise a space-low event when the repository's filesystem is below the
/// threshold.
pub fn check_space(shared: &Shared, cfg: &DaemonConfig, repo: &Path) {
    let Ok(st) = rustix::fs::statvfs(repo) else {
        return;
    };
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if total == 0 {
        return;
    }
    let pct = u128::from(free) * 100 / u128::from(total);
    if pct < u128::from(cfg.space_low_percent) {
        let notify: Vec<String> = cfg
            .jobs
            .iter()
            .filter(|j| j.repo == repo)
            .flat_map(|j| j.notify.clone())
            .collect();
        shared.events.emit(
            &Event::SpaceLow {
                repo: repo.display().to_string(),
                free_bytes: free,
                total_bytes: total,
                threshold_percent: cfg.space_low_percent,
            },
            &notify,
        );
    }
}

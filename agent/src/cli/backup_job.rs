//! What `shear backup` does around the VM backups as a vzdump job: the
//! hook script's phases (`--script`, [`crate::hookscript`]) and the
//! job's notification (`--notify`, [`crate::notify`]).

use std::path::PathBuf;
use std::time::Duration;

use super::backup_cmd::err;
use crate::hookscript::{
    HookContext, HookError, HookPhase, HookScript, HookSink, VmHooks, VmLog, VmOutcome,
};
use crate::job::report::BackupReport;
use crate::notify::{MatcherConfig, Notification, TargetConfig, VmRow};

/// The hook phases after a VM print to stderr.
struct StderrSink;

impl HookSink for StderrSink {
    fn output(&mut self, _vmid: &str, phase: HookPhase, line: &str) {
        err(format_args!("shear: hook {}: {line}", phase.as_str()));
    }
    fn warning(&mut self, _vmid: &str, text: &str) {
        err(format_args!("shear: warning: {text}"));
    }
}

/// The job id of a `shear backup` run (matchers' `match_job`).
pub const CLI_JOB: &str = "cli";

/// Hook script and notification state of one `shear backup` run.
#[derive(Debug)]
pub(super) struct JobExtras {
    repo: String,
    host: String,
    script: Option<HookScript>,
    targets: Vec<TargetConfig>,
    matchers: Vec<MatcherConfig>,
    rows: Vec<VmRow>,
    log_dir: PathBuf,
}

impl JobExtras {
    /// From the options and config; an unknown target name is an error
    /// (before anything runs).
    pub(super) fn new(
        cfg: &crate::config::Config,
        script: Option<PathBuf>,
        notify: &[String],
        repo: String,
        run_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let targets =
            crate::notify::select(&cfg.notify_target, notify).map_err(anyhow::Error::msg)?;
        let script = script.or_else(|| cfg.script.clone()).map(|p| HookScript {
            path: p,
            timeout: cfg
                .script_timeout
                .map_or(crate::hookscript::DEFAULT_HOOK_TIMEOUT, Duration::from_secs),
        });
        Ok(JobExtras {
            repo,
            host: cfg.node_name(),
            script,
            targets,
            matchers: cfg.notify_matcher.clone(),
            rows: Vec::new(),
            log_dir: run_dir.join("log"),
        })
    }

    fn ctx(&self, vmid: &str, mode: &str) -> HookContext {
        HookContext {
            job: CLI_JOB.into(),
            repo: self.repo.clone(),
            hostname: self.host.clone(),
            mode: mode.into(),
            vmid: vmid.into(),
            target: None,
            logfile: None,
        }
    }

    /// Run `phase`; print what the script said; `Err` on failure (the
    /// caller decides whether it aborts).
    async fn run(&self, phase: HookPhase, ctx: &HookContext) -> Result<(), HookError> {
        let Some(script) = &self.script else {
            return Ok(());
        };
        let out = script.run(phase, ctx).await?;
        for l in out.output.lines().filter(|l| !l.trim().is_empty()) {
            err(format_args!("shear: hook {}: {l}", phase.as_str()));
        }
        Ok(())
    }

    /// A job phase: a failure is a warning.
    pub(super) async fn job_phase(&self, phase: HookPhase) {
        if let Err(e) = self.run(phase, &self.ctx("", "")).await {
            err(format_args!("shear: warning: {}", crate::chain(&e)));
        }
    }

    /// The stop-mode hooks the backup job runs itself.
    pub(super) fn vm_hooks(&self, vmid: &str, mode: &str) -> Option<VmHooks> {
        self.script.as_ref().map(|s| VmHooks {
            script: s.clone(),
            ctx: self.ctx(vmid, mode),
        })
    }

    /// `backup-start`: a failure aborts this VM's backup.
    pub(super) async fn backup_start(&self, vmid: &str, mode: &str) -> Result<(), HookError> {
        self.run(HookPhase::BackupStart, &self.ctx(vmid, mode))
            .await
    }

    /// After a VM: `backup-end` or `backup-abort`, then `log-end` with the
    /// VM's log; records the VM's notification row.
    pub(super) async fn vm_done(
        &mut self,
        vmid: &str,
        mode: &str,
        result: Result<&BackupReport, String>,
        elapsed: Duration,
        log: VmLog,
    ) {
        let row = match &result {
            Ok(r) => VmRow {
                vmid: vmid.into(),
                status: "ok".into(),
                duration_ms: Some(r.total_ms),
                size_bytes: Some(r.disks.iter().map(|d| d.bytes_read).sum()),
                consistency: Some(
                    match r.consistency {
                        crate::repo::Consistency::Application => "application",
                        crate::repo::Consistency::Crash => "crash",
                    }
                    .into(),
                ),
                freeze_window_ms: r.freeze_window_ms,
                backup_id: Some(r.backup_id.clone()),
                error: None,
                warnings: r.warnings.clone(),
            },
            Err(msg) => VmRow {
                vmid: vmid.into(),
                status: "failed".into(),
                duration_ms: Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)),
                error: Some(msg.clone()),
                ..VmRow::default()
            },
        };
        if let Some(script) = &self.script {
            let outcome = match &result {
                Ok(r) => VmOutcome::Committed {
                    backup_id: &r.backup_id,
                    warnings: &r.warnings,
                },
                Err(error) => VmOutcome::Failed { error },
            };
            let hooks = VmHooks {
                script: script.clone(),
                ctx: self.ctx(vmid, mode),
            };
            hooks
                .after_vm(outcome, log, &self.log_dir, &mut StderrSink)
                .await;
        }
        self.rows.push(row);
    }

    /// A VM that never started (bad id, repository unusable): a failed row.
    pub(super) fn vm_failed(&mut self, vmid: &str, msg: String) {
        self.rows.push(VmRow {
            vmid: vmid.into(),
            status: "failed".into(),
            error: Some(msg),
            ..VmRow::default()
        });
    }

    /// `job-end` (or `job-abort`), then the notification to every
    /// routed target; a failed send is a warning on stderr.
    pub(super) async fn finish(self, aborted: Option<String>) {
        self.job_phase(if aborted.is_some() {
            HookPhase::JobAbort
        } else {
            HookPhase::JobEnd
        })
        .await;
        if self.targets.is_empty() {
            return;
        }
        let mut n = Notification::for_job(CLI_JOB, &self.host, self.rows);
        if let Some(why) = aborted {
            n.severity = crate::notify::Severity::Error;
            n.kind = crate::notify::Kind::JobFailed;
            n.title = format!("shear backup job {CLI_JOB} on {}: aborted", self.host);
            n.message = why;
        }
        for (name, r) in crate::notify::notify(&self.targets, &self.matchers, &n).await {
            match r {
                Ok(()) => err(format_args!("shear: notification sent to {name}")),
                Err(e) => err(format_args!(
                    "shear: warning: notification to {name} FAILED: {}",
                    crate::chain(&e)
                )),
            }
        }
    }
}

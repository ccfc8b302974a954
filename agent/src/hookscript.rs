//! vzdump-compatible hook scripts (`shear backup --script PATH`, `script`
//! in shear.toml; docs/hooks.md).
//!
//! The script is called like vzdump calls it:
//! - job phases `job-init`, `job-start`, `job-end`, `job-abort` with the
//!   phase as the only argument;
//! - VM phases `backup-start`, `pre-stop`, `pre-restart`, `post-restart`,
//!   `backup-end`, `backup-abort`, `log-end` with `PHASE MODE VMID`.
//!
//! Environment (vzdump's names; shear's equivalents): `DUMPDIR` (the
//! repository), `STOREID` (unset: shear writes to a repository path, like
//! vzdump's `--dumpdir`), `VMTYPE=qemu`, `HOSTNAME` (the node name),
//! `TARGET` (`backup-end` only: the committed backup id, e.g.
//! `vm/100/2026-11-30T02:30:00Z`), `LOGFILE` (`log-end` only: a text log of
//! that VM's run), plus `SHEAR_REPO`, `SHEAR_JOB` and, where known,
//! `SHEAR_BACKUP_ID`.
//!
//! A non-zero exit (or a timeout) at `backup-start` aborts that VM's
//! backup before anything in the VM is touched; at every other phase it is
//! a warning. Every run has a deadline ([`DEFAULT_HOOK_TIMEOUT`]); on expiry
//! the script's whole process group is killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default deadline of one hook run.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest hook output kept (stdout and stderr together).
const MAX_OUTPUT: usize = 64 * 1024;

/// A vzdump phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPhase {
    /// Before the job does anything (vzdump: before storage is accessed).
    JobInit,
    /// The job starts.
    JobStart,
    /// The job ended (some VMs may have failed).
    JobEnd,
    /// The job was aborted (a signal, a setup error).
    JobAbort,
    /// A VM's backup starts; a non-zero exit aborts it.
    BackupStart,
    /// Stop mode: before the guest is shut down.
    PreStop,
    /// Stop mode: the snapshot is taken, before the guest boots again.
    PreRestart,
    /// Stop mode: the guest was started again.
    PostRestart,
    /// A VM's backup is committed.
    BackupEnd,
    /// A VM's backup failed.
    BackupAbort,
    /// A VM's log is complete (`LOGFILE`).
    LogEnd,
}

impl HookPhase {
    /// vzdump's name.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::JobInit => "job-init",
            HookPhase::JobStart => "job-start",
            HookPhase::JobEnd => "job-end",
            HookPhase::JobAbort => "job-abort",
            HookPhase::BackupStart => "backup-start",
            HookPhase::PreStop => "pre-stop",
            HookPhase::PreRestart => "pre-restart",
            HookPhase::PostRestart => "post-restart",
            HookPhase::BackupEnd => "backup-end",
            HookPhase::BackupAbort => "backup-abort",
            HookPhase::LogEnd => "log-end",
        }
    }

    /// Whether this is a job phase (one argument) rather than a VM phase.
    pub fn is_job_phase(self) -> bool {
        matches!(
            self,
            HookPhase::JobInit | HookPhase::JobStart | HookPhase::JobEnd | HookPhase::JobAbort
        )
    }

    /// Whether a failure at this phase aborts (only `backup-start`).
    pub fn failure_aborts(self) -> bool {
        self == HookPhase::BackupStart
    }
}

/// Why a hook run failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The script could not be started.
    #[error("hook script {path}: cannot run it at phase {phase}: {source}")]
    Spawn {
        /// The script.
        path: String,
        /// The phase.
        phase: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The script exited non-zero or was killed by a signal.
    #[error("hook script {path} failed at phase {phase} ({status}){}", output_tail(.output))]
    Failed {
        /// The script.
        path: String,
        /// The phase.
        phase: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed (bounded).
        output: String,
    },
    /// The script did not finish within its deadline (it was killed).
    #[error("hook script {path} did not finish phase {phase} within {secs} s; killed")]
    Timeout {
        /// The script.
        path: String,
        /// The phase.
        phase: &'static str,
        /// The deadline.
        secs: u64,
    },
}

fn output_tail(out: &str) -> String {
    let t = out.trim();
    if t.is_empty() {
        return String::new();
    }
    let last: Vec<&str> = t.lines().rev().take(3).collect();
    let mut last = last;
    last.reverse();
    format!(": {}", last.join(" / "))
}

/// A configured hook script.
#[derive(Debug, Clone)]
pub struct HookScript {
    /// The program.
    pub path: PathBuf,
    /// Deadline of one run.
    pub timeout: Duration,
}

/// What the script is told besides the phase.
#[derive(Debug, Clone, Default)]
pub struct HookContext {
    /// The job (`cli` for `shear backup`).
    pub job: String,
    /// The repository (`DUMPDIR`).
    pub repo: String,
    /// The node name (`HOSTNAME`).
    pub hostname: String,
    /// Mode (VM phases).
    pub mode: String,
    /// VM id (VM phases).
    pub vmid: String,
    /// The committed backup (`TARGET`, `backup-end`).
    pub target: Option<String>,
    /// The VM's log (`LOGFILE`, `log-end`).
    pub logfile: Option<PathBuf>,
}

/// What a successful run printed.
#[derive(Debug, Clone, Default)]
pub struct HookOutput {
    /// stdout and stderr (bounded).
    pub output: String,
}

impl HookScript {
    /// A hook with the default deadline.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        HookScript {
            path: path.into(),
            timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }

    /// Run the script for `phase`; waits for it (within the deadline).
    pub async fn run(&self, phase: HookPhase, ctx: &HookContext) -> Result<HookOutput, HookError> {
        let shown = self.path.display().to_string();
        let mut cmd = tokio::process::Command::new(&self.path);
        cmd.arg(phase.as_str());
        if !phase.is_job_phase() {
            cmd.arg(&ctx.mode).arg(&ctx.vmid);
        }
        cmd.env("DUMPDIR", &ctx.repo)
            .env_remove("STOREID")
            .env("SHEAR_REPO", &ctx.repo)
            .env("SHEAR_JOB", &ctx.job)
            .env_remove("TARGET")
            .env_remove("LOGFILE")
            .env_remove("SHEAR_BACKUP_ID");
        if phase.is_job_phase() {
            cmd.env_remove("VMTYPE").env_remove("HOSTNAME");
        } else {
            cmd.env("VMTYPE", "qemu").env("HOSTNAME", &ctx.hostname);
            if phase == HookPhase::BackupEnd {
                if let Some(t) = &ctx.target {
                    cmd.env("TARGET", t).env("SHEAR_BACKUP_ID", t);
                }
            }
            if phase == HookPhase::LogEnd {
                if let Some(l) = &ctx.logfile {
                    cmd.env("LOGFILE", l);
                }
            }
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so a timeout kills what it started too.
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| HookError::Spawn {
            path: shown.clone(),
            phase: phase.as_str(),
            source,
        })?;
        let pid = child.id();
        match tokio::time::timeout(self.timeout, collect(child)).await {
            Ok(Ok((status, output))) if status.success() => Ok(HookOutput { output }),
            Ok(Ok((status, output))) => Err(HookError::Failed {
                path: shown,
                phase: phase.as_str(),
                status,
                output,
            }),
            Ok(Err(source)) => Err(HookError::Spawn {
                path: shown,
                phase: phase.as_str(),
                source,
            }),
            Err(_) => {
                if let Some(pgid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    if let Some(pgid) = rustix::process::Pid::from_raw(pgid) {
                        let _ = rustix::process::kill_process_group(
                            pgid,
                            rustix::process::Signal::KILL,
                        );
                    }
                }
                Err(HookError::Timeout {
                    path: shown,
                    phase: phase.as_str(),
                    secs: self.timeout.as_secs(),
                })
            }
        }
    }
}

/// A hook script bound to one VM's run: what the backup job itself runs
/// (the stop-mode phases) and the CLI or daemon around it (the others).
#[derive(Debug, Clone)]
pub struct VmHooks {
    /// The script.
    pub script: HookScript,
    /// Its context (job, repository, host, mode, VM).
    pub ctx: HookContext,
}

impl VmHooks {
    /// Run `phase`; a failure becomes the warning text returned (logged
    /// through `tracing` too). What the script printed is logged at info.
    pub async fn run_or_warn(&self, phase: HookPhase) -> Option<String> {
        self.run_reporting(phase, &mut TracingSink).await
    }
}

/// `tracing` as the sink: what the backup job's own phases (stop mode)
/// report.
struct TracingSink;

impl HookSink for TracingSink {
    fn output(&mut self, vmid: &str, phase: HookPhase, line: &str) {
        tracing::info!(vmid = %vmid, phase = phase.as_str(), "hook: {line}");
    }
    fn warning(&mut self, vmid: &str, text: &str) {
        tracing::warn!(vmid = %vmid, "{text}");
    }
}

/// How one VM's backup ended, for the hook phases after it.
#[derive(Debug, Clone, Copy)]
pub enum VmOutcome<'a> {
    /// Committed as `backup_id`, with these warnings.
    Committed {
        /// The backup.
        backup_id: &'a str,
        /// Its warnings (into the VM's log).
        warnings: &'a [String],
    },
    /// Failed with this error.
    Failed {
        /// The error, one line.
        error: &'a str,
    },
}

/// Where the phases after a VM report: the CLI prints to stderr, the
/// daemon writes the task log.
pub trait HookSink: Send {
    /// A line the script printed during `phase`.
    fn output(&mut self, vmid: &str, phase: HookPhase, line: &str);
    /// A failed phase or step (never fatal after a VM's backup).
    fn warning(&mut self, vmid: &str, text: &str);
}

impl VmHooks {
    async fn run_reporting(&self, phase: HookPhase, sink: &mut dyn HookSink) -> Option<String> {
        match self.script.run(phase, &self.ctx).await {
            Ok(out) => {
                for l in out.output.lines().filter(|l| !l.trim().is_empty()) {
                    sink.output(&self.ctx.vmid, phase, l);
                }
                None
            }
            Err(e) => {
                let w = format!("{} (ignored: only backup-start aborts)", crate::chain(&e));
                sink.warning(&self.ctx.vmid, &w);
                Some(w)
            }
        }
    }

    /// The steps after a VM's backup, as vzdump runs them: `backup-end`
    /// (with `TARGET`) or `backup-abort`; then the VM's log is written and
    /// `log-end` runs with `LOGFILE`; then the log (and its directory, when
    /// empty: another run's log may be there) is removed.
    pub async fn after_vm(
        mut self,
        outcome: VmOutcome<'_>,
        mut log: VmLog,
        log_dir: &Path,
        sink: &mut dyn HookSink,
    ) {
        let phase = match outcome {
            VmOutcome::Committed {
                backup_id,
                warnings,
            } => {
                log.line(&format!("backup {backup_id} committed"));
                for w in warnings {
                    log.line(&format!("warning: {w}"));
                }
                self.ctx.target = Some(backup_id.to_string());
                HookPhase::BackupEnd
            }
            VmOutcome::Failed { error } => {
                log.line(&format!("backup FAILED: {error}"));
                HookPhase::BackupAbort
            }
        };
        if let Some(w) = self.run_reporting(phase, sink).await {
            log.line(&format!("warning: {w}"));
        }
        match log.write(log_dir, &self.ctx.vmid) {
            Ok(path) => {
                self.ctx.target = None;
                self.ctx.logfile = Some(path.clone());
                self.run_reporting(HookPhase::LogEnd, sink).await;
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_dir(log_dir);
            }
            Err(e) => sink.warning(
                &self.ctx.vmid,
                &format!(
                    "cannot write the log for the log-end hook in {}: {e}",
                    log_dir.display()
                ),
            ),
        }
    }
}

/// Wait for the child, reading its output (bounded; the rest is drained).
async fn collect(
    mut child: tokio::process::Child,
) -> std::io::Result<(std::process::ExitStatus, String)> {
    use tokio::io::AsyncReadExt;
    async fn drain<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
        let mut kept = Vec::new();
        let Some(mut r) = r else { return kept };
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = MAX_OUTPUT.saturating_sub(kept.len());
            kept.extend_from_slice(buf.get(..n.min(room)).unwrap_or_default());
        }
        kept
    }
    let (out, err) = tokio::join!(drain(child.stdout.take()), drain(child.stderr.take()));
    let status = child.wait().await?;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    text.push_str(&String::from_utf8_lossy(&err));
    Ok((status, text))
}

/// A VM's run log for `LOGFILE` (vzdump keeps one per VM): lines with
/// times, written at `log-end`, removed after the hook ran.
#[derive(Debug, Default)]
pub struct VmLog {
    lines: Vec<String>,
}

impl VmLog {
    /// Add a line, stamped with the current UTC time.
    pub fn line(&mut self, text: &str) {
        let t = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.lines.push(format!("{t} {text}"));
    }

    /// Write the log into `dir` (created 0700) as
    /// `shear-qemu-VMID-PID.log`.
    pub fn write(&self, dir: &Path, vmid: &str) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let p = dir.join(format!("shear-qemu-{vmid}-{}.log", std::process::id()));
        let mut text = self.lines.join("\n");
        text.push('\n');
        std::fs::write(&p, text)?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("hook.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn ctx() -> HookContext {
        HookContext {
            job: "cli".into(),
            repo: "/srv/repo".into(),
            hostname: "pve1".into(),
            mode: "snapshot".into(),
            vmid: "100".into(),
            target: Some("vm/100/2026-11-30T02:30:00Z".into()),
            logfile: Some("/run/shear/log".into()),
        }
    }

    #[tokio::test]
    async fn arguments_and_environment_follow_vzdump() {
        let dir = tempfile::tempdir().unwrap();
        let h = HookScript::new(script(
            dir.path(),
            "echo \"$*|${VMTYPE-unset}|$DUMPDIR|${HOSTNAME-unset}|${TARGET-unset}|${LOGFILE-unset}|${STOREID-unset}\"",
        ));
        let out = h.run(HookPhase::JobStart, &ctx()).await.unwrap();
        assert_eq!(
            out.output.trim(),
            "job-start|unset|/srv/repo|unset|unset|unset|unset"
        );
        let out = h.run(HookPhase::BackupStart, &ctx()).await.unwrap();
        assert_eq!(
            out.output.trim(),
            "backup-start snapshot 100|qemu|/srv/repo|pve1|unset|unset|unset"
        );
        let out = h.run(HookPhase::BackupEnd, &ctx()).await.unwrap();
        assert_eq!(
            out.output.trim(),
            "backup-end snapshot 100|qemu|/srv/repo|pve1|vm/100/2026-11-30T02:30:00Z|unset|unset"
        );
        let out = h.run(HookPhase::LogEnd, &ctx()).await.unwrap();
        assert_eq!(
            out.output.trim(),
            "log-end snapshot 100|qemu|/srv/repo|pve1|unset|/run/shear/log|unset"
        );
    }

    #[tokio::test]
    async fn failure_names_phase_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let h = HookScript::new(script(dir.path(), "echo 'storage offline' >&2; exit 3"));
        let e = h.run(HookPhase::BackupStart, &ctx()).await.unwrap_err();
        assert!(matches!(e, HookError::Failed { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("backup-start"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("storage offline"), "{msg}");
        assert!(HookPhase::BackupStart.failure_aborts());
        assert!(!HookPhase::BackupEnd.failure_aborts());
    }

    #[tokio::test]
    async fn a_hung_hook_and_its_children_are_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let mut h = HookScript::new(script(
            dir.path(),
            &format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
        ));
        h.timeout = Duration::from_millis(1500);
        let t0 = std::time::Instant::now();
        let e = h.run(HookPhase::JobInit, &ctx()).await.unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild went with the group (reaped by init: give it time).
        let gone = (0..100).any(|_| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if alive {
                std::thread::sleep(Duration::from_millis(100));
            }
            !alive
        });
        assert!(gone, "the hook's child {pid} survived the timeout");
    }
}

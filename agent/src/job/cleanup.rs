//! Taking back what a killed backup run left in a VM, now: `shear cleanup
//! VMID` (like `qm unlock`) and the watchdog after the agent died.
//!
//! The run record (`<run_dir>/backup-<vmid>.json`) lists every change the
//! run made; [`graph::undo`] takes them back in reverse order. The per-VM
//! lock is taken first, so a live `shear backup` of that VM is never
//! disturbed: cleanup then refuses ([`JobError::Busy`]).

use std::path::Path;
use std::time::{Duration, Instant};

use super::graph;
use super::lock::lock_vm;
use super::record::{record_path, RunRecord, Step};
use super::JobError;

/// How long connecting to QMP may take.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a cleanup did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CleanupReport {
    /// VM id.
    pub vmid: String,
    /// A record of a killed run was found.
    pub found: bool,
    /// The pid of the run that left it.
    pub pid: Option<u32>,
    /// Steps taken back, in the order undone.
    pub undone: Vec<String>,
    /// Steps that could not be taken back (still recorded).
    pub remaining: Vec<String>,
    /// QEMU was gone: its graph changes died with it.
    pub qemu_gone: bool,
}

/// Which record to clean up.
#[derive(Debug, Clone, Copy)]
pub enum Whose {
    /// Any (the CLI: the lock proves no live backup owns it).
    Any,
    /// Only a record written by this agent pid (the watchdog: a later run's
    /// record is that run's business).
    Pid(u32),
}

/// A step, said plainly.
pub fn describe(step: &Step) -> String {
    match step {
        Step::Freeze => "thawed the guest filesystems".into(),
        Step::Pause => "resumed the VM".into(),
        Step::FleeceFile { path } => format!("removed fleecing image {}", path.display()),
        Step::Node { name } => format!("removed block node {name}"),
        Step::DriveSwap { qdev, original, .. } => format!("pointed {qdev} back at {original}"),
        Step::NbdServer { .. } => "stopped the NBD server".into(),
        Step::Export { id } => format!("removed NBD export {id}"),
        Step::Dir { path } => format!("removed {}", path.display()),
        Step::ShutdownAction { restore } => format!("restored the shutdown action {restore}"),
        Step::BitmapSplit { old: Some(old), .. } => {
            format!("merged the interrupted run's changes back into bitmap {old}")
        }
        Step::BitmapSplit { new, .. } => format!("removed change-tracking bitmap {new}"),
        Step::BitmapRetire { name, .. } => format!("removed retired bitmap {name}"),
    }
}

/// Undo the record of `vmid` in `run_dir`, holding the per-VM lock.
/// `qmp`/`qga` override the sockets the record names.
pub async fn cleanup_vm(
    run_dir: &Path,
    vmid: &str,
    qmp: Option<&Path>,
    qga: Option<&Path>,
    whose: Whose,
) -> Result<CleanupReport, JobError> {
    if !run_dir.is_dir() {
        // No run directory: no run ever recorded anything here.
        return Ok(CleanupReport {
            vmid: vmid.to_string(),
            ..CleanupReport::default()
        });
    }
    let _lock = lock_vm(run_dir, vmid)?;
    let mut report = CleanupReport {
        vmid: vmid.to_string(),
        ..CleanupReport::default()
    };
    let path = record_path(run_dir, vmid);
    // A run killed while rewriting its record leaves the new version's temp
    // file; the record itself is the old, complete version (write-ahead:
    // the step it was adding had not been taken yet).
    RunRecord::remove_temps(&path).map_err(JobError::Record)?;
    let Some(mut rec) = RunRecord::load(&path).map_err(JobError::Record)? else {
        return Ok(report);
    };
    if let Whose::Pid(pid) = whose {
        if rec.pid != pid {
            return Ok(report);
        }
    }
    report.found = true;
    report.pid = Some(rec.pid);
    let before: Vec<Step> = rec.steps.clone();
    let qmp_path = qmp.map_or_else(|| rec.qmp.clone(), Path::to_path_buf);
    let qga = qga.map(Path::to_path_buf).or_else(|| rec.qga.clone());
    let client = match qmp::Qmp::connect(&qmp_path, QMP_CONNECT_TIMEOUT).await {
        Ok((c, _events)) => Some(c),
        // No socket, or nobody listening: QEMU is gone, and with it every
        // node, filter and export; only our files remain to remove.
        Err(qmp::Error::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            report.qemu_gone = true;
            None
        }
        Err(e) => return Err(JobError::qmp("connect")(e)),
    };
    if let Some(c) = &client {
        // Never undo one VM's record in another VM (a wrong --qmp).
        super::identity::verify(c, vmid).await?;
    }
    let result = graph::undo(client.as_ref(), qga.as_deref(), &mut rec, &path).await;
    report.remaining = rec.steps.iter().map(describe).collect();
    report.undone = before
        .iter()
        .rev()
        .filter(|s| !rec.steps.contains(s))
        .map(|s| match (&client, s) {
            (None, Step::FleeceFile { .. } | Step::Dir { .. }) | (Some(_), _) => describe(s),
            (None, _) => format!("{} (QEMU is gone)", describe(s)),
        })
        .collect();
    result.map(|()| report)
}

/// [`cleanup_vm`] for the watchdog: wait (up to `wait`) for the lock the
/// dying agent may still hold, then undo that agent's record.
pub async fn cleanup_after_agent(
    run_dir: &Path,
    vmid: &str,
    qmp: &Path,
    qga: Option<&Path>,
    agent_pid: u32,
    wait: Duration,
) -> Result<CleanupReport, JobError> {
    let deadline = Instant::now() + wait;
    let mut backoff = Duration::from_millis(50);
    loop {
        match cleanup_vm(run_dir, vmid, Some(qmp), qga, Whose::Pid(agent_pid)).await {
            Err(JobError::Busy(_)) if Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

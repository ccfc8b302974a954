//! The watchdog of a libvirt backup: `shear __watchdog --libvirt URI
//! --domain DOMAIN`, started by [`crate::job::watchdog::Watchdog::spawn_libvirt`]
//! and driven by the same state lines and rescue loop as the QMP path's
//! ([`crate::job::watchdog::rescue_guest`]); only the way it reaches the
//! guest differs: `virsh resume` / `virsh start` / `virsh domfsthaw`.
//!
//! When the agent dies holding the domain (frozen, suspended, or shut down
//! in stop mode) the watchdog thaws it, resumes it, or starts it again.
//! Then it takes the per-domain lock and ends the backup job the dead run
//! began (its scratch files would grow for as long as the job lives) and
//! removes the run's directories; the run record stays: whether the run's
//! checkpoint goes is decided by the next backup, which can see the
//! repository.

use std::path::Path;
use std::time::{Duration, Instant};

use super::backup::{record_path, LibvirtRecord, JOB_END};
use super::virsh::{Virsh, QUERY};
use super::LibvirtError;
use crate::job::watchdog::{
    read_states, rescue_guest, runtime, say, Held, Release, Rescue, LOCK_WAIT,
};

/// A libvirt domain as the watchdog sees it.
struct Domain {
    virsh: Virsh,
    name: String,
    held: Held,
    since: Instant,
    stop_grace: Duration,
}

/// What libvirt says of the domain: its state, `None` when it is gone
/// (undefined), `Err` when libvirt does not answer.
pub(crate) async fn state(virsh: &Virsh, domain: &str) -> Result<Option<String>, LibvirtError> {
    match virsh.domstate(domain).await {
        Ok(s) => Ok(Some(s)),
        Err(LibvirtError::Failed { message, .. }) if message.contains("not found") => Ok(None),
        Err(e) => Err(e),
    }
}

/// What to do about a domain in `state` that must run again; `stopped`:
/// we shut it down (stop mode), so a shut-off domain is started and a
/// running one may still be on its way down until `grace_over`.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumeStep {
    /// It runs (or is not ours to run): done.
    Done,
    /// `virsh resume`.
    Resume,
    /// `virsh start`.
    Start,
    /// Look again later.
    Wait,
}

/// The step for a domain in `state` (see [`ResumeStep`]).
pub fn resume_step(state: Option<&str>, stopped: bool, grace_over: bool) -> ResumeStep {
    match state {
        None => ResumeStep::Done,
        Some("paused") => ResumeStep::Resume,
        Some("shut off") if stopped => ResumeStep::Start,
        Some("shut off") => ResumeStep::Done,
        Some("running") if stopped && !grace_over => ResumeStep::Wait,
        Some("running") => ResumeStep::Done,
        Some("in shutdown") => ResumeStep::Wait,
        Some(_) => ResumeStep::Done,
    }
}

impl Release for Domain {
    async fn resume(&self, held: Held) -> bool {
        let Ok(st) = state(&self.virsh, &self.name).await else {
            return false;
        };
        let grace_over = self.since.elapsed() >= self.stop_grace;
        match resume_step(st.as_deref(), held.stopped, grace_over) {
            ResumeStep::Done => true,
            ResumeStep::Resume => self.virsh.resume(&self.name).await.is_ok(),
            ResumeStep::Start => self.virsh.start(&self.name, false).await.is_ok(),
            ResumeStep::Wait => false,
        }
    }

    async fn thaw(&self) -> Result<bool, ()> {
        if self.virsh.fsthaw(&self.name, QUERY).await.is_ok() {
            return Ok(true);
        }
        match state(&self.virsh, &self.name).await {
            Ok(None) => Err(()),
            Ok(Some(s)) if s != "running" && s != "paused" => Err(()),
            _ => Ok(false),
        }
    }

    async fn gone(&self) -> bool {
        match state(&self.virsh, &self.name).await {
            Ok(None) => true,
            // Shut off and not by us: nothing is held any more.
            Ok(Some(s)) => s == "shut off" && !self.held.stopped,
            Err(_) => false,
        }
    }
}

/// The watchdog process's main for a libvirt domain.
pub fn run(uri: &str, domain: &str, run_dir: &Path, stop_grace: Duration) -> i32 {
    let agent_pid = std::os::unix::process::parent_id();
    let Some(held) = read_states(std::io::stdin().lock()) else {
        return 0;
    };
    let Some(rt) = runtime() else { return 2 };
    let virsh = Virsh::new(uri);
    if held.frozen || held.paused || held.stopped {
        say(format_args!(
            "shear watchdog: the agent exited while holding domain {domain} (frozen: {}, \
             suspended: {}, shut down: {}); rescuing",
            held.frozen, held.paused, held.stopped
        ));
        let guest = Domain {
            virsh: virsh.clone(),
            name: domain.to_string(),
            held,
            since: Instant::now(),
            stop_grace,
        };
        match rt.block_on(rescue_guest(&guest, held)) {
            Rescue::Released => say(format_args!("shear watchdog: domain {domain} released")),
            Rescue::VmGone => say(format_args!(
                "shear watchdog: domain {domain} is gone or shut off; nothing to release"
            )),
        }
    }
    match rt.block_on(end_dead_run(&virsh, domain, run_dir, agent_pid)) {
        Ok(Some(msg)) => {
            say(format_args!("shear watchdog: {msg}"));
            0
        }
        Ok(None) => 0,
        Err(e) => {
            say(format_args!(
                "shear watchdog: ending the backup job of domain {domain} failed ({e}); the \
                 next backup of it does"
            ));
            1
        }
    }
}

/// End the backup job a dead agent (`agent_pid`) began and remove its
/// directories, holding the per-domain lock (a live run's job is never
/// touched: its record names another pid, or it holds the lock).
async fn end_dead_run(
    virsh: &Virsh,
    domain: &str,
    run_dir: &Path,
    agent_pid: u32,
) -> Result<Option<String>, String> {
    let deadline = Instant::now() + LOCK_WAIT;
    let _lock = loop {
        match crate::job::lock::lock_vm(run_dir, &format!("libvirt-{domain}")) {
            Ok(l) => break l,
            Err(crate::job::JobError::Busy(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(crate::chain(&e)),
        }
    };
    let path = record_path(run_dir, domain);
    let Ok(text) = std::fs::read(&path) else {
        // The agent took everything back itself.
        return Ok(None);
    };
    let rec: LibvirtRecord =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if rec.pid != agent_pid {
        return Ok(None);
    }
    virsh
        .job_end(&rec.domain, JOB_END)
        .await
        .map_err(|e| crate::chain(&e))?;
    for d in &rec.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(Some(format!(
        "ended the backup job the agent (pid {agent_pid}) began on domain {domain} and removed \
         its files; its checkpoint {} is left to the next backup",
        rec.checkpoint
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_is_resumed_started_or_waited_for_as_its_state_and_hold_say() {
        use ResumeStep::*;
        assert_eq!(resume_step(Some("paused"), false, false), Resume);
        assert_eq!(resume_step(Some("paused"), true, false), Resume);
        // Suspend mode: a domain someone shut off is not started.
        assert_eq!(resume_step(Some("shut off"), false, false), Done);
        // Stop mode: our shutdown finished: start it again.
        assert_eq!(resume_step(Some("shut off"), true, false), Start);
        // Stop mode: still running, the shutdown may be under way.
        assert_eq!(resume_step(Some("running"), true, false), Wait);
        assert_eq!(resume_step(Some("running"), true, true), Done);
        assert_eq!(resume_step(Some("running"), false, false), Done);
        assert_eq!(resume_step(Some("in shutdown"), true, true), Wait);
        assert_eq!(resume_step(None, true, false), Done);
    }
}

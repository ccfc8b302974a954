//! The thaw watchdog: a child process that outlives the agent.
//!
//! A freeze (or a `stop`) must not outlive the agent (F-04). Before it
//! freezes or pauses a guest, the backup job starts `shear __watchdog` as a
//! child in its own process group (so a terminal's Ctrl-C does not reach it)
//! and keeps the write end of a pipe to its stdin. The job reports its state
//! as lines: `frozen`, `thawed`, `paused`, `resumed`, and `done` when it no
//! longer needs the watchdog. When the pipe closes without `done` — the
//! agent died, even by SIGKILL — the watchdog thaws the guest (if the last
//! state was `frozen`) and resumes it (if `paused`), retrying with backoff
//! until qemu-ga confirms the thaw or the VM is gone (it never gives up on
//! a frozen guest). Then it takes the per-VM lock and takes back the graph
//! changes the dead agent recorded (`<run_dir>/backup-<vmid>.json`): filters,
//! exports, fleecing images — the same undo as `shear cleanup`.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// Deadline of one QMP attempt inside the rescue loop.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between two rescue attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the watchdog waits for the per-VM lock (a dying agent may
/// still hold it for a moment) before leaving the record to the holder.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(30);

/// What the agent holds, as last reported to the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// The guest's filesystems are frozen by us.
    pub frozen: bool,
    /// The VM is paused by us.
    pub paused: bool,
    /// The VM is shut down (or shutting down) by us and must run again
    /// (a libvirt domain's stop mode: `stopped`; QMP's stop mode keeps
    /// QEMU alive and reports `paused`).
    pub stopped: bool,
}

/// The agent's end of the watchdog: report state changes; `finish` on the
/// normal path. Dropping it without `finish` (panic, error paths that could
/// not clean up) closes the pipe, and the watchdog rescues the guest.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Start `shear __watchdog` for this VM (its run record is in
    /// `run_dir`).
    pub fn spawn(
        qmp: &Path,
        qga: Option<&Path>,
        run_dir: &Path,
        vmid: &str,
    ) -> std::io::Result<Watchdog> {
        let mut args: Vec<std::ffi::OsString> = vec!["--qmp".into(), qmp.into()];
        args.extend([
            "--run-dir".into(),
            run_dir.into(),
            "--vmid".into(),
            vmid.into(),
        ]);
        if let Some(q) = qga {
            args.extend(["--qga".into(), q.into()]);
        }
        Self::spawn_with(&args)
    }

    /// Start `shear __watchdog --libvirt URI --domain DOMAIN` for a
    /// libvirt domain (see [`crate::libvirt::rescue`]); `stop_grace`: how
    /// long a domain that still runs after a stop-mode shutdown request
    /// is watched before it counts as running.
    pub fn spawn_libvirt(
        uri: &str,
        domain: &str,
        run_dir: &Path,
        stop_grace: Duration,
    ) -> std::io::Result<Watchdog> {
        let args: Vec<std::ffi::OsString> = vec![
            "--libvirt".into(),
            uri.into(),
            "--domain".into(),
            domain.into(),
            "--run-dir".into(),
            run_dir.into(),
            "--stop-grace".into(),
            stop_grace.as_secs().to_string().into(),
        ];
        Self::spawn_with(&args)
    }

    fn spawn_with(args: &[std::ffi::OsString]) -> std::io::Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("__watchdog").args(args);
        // Test failpoints aim at the backup process; the watchdog that
        // takes back its leftovers must not die at the same point.
        cmd.env_remove("SHEAR_TEST_KILL_AT")
            .env_remove("SHEAR_TEST_FAIL_AT");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = cmd.spawn()?;
        let pipe = child.stdin.take();
        if let Err(e) = move_to_rescue_cgroup(child.id()) {
            tracing::warn!(
                "the thaw watchdog stays in shear's cgroup ({e}): stopping shear's service \
                 (killing its whole cgroup) while the guest is frozen would kill it too"
            );
        }
        Ok(Watchdog { child, pipe })
    }

    /// Report a state line (`frozen`, `thawed`, `paused`, `resumed`).
    pub fn report(&mut self, state: &str) -> std::io::Result<()> {
        match self.pipe.as_mut() {
            Some(p) => {
                p.write_all(state.as_bytes())?;
                p.write_all(b"\n")?;
                p.flush()
            }
            None => Err(std::io::Error::other("watchdog already finished")),
        }
    }

    /// The agent is done with the guest: tell the watchdog and reap it.
    pub fn finish(mut self) {
        let _ = self.report("done");
        self.pipe = None;
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing the pipe without `done` makes the watchdog act; do not
        // wait for it here (it outlives us on purpose).
        self.pipe = None;
    }
}

/// The cgroup (v2, directly under the unified hierarchy's root) the
/// watchdog moves to: outside the cgroup of whatever started shear, so a
/// service manager that kills a unit's whole cgroup on stop or OOM
/// (systemd's `KillMode=control-group`) kills shear but not the process
/// that releases the guest. `$SHEAR_RESCUE_CGROUP` names another one; an
/// empty value keeps the watchdog where it is.
pub const RESCUE_CGROUP: &str = "shear-rescue";

/// Move process `pid` into the rescue cgroup (needs root and a cgroup v2
/// hierarchy; on failure the watchdog stays in shear's cgroup).
fn move_to_rescue_cgroup(pid: u32) -> Result<(), String> {
    let name = std::env::var("SHEAR_RESCUE_CGROUP").unwrap_or_else(|_| RESCUE_CGROUP.into());
    if name.is_empty() {
        return Err("disabled by SHEAR_RESCUE_CGROUP".into());
    }
    if name.contains('/') || name == ".." {
        return Err(format!("bad cgroup name {name:?}"));
    }
    let root = cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
    let dir = root.join(&name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", dir.display())),
    }
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| format!("moving pid {pid} into {}: {e}", dir.display()))
}

/// Where the cgroup v2 (unified) hierarchy is mounted, from
/// `/proc/self/mountinfo` (`… MOUNTPOINT … - cgroup2 …`).
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split(' ').next() == Some("cgroup2"))
            .then(|| pre.split(' ').nth(4).map(std::path::PathBuf::from))
            .flatten()
    })
}

/// Read state lines until `done` or EOF; returns what is held at EOF
/// (`None` after `done`).
pub fn read_states(input: impl BufRead) -> Option<Held> {
    let mut held = Held::default();
    for line in input.lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "frozen" => held.frozen = true,
            "thawed" => held.frozen = false,
            "paused" => held.paused = true,
            "stopped" => held.stopped = true,
            "resumed" => {
                held.paused = false;
                held.stopped = false;
            }
            "done" => return None,
            _ => {}
        }
    }
    Some(held)
}

/// The watchdog's single-threaded runtime (both the QMP and the libvirt
/// watchdog); `None` (said on stderr) if it cannot be built.
pub(crate) fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            say(format_args!("shear watchdog: cannot start a runtime: {e}"));
            None
        }
    }
}

/// The watchdog process's main: block on stdin, then rescue if needed and
/// take back the dead agent's recorded graph changes (`record`: its run
/// directory and VM id).
pub fn run(qmp: &Path, qga: Option<&Path>, record: Option<(&Path, &str)>) -> i32 {
    // The agent that started us; its pid is in the run record.
    let agent_pid = std::os::unix::process::parent_id();
    let held = read_states(std::io::stdin().lock());
    let Some(held) = held else { return 0 };
    let Some(rt) = runtime() else { return 2 };
    let mut code = 0;
    if held.frozen || held.paused {
        say(format_args!(
            "shear watchdog: the agent exited while holding the guest (frozen: {}, paused: {}); rescuing",
            held.frozen, held.paused
        ));
        match rt.block_on(rescue(qmp, qga, held)) {
            Rescue::Released => say(format_args!("shear watchdog: guest released")),
            Rescue::VmGone => say(format_args!(
                "shear watchdog: the VM is gone (QEMU exited); nothing to release"
            )),
        }
    }
    if let Some((run_dir, vmid)) = record {
        let r = rt.block_on(super::cleanup::cleanup_after_agent(
            run_dir, vmid, qmp, qga, agent_pid, LOCK_WAIT,
        ));
        match r {
            Ok(r) if r.found => say(format_args!(
                "shear watchdog: took back {} change(s) the agent left in VM {vmid}",
                r.undone.len()
            )),
            Ok(_) => {}
            Err(e) => {
                say(format_args!(
                    "shear watchdog: cleanup of VM {vmid} failed ({}); `shear cleanup {vmid}` retries",
                    super::chain(&e)
                ));
                code = 1;
            }
        }
    }
    code
}

/// How a rescue ended (it does not end otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rescue {
    /// Thawed (confirmed by the guest agent) and resumed.
    Released,
    /// The VM is gone: nothing is held any more.
    VmGone,
}

/// How the watchdog reaches a guest: QEMU's monitor and qemu-ga, or
/// libvirt ([`crate::libvirt::rescue`]). One attempt each; the loop in
/// [`rescue_guest`] retries.
pub(crate) trait Release {
    /// Make the guest run again (`held`: what was held); `true` once it
    /// runs.
    async fn resume(&self, held: Held) -> bool;
    /// Thaw the guest; `Ok(true)` once confirmed, `Err(())` when the VM is
    /// gone.
    async fn thaw(&self) -> Result<bool, ()>;
    /// The VM is gone: nothing can be held any more.
    async fn gone(&self) -> bool;
}

/// Release what `held` says, retrying with backoff until released or the
/// VM is gone (never gives up on a frozen or paused guest).
pub(crate) async fn rescue_guest(guest: &impl Release, held: Held) -> Rescue {
    let mut thawed = !held.frozen;
    let mut resumed = !held.paused && !held.stopped;
    let mut backoff = Duration::from_millis(250);
    let mut attempts = 0u32;
    loop {
        // Resume first: a paused guest cannot run qemu-ga's thaw.
        if !resumed {
            resumed = guest.resume(held).await;
        }
        // A paused guest cannot run the thaw, and the thaw loop only ends
        // when thawed: resume first, retry the resume until it works.
        if !thawed && resumed {
            match guest.thaw().await {
                Ok(t) => thawed = t,
                Err(()) => return Rescue::VmGone,
            }
        }
        if thawed && resumed {
            return Rescue::Released;
        }
        if guest.gone().await {
            return Rescue::VmGone;
        }
        attempts += 1;
        if attempts.is_multiple_of(10) {
            say(format_args!(
                "shear watchdog: guest not released yet after {attempts} attempts; still trying"
            ));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// QEMU through its monitor and qemu-ga.
struct QmpGuest<'a> {
    qmp: &'a Path,
    qga: Option<&'a Path>,
}

impl Release for QmpGuest<'_> {
    async fn resume(&self, _held: Held) -> bool {
        try_cont(self.qmp).await
    }
    async fn thaw(&self) -> Result<bool, ()> {
        match self.qga {
            // Keeps trying until thawed, or fails only when the VM is gone.
            Some(qga) => match super::freeze::thaw_recorded(qga, Some(self.qmp)).await {
                Ok(()) => Ok(true),
                Err(e) if super::freeze::is_vm_gone(&e) => Err(()),
                Err(_) => Ok(false),
            },
            None => Ok(true),
        }
    }
    async fn gone(&self) -> bool {
        vm_gone(self.qmp).await
    }
}

async fn rescue(qmp: &Path, qga: Option<&Path>, held: Held) -> Rescue {
    rescue_guest(&QmpGuest { qmp, qga }, held).await
}

/// QEMU is gone: its QMP socket is missing or nobody listens on it.
async fn vm_gone(qmp: &Path) -> bool {
    match tokio::net::UnixStream::connect(qmp).await {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
    }
}

async fn try_cont(qmp: &Path) -> bool {
    let Ok((client, _events)) = qmp::Qmp::connect(qmp, ATTEMPT_TIMEOUT).await else {
        return false;
    };
    super::graph::resume_held(&client).await.is_ok()
}

/// A line on stderr that never panics: the agent's terminal may be gone
/// (a dropped SSH session), and the rescue must go on regardless.
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(line).and_then(|()| e.write_all(b"\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_track_the_last_report() {
        let h = read_states(&b"frozen\n"[..]).unwrap();
        assert!(h.frozen && !h.paused);
        let h = read_states(&b"frozen\nthawed\npaused\n"[..]).unwrap();
        assert!(!h.frozen && h.paused);
        assert_eq!(read_states(&b"frozen\ndone\n"[..]), None);
        assert_eq!(read_states(&b""[..]), Some(Held::default()));
        let h = read_states(&b"stopped\n"[..]).unwrap();
        assert!(h.stopped && !h.paused && !h.frozen);
        assert_eq!(
            read_states(&b"stopped\nresumed\n"[..]),
            Some(Held::default())
        );
    }
}

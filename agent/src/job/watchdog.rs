//! The thaw watchdog: a child process that outlives the agent.
//!
//! A freeze (or a `stop`) must not outlive the agent (F-04). Before it
//! freezes or pauses a guest, the backup job starts `shear __watchdog` as a
//! child in its own process group (so a terminal's Ctrl-C does not reach it)
//! and keeps the write end of a pipe to its stdin. The job reports its state
//! as lines: `frozen`, `thawed`, `paused`, `resumed`, and `done` when it no
//! longer needs the watchdog. When the pipe closes without `done` — the
//! agent died, even by SIGKILL — the watchdog thaws the guest (if the last
//! state was `frozen`) and resumes it (if `paused`), retrying until a
//! deadline, then exits. Graph cleanup is left to the next `shear` run,
//! which finds the run record.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the watchdog keeps trying to thaw or resume after the agent died.
pub const RESCUE_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline of one qemu-ga / QMP attempt inside the rescue loop.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// What the agent holds, as last reported to the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// The guest's filesystems are frozen by us.
    pub frozen: bool,
    /// The VM is paused by us.
    pub paused: bool,
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
    /// Start `shear __watchdog` for this VM.
    pub fn spawn(qmp: &Path, qga: Option<&Path>) -> std::io::Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("__watchdog").arg("--qmp").arg(qmp);
        if let Some(q) = qga {
            cmd.arg("--qga").arg(q);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = cmd.spawn()?;
        let pipe = child.stdin.take();
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
            "resumed" => held.paused = false,
            "done" => return None,
            _ => {}
        }
    }
    Some(held)
}

/// The watchdog process's main: block on stdin, then rescue if needed.
pub fn run(qmp: &Path, qga: Option<&Path>) -> i32 {
    let held = read_states(std::io::stdin().lock());
    let Some(held) = held else { return 0 };
    if !held.frozen && !held.paused {
        return 0;
    }
    say(format_args!(
        "shear watchdog: the agent exited while holding the guest (frozen: {}, paused: {}); rescuing",
        held.frozen, held.paused
    ));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("shear watchdog: cannot start a runtime: {e}"));
            return 2;
        }
    };
    let ok = rt.block_on(rescue(qmp, qga, held));
    if ok {
        say(format_args!("shear watchdog: guest released"));
        0
    } else {
        say(format_args!(
            "shear watchdog: FAILED to release the guest within {RESCUE_DEADLINE:?}"
        ));
        1
    }
}

async fn rescue(qmp: &Path, qga: Option<&Path>, held: Held) -> bool {
    let deadline = Instant::now() + RESCUE_DEADLINE;
    let mut thawed = !held.frozen;
    let mut resumed = !held.paused;
    while Instant::now() < deadline && !(thawed && resumed) {
        // Resume first: a paused guest cannot run qemu-ga's thaw.
        if !resumed {
            resumed = try_cont(qmp).await;
        }
        if !thawed {
            if let Some(qga) = qga {
                thawed = super::freeze::thaw_recorded(qga).await.is_ok();
            } else {
                thawed = true;
            }
        }
        if !(thawed && resumed) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    thawed && resumed
}

async fn try_cont(qmp: &Path) -> bool {
    let Ok((client, _events)) = qmp::Qmp::connect(qmp, ATTEMPT_TIMEOUT).await else {
        return false;
    };
    super::graph::resume_held(&client).await.is_ok()
}

/// A line on stderr that never panics: the agent's terminal may be gone
/// (a dropped SSH session), and the rescue must go on regardless.
fn say(line: std::fmt::Arguments<'_>) {
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
    }
}

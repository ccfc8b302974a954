//! CPU and I/O priority of the data path: a backup takes idle CPU and idle
//! disk time, the guest's vCPUs and I/O come first (issue 17).
//!
//! Only the data-path threads are lowered — the reader, the hash/compress
//! workers, the releaser — never the control plane: freeze, thaw and the
//! QMP graph changes keep their priority, or a starved thaw could stretch
//! the freeze window. The data path runs on a thread of its own
//! ([`run_lowered`]) that lowers itself before starting the others; Linux
//! threads inherit nice, scheduling policy and I/O priority from the
//! thread that creates them.
//!
//! How (no `unsafe` outside nbd-export's io_uring module):
//! - nice: `setpriority(PRIO_PROCESS, tid)` through `rustix` (already a
//!   dependency; on Linux it applies to the one thread);
//! - `SCHED_BATCH` and the I/O priority: util-linux's `chrt -b -p 0 TID`
//!   and `ionice -c 2 -n N -p TID` (`-c 3` for idle) on the thread, the
//!   way vzdump runs its workers under `ionice`. rustix has neither
//!   `sched_setscheduler` nor `ioprio_set`, and the small crates that do
//!   (`ioprio` 0.2) pull an old `nix`; util-linux is on every Linux host
//!   shear runs on (Debian: Essential). If a tool is missing or fails, the
//!   backup goes on at the priority it has, with a warning.

use std::process::{Command, Stdio};

/// Priority of the data-path threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPriority {
    /// Nice value, 0..=19 (19: CPU only when nobody else wants it).
    pub nice: u8,
    /// I/O priority as vzdump's `ionice`: 0..=7 best-effort level (7 the
    /// lowest), 8 the idle class.
    pub ionice: u8,
    /// `SCHED_BATCH`: no wake-up preemption of the guest's threads.
    pub batch: bool,
}

impl Default for DataPriority {
    /// Nice 19, `SCHED_BATCH`, best-effort 7 (vzdump's default `ionice`).
    fn default() -> Self {
        DataPriority {
            nice: 19,
            ionice: 7,
            batch: true,
        }
    }
}

impl DataPriority {
    /// Leave the priority alone (the thread's own).
    pub const UNCHANGED: DataPriority = DataPriority {
        nice: 0,
        ionice: 4,
        batch: false,
    };

    /// Checks the ranges.
    pub fn validate(self) -> Result<Self, String> {
        if self.nice > 19 {
            return Err(format!("nice {} is not in 0..=19", self.nice));
        }
        if self.ionice > 8 {
            return Err(format!(
                "ionice {} is not in 0..=8 (8: idle class)",
                self.ionice
            ));
        }
        Ok(self)
    }

    /// Applies to the calling thread (and so to the threads it starts
    /// afterwards). Returns what could not be applied.
    pub fn apply_to_current_thread(self) -> Vec<String> {
        let mut failed = Vec::new();
        if self == Self::UNCHANGED {
            return failed;
        }
        let Some(tid) = current_tid() else {
            failed.push("the thread's id is unknown (/proc/thread-self)".into());
            return failed;
        };
        let tid_s = tid.to_string();
        if self.nice > 0 {
            let r = rustix::process::Pid::from_raw(tid)
                .ok_or(rustix::io::Errno::INVAL)
                .and_then(|p| rustix::process::setpriority_process(Some(p), i32::from(self.nice)));
            if let Err(e) = r {
                failed.push(format!("nice {}: {e}", self.nice));
            }
        }
        if self.batch {
            if let Err(e) = run_tool("chrt", &["-b", "-p", "0", &tid_s]) {
                failed.push(format!("SCHED_BATCH: {e}"));
            }
        }
        let (class, level) = if self.ionice >= 8 {
            ("3", None)
        } else {
            ("2", Some(self.ionice.to_string()))
        };
        let mut args = vec!["-c", class];
        if let Some(l) = &level {
            args.extend(["-n", l.as_str()]);
        }
        args.extend(["-p", &tid_s]);
        if let Err(e) = run_tool("ionice", &args) {
            failed.push(format!("ionice {}: {e}", self.ionice));
        }
        failed
    }
}

fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a new thread named `name` that first lowers itself to
/// `prio` (so does every thread `f` starts); waits for it. Warnings (what
/// could not be lowered) go to `warn`. Fails only if no thread can be
/// started.
pub fn run_lowered<T: Send>(
    name: &str,
    prio: DataPriority,
    warn: &(dyn Fn(String) + Sync),
    f: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name(name.to_string())
            .spawn_scoped(s, move || {
                for w in prio.apply_to_current_thread() {
                    warn(format!("the data path keeps its priority: {w}"));
                }
                f()
            })?;
        match h.join() {
            Ok(v) => Ok(v),
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// The calling thread's id (from `/proc/thread-self`, `PID/task/TID`).
pub fn current_tid() -> Option<i32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// `(nice, policy)` of thread `tid` of this process, from
/// `/proc/self/task/TID/stat` (fields 19 and 41).
pub fn thread_sched(tid: i32) -> Option<(i32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at field 3.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let nice = f.get(19 - 3)?.parse().ok()?;
    let policy = f.get(41 - 3)?.parse().ok()?;
    Some((nice, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ionice_of(tid: i32) -> String {
        let out = Command::new("ionice")
            .args(["-p", &tid.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn have_tools() -> bool {
        ["chrt", "ionice"].iter().all(|t| {
            Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    #[test]
    fn lowered_thread_and_its_children_get_the_priority_the_caller_keeps_its_own() {
        if !have_tools() {
            eprintln!("chrt/ionice missing: skipped");
            return;
        }
        let me = current_tid().unwrap();
        let (my_nice, my_policy) = thread_sched(me).unwrap();
        for (prio, want_io) in [
            (
                DataPriority {
                    nice: 19,
                    ionice: 8,
                    batch: true,
                },
                "idle",
            ),
            (
                DataPriority {
                    nice: 7,
                    ionice: 6,
                    batch: false,
                },
                "best-effort: prio 6",
            ),
        ] {
            let warnings = std::sync::Mutex::new(Vec::new());
            let (outer, inner) = run_lowered(
                "test-lowered",
                prio,
                &|w| warnings.lock().unwrap().push(w),
                || {
                    let t = current_tid().unwrap();
                    let child = std::thread::spawn(|| {
                        let c = current_tid().unwrap();
                        (thread_sched(c).unwrap(), ionice_of(c))
                    })
                    .join()
                    .unwrap();
                    ((thread_sched(t).unwrap(), ionice_of(t)), child)
                },
            )
            .unwrap();
            assert!(warnings.lock().unwrap().is_empty(), "{warnings:?}");
            let want_policy = if prio.batch { 3 } else { 0 };
            for (what, ((nice, policy), io)) in [("thread", outer), ("child", inner)] {
                assert_eq!(nice, i32::from(prio.nice), "{what} nice");
                assert_eq!(policy, want_policy, "{what} policy");
                assert_eq!(io, want_io, "{what} ionice");
            }
        }
        assert_eq!(thread_sched(me).unwrap(), (my_nice, my_policy));
    }

    #[test]
    fn ranges_are_checked() {
        DataPriority::default().validate().unwrap();
        DataPriority {
            nice: 20,
            ..DataPriority::default()
        }
        .validate()
        .unwrap_err();
        DataPriority {
            ionice: 9,
            ..DataPriority::default()
        }
        .validate()
        .unwrap_err();
    }
}

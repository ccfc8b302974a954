//! Holding the guest while the filters go in, and releasing it: freeze
//! through qemu-ga (snapshot mode), `stop` (suspend mode, or no agent), or
//! an orderly shutdown (stop mode). Each hold is recorded before it is
//! made and reported to the watchdog, so a killed agent's hold is released
//! by the watchdog or the next run.

use std::time::{Duration, Instant};

use super::backup::{ms, BackupRun, Hold, Mode};
use super::cancel::Cancel;
use super::graph::GraphBuilder;
use super::record::Step;
use super::watchdog::Watchdog;
use super::{chain, JobError};
use crate::repo::Consistency;

/// Report a state line to the watchdog, if there is one.
pub(crate) fn tell_watchdog(w: &mut Option<Watchdog>, state: &str) {
    if let Some(w) = w.as_mut() {
        if let Err(e) = w.report(state) {
            tracing::warn!("thaw watchdog unreachable: {e}");
        }
    }
}

impl BackupRun {
    /// Phase `hold`: freeze, pause or shut down the guest, as the mode and
    /// the agent allow. Sets `hold`, `hold_start` and `consistency`.
    pub(super) async fn hold(&mut self) -> Result<(), JobError> {
        self.hold_start = Instant::now();
        self.hold = match self.opts.mode {
            // A VM someone else paused is not ours to shut down, reset or
            // resume (F-29): back it up as it is.
            Mode::Stop if !self.was_running => Hold::None,
            Mode::Stop => {
                self.stop_mode_hook(crate::hookscript::HookPhase::PreStop)
                    .await;
                self.stop_guest().await?;
                self.consistency = Consistency::Application;
                Hold::ShutDown
            }
            Mode::Snapshot if self.agent.is_some() => self.freeze_or_pause().await?,
            _ => self.pause().await?,
        };
        Ok(())
    }

    /// Freeze through qemu-ga; if the freeze fails, pause instead.
    async fn freeze_or_pause(&mut self) -> Result<Hold, JobError> {
        let agent = self
            .agent
            .take()
            .ok_or_else(|| JobError::Invalid("qemu-ga connection vanished".into()))?;
        self.graph()?.log(Step::Freeze)?;
        tell_watchdog(&mut self.watchdog, "frozen");
        match guest_agent::FreezeGuard::freeze(agent, guest_agent::FreezeScope::All).await {
            Ok(guard) => {
                self.consistency = Consistency::Application;
                return Ok(Hold::Frozen(Box::new(guard)));
            }
            Err(guest_agent::Error::AlreadyFrozen) => {
                // Not ours: never thaw it (F-05).
                self.graph()?.forget(&Step::Freeze)?;
                tell_watchdog(&mut self.watchdog, "thawed");
                self.warn(
                    "guest filesystems already frozen by someone else: not freezing, not \
                     thawing; backup is crash-consistent"
                        .into(),
                );
            }
            // The guard ran its thaw loop and could not confirm the thaw:
            // the recorded freeze stays, so teardown, the watchdog and the
            // next run keep trying to thaw it; the run fails at the end.
            Err(
                e @ guest_agent::Error::FreezeFailed {
                    thaw_error: Some(_),
                    ..
                },
            ) => {
                self.warn(format!(
                    "fsfreeze failed and the guest could not be confirmed thawed ({}); will keep \
                     trying; pausing instead",
                    chain(&e)
                ));
                self.thaw_unconfirmed = Some(e);
            }
            Err(e) => {
                self.graph()?.forget(&Step::Freeze)?;
                tell_watchdog(&mut self.watchdog, "thawed");
                self.warn(format!(
                    "fsfreeze failed ({}); guest thawed, pausing instead; backup is \
                     crash-consistent",
                    chain(&e)
                ));
            }
        }
        self.hold_start = Instant::now();
        self.pause().await
    }

    /// Pause the vCPUs (unless someone else already paused the VM: then it
    /// is not ours to resume, F-29).
    async fn pause(&mut self) -> Result<Hold, JobError> {
        if !self.was_running {
            return Ok(Hold::None);
        }
        self.graph()?.log(Step::Pause)?;
        tell_watchdog(&mut self.watchdog, "paused");
        self.monitor
            .get()?
            .stop()
            .await
            .map_err(JobError::qmp("stop"))?;
        Ok(Hold::Paused)
    }

    /// Phase `release`: thaw / `cont` / `system_reset` + `cont` at once.
    /// Sets `freeze_window_ms`: the freeze as the guard measured it (freeze
    /// sent → thaw answered), else hold → release.
    pub(super) async fn release(&mut self) -> Result<(), JobError> {
        let held = !matches!(self.hold, Hold::None);
        let shut_down = matches!(self.hold, Hold::ShutDown);
        if shut_down {
            self.stop_mode_hook(crate::hookscript::HookPhase::PreRestart)
                .await;
        }
        let r = self.release_hold().await;
        if shut_down && r.is_ok() {
            self.stop_mode_hook(crate::hookscript::HookPhase::PostRestart)
                .await;
        }
        self.released(held, r)
    }

    /// Phases `release` and `export` at once when the guest is frozen: the
    /// thaw is sent first (as early as before), and while the guest thaws
    /// (a round trip to qemu-ga plus the guest's own work: 60-250 ms
    /// here) the exports go in over QMP, which the thaw does not need.
    /// Other holds (pause, shutdown) need the monitor to release: they are
    /// released first, then exported. Both results are kept: a failed
    /// export still waits for the thaw's outcome.
    pub(super) async fn release_and_export(
        &mut self,
    ) -> (Result<(), JobError>, Option<Result<(), JobError>>) {
        if !matches!(self.hold, Hold::Frozen(_)) {
            let released = self.release().await;
            if released.is_err() {
                return (released, None);
            }
            if let Err(e) = self.cancel.check() {
                return (Err(e), None);
            }
            self.phase(super::events::Phase::Export);
            let exported = self.export().await;
            return (released, Some(exported));
        }
        let Hold::Frozen(guard) = std::mem::take(&mut self.hold) else {
            return (Ok(()), None);
        };
        self.phase(super::events::Phase::Export);
        let (thawed, exported) = tokio::join!(guard.thaw(), self.export());
        let r = match thawed {
            Ok(t) => {
                tell_watchdog(&mut self.watchdog, "thawed");
                match self.graph().and_then(|mut g| g.forget(&Step::Freeze)) {
                    Ok(()) => Ok(t.freeze_window),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(JobError::qga("guest-fsfreeze-thaw")(e)),
        };
        (self.released(true, r), Some(exported))
    }

    /// After a release: the freeze window and its alarm.
    fn released(
        &mut self,
        held: bool,
        r: Result<Option<Duration>, JobError>,
    ) -> Result<(), JobError> {
        self.freeze_window_ms = match &r {
            Ok(Some(w)) => Some(ms(*w)),
            _ => held.then(|| ms(self.hold_start.elapsed())),
        };
        if let Some(w) = window_alarm(self.freeze_window_ms) {
            self.warn(w);
        }
        r.map(|_| ())
    }

    async fn release_hold(&mut self) -> Result<Option<Duration>, JobError> {
        match std::mem::take(&mut self.hold) {
            Hold::Frozen(guard) => {
                let thawed = guard
                    .thaw()
                    .await
                    .map_err(JobError::qga("guest-fsfreeze-thaw"))?;
                tell_watchdog(&mut self.watchdog, "thawed");
                self.graph()?.forget(&Step::Freeze)?;
                Ok(thawed.freeze_window)
            }
            held @ (Hold::Paused | Hold::ShutDown) => {
                let qmp = self.monitor.get()?;
                // A guest we shut down (stop mode) boots again first.
                if matches!(held, Hold::ShutDown) {
                    qmp.system_reset()
                        .await
                        .map_err(JobError::qmp("system_reset"))?;
                }
                qmp.cont().await.map_err(JobError::qmp("cont"))?;
                tell_watchdog(&mut self.watchdog, "resumed");
                self.graph()?.forget(&Step::Pause)?;
                Ok(None)
            }
            Hold::None => Ok(None),
        }
    }

    /// Run the vzdump hook script (if any) at a stop-mode phase; a failure
    /// is a warning, as in vzdump.
    async fn stop_mode_hook(&mut self, phase: crate::hookscript::HookPhase) {
        let Some(hooks) = self.opts.script.clone() else {
            return;
        };
        if let Some(w) = hooks.run_or_warn(phase).await {
            self.warn(w);
        }
    }

    /// Stop mode: make a guest shutdown pause the VM instead of ending QEMU,
    /// ask the guest to power down, wait until it has.
    async fn stop_guest(&mut self) -> Result<(), JobError> {
        // QEMU has no query for the current action; restore its default.
        self.graph()?.log(Step::ShutdownAction {
            restore: "poweroff".into(),
        })?;
        self.monitor
            .get()?
            .execute_value(
                "set-action",
                serde_json::json!({"shutdown": "pause", "reboot": "reset"}),
            )
            .await
            .map_err(JobError::qmp("set-action shutdown=pause"))?;
        // From here the VM is "held": if we die, the watchdog (or the next
        // run) boots it again.
        self.graph()?.log(Step::Pause)?;
        tell_watchdog(&mut self.watchdog, "paused");
        self.monitor
            .get()?
            .system_powerdown()
            .await
            .map_err(JobError::qmp("system_powerdown"))?;
        wait_shut_down(self.monitor.get()?, self.opts.stop_timeout, &self.cancel).await
    }

    fn graph(&mut self) -> Result<GraphBuilder<'_>, JobError> {
        Ok(GraphBuilder::new(
            self.monitor.get()?,
            &mut self.record,
            &self.rpath,
        ))
    }
}

async fn wait_shut_down(
    qmp: &qmp::Qmp,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), JobError> {
    let deadline = Instant::now() + timeout;
    loop {
        cancel.check()?;
        let st = qmp
            .query_status()
            .await
            .map_err(JobError::qmp("query-status"))?;
        if !st.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(JobError::Invalid(format!(
                "the guest did not shut down within {timeout:?} (stop mode)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The freeze window above which a run warns (F-07's alarm level): the
/// guest's applications had their writes blocked that long.
pub(super) const WINDOW_ALARM_MS: u64 = 5_000;

/// The warning for a freeze (or pause) window over [`WINDOW_ALARM_MS`].
/// A Linux guest holds a freeze as long as asked; Windows VSS gives up
/// after 10 s, so a window this long would cost a Windows guest its
/// application consistency.
pub(super) fn window_alarm(window_ms: Option<u64>) -> Option<String> {
    let w = window_ms.filter(|&w| w > WINDOW_ALARM_MS)?;
    Some(format!(
        "the guest was held for {:.1} s (freeze window over the {} s alarm level; Windows VSS \
         cannot hold writes past 10 s)",
        Duration::from_millis(w).as_secs_f64(),
        WINDOW_ALARM_MS / 1000
    ))
}

#[cfg(test)]
mod window_tests {
    use super::window_alarm;

    #[test]
    fn window_alarm_only_above_5_s() {
        assert_eq!(window_alarm(None), None);
        assert_eq!(window_alarm(Some(5_000)), None);
        let w = window_alarm(Some(12_345)).unwrap_or_default();
        assert!(w.contains("12.3 s") && w.contains("alarm"), "{w}");
    }
}

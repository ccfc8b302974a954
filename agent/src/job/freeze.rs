//! Freeze helpers the job needs beyond the guest-agent crate's guard: the
//! thaw of a freeze recorded by an earlier (killed) run, used by the run
//! record's undo and by the watchdog.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::{Config, FsFreezeStatus, GuestAgent};

use super::JobError;

/// How long to keep trying to thaw a recorded freeze.
const RECORDED_THAW_DEADLINE: Duration = Duration::from_secs(30);

/// Thaw a freeze that a record says this agent made: reconnect (fresh sync
/// id each attempt), and thaw while the status says frozen, until the status
/// is `thawed` or the deadline passes. An unreachable agent with no way to
/// learn the status is an error (the caller reports it loudly).
pub async fn thaw_recorded(qga: &Path) -> Result<(), JobError> {
    let deadline = Instant::now() + RECORDED_THAW_DEADLINE;
    let mut last_err = None;
    while Instant::now() < deadline {
        match try_thaw(qga).await {
            Ok(()) => return Ok(()),
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last_err.unwrap_or_else(|| JobError::Invalid("thaw deadline passed".into())))
}

async fn try_thaw(qga: &Path) -> Result<(), JobError> {
    let mut agent = GuestAgent::connect(qga, Config::default())
        .await
        .map_err(JobError::qga("connect to qemu-ga for thaw"))?;
    if agent
        .fsfreeze_status()
        .await
        .map_err(JobError::qga("guest-fsfreeze-status"))?
        == FsFreezeStatus::Frozen
    {
        agent
            .fsfreeze_thaw()
            .await
            .map_err(JobError::qga("guest-fsfreeze-thaw"))?;
        if agent
            .fsfreeze_status()
            .await
            .map_err(JobError::qga("guest-fsfreeze-status"))?
            == FsFreezeStatus::Frozen
        {
            return Err(JobError::Invalid("still frozen after thaw".into()));
        }
    }
    Ok(())
}

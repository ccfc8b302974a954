//! Thawing a freeze recorded by this agent (by an earlier, killed run, or
//! one whose guard could not confirm the thaw): used by the run record's
//! undo and by the watchdog. The retry loop (reconnect, resync, thaw until
//! `guest-fsfreeze-status` says thawed) is guest-agent's `thaw_blocking`,
//! run on a blocking thread.

use std::path::Path;
use std::time::{Duration, Instant};

use super::JobError;

/// How long to keep trying to thaw a recorded freeze.
const RECORDED_THAW_DEADLINE: Duration = Duration::from_secs(30);

/// Thaw a freeze that a record says this agent made. Only for our own
/// freezes: it sends a thaw whatever the status.
pub async fn thaw_recorded(qga: &Path) -> Result<(), JobError> {
    let path = qga.to_path_buf();
    let deadline = Instant::now() + RECORDED_THAW_DEADLINE;
    tokio::task::spawn_blocking(move || guest_agent::thaw_blocking(path, deadline))
        .await
        .map_err(|e| JobError::Invalid(format!("thaw thread failed: {e}")))?
        .map(|_| ())
        .map_err(JobError::qga("thaw of a recorded freeze"))
}

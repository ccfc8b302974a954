//! Thawing a freeze recorded by this agent (by an earlier, killed run, or
//! one whose guard could not confirm the thaw): used by the run record's
//! undo and by the watchdog. Each round is guest-agent's `thaw_blocking`
//! (reconnect, resync, thaw until `guest-fsfreeze-status` says thawed) on a
//! blocking thread. Nothing gives up on a frozen guest: rounds repeat, with
//! backoff, until qemu-ga confirms the thaw or the VM is gone (QEMU's QMP
//! socket — else its qemu-ga socket — is missing or nobody listens on it:
//! QEMU exited). An unreachable qemu-ga alone is not "gone": it may come
//! back, and the guest stays frozen until it does.

use std::path::Path;
use std::time::{Duration, Instant};

use super::JobError;

/// Deadline of one thaw round (reconnects and retries inside it).
const THAW_ROUND: Duration = Duration::from_secs(30);
/// Longest pause between two rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Thaw a freeze that a record says this agent made. Only for our own
/// freezes: it sends a thaw whatever the status. Returns only when the
/// guest is confirmed thawed, or with [`JobError::VmGone`]. `qmp` is the
/// VM's QMP socket (the better sign of life), when known.
pub async fn thaw_recorded(qga: &Path, qmp: Option<&Path>) -> Result<(), JobError> {
    let mut backoff = Duration::from_millis(250);
    loop {
        let path = qga.to_path_buf();
        let deadline = Instant::now() + THAW_ROUND;
        let r = tokio::task::spawn_blocking(move || guest_agent::thaw_blocking(path, deadline))
            .await
            .map_err(|e| JobError::Invalid(format!("thaw thread failed: {e}")))?;
        match r {
            Ok(_) => return Ok(()),
            Err(e) => {
                if socket_dead(qmp.unwrap_or(qga)) {
                    return Err(JobError::VmGone(format!(
                        "thaw of a recorded freeze ({})",
                        super::chain(&e)
                    )));
                }
                tracing::warn!(error = %super::chain(&e), "guest not confirmed thawed yet; still trying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether `e` says the VM is gone (nothing left to thaw).
pub fn is_vm_gone(e: &JobError) -> bool {
    matches!(e, JobError::VmGone(_))
}

/// The socket QEMU serves is missing, or nobody listens on it.
fn socket_dead(path: &Path) -> bool {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
    }
}

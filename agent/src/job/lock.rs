//! The per-VM lock (one backup or cleanup of a VM at a time) and the
//! private directories of the run directory.

use std::path::Path;
use std::time::{Duration, Instant};

use super::JobError;

/// Exclusive per-VM lock in the run directory (F-30: one backup per VM).
#[derive(Debug)]
pub(crate) struct VmLock {
    _file: std::fs::File,
}

/// Take the per-VM lock without waiting.
pub(crate) fn lock_vm(run_dir: &Path, vmid: &str) -> Result<VmLock, JobError> {
    let path = run_dir.join(format!("backup-{vmid}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| JobError::io(format!("opening lock {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(VmLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(JobError::Busy(vmid.to_string())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(JobError::io(format!("locking {}", path.display()), e))
        }
    }
}

/// How long a backup waits for the per-VM lock: long enough for a
/// watchdog taking back a killed run's leftovers (it holds the lock for
/// that), short enough that a running backup is reported promptly.
pub(super) const VM_LOCK_WAIT: Duration = Duration::from_secs(15);

/// [`lock_vm`], retrying while another holder has it, up to `wait`.
pub(super) async fn lock_vm_waiting(
    run_dir: &Path,
    vmid: &str,
    wait: Duration,
) -> Result<VmLock, JobError> {
    let deadline = Instant::now() + wait;
    loop {
        match lock_vm(run_dir, vmid) {
            Err(JobError::Busy(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

pub(super) fn private_dir(path: &Path) -> Result<(), JobError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| JobError::io(format!("creating {}", path.display()), e))
}

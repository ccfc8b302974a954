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

impl Drop for VmLock {
    fn drop(&mut self) {
        // No role left behind for the next holder's waiters to misread.
        let _ = self._file.set_len(0);
    }
}

/// Who holds a per-VM lock (written into the lock file once held, so a
/// waiter can tell a backup from a short cleanup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockRole {
    /// A backup run: another backup is refused at once.
    Backup,
    /// `shear cleanup` or a watchdog taking back a killed run: brief; a
    /// backup waits for it.
    Cleanup,
    /// A `shear snapshot` operation (seconds): a backup waits for it.
    Snapshot,
}

impl LockRole {
    fn as_str(self) -> &'static str {
        match self {
            LockRole::Backup => "backup",
            LockRole::Cleanup => "cleanup",
            LockRole::Snapshot => "snapshot",
        }
    }
}

fn lock_path(run_dir: &Path, vmid: &str) -> std::path::PathBuf {
    run_dir.join(format!("backup-{vmid}.lock"))
}

/// Take the per-VM lock as a cleanup, without waiting.
pub(crate) fn lock_vm(run_dir: &Path, vmid: &str) -> Result<VmLock, JobError> {
    lock_vm_as(run_dir, vmid, LockRole::Cleanup)
}

/// Take the per-VM lock as `role`, without waiting.
pub(crate) fn lock_vm_as(run_dir: &Path, vmid: &str, role: LockRole) -> Result<VmLock, JobError> {
    use std::io::{Seek, Write};
    let path = lock_path(run_dir, vmid);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| JobError::io(format!("opening lock {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => {
            // Best effort: the role only decides whether a backup waits.
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = write!(file, "{} {}", role.as_str(), std::process::id());
            Ok(VmLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(JobError::Busy(vmid.to_string())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(JobError::io(format!("locking {}", path.display()), e))
        }
    }
}

/// How long a backup waits for the per-VM lock while a cleanup holds it
/// (a watchdog taking back a killed run's leftovers: milliseconds to
/// seconds). Another backup holding it is reported at once (F-30).
pub(super) const VM_LOCK_WAIT: Duration = Duration::from_secs(15);

/// Take the per-VM lock for a backup, waiting up to `wait` while a cleanup
/// holds it; `Busy` at once while another backup does.
pub(super) async fn lock_vm_waiting(
    run_dir: &Path,
    vmid: &str,
    wait: Duration,
) -> Result<VmLock, JobError> {
    let deadline = Instant::now() + wait;
    loop {
        match lock_vm_as(run_dir, vmid, LockRole::Backup) {
            Err(JobError::Busy(v)) => {
                let holder = std::fs::read_to_string(lock_path(run_dir, vmid)).unwrap_or_default();
                if holder.starts_with(LockRole::Backup.as_str()) || Instant::now() >= deadline {
                    return Err(JobError::Busy(v));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

pub(crate) fn private_dir(path: &Path) -> Result<(), JobError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| JobError::io(format!("creating {}", path.display()), e))
}

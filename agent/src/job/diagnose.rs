//! Why a read of the export failed (issue 16): the NBD error alone (often
//! EPERM from `snapshot-access` once copy-before-write broke the snapshot)
//! hides the cause. Upstream QEMU exposes neither the filter's snapshot
//! error nor I/O statistics for nodes without a BlockBackend, and emits no
//! event for a copy-before-write failure, so the cause is found from what
//! can be checked: whether QEMU still answers, whether our export still
//! exists, the errno, and whether the fleecing storage has room left.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::JobError;

/// How long each check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Room the fleecing storage needs for copy-before-write to go on: one
/// block-copy chunk (1 MiB) plus qcow2 metadata, with margin.
const PROBE_BYTES: usize = 2 << 20;

/// Give a failed read ([`JobError::ReadFailed`]) its cause; other errors
/// are returned as they are. Called while QMP is still connected.
pub(super) async fn explain(qmp: Option<&qmp::Qmp>, fleecing_dir: &Path, e: JobError) -> JobError {
    match e {
        JobError::ReadFailed {
            disk,
            offset,
            cause: None,
            source,
        } => {
            let cause = cause(qmp, fleecing_dir, &source).await;
            JobError::ReadFailed {
                disk,
                offset,
                cause: Some(cause),
                source,
            }
        }
        other => other,
    }
}

async fn cause(qmp: Option<&qmp::Qmp>, fleecing_dir: &Path, source: &nbd_export::Error) -> String {
    let Some(qmp) = qmp else {
        return "QEMU exited or closed its monitor (cannot reconnect)".to_string();
    };
    match tokio::time::timeout(CHECK_TIMEOUT, qmp.query_status()).await {
        Err(_) => return format!("QEMU does not answer QMP within {CHECK_TIMEOUT:?} (hung?)"),
        Ok(Err(e)) => return format!("QEMU exited or closed its monitor ({})", super::chain(&e)),
        Ok(Ok(_)) => {}
    }
    let failed = match source.root() {
        // snapshot-access refuses every request once the snapshot broke:
        // a read's EACCES arrives as EPERM, but a sparse read fails in its
        // hole check as EINVAL "unable to check for holes: Permission
        // denied", and block status as EINVAL "can't get block status"
        // (F-11). Counted as the snapshot's refusal (EPERM).
        nbd_export::Error::Command {
            command,
            errno,
            message,
            ..
        } if message.contains("Permission denied")
            || (*errno == nbd_export::wire::NBD_EINVAL && message.contains("block status")) =>
        {
            Some((*command, nbd_export::wire::NBD_EPERM))
        }
        nbd_export::Error::Command { command, errno, .. } => Some((*command, *errno)),
        _ => None,
    };
    // Once copy-before-write broke the snapshot (break-snapshot), every
    // request on snapshot-access fails: reads with EACCES (NBD: EPERM),
    // block status with EINVAL. The errno does not say why; the fleecing
    // storage does.
    let fleece = fleecing_dir.display();
    match (failed, probe_space(fleecing_dir)) {
        (Some(_), Err(e)) if e.kind() == std::io::ErrorKind::StorageFull => format!(
            "copy-before-write broke the snapshot: the fleecing storage {fleece} is full \
             (No space left on device, ENOSPC): guest writes during the backup need room for \
             the old data"
        ),
        (Some(_), Err(e)) => format!(
            "copy-before-write broke the snapshot: the fleecing storage {fleece} fails writes \
             ({e})"
        ),
        (Some((_, nbd_export::wire::NBD_EPERM)), Ok(())) => format!(
            "copy-before-write broke the snapshot: saving old data to the fleecing image failed \
             (an I/O error or cbw-timeout; {fleece} has room left)"
        ),
        (Some((command, errno)), Ok(())) => format!(
            "QEMU failed {command} with {} (the source disk or its storage failed, or \
             copy-before-write broke the snapshot; {fleece} has room left)",
            nbd_export::wire::errno_name(errno)
        ),
        (None, _) => match tokio::time::timeout(CHECK_TIMEOUT, qmp.query_block_exports()).await {
            Ok(Ok(exports)) if !exports.iter().any(|x| x.id.starts_with("shear-exp")) => {
                "the export is gone while QEMU runs (removed by someone else)".into()
            }
            _ => "the NBD connection broke while QEMU still runs".into(),
        },
    }
}

/// Write (then remove) a file of [`PROBE_BYTES`] in the fleecing directory:
/// an error is why copy-before-write could not write there either.
fn probe_space(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(format!(".shear-space-probe-{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0xa5u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    r
}

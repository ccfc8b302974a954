//! VM snapshots (`shear snapshot`): qcow2 internal snapshots of every disk
//! of a running VM at one instant, with or without its memory, named,
//! described, listed, rolled back, deleted and pruned.
//!
//! Snapshots are not backups: they live in the VM's own images and die
//! with them. They are for "come back to this exact point" before a risky
//! change, and should not be kept for days (a qcow2 image with old internal
//! snapshots keeps every overwritten cluster): `list` marks those past the
//! configured age (`snapshot_max_age`, default 48 h) and `prune` removes
//! them.
//!
//! How (QEMU 10, see design.md "Snapshots with memory"):
//! - disk-only `create`: freeze through qemu-ga when it answers, one QMP
//!   `transaction` of `blockdev-snapshot-internal-sync` on every disk (QEMU
//!   aborts the whole transaction if one disk fails: all disks or none),
//!   thaw on every path (the thaw watchdog covers a killed shear);
//! - `create --vmstate`: the `snapshot-save` job (the VM's RAM and device
//!   state go into one qcow2 disk, `--vmstate-disk`, default the first),
//!   waited for with a deadline and dismissed; on failure every disk's
//!   snapshot with that tag is deleted;
//! - `rollback` with memory: the `snapshot-load` job (the VM resumes where
//!   it was saved); without memory, QEMU cannot apply an internal snapshot
//!   under a running VM's disks: shear refuses while QEMU runs and, once
//!   the VM is stopped, applies it offline (`qemu-img snapshot -a`) to the
//!   image files recorded at creation;
//! - a rollback changes the disks behind the change-tracking bitmaps'
//!   back: shear removes its own tracking bitmaps (`shear-…`), so the next
//!   backup reads each disk in full, saying why.
//!
//! Names: QEMU has no rename and no description for internal snapshots;
//! [`record`] keeps shear's names and descriptions, mapped to QEMU tags,
//! beside the VM in the state directory. QEMU stays the truth for what
//! exists (orphans are flagged both ways by [`record::reconcile`]).
//!
//! Safety: every operation takes the per-VM lock a backup takes (a snapshot
//! and a backup of one VM never run at once); a VM being migrated or paused
//! by someone else is refused; a disk that cannot hold internal snapshots
//! (raw, …) is refused before anything changes.

pub mod ops;
pub mod record;

use std::path::PathBuf;

/// What a snapshot operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A disk's format cannot hold internal snapshots.
    #[error(
        "disk {disk} of VM {vmid} is {format} ({filename}): {format} images cannot hold \
         internal snapshots; every disk must be qcow2 (convert it with `qemu-img convert -O \
         qcow2` while the VM is stopped, then attach the qcow2 image); nothing was changed"
    )]
    Unsupported {
        /// VM id.
        vmid: String,
        /// The disk.
        disk: String,
        /// Its format driver.
        format: String,
        /// Its image file.
        filename: String,
    },
    /// No snapshot of that name.
    #[error("VM {vmid} has no snapshot named {name:?} (see `shear snapshot {vmid} list`)")]
    NotFound {
        /// VM id.
        vmid: String,
        /// The name.
        name: String,
    },
    /// The name is taken.
    #[error("VM {vmid} already has a snapshot named {name:?}")]
    Exists {
        /// VM id.
        vmid: String,
        /// The name.
        name: String,
    },
    /// A name shear does not accept.
    #[error("bad snapshot name {0:?}: {1}")]
    BadName(String, String),
    /// The VM is in a state shear does not snapshot or roll back.
    #[error("refusing VM {vmid}: {why}")]
    Refused {
        /// VM id.
        vmid: String,
        /// Why.
        why: String,
    },
    /// A rollback without memory on a running QEMU.
    #[error(
        "snapshot {name:?} of VM {vmid} has no memory state: QEMU cannot apply an internal \
         snapshot under a running VM's disks. Stop the VM, then run `shear snapshot {vmid} \
         rollback {name}` again: it applies the snapshot offline (qemu-img snapshot -a) to \
         the image files recorded at creation; then start the VM"
    )]
    NeedsStop {
        /// VM id.
        vmid: String,
        /// The snapshot.
        name: String,
    },
    /// Another backup or snapshot of the VM holds the per-VM lock.
    #[error("a shear backup or snapshot of VM {0} is running; try again when it has finished")]
    Busy(String),
    /// The rollback was not confirmed.
    #[error("rollback not confirmed: {0}")]
    NotConfirmed(String),
    /// QEMU failed a step (the VM was left as the message says).
    #[error("QMP: {step}")]
    Qmp {
        /// The step.
        step: String,
        /// Cause.
        #[source]
        source: qmp::Error,
    },
    /// A step shared with backups failed (connect, identity, freeze…).
    #[error(transparent)]
    Job(#[from] crate::job::JobError),
    /// The snapshot record.
    #[error("snapshot record {path}: {what}")]
    Record {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// An offline step (`qemu-img`) failed.
    #[error("{0}")]
    Offline(String),
}

impl SnapshotError {
    /// `map_err` adapter for a QMP step.
    pub fn qmp(step: impl Into<String>) -> impl FnOnce(qmp::Error) -> SnapshotError {
        let step = step.into();
        move |source| SnapshotError::Qmp { step, source }
    }
}

//! Incremental backups on QEMU dirty bitmaps: which disks can be read
//! incrementally, the bitmap split inside the hold, and what undo does.
//!
//! One tracking bitmap per disk per repository, named
//! `shear-<repo id>-<generation>`: the repository id keeps two repositories'
//! chains apart; the generation is random per backup and recorded in that
//! backup's manifest (`disks[].read.bitmap`), so a bitmap always names the
//! backup whose freeze instant it counts changes since. Every backup stays
//! logically full (clean chunks reuse the base index's digests), so prune
//! and gc need no knowledge of chains.
//!
//! The split, inside the hold (one QMP `transaction` per run, together with
//! the copy-before-write filters): add the new bitmap (persistent on qcow2)
//! and disable the old one. The old bitmap now holds exactly the changes
//! between the base's freeze and this freeze; it is exported with the
//! snapshot and read as `qemu:dirty-bitmap:<old>`. New writes go to the new
//! bitmap. The split is write-ahead logged as [`Step::BitmapSplit`]:
//! - on failure (and after SIGKILL, by the next run or the watchdog) undo
//!   re-enables the old bitmap, merges the new one into it and removes the
//!   new one: no change is lost and the chain goes on from the base;
//! - on success the step becomes [`Step::BitmapRetire`] (remove the old
//!   bitmap at teardown); if the manifest then fails to commit, the new
//!   bitmap names no backup, and the next run reads in full.
//!
//! Trust nothing unproven: whenever the bitmap or its base cannot be shown
//! to be right, the disk is read in full (with dedup, so the repository
//! does not grow) and the reason is reported; no user action is ever needed.
//!
//! [`Step::BitmapSplit`]: super::record::Step::BitmapSplit
//! [`Step::BitmapRetire`]: super::record::Step::BitmapRetire

use std::collections::HashMap;
use std::sync::Arc;

use qmp::{BitmapAddOptions, DirtyBitmapInfo, TransactionAction};

use super::graph::{bitmaps_on, VmDisk};
pub use super::graph::{remove_bitmap, undo_split};
use super::JobError;
use crate::repo::{self, BackupId, Digest, Repository, VmId};

/// Prefix of every bitmap shear makes for the repository `repo_id`.
pub fn bitmap_prefix(repo_id: &str) -> String {
    let short: String = repo_id.chars().take(16).collect();
    format!("shear-{short}-")
}

/// The base an incremental read reuses.
#[derive(Debug, Clone)]
pub struct IncrementalBase {
    /// The backup whose index the clean chunks come from.
    pub backup: BackupId,
    /// Its index entries (one digest per chunk).
    pub digests: Arc<Vec<Digest>>,
    /// Bytes the old bitmap marks dirty (at planning time; the split
    /// freezes it a moment later).
    pub dirty_bytes: u64,
}

/// The change-tracking plan of one disk for this run.
#[derive(Debug, Clone)]
pub struct DiskTracking {
    /// Node that holds the bitmaps (the device's node).
    pub node: String,
    /// The bitmap this run creates (counts from this run's freeze).
    pub new_bitmap: String,
    /// Whether it is stored in the image (qcow2).
    pub persistent: bool,
    /// Our valid bitmap that counted up to now (disabled in the split,
    /// merged back on failure, removed on success).
    pub old_bitmap: Option<String>,
    /// Set when the disk is read incrementally.
    pub base: Option<IncrementalBase>,
    /// Why the disk is read in full.
    pub full_reason: Option<String>,
}

impl DiskTracking {
    /// The QMP actions of the split (in the hold's transaction).
    pub fn split_actions(&self) -> Vec<TransactionAction> {
        let mut v = vec![TransactionAction::bitmap_add(
            &self.node,
            &self.new_bitmap,
            BitmapAddOptions {
                persistent: Some(self.persistent),
                ..BitmapAddOptions::default()
            },
        )];
        if let Some(old) = &self.old_bitmap {
            v.push(TransactionAction::bitmap_disable(&self.node, old));
        }
        v
    }

    /// The manifest's record of how this disk is read.
    pub fn read_record(&self, filename: &str, dirty_bytes: Option<u64>) -> repo::DiskRead {
        repo::DiskRead {
            kind: if self.base.is_some() {
                repo::ReadKind::Incremental
            } else {
                repo::ReadKind::Full
            },
            full_reason: self.full_reason.clone(),
            base: self.base.as_ref().map(|b| b.backup.to_string()),
            dirty_bytes,
            bitmap: Some(self.new_bitmap.clone()),
            bitmap_persistent: self.persistent,
            filename: filename.to_string(),
            fleece_peak_bytes: None,
        }
    }
}

/// What planning found: a plan per disk (same order as the disks), our
/// bitmaps to remove before the hold (stale, inconsistent, disabled), and
/// warnings for the report.
#[derive(Debug, Default)]
pub struct TrackingPlan {
    /// Per disk.
    pub disks: Vec<DiskTracking>,
    /// `(node, bitmap)` of ours that cannot be used.
    pub remove: Vec<(String, String)>,
    /// Things to tell the user.
    pub warnings: Vec<String>,
}

/// One committed backup's record of a disk, by the bitmap it started.
#[derive(Debug, Clone)]
struct Started {
    backup: BackupId,
    entry: repo::DiskEntry,
    /// The key fingerprint the backup was written with (its manifest's).
    key_fingerprint: Option<String>,
}

/// Plan change tracking for `disks`. `force_full`: `--full`.
pub async fn plan(
    qmp: &qmp::Qmp,
    repo: &Repository,
    vmid: &str,
    disks: &[VmDisk],
    force_full: bool,
) -> Result<TrackingPlan, JobError> {
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(JobError::qmp("query-named-block-nodes"))?;
    let bitmaps_of = |node: &str| -> Vec<DirtyBitmapInfo> {
        nodes
            .iter()
            .find(|n| n.node_name == node)
            .map(|n| n.dirty_bitmaps.clone())
            .unwrap_or_default()
    };
    let prefix = bitmap_prefix(&repo.repo_id());
    let started = started_bitmaps(repo, vmid)?;
    let chunk_size = repo.config().chunk_size;
    let fingerprint = repo
        .config()
        .encryption
        .as_ref()
        .map(|e| e.key_fingerprint.clone());
    let mut plan = TrackingPlan::default();
    for disk in disks {
        let persistent = disk.format == "qcow2";
        let mut t = DiskTracking {
            node: disk.node.clone(),
            new_bitmap: format!("{prefix}{}", random_generation()),
            persistent,
            old_bitmap: None,
            base: None,
            full_reason: None,
        };
        let mut ours: Vec<DirtyBitmapInfo> = bitmaps_of(&disk.node)
            .into_iter()
            .filter(|b| b.name.starts_with(&prefix))
            .collect();
        if let Some(w) = heal_interrupted_split(qmp, &disk.node, &ours, &started).await? {
            plan.warnings.push(format!("disk {}: {w}", disk.name));
            ours = bitmaps_on(qmp, &disk.node)
                .await?
                .unwrap_or_default()
                .into_iter()
                .filter(|b| b.name.starts_with(&prefix))
                .collect();
        }
        // Pick the one bitmap a committed backup started; every other one
        // of ours is a leftover (a failed or uncommitted run's).
        let mut chosen: Option<(DirtyBitmapInfo, Started)> = None;
        let had_ours = !ours.is_empty();
        for b in ours {
            match started.get(&b.name) {
                Some(s) if chosen.is_none() && s.entry.name == disk.name => {
                    chosen = Some((b, s.clone()));
                }
                _ => plan.remove.push((disk.node.clone(), b.name)),
            }
        }
        let verdict = match chosen {
            None if had_ours => Err(
                "the backup that the disk's change-tracking bitmap counts from is not in the \
                 repository (pruned, forgotten, or its run never committed)"
                    .to_string(),
            ),
            None => Err(
                "no change-tracking bitmap for this repository on the disk (first backup to \
                 this repository, or QEMU lost it: VM restarted with a non-persistent bitmap, \
                 migrated without dirty-bitmaps, image replaced, a `shear snapshot` rollback \
                 reset it, or the bitmap's backup is gone)"
                    .to_string(),
            ),
            Some((b, s)) => {
                let v = check(repo, &b, &s, disk, chunk_size, fingerprint.as_deref());
                match &v {
                    // A bitmap QEMU cannot use again (inconsistent, disabled)
                    // goes; a busy one is someone's job: leave it alone.
                    Err(_) if b.inconsistent || !b.recording => {
                        plan.remove.push((disk.node.clone(), b.name.clone()));
                    }
                    Err(_) if b.busy => {}
                    _ => t.old_bitmap = Some(b.name.clone()),
                }
                v
            }
        };
        match verdict {
            Ok(base) if !force_full => t.base = Some(base),
            Ok(_) => t.full_reason = Some("--full was given".into()),
            Err(reason) => t.full_reason = Some(reason),
        }
        if !persistent {
            plan.warnings.push(format!(
                "disk {} is {}: QEMU cannot store its change-tracking bitmap in the image; it \
                 lasts as long as this QEMU process (a VM restart means a full read)",
                disk.name, disk.format
            ));
        }
        plan.disks.push(t);
    }
    Ok(plan)
}

/// A split whose run record is gone (QEMU quit mid-backup: its exit took
/// the undo along): one of our bitmaps that a committed backup started, now
/// disabled, and one of ours that no backup started, still recording. Both
/// were made in one transaction (the split), so their union holds every
/// change since that backup: undo the split now, exactly as the record
/// would have. Returns what was done.
async fn heal_interrupted_split(
    qmp: &qmp::Qmp,
    node: &str,
    ours: &[DirtyBitmapInfo],
    started: &HashMap<String, Started>,
) -> Result<Option<String>, JobError> {
    let usable = |b: &&DirtyBitmapInfo| !b.inconsistent && !b.busy;
    let frozen: Vec<&DirtyBitmapInfo> = ours
        .iter()
        .filter(usable)
        .filter(|b| !b.recording && started.contains_key(&b.name))
        .collect();
    let newer: Vec<&DirtyBitmapInfo> = ours
        .iter()
        .filter(usable)
        .filter(|b| b.recording && !started.contains_key(&b.name))
        .collect();
    let ([old], [new]) = (frozen.as_slice(), newer.as_slice()) else {
        return Ok(None);
    };
    undo_split(qmp, node, Some(&old.name), &new.name).await?;
    Ok(Some(format!(
        "merged the change tracking of an interrupted run ({}) back into {}",
        new.name, old.name
    )))
}

/// Whether a bitmap and the backup it started can serve as a base.
fn check(
    repo: &Repository,
    b: &DirtyBitmapInfo,
    s: &Started,
    disk: &VmDisk,
    chunk_size: u32,
    fingerprint: Option<&str>,
) -> Result<IncrementalBase, String> {
    if b.inconsistent {
        return Err(format!(
            "bitmap {} is inconsistent (QEMU was killed or crashed while it was in use)",
            b.name
        ));
    }
    if b.busy {
        return Err(format!("bitmap {} is busy (in use by another job)", b.name));
    }
    if !b.recording {
        return Err(format!(
            "bitmap {} is disabled (not recording writes)",
            b.name
        ));
    }
    let e = &s.entry;
    if e.virtual_size != disk.virtual_size {
        return Err(format!(
            "the disk's size changed ({} → {} bytes) since backup {}",
            e.virtual_size, disk.virtual_size, s.backup
        ));
    }
    if let Some(read) = &e.read {
        if !read.filename.is_empty() && read.filename != disk.filename {
            return Err(format!(
                "the disk's image was replaced ({} → {}) since backup {}",
                read.filename, disk.filename, s.backup
            ));
        }
    }
    if e.chunk_size != chunk_size {
        return Err(format!(
            "backup {} has another chunk size than the repository",
            s.backup
        ));
    }
    match repo.verify_state(&s.backup) {
        Ok(Some(v)) if v.state != "ok" => {
            return Err(format!(
                "backup {} failed verify ({}); its chunks are not reused",
                s.backup, v.time
            ))
        }
        Ok(_) => {}
        Err(err) => {
            return Err(format!(
                "the verify state of backup {} is unreadable: {}",
                s.backup,
                crate::chain(&err)
            ))
        }
    }
    if s.key_fingerprint.as_deref() != fingerprint {
        return Err(format!("backup {} was written with another key", s.backup));
    }
    let reader = repo.open_backup(&s.backup).map_err(|err| {
        format!(
            "backup {} cannot be opened: {}",
            s.backup,
            crate::chain(&err)
        )
    })?;
    let d = reader.open_disk(&disk.name).map_err(|err| {
        format!(
            "the index of {} in backup {} is unreadable: {}",
            disk.name,
            s.backup,
            crate::chain(&err)
        )
    })?;
    Ok(IncrementalBase {
        backup: s.backup.clone(),
        digests: Arc::new(d.entries().to_vec()),
        dirty_bytes: b.count,
    })
}

/// Every committed backup of `vmid` by the bitmap each disk started.
fn started_bitmaps(repo: &Repository, vmid: &str) -> Result<HashMap<String, Started>, JobError> {
    let vmid = VmId::new(vmid).map_err(JobError::repo("VM id"))?;
    let mut out = HashMap::new();
    let list = repo
        .list_backups(Some(&vmid))
        .map_err(JobError::repo("listing backups"))?;
    for info in list.iter().rev() {
        // An unreadable manifest names no base: the disk is read in full.
        let Ok(m) = repo.load_manifest(&info.id) else {
            continue;
        };
        let key_fingerprint = m.encryption.map(|e| e.key_fingerprint);
        for e in m.disks {
            if let Some(bitmap) = e.read.as_ref().and_then(|r| r.bitmap.clone()) {
                out.entry(bitmap).or_insert(Started {
                    backup: info.id.clone(),
                    entry: e,
                    key_fingerprint: key_fingerprint.clone(),
                });
            }
        }
    }
    Ok(out)
}

fn random_generation() -> String {
    use rand::RngCore;
    let mut b = [0u8; 6];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_names_carry_the_repository() {
        let p = bitmap_prefix("0123456789abcdef0123456789abcdef");
        assert_eq!(p, "shear-0123456789abcdef-");
        let t = DiskTracking {
            node: "drv-d0".into(),
            new_bitmap: format!("{p}aaaa"),
            persistent: true,
            old_bitmap: Some(format!("{p}bbbb")),
            base: None,
            full_reason: None,
        };
        let a = t.split_actions();
        assert_eq!(a.len(), 2, "add the new bitmap, disable the old one");
    }
}

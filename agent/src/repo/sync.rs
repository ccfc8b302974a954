//! `shear sync`: copy committed backups from one repository to another
//! (local ↔ S3 in any direction).
//!
//! Per backup, oldest first: chunks the target lacks, then the indexes, then
//! the manifest last, as a backup writer does. So an interrupted sync leaves
//! nothing listed that is incomplete, and a rerun copies only what did not
//! arrive (chunks present in the target are skipped; a backup whose manifest
//! is there is skipped). Blobs are copied as stored (compressed, encrypted),
//! never re-encoded: index and manifest digests stay valid.
//!
//! The target must have the same chunk size and the same encryption key
//! fingerprint (chunk digests are keyed when encrypted). The indexes of an
//! encrypted repository are encrypted (format v1), so reading which chunks a
//! backup needs takes the key: the key is needed to sync, not to store.
//! In the target the sync is a backup writer: on a local directory it holds
//! the shared repository lock and its new backup's exclusive lock; on an
//! object store it holds an in-progress marker (repo/coord.rs), so GC on
//! the target never deletes a chunk the sync is relying on.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use super::backend::{Coordination, LockMode, LockWait};
use super::blob;
use super::error::{ErrorKind, RepoError, Result};
use super::format::{chunk_len, Digest, ZERO_ENTRY};
use super::names::{BackupId, VmId};
use super::{Repository, MANIFEST_NAME, MAX_CHUNK_BLOB, VM_BACKUPS_KEY};

/// What to copy.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Only this VM's backups.
    pub vmid: Option<VmId>,
    /// Only the newest N backups (per VM).
    pub last: Option<usize>,
    /// Decode every copied chunk and check its digest (needs the key if
    /// encrypted).
    pub verify: bool,
    /// Forget backups in the target (of the selected VM, or all) that the
    /// source no longer has. Protected, in-use, Object-Locked backups and
    /// append-only targets are left and reported; a partial listing of
    /// either side fails instead (F-41).
    pub remove_vanished: bool,
    /// Chunks copied in parallel (0 and 1: one stream). A single stream
    /// collapses on a high-latency link: each chunk is a round trip.
    pub streams: usize,
}

/// What a sync did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Backups copied.
    pub copied: Vec<BackupId>,
    /// Backups already in the target.
    pub already_present: u64,
    /// Chunks copied.
    pub chunks_copied: u64,
    /// Chunks the target had.
    pub chunks_present: u64,
    /// Bytes of chunk, index and manifest blobs written to the target.
    pub bytes_copied: u64,
    /// `remove_vanished`: backups forgotten in the target.
    pub removed: Vec<BackupId>,
    /// `remove_vanished`: vanished backups left in the target, and why.
    pub not_removed: Vec<String>,
}

/// Copies the chunks in `work` the target lacks, over `streams` threads:
/// (copied, already present, bytes copied). The first error stops every
/// stream and is returned.
fn copy_chunks(
    from: &Repository,
    tb: &Arc<dyn super::Backend>,
    work: &[(Digest, usize)],
    key: Option<&super::Key>,
    verify: bool,
    streams: usize,
) -> Result<(u64, u64, u64)> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let (copied, present, bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failed = AtomicBool::new(false);
    let first_err: std::sync::Mutex<Option<RepoError>> = std::sync::Mutex::new(None);
    let one = |digest: &Digest, len: usize| -> Result<()> {
        let ck = Repository::chunk_key(digest);
        if tb.size(&ck)?.is_some() {
            present.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let blob_bytes = from.backend().get(&ck, MAX_CHUNK_BLOB)?;
        if verify {
            blob::check_chunk(&blob_bytes, digest, key, len)?;
        }
        tb.put(&ck, &blob_bytes)?;
        copied.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(blob_bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    std::thread::scope(|sc| {
        for _ in 0..streams.min(work.len()).max(1) {
            sc.spawn(|| {
                while !failed.load(Ordering::Acquire) {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    let Some((d, len)) = work.get(i) else { break };
                    if let Err(e) = one(d, *len) {
                        failed.store(true, Ordering::Release);
                        first_err
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((
        copied.into_inner(),
        present.into_inner(),
        bytes.into_inner(),
    ))
}

/// Copies backups from `from` to `to`; see the module docs.
pub fn sync(from: &Repository, to: &Repository, opts: &SyncOptions) -> Result<SyncReport> {
    let (fc, tc) = (from.config(), to.config());
    if fc.chunk_size != tc.chunk_size {
        return Err(RepoError::invalid(
            "sync target",
            format!(
                "chunk size {} differs from the source's {}: create it with --chunk-size {}",
                tc.chunk_size, fc.chunk_size, fc.chunk_size
            ),
        ));
    }
    let ffp = fc.encryption.as_ref().map(|e| e.key_fingerprint.clone());
    let tfp = tc.encryption.as_ref().map(|e| e.key_fingerprint.clone());
    if ffp != tfp {
        return Err(RepoError::invalid(
            "sync target",
            format!(
                "encryption differs (source key {}, target key {}): create the target with the source's key",
                ffp.as_deref().unwrap_or("none"),
                tfp.as_deref().unwrap_or("none")
            ),
        ));
    }
    let mut ids: Vec<BackupId> = from
        .snapshot_dirs(opts.vmid.as_ref())?
        .into_iter()
        .filter(|s| s.complete)
        .map(|s| s.id)
        .collect();
    if let Some(n) = opts.last {
        let mut keep = Vec::new();
        let vms: HashSet<VmId> = ids.iter().map(|i| i.vmid().clone()).collect();
        for v in vms {
            let mine: Vec<&BackupId> = ids.iter().filter(|i| *i.vmid() == v).collect();
            keep.extend(mine.iter().rev().take(n).map(|i| (*i).clone()));
        }
        keep.sort();
        ids = keep;
    }
    let mut report = SyncReport::default();
    let tb = Arc::clone(to.backend());
    let _repo_lock = to.lock_repo(LockMode::Shared, LockWait::Forever)?;
    let _lease = match tb.coordination() {
        Coordination::Locks => None,
        Coordination::Markers => Some(super::coord::begin_writer_named(&tb, "sync", "sync")?.0),
    };
    let mut known: HashSet<Digest> = HashSet::new();
    for id in ids {
        let mkey = format!("{}/{MANIFEST_NAME}", id.dir_key());
        if tb.size(&mkey)?.is_some() {
            report.already_present += 1;
            continue;
        }
        let m = from.load_manifest(&id)?;
        let mut indexes = Vec::new();
        for d in &m.disks {
            indexes.push((d.clone(), from.load_index(&id, d)?));
        }
        tb.ensure_dir(&format!("{VM_BACKUPS_KEY}/{}", id.vmid()))?;
        match tb.create_dir(&id.dir_key()) {
            Ok(()) => {}
            // A directory an interrupted sync left (no manifest): reuse it.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let _snap = to.lock_snapshot(&id, LockMode::Exclusive, LockWait::NoWait)?;
        let key = from.key_for_data()?;
        // The chunks this backup needs that no earlier one of this run
        // copied or found, each once, with its plain length.
        let mut work: Vec<(Digest, usize)> = Vec::new();
        for (_, idx) in &indexes {
            for (i, digest) in idx.entries.iter().enumerate() {
                if *digest == ZERO_ENTRY || !known.insert(*digest) {
                    continue;
                }
                work.push((
                    *digest,
                    chunk_len(idx.virtual_size, idx.chunk_size, i as u64),
                ));
            }
        }
        let (copied, present, bytes) =
            copy_chunks(from, &tb, &work, key, opts.verify, opts.streams.max(1))?;
        report.chunks_copied += copied;
        report.chunks_present += present;
        report.bytes_copied += bytes;
        for (d, _) in &indexes {
            let ik = format!("{}/{}", id.dir_key(), d.index_file);
            let bytes = from.backend().get(&ik, 1 << 30)?;
            tb.put(&ik, &bytes)?;
            report.bytes_copied += bytes.len() as u64;
        }
        if let Some(l) = &_lease {
            l.check_fresh()?;
        }
        let bytes = from.backend().get(&mkey, 64 << 20)?;
        tb.put(&mkey, &bytes)?;
        if _lease.is_some() {
            super::coord::note_commit(&*tb, &id.dir_key());
        }
        report.bytes_copied += bytes.len() as u64;
        report.copied.push(id);
    }
    if opts.remove_vanished {
        let present: HashSet<BackupId> = from
            .snapshot_dirs_checked(opts.vmid.as_ref())?
            .into_iter()
            .filter(|s| s.complete)
            .map(|s| s.id)
            .collect();
        for s in to.snapshot_dirs_checked(opts.vmid.as_ref())? {
            if !s.complete || present.contains(&s.id) {
                continue;
            }
            match to.forget(&s.id) {
                Ok(()) => report.removed.push(s.id),
                Err(e) => report.not_removed.push(format!("{}: {e}", s.id)),
            }
        }
    }
    Ok(report)
}

//! Garbage collection: mark and sweep, safe while backups run (F-36, F-37).
//!
//! 1. Take `gc.lock` (one GC at a time).
//! 2. Mark, under the *shared* repository lock (backups keep running): read
//!    every committed manifest and index, collect the referenced digests.
//!    Any unreadable manifest or index aborts GC before anything is deleted
//!    (we cannot know what it references); so does any listing error (F-41).
//! 3. Sweep, under the *exclusive* repository lock (no backup, restore or
//!    verify runs; waits at most `wait`): mark again every backup committed
//!    since step 2, then delete unreferenced chunks, temp files of
//!    interrupted writes, abandoned snapshot directories (no manifest) and
//!    half-deleted ones (`.trash-*`), and quarantined `.bad` chunks that
//!    nothing references any more.
//!
//! No wall clock or atime is involved: a chunk a running backup deduplicated
//! against is protected by that backup's shared lock, not by a timestamp.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::backend::{LockMode, LockWait};
use super::error::{ErrorKind, RepoError, Result};
use super::format::{Digest, ZERO_ENTRY};
use super::names::BackupId;
use super::{Repository, CHUNKS_KEY, GC_LOCK_KEY, TRASH_PREFIX, VM_BACKUPS_KEY};

/// GC options.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// How long to wait for running backups/restores before the sweep.
    pub wait: Duration,
    /// Only report what would be deleted.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            wait: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

/// What GC did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Committed backups marked.
    pub backups_marked: u64,
    /// Distinct chunks referenced.
    pub chunks_referenced: u64,
    /// Chunks kept (referenced and present).
    pub chunks_kept: u64,
    /// Unreferenced chunks deleted.
    pub chunks_removed: u64,
    /// Bytes freed by deleted chunks.
    pub bytes_removed: u64,
    /// Temp files removed.
    pub temp_files_removed: u64,
    /// Abandoned or half-deleted snapshot directories removed.
    pub incomplete_backups_removed: u64,
    /// Quarantined `.bad` chunks removed.
    pub bad_chunks_removed: u64,
    /// Object Lock: referenced chunks whose retention was extended.
    pub retention_extended: u64,
    /// Object Lock: unreferenced chunks not deleted because still retained.
    pub chunks_locked: u64,
    /// Object Lock: the latest retain-until date of those (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
    /// Object stores: why nothing was deleted this time (a backup was
    /// running; see repo/coord.rs), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
}

impl Repository {
    /// Runs garbage collection (needs the key if encrypted: indexes are).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        self.key_for_data()?;
        if !opts.dry_run {
            self.require_admin("gc")?;
        }
        let b = &self.inner.backend;
        if b.coordination() == super::backend::Coordination::Markers {
            return self.gc_markers(opts);
        }
        let _gc_lock = b
            .lock(GC_LOCK_KEY, LockMode::Exclusive, LockWait::NoWait)
            .map_err(|e| match e.kind() {
                ErrorKind::Busy => RepoError::Busy {
                    what: "another garbage collection is running".into(),
                },
                _ => e,
            })?;
        let mut report = GcReport::default();
        let mut marked_ids: HashSet<BackupId> = HashSet::new();
        let mut referenced: HashSet<Digest> = HashSet::new();
        {
            let _shared = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
            self.mark(&mut marked_ids, &mut referenced)?;
        }
        let _exclusive = self
            .lock_repo(LockMode::Exclusive, LockWait::Timeout(opts.wait))
            .map_err(|e| match e.kind() {
                ErrorKind::Busy => RepoError::Busy {
                    what: format!(
                        "backups or restores kept running for {}s; garbage collection did not sweep (nothing deleted)",
                        opts.wait.as_secs()
                    ),
                },
                _ => e,
            })?;
        // Backups committed between the two phases.
        self.mark(&mut marked_ids, &mut referenced)?;
        report.backups_marked = marked_ids.len() as u64;
        report.chunks_referenced = referenced.len() as u64;

        // Sweep chunks.
        for prefix in b.list(CHUNKS_KEY)?.into_iter().filter(|e| e.is_dir) {
            let dir = format!("{CHUNKS_KEY}/{}", prefix.name);
            for f in b.list(&dir)? {
                if f.is_dir {
                    continue;
                }
                let key = format!("{dir}/{}", f.name);
                if b.is_temp_name(&f.name) {
                    report.temp_files_removed += 1;
                    if !opts.dry_run {
                        b.delete(&key)?;
                    }
                    continue;
                }
                let (hex_part, bad) = match f.name.strip_suffix(".bad") {
                    Some(h) => (h, true),
                    None => (f.name.as_str(), false),
                };
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(hex_part, &mut digest).is_err() {
                    continue; // not ours: leave it
                }
                let used = referenced.contains(&digest);
                if bad {
                    if !used {
                        report.bad_chunks_removed += 1;
                        if !opts.dry_run {
                            b.delete(&key)?;
                        }
                    }
                } else if used {
                    report.chunks_kept += 1;
                } else {
                    report.chunks_removed += 1;
                    report.bytes_removed += f.size;
                    if !opts.dry_run {
                        b.delete(&key)?;
                    }
                }
            }
        }

        // Sweep backup directories: temp files, abandoned and trashed dirs.
        for group in b.list(VM_BACKUPS_KEY)?.into_iter().filter(|e| e.is_dir) {
            let gkey = format!("{VM_BACKUPS_KEY}/{}", group.name);
            for snap in b.list(&gkey)? {
                let skey = format!("{gkey}/{}", snap.name);
                if !snap.is_dir {
                    if b.is_temp_name(&snap.name) {
                        report.temp_files_removed += 1;
                        if !opts.dry_run {
                            b.delete(&skey)?;
                        }
                    }
                    continue;
                }
                if snap.name.starts_with(TRASH_PREFIX) {
                    report.incomplete_backups_removed += 1;
                    if !opts.dry_run {
                        b.remove_tree(&skey)?;
                    }
                    continue;
                }
                let files = b.list(&skey)?;
                if !files.iter().any(|f| f.name == super::MANIFEST_NAME) {
                    // No writer is running (we hold the exclusive lock), so
                    // a directory without a manifest is abandoned.
                    report.incomplete_backups_removed += 1;
                    if !opts.dry_run {
                        b.remove_tree(&skey)?;
                    }
                    continue;
                }
                for f in files.iter().filter(|f| b.is_temp_name(&f.name)) {
                    report.temp_files_removed += 1;
                    if !opts.dry_run {
                        b.delete(&format!("{skey}/{}", f.name))?;
                    }
                }
            }
        }
        Ok(report)
    }

    /// GC on an object store (repo/coord.rs): GC marker, then writers'
    /// markers; nothing is deleted while a backup runs.
    fn gc_markers(&self, opts: &GcOptions) -> Result<GcReport> {
        use super::coord;
        let b = &self.inner.backend;
        let mut report = GcReport::default();
        let lease = coord::Lease::acquire(Arc::clone(b), coord::GC_KEY, "gc", "gc")?;
        let t0 = lease.started_ms;
        let grace = i64::try_from(coord::gc_grace().as_millis()).unwrap_or(i64::MAX);
        let writers = coord::live_markers(&**b, coord::IN_PROGRESS_KEY)?;
        // Marked after the writers' markers were listed: a backup that
        // committed (manifest, then marker deleted) before is seen here.
        let mut marked_ids: HashSet<BackupId> = HashSet::new();
        let mut referenced: HashSet<Digest> = HashSet::new();
        // F-41: a listing that lost backups would make their chunks look
        // unreferenced.
        let dirs = self.snapshot_dirs_checked(None)?;
        self.mark_dirs(dirs, &mut marked_ids, &mut referenced)?;
        report.backups_marked = marked_ids.len() as u64;
        report.chunks_referenced = referenced.len() as u64;
        let objects = b.list_objects(CHUNKS_KEY)?;
        // F-41: every chunk a committed backup references must be listed
        // (as itself or quarantined); else the chunk listing is partial.
        let mut listed: HashSet<Digest> = HashSet::with_capacity(objects.len());
        for o in &objects {
            let name = o.key.rsplit('/').next().unwrap_or("");
            let mut d = [0u8; 32];
            if hex::decode_to_slice(name.strip_suffix(".bad").unwrap_or(name), &mut d).is_ok() {
                listed.insert(d);
            }
        }
        let unlisted = referenced.iter().filter(|d| !listed.contains(*d)).count();
        if let Some(d) = referenced.iter().find(|d| !listed.contains(*d)) {
            lease.end();
            return Err(RepoError::ListingIncomplete {
                what: format!(
                    "{unlisted} chunk(s) referenced by committed backups are not in the chunk \
                     listing (e.g. {}): the listing is partial, or chunks are missing (run verify)",
                    hex::encode(d)
                ),
            });
        }
        // Object Lock: extend the retention of referenced chunks before it
        // runs out (even when deletions are deferred).
        let lock = self.inner.config.object_lock;
        if let (Some(lock), false) = (lock, opts.dry_run) {
            for o in &objects {
                let name = o.key.rsplit('/').next().unwrap_or("");
                let mut d = [0u8; 32];
                if hex::decode_to_slice(name, &mut d).is_ok()
                    && referenced.contains(&d)
                    && super::immut::needs_extension(o.modified_ms, t0, &lock)
                {
                    b.extend_retention(&o.key, t0.saturating_add(lock.retention_ms()))?;
                    report.retention_extended += 1;
                }
            }
        }
        if let Some((key, m)) = writers.first() {
            report.deferred = Some(format!(
                "{} backup(s) running ({}): nothing deleted; run gc again when they are done",
                writers.len(),
                m.as_ref().map_or(key.as_str(), |m| m.backup.as_str())
            ));
            lease.end();
            return Ok(report);
        }
        let mut doomed = Vec::new();
        for o in &objects {
            let name = o.key.rsplit('/').next().unwrap_or("");
            let (hex_part, bad) = match name.strip_suffix(".bad") {
                Some(h) => (h, true),
                None => (name, false),
            };
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(hex_part, &mut digest).is_err() {
                continue; // not ours: leave it
            }
            if referenced.contains(&digest) {
                if !bad {
                    report.chunks_kept += 1;
                }
                continue;
            }
            if bad {
                report.bad_chunks_removed += 1;
                doomed.push(o.key.clone());
            } else if o.modified_ms < t0 - grace {
                if let Some(lock) = lock {
                    // Still retained: the server would keep it anyway.
                    let until = if o.modified_ms.saturating_add(lock.retention_ms()) > t0 {
                        Some(o.modified_ms.saturating_add(lock.retention_ms()))
                    } else {
                        b.retention(&o.key)?.map(|r| r.until_ms).filter(|u| *u > t0)
                    };
                    if let Some(u) = until {
                        report.chunks_locked += 1;
                        let s = super::immut::format_ms(u);
                        if report.locked_until.as_ref().is_none_or(|l| *l < s) {
                            report.locked_until = Some(s);
                        }
                        continue;
                    }
                }
                report.chunks_removed += 1;
                report.bytes_removed += o.size;
                doomed.push(o.key.clone());
            } else {
                report.chunks_kept += 1;
            }
        }
        // Abandoned backups: no manifest, no live writer (checked above),
        // and nothing written since this GC started.
        let mut abandoned = Vec::new();
        for s in self.snapshot_dirs(None)? {
            if s.complete {
                continue;
            }
            let objs = b.list_objects(&s.id.dir_key())?;
            if objs.iter().all(|o| o.modified_ms < t0) {
                report.incomplete_backups_removed += 1;
                abandoned.push(s.id.dir_key());
            }
        }
        // Stale markers of dead writers.
        let stale: Vec<String> = coord::markers(&**b, coord::IN_PROGRESS_KEY)?
            .into_iter()
            .filter(|(_, t, _)| *t < t0)
            .map(|(k, _, _)| k)
            .collect();
        if !opts.dry_run {
            if !doomed.is_empty() {
                coord::bump_epoch(&**b)?;
            }
            for k in &doomed {
                lease.check_fresh()?;
                b.delete(k)?;
            }
            for k in &abandoned {
                lease.check_fresh()?;
                b.remove_tree(k)?;
            }
            for k in &stale {
                b.delete(k)?;
            }
        }
        lease.end();
        Ok(report)
    }

    /// Adds every committed backup not yet in `ids` to the mark set.
    fn mark(&self, ids: &mut HashSet<BackupId>, referenced: &mut HashSet<Digest>) -> Result<()> {
        self.mark_dirs(self.snapshot_dirs(None)?, ids, referenced)
    }

    /// [`Self::mark`] over a given listing.
    fn mark_dirs(
        &self,
        dirs: Vec<super::SnapshotDir>,
        ids: &mut HashSet<BackupId>,
        referenced: &mut HashSet<Digest>,
    ) -> Result<()> {
        for s in dirs {
            if !s.complete || ids.contains(&s.id) {
                continue;
            }
            let m = match self.load_manifest(&s.id) {
                Ok(m) => m,
                // Pruned between listing and reading: nothing to mark.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(RepoError::corrupt(
                        format!("backup {}", s.id),
                        format!(
                            "{e}; garbage collection stopped before deleting anything (forget or repair this backup)"
                        ),
                    ))
                }
            };
            let mut gone = false;
            for d in &m.disks {
                let idx = match self.load_index(&s.id, d) {
                    Ok(idx) => idx,
                    Err(e) => {
                        let mkey = format!("{}/{}", s.id.dir_key(), super::MANIFEST_NAME);
                        if self.inner.backend.size(&mkey)?.is_none() {
                            gone = true; // pruned while we read it
                            break;
                        }
                        return Err(RepoError::corrupt(
                            format!("backup {}", s.id),
                            format!("{e}; garbage collection stopped before deleting anything"),
                        ));
                    }
                };
                referenced.extend(idx.entries.iter().filter(|e| **e != ZERO_ENTRY));
            }
            if !gone {
                ids.insert(s.id);
            }
        }
        Ok(())
    }
}

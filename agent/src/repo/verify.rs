//! Verify: re-read every chunk of the selected backups, check CRC, tag and
//! digest, name every bad chunk with the backups and offsets it breaks,
//! quarantine corrupt chunks as `<digest>.bad`, and record the result per
//! backup in `verify-state.json` (F-35).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::backend::{LockMode, LockWait};
use super::blob;
use super::error::{ErrorKind, RepoError, Result};
use super::format::{self, chunk_len, Digest, ZERO_ENTRY};
use super::names::{format_time, BackupId};
use super::{Repository, VerifyState, MAX_CHUNK_BLOB, VERIFY_STATE_NAME};

/// What to verify.
#[derive(Debug, Clone)]
pub enum VerifyTarget {
    /// Every committed backup.
    All,
    /// One backup.
    Backup(BackupId),
}

/// Where a bad chunk is used.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkUse {
    /// Backup.
    pub backup: BackupId,
    /// Disk.
    pub disk: String,
    /// Byte offsets in the disk.
    pub offsets: Vec<u64>,
}

/// A chunk that is missing or corrupt.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    /// Hex digest.
    pub digest: String,
    /// "missing" or the failed check.
    pub problem: String,
    /// Renamed to `<digest>.bad`.
    pub quarantined: bool,
    /// Every use in the verified backups.
    pub used_by: Vec<ChunkUse>,
}

/// Result for one backup.
#[derive(Debug, Clone, Serialize)]
pub struct BackupVerify {
    /// Backup.
    pub backup: BackupId,
    /// No problem found.
    pub ok: bool,
    /// Problems (manifest, index, chunks).
    pub problems: Vec<String>,
}

/// Result of a verify run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    /// Per backup, oldest first.
    pub backups: Vec<BackupVerify>,
    /// Distinct chunks read.
    pub chunks_checked: u64,
    /// Bad chunks.
    pub bad_chunks: Vec<BadChunk>,
    /// Backups skipped because another operation (prune) held them.
    pub skipped: Vec<String>,
    /// Why the results could not be recorded in the repository (a
    /// read-only repository, a mirror): the verify itself still ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_recorded: Option<String>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.bad_chunks.is_empty() && self.backups.iter().all(|b| b.ok)
    }
}

struct Loaded {
    backup: usize,
    disk: String,
    index: format::FixedIndex,
}

impl Repository {
    /// Verifies backups; see the module docs. `threads` chunk readers.
    pub fn verify(&self, target: &VerifyTarget, threads: usize) -> Result<VerifyReport> {
        let key = self.key_for_data()?;
        let _repo_lock = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
        let ids: Vec<BackupId> = match target {
            VerifyTarget::All => self
                .snapshot_dirs(None)?
                .into_iter()
                .filter(|s| s.complete)
                .map(|s| s.id)
                .collect(),
            VerifyTarget::Backup(id) => {
                if self
                    .inner
                    .backend
                    .size(&format!("{}/{}", id.dir_key(), super::MANIFEST_NAME))?
                    .is_none()
                {
                    return Err(RepoError::not_found(format!("backup {id}")));
                }
                vec![id.clone()]
            }
        };
        let mut report = VerifyReport::default();
        let mut locks = Vec::new();
        let mut loaded: Vec<Loaded> = Vec::new();
        for id in ids {
            let lock = match self.lock_snapshot(&id, LockMode::Shared, LockWait::NoWait) {
                Ok(l) => l,
                Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::NotFound) => {
                    report.skipped.push(format!("{id}: {e}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            locks.push(lock);
            let b = report.backups.len();
            let mut problems = Vec::new();
            match self.load_manifest(&id) {
                Err(e) => problems.push(format!("manifest damaged: {e}")),
                Ok(m) => {
                    for d in &m.disks {
                        match self.load_index(&id, d).and_then(|idx| {
                            let cs = idx.chunk_size;
                            let full = self.zero_digest(cs as usize)?;
                            let tail = self.zero_digest(chunk_len(
                                idx.virtual_size,
                                cs,
                                (idx.entries.len() as u64).saturating_sub(1),
                            ))?;
                            let dg =
                                format::image_digest(idx.virtual_size, cs, &idx.entries, |l| {
                                    if l == cs as usize {
                                        full
                                    } else {
                                        tail
                                    }
                                });
                            if hex::encode(dg) != d.image_digest {
                                return Err(RepoError::corrupt(
                                    format!("index of disk {} in {id}", d.name),
                                    "entries do not fold to the manifest's image digest",
                                ));
                            }
                            Ok(idx)
                        }) {
                            Ok(index) => loaded.push(Loaded {
                                backup: b,
                                disk: d.name.clone(),
                                index,
                            }),
                            Err(e) => {
                                problems.push(format!("index of disk {} damaged: {e}", d.name));
                            }
                        }
                    }
                }
            }
            report.backups.push(BackupVerify {
                backup: id,
                ok: problems.is_empty(),
                problems,
            });
        }

        // Distinct chunks with their expected length and users.
        let mut chunks: HashMap<Digest, (usize, Vec<usize>)> = HashMap::new();
        for (n, l) in loaded.iter().enumerate() {
            for (i, e) in l.index.entries.iter().enumerate() {
                if *e == ZERO_ENTRY {
                    continue;
                }
                let len = chunk_len(l.index.virtual_size, l.index.chunk_size, i as u64);
                let entry = chunks.entry(*e).or_insert_with(|| (len, Vec::new()));
                if entry.1.last() != Some(&n) {
                    entry.1.push(n);
                }
            }
        }
        let mut work: Vec<(&Digest, &(usize, Vec<usize>))> = chunks.iter().collect();
        work.sort_by(|a, b| a.0.cmp(b.0));
        let next = AtomicUsize::new(0);
        let bad: Mutex<Vec<(Digest, String, bool)>> = Mutex::new(Vec::new());
        let fatal: Mutex<Option<RepoError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::AcqRel);
                    let Some((digest, (len, _))) = work.get(n) else {
                        return;
                    };
                    let ckey = Repository::chunk_key(digest);
                    let problem = match self.inner.backend.get(&ckey, MAX_CHUNK_BLOB) {
                        Err(e) if e.kind() == ErrorKind::NotFound => {
                            Some(("missing".into(), false))
                        }
                        Err(RepoError::Corrupt { reason, .. }) => Some((reason, true)),
                        Err(e) => {
                            fatal
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                        Ok(bytes) => match blob::check_chunk(&bytes, digest, key, *len) {
                            Ok(_) => None,
                            Err(RepoError::Corrupt { reason, .. }) => Some((reason, true)),
                            Err(e) => Some((e.to_string(), true)),
                        },
                    };
                    if let Some((reason, present)) = problem {
                        let quarantined = present
                            && self
                                .inner
                                .backend
                                .rename(&ckey, &format!("{ckey}.bad"))
                                .is_ok();
                        bad.lock().unwrap_or_else(|p| p.into_inner()).push((
                            **digest,
                            reason,
                            quarantined,
                        ));
                    }
                });
            }
        });
        if let Some(e) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        report.chunks_checked = work.len() as u64;
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        if self.inner.backend.coordination() == super::backend::Coordination::Markers
            && bad.iter().any(|b| b.2)
        {
            // Writers' caches of known chunks must forget the quarantined.
            super::coord::bump_epoch(&*self.inner.backend)?;
        }
        bad.sort();
        for (digest, problem, quarantined) in bad {
            let users = chunks.get(&digest).map(|c| c.1.clone()).unwrap_or_default();
            let mut used_by = Vec::new();
            for u in users {
                let l = &loaded[u];
                let cs = u64::from(l.index.chunk_size);
                let offsets: Vec<u64> = l
                    .index
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| **e == digest)
                    .map(|(i, _)| i as u64 * cs)
                    .collect();
                let backup = report.backups[l.backup].backup.clone();
                let hexd = hex::encode(digest);
                let b = &mut report.backups[l.backup];
                b.ok = false;
                b.problems.push(format!(
                    "chunk {hexd} {problem} (disk {} offsets {offsets:?})",
                    l.disk
                ));
                used_by.push(ChunkUse {
                    backup,
                    disk: l.disk.clone(),
                    offsets,
                });
            }
            report.bad_chunks.push(BadChunk {
                digest: hex::encode(digest),
                problem,
                quarantined,
                used_by,
            });
        }
        let now = format_time(time::OffsetDateTime::now_utc());
        for b in &report.backups {
            let state = VerifyState {
                state: if b.ok { "ok" } else { "failed" }.into(),
                time: now.clone(),
                problems: b.problems.len() as u64,
            };
            let json = serde_json::to_vec(&state)
                .map_err(|e| RepoError::invalid("verify state", e.to_string()))?;
            if let Err(e) = self.inner.backend.put(
                &format!("{}/{VERIFY_STATE_NAME}", b.backup.dir_key()),
                &json,
            ) {
                // Recording is a convenience for `list`; the report is the
                // result. Say why it was not recorded and stop trying.
                report.not_recorded = Some(crate::chain(&e));
                break;
            }
        }
        drop(locks);
        Ok(report)
    }
}

/// Groups chunk users for display: backup → disks.
pub fn affected_backups(report: &VerifyReport) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &report.bad_chunks {
        for u in &c.used_by {
            out.entry(u.backup.to_string())
                .or_default()
                .push(format!("{} ({})", c.digest, u.disk));
        }
    }
    out
}

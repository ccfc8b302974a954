//! The writer API the live backup job calls.
//!
//! ```no_run
//! # use shear::repo::*;
//! # fn demo(repo: &Repository, data: Vec<u8>) -> Result<()> {
//! let session = repo.begin_backup(&BackupMeta::new("100", "web"))?;
//! let disk = session.add_disk(&DiskSpec::new("drive-virtio0", 8 << 30))?;
//! let pipeline = ChunkPipeline::new(2, 4);
//! pipeline.submit(&disk, 0, data)?;   // hashed, compressed, checked, stored on the pool
//! disk.put_zero(1)?;                 // a hole: never stored
//! // disk.reuse(2, digest_from_base)?; // incremental: clean chunk, not read
//! pipeline.finish()?;
//! disk.finish()?;                    // writes the index
//! let id = session.commit(&CommitInfo::default())?; // writes the manifest
//! # Ok(()) }
//! ```
//!
//! Dropping a session without `commit` leaves nothing visible: its directory
//! has no manifest and is removed (at once on drop, or by GC after a crash).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use time::OffsetDateTime;

use super::backend::{Coordination, LockGuard, LockMode, LockWait};
use super::blob;
use super::error::{ErrorKind, RepoError, Result};
use super::format::{
    self, chunk_count, chunk_len, BlobHeader, Digest, Encryption, FixedIndex, ObjectType,
    BLOB_HEADER_LEN, ZERO_ENTRY,
};
use super::manifest::{
    index_file_name, BackupMode, Consistency, DiskEntry, Manifest, ManifestEncryption, Timings,
    MANIFEST_FORMAT, MANIFEST_VERSION,
};
use super::names::{format_time, validate_name, BackupId, VmId};
use super::stages::{charge, Stage, StageMeter};
use super::{Repository, MANIFEST_NAME, VM_BACKUPS_KEY};

/// What the backup job knows when it starts.
#[derive(Debug, Clone)]
pub struct BackupMeta {
    /// VM id (validated).
    pub vmid: String,
    /// VM name (free text).
    pub vm_name: String,
    /// Backup time; `None` = now. Whole seconds, UTC.
    pub time: Option<OffsetDateTime>,
    /// The backup an incremental reuses digests from; locked for the
    /// session so prune cannot remove it (F-39).
    pub base: Option<BackupId>,
    /// zstd level; `None` = the repository's default.
    pub zstd_level: Option<i32>,
}

impl BackupMeta {
    /// Meta for a backup of `vmid` now.
    pub fn new(vmid: &str, vm_name: &str) -> Self {
        BackupMeta {
            vmid: vmid.to_owned(),
            vm_name: vm_name.to_owned(),
            time: None,
            base: None,
            zstd_level: None,
        }
    }
}

/// One disk to back up.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Disk name (validated; names the index and the restored file).
    pub name: String,
    /// QEMU device id.
    pub device: String,
    /// QEMU block node name.
    pub node: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// How the disk is read (recorded in the manifest).
    pub read: Option<super::manifest::DiskRead>,
}

impl DiskSpec {
    /// A disk with no device/node information.
    pub fn new(name: &str, virtual_size: u64) -> Self {
        DiskSpec {
            name: name.to_owned(),
            device: String::new(),
            node: String::new(),
            virtual_size,
            read: None,
        }
    }
}

/// What the backup job adds at commit.
#[derive(Debug, Clone)]
pub struct CommitInfo {
    /// Full or incremental.
    pub mode: BackupMode,
    /// Application (frozen) or crash consistent.
    pub consistency: Consistency,
    /// vzdump mode the VM was backed up in (`snapshot`, `suspend`, `stop`).
    pub vm_mode: String,
    /// VM configuration as QEMU reports it.
    pub vm_config: serde_json::Value,
    /// Notes.
    pub notes: String,
    /// Milliseconds the guest was frozen, if it was.
    pub freeze_window_ms: Option<u64>,
}

impl Default for CommitInfo {
    fn default() -> Self {
        CommitInfo {
            mode: BackupMode::Full,
            consistency: Consistency::Crash,
            vm_mode: String::new(),
            vm_config: serde_json::Value::Null,
            notes: String::new(),
            freeze_window_ms: None,
        }
    }
}

/// What happened to one `put_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// All zero: recorded as a hole, not stored.
    Zero,
    /// New chunk written; the stored (compressed) size.
    Stored(u64),
    /// Already in the store.
    Deduplicated,
}

struct SessionShared {
    repo: Repository,
    id: BackupId,
    level: i32,
    known: Mutex<HashSet<Digest>>,
    committed: AtomicBool,
    aborted: AtomicBool,
    /// Held from begin until commit or abort (not until the last
    /// `DiskWriter` handle is dropped).
    locks: Mutex<Option<SessionLocks>>,
    /// Object stores: the in-progress marker (repo/coord.rs) and the local
    /// cache of known chunks. `None` on a local directory.
    markers: Option<MarkerState>,
}

struct MarkerState {
    lease: Mutex<Option<super::coord::Lease>>,
    cache: super::coord::ChunkCache,
}

struct SessionLocks {
    _snapshot: LockGuard,
    _base: Option<LockGuard>,
    _repo: LockGuard,
}

impl SessionShared {
    fn check_open(&self) -> Result<()> {
        if self.committed.load(Ordering::Acquire) {
            return Err(RepoError::SessionClosed {
                reason: "already committed".into(),
            });
        }
        if self.aborted.load(Ordering::Acquire) {
            return Err(RepoError::SessionClosed {
                reason: "aborted".into(),
            });
        }
        Ok(())
    }

    /// Whether a plausible copy of the chunk is stored: present, not
    /// truncated, same encryption mode (F-47 cross-mode, F-32 empty files).
    fn chunk_present(&self, digest: &Digest) -> Result<bool> {
        if let Some(m) = &self.markers {
            if m.cache.known.contains(digest) {
                return Ok(true);
            }
        }
        if lock(&self.known).contains(digest) {
            return Ok(true);
        }
        let key = Repository::chunk_key(digest);
        let b = &self.repo.inner.backend;
        let Some(size) = b.size(&key)? else {
            return Ok(false);
        };
        let Some(head) = b.get_prefix(&key, BLOB_HEADER_LEN)? else {
            return Ok(false);
        };
        let Ok(h) = BlobHeader::decode(&head, &key) else {
            return Ok(false);
        };
        let mode_ok = (h.encryption == Encryption::Aes256Gcm) == self.repo.is_encrypted();
        let ok = h.object_type == ObjectType::Chunk
            && mode_ok
            && size == (BLOB_HEADER_LEN as u64 + u64::from(h.stored_size));
        if ok {
            lock(&self.known).insert(*digest);
        }
        Ok(ok)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short critical sections leaves the data
    // consistent (plain inserts/assignments), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A backup in progress. Not visible until [`BackupSession::commit`].
pub struct BackupSession {
    shared: Arc<SessionShared>,
    disks: Mutex<Vec<Arc<DiskWriter>>>,
    meta: BackupMeta,
    started: Instant,
    started_wall: OffsetDateTime,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Repository {
    /// Starts a backup of `meta.vmid`. Takes the shared repository lock for
    /// the whole session; fails if a backup with the same id exists.
    pub fn begin_backup(&self, meta: &BackupMeta) -> Result<BackupSession> {
        self.key_for_data()?;
        let vmid = VmId::new(&meta.vmid)?;
        let level = meta.zstd_level.unwrap_or(self.inner.config.zstd_level);
        super::zstd_level_check(level)?;
        let started_wall = OffsetDateTime::now_utc();
        let id = BackupId::new(vmid, meta.time.unwrap_or(started_wall));
        let repo_lock = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
        let b = &self.inner.backend;
        let markers = match b.coordination() {
            Coordination::Locks => None,
            Coordination::Markers => {
                let (lease, epoch) = super::coord::begin_writer(b, &id)?;
                let cache = super::coord::ChunkCache::load(&self.repo_id(), &epoch);
                Some(MarkerState {
                    cache,
                    lease: Mutex::new(Some(lease)),
                })
            }
        };
        b.ensure_dir(&format!("{VM_BACKUPS_KEY}/{}", id.vmid()))?;
        b.create_dir(&id.dir_key()).map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => RepoError::AlreadyExists {
                what: format!("backup {id}"),
            },
            _ => e,
        })?;
        let snapshot_lock = match self.lock_snapshot(&id, LockMode::Exclusive, LockWait::NoWait) {
            Ok(l) => l,
            Err(e) => {
                let _ = b.remove_tree(&id.dir_key());
                return Err(e);
            }
        };
        let base_lock = match &meta.base {
            None => None,
            Some(base) => {
                let l = self.lock_snapshot(base, LockMode::Shared, LockWait::NoWait);
                let l = l.and_then(|l| {
                    match b.size(&format!("{}/{MANIFEST_NAME}", base.dir_key()))? {
                        Some(_) => Ok(l),
                        None => Err(RepoError::not_found(format!("base backup {base}"))),
                    }
                });
                match l {
                    Ok(l) => Some(l),
                    Err(e) => {
                        let _ = b.remove_tree(&id.dir_key());
                        return Err(e);
                    }
                }
            }
        };
        Ok(BackupSession {
            shared: Arc::new(SessionShared {
                repo: self.clone(),
                id,
                level,
                known: Mutex::new(HashSet::new()),
                committed: AtomicBool::new(false),
                aborted: AtomicBool::new(false),
                locks: Mutex::new(Some(SessionLocks {
                    _snapshot: snapshot_lock,
                    _base: base_lock,
                    _repo: repo_lock,
                })),
                markers,
            }),
            disks: Mutex::new(Vec::new()),
            meta: meta.clone(),
            started: Instant::now(),
            started_wall,
        })
    }
}

impl BackupSession {
    /// The id this backup will have.
    pub fn id(&self) -> &BackupId {
        &self.shared.id
    }

    /// Adds a disk. The returned writer is `Send + Sync`: share it with the
    /// reader/worker threads.
    pub fn add_disk(&self, spec: &DiskSpec) -> Result<Arc<DiskWriter>> {
        self.shared.check_open()?;
        validate_name("disk name", &spec.name)?;
        let chunk_size = self.shared.repo.inner.config.chunk_size;
        format::check_geometry(chunk_size, spec.virtual_size)?;
        let mut disks = lock(&self.disks);
        if disks.iter().any(|d| d.spec.name == spec.name) {
            return Err(RepoError::AlreadyExists {
                what: format!("disk {} in this backup", spec.name),
            });
        }
        let count = chunk_count(spec.virtual_size, chunk_size);
        let count_usize = usize::try_from(count)
            .map_err(|_| RepoError::invalid("virtual size", "too many chunks"))?;
        let w = Arc::new(DiskWriter {
            shared: Arc::clone(&self.shared),
            spec: spec.clone(),
            chunk_size,
            count,
            entries: Mutex::new(vec![None; count_usize]),
            stats: Mutex::new(Stats::default()),
            finished: Mutex::new(None),
            fleece_peak: Mutex::new(None),
        });
        disks.push(Arc::clone(&w));
        Ok(w)
    }

    /// Finishes every disk not finished yet (writes their indexes).
    pub fn finish_all(&self) -> Result<Vec<DiskEntry>> {
        let disks: Vec<Arc<DiskWriter>> = lock(&self.disks).clone();
        disks.iter().map(|d| d.finish()).collect()
    }

    /// Writes the manifest: the backup becomes visible. Every disk must be
    /// finished.
    pub fn commit(self, info: &CommitInfo) -> Result<BackupId> {
        self.shared.check_open()?;
        let repo = &self.shared.repo;
        let mut disks = Vec::new();
        for d in lock(&self.disks).iter() {
            match lock(&d.finished).clone() {
                Some(e) => disks.push(e),
                None => {
                    return Err(RepoError::invalid(
                        "commit",
                        format!("disk {} is not finished", d.spec.name),
                    ))
                }
            }
        }
        if disks.is_empty() {
            return Err(RepoError::invalid(
                "commit",
                "a backup needs at least one disk",
            ));
        }
        if info.mode == BackupMode::Incremental && self.meta.base.is_none() {
            return Err(RepoError::invalid(
                "commit",
                "incremental backup without a base",
            ));
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            backup_id: self.shared.id.clone(),
            vmid: self.shared.id.vmid().to_string(),
            vm_name: self.meta.vm_name.clone(),
            mode: info.mode,
            consistency: info.consistency,
            vm_mode: info.vm_mode.clone(),
            base: self.meta.base.clone(),
            disks,
            vm_config: info.vm_config.clone(),
            notes: info.notes.clone(),
            timings: Timings {
                started: format_time(self.started_wall),
                finished: format_time(OffsetDateTime::now_utc()),
                freeze_window_ms: info.freeze_window_ms,
                total_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
            tool_version: super::tool_version(),
            encryption: repo
                .inner
                .config
                .encryption
                .as_ref()
                .map(|e| ManifestEncryption {
                    alg: e.alg.clone(),
                    key_fingerprint: e.key_fingerprint.clone(),
                }),
        };
        let json = manifest.to_json()?;
        let key = repo.key_for_data()?;
        let blob = blob::encode(ObjectType::Manifest, &json, Some(1), key, b"")?;
        let mkey = format!("{}/{MANIFEST_NAME}", self.shared.id.dir_key());
        if let Some(m) = &self.shared.markers {
            if let Some(l) = lock(&m.lease).as_ref() {
                l.check_fresh()?;
            }
        }
        repo.inner.backend.put(&mkey, &blob)?;
        self.shared.committed.store(true, Ordering::Release);
        if let Some(m) = &self.shared.markers {
            super::coord::note_commit(&*repo.inner.backend, &self.shared.id.dir_key());
            // The manifest is visible: the marker may go.
            if let Some(l) = lock(&m.lease).take() {
                l.end();
            }
            m.cache.save(&lock(&self.shared.known));
        }
        lock(&self.shared.locks).take();
        Ok(self.shared.id.clone())
    }

    /// Abandons the backup (same as dropping it).
    pub fn abort(self) {
        self.shared.aborted.store(true, Ordering::Release);
    }
}

impl Drop for BackupSession {
    fn drop(&mut self) {
        if !self.shared.committed.load(Ordering::Acquire) {
            // Writers still held by worker threads fail from now on.
            self.shared.aborted.store(true, Ordering::Release);
            // Best effort, while the snapshot lock is still held: GC removes
            // the directory if this fails or the process is killed.
            let _ = self
                .shared
                .repo
                .inner
                .backend
                .remove_tree(&self.shared.id.dir_key());
            if let Some(m) = &self.shared.markers {
                if let Some(l) = lock(&m.lease).take() {
                    l.end();
                }
            }
            lock(&self.shared.locks).take();
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    zero_chunks: u64,
    zero_bytes: u64,
    data_bytes: u64,
    new_chunks: u64,
    new_data_bytes: u64,
    stored_bytes: u64,
    dedup_bytes: u64,
    reused_chunks: u64,
}

/// A chunk hashed, looked up and (if new) compressed and checked by
/// [`DiskWriter::prepare_chunk`], waiting for [`DiskWriter::complete_chunk`].
#[derive(Debug)]
pub struct PreparedChunk {
    i: usize,
    len: u64,
    kind: Prepared,
}

#[derive(Debug)]
enum Prepared {
    Zero,
    Present(Digest),
    Store(Digest, Vec<u8>),
}

impl PreparedChunk {
    /// Whether completing it writes to the store (fsyncs); otherwise it
    /// only records an index entry.
    pub fn needs_store(&self) -> bool {
        matches!(self.kind, Prepared::Store(..))
    }
}

/// Writes one disk of a backup. All methods take `&self` and may run on
/// several threads at once.
pub struct DiskWriter {
    shared: Arc<SessionShared>,
    spec: DiskSpec,
    chunk_size: u32,
    count: u64,
    entries: Mutex<Vec<Option<Digest>>>,
    stats: Mutex<Stats>,
    finished: Mutex<Option<DiskEntry>>,
    /// Recorded in the manifest's `read.fleece_peak_bytes`.
    fleece_peak: Mutex<Option<u64>>,
}

impl std::fmt::Debug for DiskWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskWriter")
            .field("disk", &self.spec.name)
            .field("chunks", &self.count)
            .finish_non_exhaustive()
    }
}

impl DiskWriter {
    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks (the last may be short).
    pub fn chunk_count(&self) -> u64 {
        self.count
    }

    /// Length of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> usize {
        chunk_len(self.spec.virtual_size, self.chunk_size, index)
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Records the most bytes the disk's fleece image allocated while it
    /// was read (the manifest's `read.fleece_peak_bytes`); call before
    /// [`DiskWriter::finish`].
    pub fn set_fleece_peak_bytes(&self, bytes: u64) {
        *lock(&self.fleece_peak) = Some(bytes);
    }

    fn check_index(&self, index: u64) -> Result<usize> {
        self.shared.check_open()?;
        if lock(&self.finished).is_some() {
            return Err(RepoError::SessionClosed {
                reason: format!("disk {} is finished", self.spec.name),
            });
        }
        if index >= self.count {
            return Err(RepoError::invalid(
                "chunk index",
                format!(
                    "{index} >= {} chunks of disk {}",
                    self.count, self.spec.name
                ),
            ));
        }
        usize::try_from(index).map_err(|_| RepoError::invalid("chunk index", "too large"))
    }

    fn set_entry(&self, i: usize, value: Digest) -> Result<bool> {
        let mut e = lock(&self.entries);
        match e[i] {
            None => {
                e[i] = Some(value);
                Ok(true)
            }
            Some(v) if v == value => Ok(false),
            Some(_) => Err(RepoError::invalid(
                "chunk",
                format!(
                    "chunk {i} of disk {} was given twice with different data",
                    self.spec.name
                ),
            )),
        }
    }

    /// Stores chunk `index` (exactly `chunk_len(index)` bytes). An all-zero
    /// chunk is recorded as a hole; a chunk already in the store is not
    /// written again. The chunk is verified before it is stored (F-45).
    pub fn put_chunk(&self, index: u64, data: &[u8]) -> Result<ChunkOutcome> {
        let i = self.check_index(index)?;
        let want = self.chunk_len(index);
        if data.len() != want {
            return Err(RepoError::invalid(
                "chunk length",
                format!("chunk {index} has {} bytes, expected {want}", data.len()),
            ));
        }
        let prepared = self.prepare_chunk_at(i, data)?;
        self.complete_chunk(prepared)
    }

    /// The CPU half of [`DiskWriter::put_chunk`]: hash, look up, compress
    /// and check. A chunk that must be stored comes back as
    /// [`PreparedChunk::needs_store`]; [`DiskWriter::complete_chunk`] does
    /// the durable write (two fsyncs, which a pipeline runs on I/O threads
    /// so its CPU workers keep compressing meanwhile).
    pub fn prepare_chunk(&self, index: u64, data: &[u8]) -> Result<PreparedChunk> {
        let i = self.check_index(index)?;
        let want = self.chunk_len(index);
        if data.len() != want {
            return Err(RepoError::invalid(
                "chunk length",
                format!("chunk {index} has {} bytes, expected {want}", data.len()),
            ));
        }
        self.prepare_chunk_at(i, data)
    }

    fn prepare_chunk_at(&self, i: usize, data: &[u8]) -> Result<PreparedChunk> {
        let len = data.len() as u64;
        // The zero check and the digest are the hash stage (its bytes are
        // counted here, once per chunk).
        if charge(Stage::Hash, len, || format::is_zero(data)) {
            return Ok(PreparedChunk {
                i,
                len,
                kind: Prepared::Zero,
            });
        }
        let repo = &self.shared.repo;
        let key = repo.key_for_data()?;
        let hash = charge(Stage::Hash, 0, || blob::chunk_hash(key, data));
        let digest = hash.digest;
        // The lookup asks the store: charged to write, with no bytes.
        let present = charge(Stage::Write, 0, || self.shared.chunk_present(&digest))?;
        let kind = if present {
            Prepared::Present(digest)
        } else {
            let encoded = blob::encode_chunk_verified(data, &hash, key, self.shared.level)?;
            Prepared::Store(digest, encoded)
        };
        Ok(PreparedChunk { i, len, kind })
    }

    /// The durable half of [`DiskWriter::put_chunk`]: stores the encoded
    /// chunk (if it must be) and only then records it in the index.
    pub fn complete_chunk(&self, prepared: PreparedChunk) -> Result<ChunkOutcome> {
        let PreparedChunk { i, len, kind } = prepared;
        let (digest, outcome) = match kind {
            Prepared::Zero => {
                self.put_zero_at(i)?;
                return Ok(ChunkOutcome::Zero);
            }
            Prepared::Present(digest) => (digest, ChunkOutcome::Deduplicated),
            Prepared::Store(digest, encoded) => {
                self.shared.check_open()?;
                charge(Stage::Write, encoded.len() as u64, || {
                    self.shared
                        .repo
                        .inner
                        .backend
                        .put(&Repository::chunk_key(&digest), &encoded)
                })?;
                lock(&self.shared.known).insert(digest);
                (digest, ChunkOutcome::Stored(encoded.len() as u64))
            }
        };
        if self.set_entry(i, digest)? {
            let mut s = lock(&self.stats);
            s.data_bytes += len;
            match outcome {
                ChunkOutcome::Stored(n) => {
                    s.new_chunks += 1;
                    s.new_data_bytes += len;
                    s.stored_bytes += n;
                }
                _ => s.dedup_bytes += len,
            }
        }
        Ok(outcome)
    }

    /// Records chunk `index` as all zero (a hole; nothing is stored).
    pub fn put_zero(&self, index: u64) -> Result<()> {
        let i = self.check_index(index)?;
        self.put_zero_at(i)
    }

    fn put_zero_at(&self, i: usize) -> Result<()> {
        if self.set_entry(i, ZERO_ENTRY)? {
            let mut s = lock(&self.stats);
            s.zero_chunks += 1;
            s.zero_bytes += self.chunk_len(i as u64) as u64;
        }
        Ok(())
    }

    /// Incremental: chunk `index` is unchanged since the base backup, whose
    /// index holds `digest` for it. Checks the chunk is still stored (a
    /// missing or truncated chunk is `ChunkMissing`: read and `put_chunk`
    /// it instead, F-35).
    pub fn reuse(&self, index: u64, digest: Digest) -> Result<()> {
        let i = self.check_index(index)?;
        if digest == ZERO_ENTRY {
            return self.put_zero(index);
        }
        if !self.shared.chunk_present(&digest)? {
            return Err(RepoError::ChunkMissing {
                digest: hex::encode(digest),
            });
        }
        if self.set_entry(i, digest)? {
            let len = self.chunk_len(index) as u64;
            let mut s = lock(&self.stats);
            s.data_bytes += len;
            s.dedup_bytes += len;
            s.reused_chunks += 1;
        }
        Ok(())
    }

    /// Writes the index (every chunk must have been given) and returns the
    /// disk's statistics as recorded in the manifest.
    pub fn finish(&self) -> Result<DiskEntry> {
        self.shared.check_open()?;
        let mut finished = lock(&self.finished);
        if let Some(e) = finished.as_ref() {
            return Ok(e.clone());
        }
        let entries = lock(&self.entries).clone();
        let missing: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(i, _)| i)
            .take(5)
            .collect();
        if !missing.is_empty() {
            return Err(RepoError::invalid(
                "disk",
                format!("{}: chunks {missing:?}… were never written", self.spec.name),
            ));
        }
        let entries: Vec<Digest> = entries.into_iter().flatten().collect();
        let repo = &self.shared.repo;
        let key = repo.key_for_data()?;
        let vsize = self.spec.virtual_size;
        let cs = self.chunk_size;
        let full_zero = blob::chunk_digest(key, &vec![0u8; cs as usize]);
        let image = format::image_digest(vsize, cs, &entries, |len| {
            if len == cs as usize {
                full_zero
            } else {
                blob::chunk_digest(key, &vec![0u8; len])
            }
        });
        let index = FixedIndex {
            chunk_size: cs,
            virtual_size: vsize,
            entries,
        };
        let blob = blob::encode(ObjectType::Index, &index.encode(), Some(1), key, b"")?;
        let index_file = index_file_name(&self.spec.name);
        let ikey = format!("{}/{index_file}", self.shared.id.dir_key());
        repo.inner.backend.put(&ikey, &blob)?;
        if repo.inner.backend.coordination() == Coordination::Markers {
            // F-40: an object store confirms the index's size (HEAD) before
            // the manifest can refer to it.
            let stored = repo.inner.backend.size(&ikey)?;
            if stored != Some(blob.len() as u64) {
                return Err(RepoError::corrupt(
                    &ikey,
                    format!(
                        "the store holds {stored:?} bytes after a PUT of {}: not committing",
                        blob.len()
                    ),
                ));
            }
        }
        let s = *lock(&self.stats);
        let entry = DiskEntry {
            name: self.spec.name.clone(),
            device: self.spec.device.clone(),
            node: self.spec.node.clone(),
            virtual_size: vsize,
            chunk_size: cs,
            index_file,
            index_digest: hex::encode(blake3::hash(&blob).as_bytes()),
            image_digest: hex::encode(image),
            chunks: self.count,
            zero_chunks: s.zero_chunks,
            data_bytes: s.data_bytes,
            zero_bytes: s.zero_bytes,
            new_chunks: s.new_chunks,
            new_data_bytes: s.new_data_bytes,
            stored_bytes: s.stored_bytes,
            dedup_bytes: s.dedup_bytes,
            reused_chunks: s.reused_chunks,
            read: self.spec.read.clone().map(|mut r| {
                r.fleece_peak_bytes = *lock(&self.fleece_peak);
                r
            }),
        };
        *finished = Some(entry.clone());
        Ok(entry)
    }
}

enum Job {
    Chunk(Arc<DiskWriter>, u64, Vec<u8>),
}

/// A prepared chunk on its way to a store thread, with the buffer it was
/// read into (recycled once stored, so the reader's byte budget still
/// bounds every chunk in flight).
type StoreJob = (Arc<DiskWriter>, u64, PreparedChunk, Vec<u8>);

/// Threads of a [`ChunkPipeline`] that write prepared chunks durably. A
/// local chunk costs two fsyncs (file, directory: 10-20 ms here); on the
/// CPU workers they left the compressor idle, serially. Concurrent fsyncs
/// also share ext4 journal commits, and an S3 backend gets parallel PUTs.
pub const STORE_THREADS: usize = 4;

/// Prepared chunks queued for the store threads. With [`STORE_THREADS`]
/// this bounds the compressed copies held beside their raw buffers (at
/// most 6 chunks' worth).
pub const STORE_QUEUE: usize = 2;

/// Where [`ChunkPipeline`] workers hand stored chunks' buffers.
pub type BufferRecycler = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

/// Called by a [`ChunkPipeline`] worker with a chunk's index once
/// [`DiskWriter::put_chunk`] stored it successfully.
pub type StoredHook = Arc<dyn Fn(u64) + Send + Sync>;

/// A bounded pool that hashes, compresses, checks and stores chunks on
/// `threads` worker threads. `submit` blocks while `queue` chunks wait, so
/// memory stays at `(threads + queue) × chunk size`.
pub struct ChunkPipeline {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    store_tx: Option<SyncSender<StoreJob>>,
    store_workers: Vec<JoinHandle<()>>,
    error: Arc<Mutex<Option<RepoError>>>,
    failed: Arc<AtomicBool>,
    stored: Option<StoredHook>,
}

impl std::fmt::Debug for ChunkPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkPipeline")
            .field("threads", &self.workers.len())
            .field("store_threads", &self.store_workers.len())
            .finish_non_exhaustive()
    }
}

/// What pipeline threads share to report the first failure.
#[derive(Clone)]
struct Failure {
    error: Arc<Mutex<Option<RepoError>>>,
    failed: Arc<AtomicBool>,
}

impl Failure {
    fn is_set(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn set(&self, e: RepoError) {
        self.failed.store(true, Ordering::Release);
        lock(&self.error).get_or_insert(e);
    }
}

impl ChunkPipeline {
    /// Starts `threads` workers (at least 1) with a queue of `queue` chunks.
    pub fn new(threads: usize, queue: usize) -> Self {
        Self::with_recycler(threads, queue, &(Arc::new(drop) as BufferRecycler))
    }

    /// Like [`ChunkPipeline::new`], handing each chunk's buffer to
    /// `recycle` once it is stored (so the reader can reuse it instead of
    /// allocating and faulting in a fresh 4 MiB buffer per chunk).
    pub fn with_recycler(threads: usize, queue: usize, recycle: &BufferRecycler) -> Self {
        Self::with_hooks(threads, queue, recycle, None)
    }

    /// Like [`ChunkPipeline::with_recycler`], also calling `stored` with
    /// each chunk's index once it is stored (not for a chunk whose store
    /// failed).
    ///
    /// `threads` CPU workers hash, compress and check; a chunk the store
    /// lacks goes on to one of [`STORE_THREADS`] store threads, which write
    /// it durably and only then record it in the index and call `stored`.
    pub fn with_hooks(
        threads: usize,
        queue: usize,
        recycle: &BufferRecycler,
        stored: Option<StoredHook>,
    ) -> Self {
        Self::with_meter(threads, queue, recycle, stored, None)
    }

    /// Like [`ChunkPipeline::with_hooks`], charging the CPU time of every
    /// stage its threads run (hash, compress, verify, encrypt, write) to
    /// `meter` (see [`super::stages`]).
    pub fn with_meter(
        threads: usize,
        queue: usize,
        recycle: &BufferRecycler,
        stored: Option<StoredHook>,
        meter: Option<&Arc<StageMeter>>,
    ) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let (store_tx, store_rx) = sync_channel::<StoreJob>(STORE_QUEUE);
        let store_rx = Arc::new(Mutex::new(store_rx));
        let error = Arc::new(Mutex::new(None));
        let failed = Arc::new(AtomicBool::new(false));
        let failure = Failure {
            error: Arc::clone(&error),
            failed: Arc::clone(&failed),
        };
        let store_workers = (0..STORE_THREADS)
            .map(|n| {
                let rx = Arc::clone(&store_rx);
                let failure = failure.clone();
                let recycle = Arc::clone(recycle);
                let stored = stored.clone();
                let meter = meter.cloned();
                std::thread::Builder::new()
                    .name(format!("shear-store-{n}"))
                    .spawn(move || {
                        super::stages::attach(meter);
                        loop {
                            let job = lock(&rx).recv();
                            let Ok((disk, index, prepared, data)) = job else {
                                return;
                            };
                            if !failure.is_set() {
                                complete(&disk, index, prepared, stored.as_ref(), &failure);
                            }
                            recycle(data);
                        }
                    })
            })
            .filter_map(std::result::Result::ok)
            .collect::<Vec<_>>();
        // Without store threads (none could start), workers store inline.
        let store_tx = (!store_workers.is_empty()).then_some(store_tx);
        let workers = (0..threads.max(1))
            .map(|n| {
                let rx: Arc<Mutex<Receiver<Job>>> = Arc::clone(&rx);
                let failure = failure.clone();
                let recycle = Arc::clone(recycle);
                let stored = stored.clone();
                let store_tx = store_tx.clone();
                let meter = meter.cloned();
                std::thread::Builder::new()
                    .name(format!("shear-chunk-{n}"))
                    .spawn(move || {
                        super::stages::attach(meter);
                        worker_loop(&rx, &failure, &recycle, stored.as_ref(), store_tx.as_ref());
                    })
            })
            .filter_map(std::result::Result::ok)
            .collect();
        ChunkPipeline {
            tx: Some(tx),
            workers,
            store_tx,
            store_workers,
            error,
            failed,
            stored,
        }
    }

    /// Queues chunk `index` of `disk`; blocks while the queue is full.
    /// Returns the first worker error, if one happened already.
    pub fn submit(&self, disk: &Arc<DiskWriter>, index: u64, data: Vec<u8>) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(self.take_error());
        }
        let Some(tx) = &self.tx else {
            return Err(RepoError::SessionClosed {
                reason: "pipeline finished".into(),
            });
        };
        if self.workers.is_empty() {
            disk.put_chunk(index, &data)?;
            if let Some(hook) = &self.stored {
                hook(index);
            }
            return Ok(());
        }
        tx.send(Job::Chunk(Arc::clone(disk), index, data))
            .map_err(|_| RepoError::SessionClosed {
                reason: "pipeline workers exited".into(),
            })
    }

    fn take_error(&self) -> RepoError {
        lock(&self.error)
            .take()
            .unwrap_or(RepoError::SessionClosed {
                reason: "a pipeline worker failed".into(),
            })
    }

    /// Waits for every queued chunk; returns the first error.
    pub fn finish(mut self) -> Result<()> {
        if self.join_all() {
            self.failed.store(true, Ordering::Release);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(self.take_error());
        }
        Ok(())
    }

    /// Closes the queues and joins the CPU workers, then (their senders
    /// gone) the store threads. True if a thread panicked.
    fn join_all(&mut self) -> bool {
        self.tx = None;
        let mut panicked = false;
        for w in self.workers.drain(..) {
            panicked |= w.join().is_err();
        }
        self.store_tx = None;
        for w in self.store_workers.drain(..) {
            panicked |= w.join().is_err();
        }
        panicked
    }
}

/// A CPU worker of a [`ChunkPipeline`]: prepares chunks until the queue
/// closes, handing those that must be stored to the store threads.
fn worker_loop(
    rx: &Mutex<Receiver<Job>>,
    failure: &Failure,
    recycle: &BufferRecycler,
    stored: Option<&StoredHook>,
    store_tx: Option<&SyncSender<StoreJob>>,
) {
    loop {
        let job = lock(rx).recv();
        let Ok(Job::Chunk(disk, index, data)) = job else {
            return;
        };
        if failure.is_set() {
            // Drain without work after a failure; the buffer still goes
            // back (a reader paying buffers until they return would wait).
            recycle(data);
            continue;
        }
        let prepared = match disk.prepare_chunk(index, &data) {
            Ok(p) => p,
            Err(e) => {
                failure.set(e);
                recycle(data);
                continue;
            }
        };
        match store_tx {
            Some(to_store) if prepared.needs_store() => {
                if let Err(back) = to_store.send((disk, index, prepared, data)) {
                    failure.set(RepoError::SessionClosed {
                        reason: "pipeline store threads exited".into(),
                    });
                    recycle(back.0 .3);
                }
            }
            _ => {
                complete(&disk, index, prepared, stored, failure);
                recycle(data);
            }
        }
    }
}

/// The durable half of a chunk on a pipeline thread.
fn complete(
    disk: &DiskWriter,
    index: u64,
    prepared: PreparedChunk,
    stored: Option<&StoredHook>,
    failure: &Failure,
) {
    match disk.complete_chunk(prepared) {
        Ok(_) => {
            if let Some(hook) = stored {
                hook(index);
            }
        }
        Err(e) => failure.set(e),
    }
}

impl Drop for ChunkPipeline {
    fn drop(&mut self) {
        self.failed.store(true, Ordering::Release);
        self.join_all();
    }
}

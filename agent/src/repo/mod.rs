//! The backup repository: deduplicated, compressed, optionally encrypted,
//! verifiable, crash-safe storage of VM disk images.
//!
//! Proxmox Backup Server's datastore is the design reference (content-
//! addressed chunks, fixed indexes, a manifest as the commit point, atomic
//! temp+rename writes, a locking table); docs/formats.md has every byte.
//!
//! # Layout (local directory backend; an S3 repository has the same keys
//! under its prefix, without lock files, plus `coord/` markers)
//!
//! ```text
//! <repo>/shear-repo.json            repository config (written last by init)
//! <repo>/lock                        process-wide lock (see the table)
//! <repo>/gc.lock                     one GC at a time
//! <repo>/chunks/<2 hex>/<64 hex>     chunk blobs; `<64 hex>.bad` = quarantined
//! <repo>/backups/vm/<vmid>/<time>/   one backup ("snapshot directory")
//!     <disk>.fidx                    fixed index blob per disk
//!     manifest.blob                  manifest blob: written last = commit point
//!     protected                      marker: never pruned
//!     verify-state.json              result of the last verify
//! ```
//!
//! A snapshot directory without `manifest.blob` is a backup in progress (its
//! writer holds the directory lock) or an abandoned one (nobody does): never
//! listed, never restorable, removed by GC. Names with `.tmp-` are temp files
//! of interrupted writes, removed by GC.
//!
//! # Durability
//!
//! Every object is written to a temp file, fsynced, renamed into place, and
//! the directory is fsynced ([`backend::Backend::put`]). Order: chunks, then
//! each index, then the manifest. A process killed at any point therefore
//! leaves either a committed backup whose every reference is durable, or an
//! invisible partial one (F-31, F-32).
//!
//! # Locking table
//!
//! The backend decides how operations coordinate
//! ([`backend::Coordination`]).
//!
//! ## Local directory: `flock` locks
//!
//! Two `flock` locks: the repository lock (`<repo>/lock`) and one lock per
//! snapshot directory (the directory itself). flock locks die with their
//! process, so no stale lock survives a crash and no lease can expire under
//! a stalled holder (F-38: a `SIGSTOP`ped writer keeps GC waiting instead).
//!
//! | operation            | repository lock                          | snapshot lock                              | GC lock   |
//! |----------------------|------------------------------------------|--------------------------------------------|-----------|
//! | backup writer, sync  | shared, session lifetime                 | exclusive on its new dir; shared on `base` | –         |
//! | restore / reader     | shared, reader lifetime                  | shared                                     | –         |
//! | verify               | shared                                   | shared, per backup while checked           | –         |
//! | prune / forget       | shared                                   | exclusive, non-blocking (busy → skipped)   | –         |
//! | protect / unprotect  | shared                                   | shared                                     | –         |
//! | GC phase 1 (mark)    | shared                                   | –                                          | exclusive |
//! | GC phase 2 (sweep)   | **exclusive** (waits, bounded)           | –                                          | exclusive |
//!
//! Why each pair is safe:
//! - *writer × GC* (F-36): a writer's dedup decision ("chunk exists") and its
//!   commit happen while it holds the shared repository lock; the sweep runs
//!   only under the exclusive lock, after re-marking every manifest committed
//!   since phase 1. So a chunk a running backup relies on is never swept, and
//!   the writer needs no atime touch: safety does not depend on clocks or on
//!   the filesystem honouring atime (F-37), unlike PBS's atime cutoff.
//! - *writer × writer*: different snapshot directories; identical chunks are
//!   renamed into place atomically with identical content.
//! - *writer × prune*: prune only removes committed backups; an incremental's
//!   base is share-locked by the writer, so prune skips it (F-39).
//! - *reader × prune*: the reader's shared snapshot lock makes prune skip the
//!   backup (F-39 "prune while a restore reads").
//! - *reader/verify × GC*: readers hold the shared repository lock, so no
//!   sweep runs under them; phase 1 runs beside them.
//! - *verify × writer*: verify may quarantine a corrupt chunk that a running
//!   backup just deduplicated against; that backup then references a missing
//!   chunk and the next verify names it (as in PBS). Backups after the
//!   quarantine upload the chunk again (F-35).
//!
//! ## Object store (S3): leases written into the store, no locks
//!
//! `lock` holds nothing; [`coord`] has the protocol and its proof. Markers
//! live under `coord/`; times are the server's `Last-Modified`, never a
//! client clock; no conditional PUT is used.
//!
//! | operation            | writes                                        | checks                                                  |
//! |----------------------|-----------------------------------------------|---------------------------------------------------------|
//! | backup writer, sync  | in-progress marker (heartbeat every lease/4)  | then: waits while a live GC marker exists; before the manifest: its heartbeat never lapsed ½ lease (fencing) |
//! | restore / verify     | – (verify: `verify-state.json`, `.bad` copy)  | digests of every index and chunk (as locally)           |
//! | prune / forget       | deletes the manifest first, then the rest     | –                                                       |
//! | GC                   | GC marker (heartbeat), then the epoch         | then: any live writer marker → deletes nothing (deferred); fencing before each delete |
//!
//! Why each pair is safe:
//! - *writer × GC* (F-36): each writes its own marker, then looks for the
//!   other's; over a strongly consistent store one of them sees the other.
//!   GC that sees a writer deletes nothing; a writer that sees GC makes no
//!   dedup decision until GC is done (and its cache of known chunks is
//!   dropped, GC having changed the epoch). GC marks manifests *after*
//!   listing writers, so a backup that committed meanwhile is marked.
//!   Only unreferenced chunks older than the grace period (store time) go.
//! - *stalled writer or GC* (F-38): a marker not renewed for its lease is
//!   taken for dead; its holder, when it resumes, finds the lapse and fails
//!   before committing or deleting (fencing). A killed writer's marker
//!   blocks GC for one lease at most.
//! - *clock skew* (F-37): only server times are compared with each other.
//! - *writer × prune*: prune removes only committed backups; an
//!   incremental's base may go while the writer runs, but its chunks stay
//!   (GC defers while the writer runs) and the writer checks each reused
//!   chunk exists.
//! - *reader × prune*: not excluded: a restore of a backup pruned under it
//!   fails on a missing index or chunk (digests are checked: never wrong
//!   data). `protect` a backup you are restoring from a shared bucket.
//! - *writer × writer*: chunk PUTs are idempotent (same key, same bytes).

//! # Threads
//!
//! The store is synchronous `std::fs` code. [`writer::DiskWriter`] methods
//! take `&self` and may be called from many threads at once: hashing,
//! compression, the pre-store check and the chunk write run on the calling
//! thread. [`writer::ChunkPipeline`] is a bounded pool (queue of owned
//! buffers, so memory is `(threads + queue) × chunk size`). Async callers use
//! `spawn_blocking`.

pub mod backend;
pub mod blob;
pub mod coord;
pub mod crypto;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod gc;
pub mod immut;
pub mod manifest;
pub mod master;
pub mod names;
pub mod prune;
pub mod qcow2;
pub mod reader;
pub mod restore_test;
pub mod s3;
pub mod s3_settings;
pub(crate) mod s3_signed;
pub mod shared;
pub mod stages;
pub mod sync;
pub mod target;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use backend::{Backend, Coordination, LocalBackend, LockMode, LockWait};
pub use crypto::{Fingerprint, KdfParams, Key};
pub use error::{ErrorKind, RepoError, Result, Retry};
pub use master::{MasterPrivateKey, MasterPublicKey, MasterSeal};

pub use format::Digest;
pub use manifest::{BackupMode, Consistency, DiskEntry, DiskRead, Manifest, ReadKind};
pub use names::{BackupId, VmId};
pub use prune::{KeepOptions, PruneMark};
pub use reader::{BackupReader, DiskReader, ImageFormat, RestoreOptions, RestoreReport};
pub use shared::{CacheStats, DiskExtent, SharedDisk};
pub use verify::{VerifyReport, VerifyTarget};
pub use writer::{
    BackupMeta, BackupSession, BufferRecycler, ChunkPipeline, CommitInfo, DiskSpec, DiskWriter,
    PreparedChunk, StoredHook, STORE_QUEUE, STORE_THREADS,
};

use backend::LockGuard;
use format::{ObjectType, BLOB_HEADER_LEN, MAX_MANIFEST_SIZE, TAG_LEN};

/// Default repository location.
pub const DEFAULT_REPO_PATH: &str = "/var/lib/shear/repo";

pub(crate) const CONFIG_KEY: &str = "shear-repo.json";
pub(crate) const LOCK_KEY: &str = "lock";
pub(crate) const GC_LOCK_KEY: &str = "gc.lock";
pub(crate) const CHUNKS_KEY: &str = "chunks";
pub(crate) const VM_BACKUPS_KEY: &str = "backups/vm";
pub(crate) const MANIFEST_NAME: &str = "manifest.blob";
pub(crate) const PROTECTED_NAME: &str = "protected";
pub(crate) const VERIFY_STATE_NAME: &str = "verify-state.json";
/// Prefix of snapshot directories being deleted (renamed first, F-31).
pub(crate) const TRASH_PREFIX: &str = ".trash-";

const CONFIG_FORMAT: &str = "shear-repository";
const CONFIG_VERSION: u32 = 1;
const MAX_CONFIG_LEN: usize = 64 << 10;

/// Largest stored chunk blob accepted when reading.
pub(crate) const MAX_CHUNK_BLOB: usize = format::MAX_CHUNK_SIZE + BLOB_HEADER_LEN + TAG_LEN;

/// The repository config (`shear-repo.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Always "shear-repository".
    pub format: String,
    /// Config version.
    pub version: u32,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Default zstd level for new chunks.
    pub zstd_level: i32,
    /// Set when the repository is encrypted.
    pub encryption: Option<manifest::ManifestEncryption>,
    /// Creation time (RFC 3339 UTC).
    pub created: String,
    /// Random id of this repository (32 hex digits): names the QEMU dirty
    /// bitmaps that track changes for it, so two repositories backing up
    /// one VM keep independent chains. Absent in repositories created
    /// before it existed; see [`Repository::repo_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Append-only: deletions and overwrites need the admin token
    /// (repo/immut.rs). An older shear refuses such a config (unknown
    /// field) rather than ignoring it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_only: Option<immut::AppendOnly>,
    /// S3 Object Lock retention of chunks, indexes and manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<immut::ObjectLock>,
}

/// Options of [`Repository::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunk size (power of two, 64 KiB ..= 16 MiB). Default 4 MiB.
    pub chunk_size: u32,
    /// zstd level. Default 1.
    pub zstd_level: i32,
    /// Append-only, with the hash of this admin token (repo/immut.rs).
    pub append_only: Option<immut::AppendOnly>,
    /// S3 Object Lock (the bucket must have it enabled).
    pub object_lock: Option<immut::ObjectLock>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: format::DEFAULT_CHUNK_SIZE,
            zstd_level: 1,
            append_only: None,
            object_lock: None,
        }
    }
}

/// A snapshot directory found by listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotDir {
    pub id: BackupId,
    pub complete: bool,
    pub protected: bool,
}

/// Result of the last verify of a backup (`verify-state.json`). Holds only
/// counts: it is readable without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyState {
    /// "ok" or "failed".
    pub state: String,
    /// When (RFC 3339 UTC).
    pub time: String,
    /// Number of problems found.
    pub problems: u64,
}

/// One backup as listed.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    /// The id (`backup_id`, the name `backup --json` uses).
    #[serde(rename = "backup_id")]
    pub id: BackupId,
    /// The same id under its old name (kept for scripts written before
    /// `backup_id`; deprecated).
    #[serde(rename = "id")]
    pub legacy_id: BackupId,
    /// Whether the manifest reads and checks now: `ok`, `damaged`, or
    /// `locked` (encrypted, no key given).
    pub manifest: ManifestState,
    /// Why the manifest cannot be read (when `damaged`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_error: Option<String>,
    /// Never pruned.
    pub protected: bool,
    /// Result of the last verify, if any.
    pub verify: Option<VerifyState>,
    /// The last restore test (`verify --boot`), if any.
    pub restore_test: Option<restore_test::RestoreTest>,
    /// Bytes of the backup's own files (indexes + manifest; chunks are shared).
    pub metadata_bytes: u64,
    /// From the manifest, when it is readable (needs the key if encrypted).
    pub summary: Option<BackupSummary>,
}

/// Manifest facts shown by `list`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    /// VM name.
    pub vm_name: String,
    /// Full or incremental.
    pub mode: BackupMode,
    /// Application or crash.
    pub consistency: Consistency,
    /// (disk name, virtual size).
    pub disks: Vec<(String, u64)>,
    /// Bytes this backup added to the store.
    pub stored_bytes: u64,
    /// First line of the notes.
    pub notes: String,
}

/// The state of a backup's manifest as `list` found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestState {
    /// Read and checked.
    Ok,
    /// Unreadable or failing its checks (the backup cannot be restored).
    Damaged,
    /// Encrypted and no key was given.
    Locked,
}

pub(crate) struct Inner {
    pub backend: Arc<dyn Backend>,
    pub config: RepoConfig,
    pub key: Option<Key>,
    /// Append-only repositories: the admin token was given.
    pub admin: Arc<std::sync::atomic::AtomicBool>,
}

/// Constant-time comparison of two hashes.
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An open repository. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.backend.location())
            .field("encrypted", &self.inner.config.encryption.is_some())
            .finish()
    }
}

impl Repository {
    /// Creates a repository in `path` (created if missing; must be empty if
    /// present) and opens it. With a key, the repository is encrypted and
    /// pinned to that key.
    pub fn init(path: &Path, key: Option<Key>, opts: &InitOptions) -> Result<Repository> {
        format::check_geometry(opts.chunk_size, 1)?;
        zstd_level_check(opts.zstd_level)?;
        if let Some(backend) = url_backend(path)? {
            return Repository::init_backend(backend, key, opts);
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                let mut rd = std::fs::read_dir(path)
                    .map_err(|e| RepoError::io("read directory", path, e))?;
                if rd.next().is_some() {
                    if path.join(CONFIG_KEY).exists() {
                        return Err(RepoError::AlreadyExists {
                            what: format!("repository at {}", path.display()),
                        });
                    }
                    return Err(RepoError::invalid(
                        "repository path",
                        format!("{} exists and is not empty", path.display()),
                    ));
                }
            }
            Ok(_) => {
                return Err(RepoError::NotARepository {
                    path: path.to_owned(),
                    reason: "exists and is not a directory".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Parents as needed (e.g. /var/lib/shear); the repository
                // itself private to its owner.
                std::os::unix::fs::DirBuilderExt::mode(
                    std::fs::DirBuilder::new().recursive(true),
                    0o700,
                )
                .create(path)
                .map_err(|e| RepoError::io("create repository", path, e))?;
            }
            Err(e) => return Err(RepoError::io("stat repository path", path, e)),
        }
        if opts.object_lock.is_some() {
            return Err(RepoError::invalid(
                "object lock",
                "Object Lock is an S3 feature: for a local repository use --append-only",
            ));
        }
        let backend = LocalBackend::new(path)?;
        backend.ensure_dir(CHUNKS_KEY)?;
        for i in 0..=255u8 {
            backend.ensure_dir(&format!("{CHUNKS_KEY}/{i:02x}"))?;
        }
        backend.ensure_dir(VM_BACKUPS_KEY)?;
        backend.put(LOCK_KEY, b"")?;
        backend.put(GC_LOCK_KEY, b"")?;
        Repository::write_config(&backend, key.as_ref(), opts)?;
        Repository::open(path, key)
    }

    /// Creates a repository on an object store (which must hold nothing
    /// under its prefix) and opens it.
    pub fn init_backend(
        backend: Arc<dyn Backend>,
        key: Option<Key>,
        opts: &InitOptions,
    ) -> Result<Repository> {
        format::check_geometry(opts.chunk_size, 1)?;
        zstd_level_check(opts.zstd_level)?;
        if backend.size(CONFIG_KEY)?.is_some() {
            return Err(RepoError::AlreadyExists {
                what: format!("repository at {}", backend.location()),
            });
        }
        if !backend.list_objects("")?.is_empty() {
            return Err(RepoError::invalid(
                "repository path",
                format!("{} exists and is not empty", backend.location()),
            ));
        }
        if opts.object_lock.is_some() {
            backend.check_object_lock()?;
        }
        Repository::write_config(&*backend, key.as_ref(), opts)?;
        Repository::open_backend(backend, key)
    }

    fn write_config(backend: &dyn Backend, key: Option<&Key>, opts: &InitOptions) -> Result<()> {
        let config = RepoConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            chunk_size: opts.chunk_size,
            zstd_level: opts.zstd_level,
            encryption: key.as_ref().map(|k| manifest::ManifestEncryption {
                alg: "aes-256-gcm".into(),
                key_fingerprint: k.fingerprint().to_string(),
            }),
            created: names::format_time(time::OffsetDateTime::now_utc()),
            id: Some({
                use rand::RngCore;
                let mut b = [0u8; 16];
                rand::rng().fill_bytes(&mut b);
                hex::encode(b)
            }),
            append_only: opts.append_only.clone(),
            object_lock: opts.object_lock,
        };
        let mut text = serde_json::to_vec_pretty(&config)
            .map_err(|e| RepoError::invalid("config", e.to_string()))?;
        text.push(b'\n');
        // The config is the last file: its presence means "initialised".
        backend.put(CONFIG_KEY, &text)
    }

    /// This repository's id: the config's, or for a repository created
    /// before ids existed, a stable digest of its creation time and
    /// settings.
    pub fn repo_id(&self) -> String {
        let c = &self.inner.config;
        match &c.id {
            Some(id) => id.clone(),
            None => {
                let fp = c
                    .encryption
                    .as_ref()
                    .map_or("", |e| e.key_fingerprint.as_str());
                let h = blake3::hash(format!("{}|{}|{fp}", c.created, c.chunk_size).as_bytes());
                hex::encode(&h.as_bytes()[..16])
            }
        }
    }

    /// Opens the repository in `path`. Without a key, an encrypted
    /// repository can only list backup ids and sizes. A key that does not
    /// match the repository is refused here, before anything is written.
    pub fn open(path: &Path, key: Option<Key>) -> Result<Repository> {
        if let Some(backend) = url_backend(path)? {
            return Repository::open_backend(backend, key);
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(RepoError::NotARepository {
                    path: path.to_owned(),
                    reason: "not a directory".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RepoError::NotARepository {
                    path: path.to_owned(),
                    reason: "does not exist (run `shear init`)".into(),
                })
            }
            Err(e) => return Err(RepoError::io("open repository", path, e)),
        }
        Repository::open_backend(Arc::new(LocalBackend::new(path)?), key)
    }

    /// Opens a repository on any backend.
    pub fn open_backend(backend: Arc<dyn Backend>, key: Option<Key>) -> Result<Repository> {
        let text = match backend.get(CONFIG_KEY, MAX_CONFIG_LEN) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(RepoError::NotARepository {
                    path: PathBuf::from(backend.location()),
                    reason: format!("no {CONFIG_KEY} (run `shear init`)"),
                })
            }
            Err(e) => return Err(e),
        };
        let config: RepoConfig = serde_json::from_slice(&text)
            .map_err(|e| RepoError::corrupt(CONFIG_KEY, e.to_string()))?;
        if config.format != CONFIG_FORMAT || config.version != CONFIG_VERSION {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                format!("unsupported format {} v{}", config.format, config.version),
            ));
        }
        format::check_geometry(config.chunk_size, 1)
            .map_err(|e| RepoError::corrupt(CONFIG_KEY, e.to_string()))?;
        match (&config.encryption, &key) {
            (Some(enc), Some(k)) if *enc.key_fingerprint != k.fingerprint().to_string() => {
                return Err(RepoError::WrongKey {
                    given: k.fingerprint().to_string(),
                    expected: enc.key_fingerprint.clone(),
                });
            }
            (None, Some(_)) => return Err(RepoError::KeyNotExpected),
            _ => {}
        }
        backend.set_object_lock(config.object_lock)?;
        let admin = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backend: Arc<dyn Backend> = if config.append_only.is_some() {
            Arc::new(immut::AppendOnlyBackend::new(backend, Arc::clone(&admin)))
        } else {
            backend
        };
        Ok(Repository {
            inner: Arc::new(Inner {
                backend,
                config,
                key,
                admin,
            }),
        })
    }

    /// Lifts an append-only repository's refusals for this handle, given
    /// the admin token `shear init --append-only` printed. Fails on a wrong
    /// token; a no-op on a repository that is not append-only.
    pub fn authorize_admin(&self, token: &str) -> Result<()> {
        let Some(a) = &self.inner.config.append_only else {
            return Ok(());
        };
        let given = immut::admin_token_hash(token);
        if !subtle_eq(given.as_bytes(), a.admin_token_hash.as_bytes()) {
            return Err(RepoError::Immutable {
                what: format!(
                    "the admin token does not match the one of the append-only repository {}",
                    self.location()
                ),
            });
        }
        self.inner
            .admin
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Fails on an append-only repository unless the admin token was given.
    pub(crate) fn require_admin(&self, op: &str) -> Result<()> {
        if self.is_append_only() && !self.inner.admin.load(std::sync::atomic::Ordering::Acquire) {
            return Err(RepoError::Immutable {
                what: format!(
                    "{} is append-only: {op} needs the admin token (--admin-token-file)",
                    self.location()
                ),
            });
        }
        Ok(())
    }

    /// Whether the repository is append-only.
    pub fn is_append_only(&self) -> bool {
        self.inner.config.append_only.is_some()
    }

    /// The Object Lock retention of a backup's manifest, if it is still
    /// retained at the store's time now: prune and forget refuse it then.
    pub(crate) fn locked_until(&self, id: &BackupId) -> Result<Option<i64>> {
        if self.inner.config.object_lock.is_none() {
            return Ok(None);
        }
        let b = &self.inner.backend;
        let mkey = format!("{}/{MANIFEST_NAME}", id.dir_key());
        let Some(r) = b.retention(&mkey)? else {
            return Ok(None);
        };
        let now = coord::server_now(&**b)?;
        Ok((r.until_ms > now).then_some(r.until_ms))
    }

    /// The config.
    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    /// Where the repository is.
    pub fn location(&self) -> String {
        self.inner.backend.location()
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.inner.config.encryption.is_some()
    }

    /// The key, or `KeyRequired` if the repository is encrypted without one.
    pub(crate) fn key_for_data(&self) -> Result<Option<&Key>> {
        match (&self.inner.config.encryption, &self.inner.key) {
            (Some(_), None) => Err(RepoError::KeyRequired),
            (_, k) => Ok(k.as_ref()),
        }
    }

    pub(crate) fn lock_repo(&self, mode: LockMode, wait: LockWait) -> Result<LockGuard> {
        self.inner.backend.lock(LOCK_KEY, mode, wait)
    }

    pub(crate) fn lock_snapshot(
        &self,
        id: &BackupId,
        mode: LockMode,
        wait: LockWait,
    ) -> Result<LockGuard> {
        self.inner
            .backend
            .lock(&id.dir_key(), mode, wait)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => RepoError::not_found(format!("backup {id}")),
                ErrorKind::Busy => RepoError::Busy {
                    what: format!("backup {id} is in use by another operation"),
                },
                _ => e,
            })
    }

    /// Storage key of a chunk.
    pub(crate) fn chunk_key(digest: &Digest) -> String {
        let h = hex::encode(digest);
        format!("{CHUNKS_KEY}/{}/{h}", &h[..2])
    }

    /// Lists snapshot directories (complete or not) of one VM or all VMs.
    /// Fails on any listing error: a partial listing is never used (F-41).
    pub(crate) fn snapshot_dirs(&self, vmid: Option<&VmId>) -> Result<Vec<SnapshotDir>> {
        let b = &self.inner.backend;
        let vmids: Vec<VmId> = match vmid {
            Some(v) => vec![v.clone()],
            None => match b.list(VM_BACKUPS_KEY) {
                Ok(l) => l
                    .into_iter()
                    .filter(|e| e.is_dir)
                    .filter_map(|e| VmId::new(&e.name).ok())
                    .collect(),
                // An object store has no empty prefixes.
                Err(e)
                    if e.kind() == ErrorKind::NotFound
                        && b.coordination() == Coordination::Markers =>
                {
                    Vec::new()
                }
                Err(e) => return Err(e),
            },
        };
        let mut out = Vec::new();
        for v in vmids {
            let group = format!("{VM_BACKUPS_KEY}/{v}");
            let entries = match b.list(&group) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound && vmid.is_some() => continue,
                Err(e) => return Err(e),
            };
            for e in entries.into_iter().filter(|e| e.is_dir) {
                let Ok(time) = names::parse_time(&e.name) else {
                    continue;
                };
                let id = BackupId::new(v.clone(), time);
                let files = match b.list(&id.dir_key()) {
                    Ok(f) => f,
                    // Removed meanwhile (no empty prefixes in object stores).
                    Err(e)
                        if e.kind() == ErrorKind::NotFound
                            && b.coordination() == Coordination::Markers =>
                    {
                        continue
                    }
                    Err(e) => return Err(e),
                };
                let has = |n: &str| files.iter().any(|f| f.name == n && !f.is_dir);
                out.push(SnapshotDir {
                    complete: has(MANIFEST_NAME),
                    protected: has(PROTECTED_NAME),
                    id,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// [`Self::snapshot_dirs`] for decisions that delete (prune, GC), with
    /// the listing cross-checked on an object store (F-41): a flat listing
    /// of every manifest taken *before* it, and the last committed backup
    /// (`coord/last-commit`), must all be in it unless their manifest is
    /// gone. A listing that stopped early, lost a page or came back empty
    /// fails with [`RepoError::ListingIncomplete`] instead of making
    /// backups look absent.
    pub(crate) fn snapshot_dirs_checked(&self, vmid: Option<&VmId>) -> Result<Vec<SnapshotDir>> {
        let b = &self.inner.backend;
        if b.coordination() != Coordination::Markers {
            return self.snapshot_dirs(vmid);
        }
        let prefix = match vmid {
            Some(v) => format!("{VM_BACKUPS_KEY}/{v}"),
            None => VM_BACKUPS_KEY.to_owned(),
        };
        let flat: Vec<String> = b
            .list_objects(&prefix)?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_suffix(&format!("/{MANIFEST_NAME}"))
                    .map(str::to_owned)
            })
            .collect();
        let last = match b.get(coord::LAST_COMMIT_KEY, 4096) {
            Ok(v) => Some(String::from_utf8_lossy(&v).trim().to_owned()),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let dirs = self.snapshot_dirs(vmid)?;
        let listed: std::collections::HashSet<String> = dirs
            .iter()
            .filter(|d| d.complete)
            .map(|d| d.id.dir_key())
            .collect();
        let mut expected = flat;
        if let Some(l) = last.filter(|l| l.starts_with(&format!("{prefix}/"))) {
            expected.push(l);
        }
        for dir in expected {
            if listed.contains(&dir) {
                continue;
            }
            // Pruned since (its manifest is gone): fine. Otherwise the
            // listing missed a committed backup.
            if b.size(&format!("{dir}/{MANIFEST_NAME}"))?.is_some() {
                return Err(RepoError::ListingIncomplete {
                    what: format!(
                        "committed backup {dir} is missing from the listing of {}",
                        b.location()
                    ),
                });
            }
        }
        Ok(dirs)
    }

    /// Committed backups, oldest first.
    pub fn list_backups(&self, vmid: Option<&VmId>) -> Result<Vec<BackupInfo>> {
        let b = &self.inner.backend;
        let mut out = Vec::new();
        for s in self.snapshot_dirs(vmid)? {
            if !s.complete {
                continue;
            }
            let files = b.list(&s.id.dir_key())?;
            let metadata_bytes = files
                .iter()
                .filter(|f| f.name == MANIFEST_NAME || f.name.ends_with(".fidx"))
                .map(|f| f.size)
                .sum();
            let verify = self.verify_state(&s.id).ok().flatten();
            let restore_test = self.restore_test(&s.id).ok().flatten();
            let (summary, manifest, manifest_error) =
                if self.inner.key.is_some() || !self.is_encrypted() {
                    match self.load_manifest(&s.id) {
                        Ok(m) => (
                            Some(BackupSummary {
                                vm_name: m.vm_name.clone(),
                                mode: m.mode,
                                consistency: m.consistency,
                                disks: m
                                    .disks
                                    .iter()
                                    .map(|d| (d.name.clone(), d.virtual_size))
                                    .collect(),
                                stored_bytes: m.disks.iter().map(|d| d.stored_bytes).sum(),
                                notes: m.notes.lines().next().unwrap_or("").to_owned(),
                            }),
                            ManifestState::Ok,
                            None,
                        ),
                        Err(e) => (None, ManifestState::Damaged, Some(crate::chain(&e))),
                    }
                } else {
                    (None, ManifestState::Locked, None)
                };
            out.push(BackupInfo {
                legacy_id: s.id.clone(),
                id: s.id,
                manifest,
                manifest_error,
                protected: s.protected,
                verify,
                restore_test,
                metadata_bytes,
                summary,
            });
        }
        Ok(out)
    }

    /// Reads and checks the manifest of a committed backup.
    pub fn load_manifest(&self, id: &BackupId) -> Result<Manifest> {
        let key = self.key_for_data()?;
        let mkey = format!("{}/{MANIFEST_NAME}", id.dir_key());
        let bytes = match self
            .inner
            .backend
            .get(&mkey, MAX_MANIFEST_SIZE + BLOB_HEADER_LEN + TAG_LEN)
        {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(RepoError::not_found(format!("backup {id}")))
            }
            Err(e) => return Err(e),
        };
        let what = format!("manifest of {id}");
        let json = blob::decode(
            &bytes,
            ObjectType::Manifest,
            key,
            b"",
            MAX_MANIFEST_SIZE,
            None,
            &what,
        )?;
        let m = Manifest::from_json(&json, id)?;
        let expect_fp = self
            .inner
            .config
            .encryption
            .as_ref()
            .map(|e| &e.key_fingerprint);
        if m.encryption.as_ref().map(|e| &e.key_fingerprint) != expect_fp {
            return Err(RepoError::corrupt(
                what,
                "key fingerprint differs from the repository's",
            ));
        }
        Ok(m)
    }

    /// Reads and checks the index of one disk against its manifest entry.
    pub(crate) fn load_index(&self, id: &BackupId, disk: &DiskEntry) -> Result<format::FixedIndex> {
        let key = self.key_for_data()?;
        let ikey = format!("{}/{}", id.dir_key(), disk.index_file);
        let what = format!("index of disk {} in {id}", disk.name);
        let max_payload =
            format::INDEX_HEADER_LEN + 32 * usize::try_from(format::MAX_INDEX_ENTRIES).unwrap_or(0);
        let bytes = self
            .inner
            .backend
            .get(&ikey, max_payload + BLOB_HEADER_LEN + TAG_LEN + 1024)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => RepoError::corrupt(&what, "index file is missing"),
                _ => e,
            })?;
        if hex::encode(blake3::hash(&bytes).as_bytes()) != disk.index_digest {
            return Err(RepoError::corrupt(
                &what,
                "index digest differs from the manifest",
            ));
        }
        let payload = blob::decode(
            &bytes,
            ObjectType::Index,
            key,
            b"",
            max_payload,
            None,
            &what,
        )?;
        let idx = format::FixedIndex::decode(&payload, &what)?;
        if idx.virtual_size != disk.virtual_size || idx.chunk_size != disk.chunk_size {
            return Err(RepoError::corrupt(
                &what,
                "geometry differs from the manifest",
            ));
        }
        Ok(idx)
    }

    /// Digest of `len` zero bytes under this repository's chunk hash.
    pub(crate) fn zero_digest(&self, len: usize) -> Result<Digest> {
        let key = self.key_for_data()?;
        Ok(blob::chunk_digest(key, &vec![0u8; len]))
    }

    /// The last verify result of a backup, if any.
    pub fn verify_state(&self, id: &BackupId) -> Result<Option<VerifyState>> {
        let k = format!("{}/{VERIFY_STATE_NAME}", id.dir_key());
        match self.inner.backend.get(&k, 64 << 10) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| RepoError::corrupt(k, e.to_string())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Marks or unmarks a backup as protected (never pruned).
    pub fn set_protected(&self, id: &BackupId, protected: bool) -> Result<()> {
        let _repo = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
        let _snap = self.lock_snapshot(id, LockMode::Shared, LockWait::NoWait)?;
        if self
            .inner
            .backend
            .size(&format!("{}/{MANIFEST_NAME}", id.dir_key()))?
            .is_none()
        {
            return Err(RepoError::not_found(format!("backup {id}")));
        }
        if !protected {
            self.require_admin("unprotect")?;
        }
        let k = format!("{}/{PROTECTED_NAME}", id.dir_key());
        if protected {
            self.inner.backend.put(&k, b"")
        } else {
            self.inner.backend.delete(&k).map(|_| ())
        }
    }

    /// Removes one backup (not its chunks: GC does that). Refuses protected
    /// backups and backups in use.
    pub fn forget(&self, id: &BackupId) -> Result<()> {
        self.require_admin("forget")?;
        let _repo = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
        let snap = self.lock_snapshot(id, LockMode::Exclusive, LockWait::NoWait)?;
        if self
            .inner
            .backend
            .size(&format!("{}/{PROTECTED_NAME}", id.dir_key()))?
            .is_some()
        {
            return Err(RepoError::invalid(
                "backup",
                format!("{id} is protected (unprotect it first)"),
            ));
        }
        if let Some(until) = self.locked_until(id)? {
            return Err(RepoError::Immutable {
                what: format!(
                    "backup {id} is under S3 Object Lock until {}",
                    immut::format_ms(until)
                ),
            });
        }
        self.remove_snapshot_locked(id, snap)
    }

    /// Deletes a snapshot directory crash-safely: rename it to a trash name
    /// first (one atomic step makes it invisible), then remove the files.
    pub(crate) fn remove_snapshot_locked(&self, id: &BackupId, lock: LockGuard) -> Result<()> {
        let b = &self.inner.backend;
        if b.coordination() == Coordination::Markers {
            // No rename: the manifest goes first (the backup is invisible
            // from then on); a crash leaves a manifest-less prefix that GC
            // removes as abandoned.
            b.delete(&format!("{}/{MANIFEST_NAME}", id.dir_key()))?;
            drop(lock);
            return b.remove_tree(&id.dir_key());
        }
        let trash = format!(
            "{VM_BACKUPS_KEY}/{}/{TRASH_PREFIX}{}-{}",
            id.vmid(),
            id.time_str(),
            std::process::id()
        );
        b.rename(&id.dir_key(), &trash)?;
        drop(lock);
        b.remove_tree(&trash)
    }
}

/// The backend of a repository given as a URL (`s3://BUCKET/PREFIX`);
/// `None` for a local path. Any other `scheme://` is refused rather than
/// taken as a local directory named `scheme:`.
pub fn url_backend(path: &Path) -> Result<Option<Arc<dyn Backend>>> {
    let Some(s) = path.to_str() else {
        return Ok(None);
    };
    match s3::url_scheme(s) {
        None => Ok(None),
        Some("s3") => Ok(Some(Arc::new(s3::S3Backend::new(s3::S3Location::parse(
            s,
        )?)?))),
        Some(other) => Err(RepoError::invalid(
            "repository",
            format!("{s}: unsupported scheme {other}:// (use a local path or s3://BUCKET/PREFIX)"),
        )),
    }
}

/// Checks a zstd level.
pub(crate) fn zstd_level_check(level: i32) -> Result<()> {
    // 0 stores chunks uncompressed (`--compress none`).
    if (0..=19).contains(&level) {
        Ok(())
    } else {
        Err(RepoError::invalid(
            "zstd level",
            format!("{level}: use 1..=19, or 0 for none"),
        ))
    }
}

/// The version string recorded in manifests.
pub fn tool_version() -> String {
    format!("shear {}", env!("CARGO_PKG_VERSION"))
}

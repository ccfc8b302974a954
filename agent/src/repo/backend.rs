//! Storage behind a trait: a local directory ([`LocalBackend`]) or an S3
//! bucket ([`super::s3::S3Backend`]).
//!
//! The contract splits in two (issue 14):
//! - **the object store**: `put` / `get` / `get_prefix` (range get) /
//!   `size` (head) / `list` / `list_objects` / `delete`. Content-addressed
//!   chunk writes are idempotent (the same key always gets the same bytes),
//!   so two writers racing on one chunk need nothing else.
//! - **coordination** ([`Coordination`]): a local directory has `flock`
//!   locks, renames and directories ([`Coordination::Locks`], the locking
//!   table in `repo/mod.rs`); an object store has none of them, and the
//!   repository coordinates through objects it writes itself: in-progress
//!   markers with heartbeats and GC's condemned lists
//!   ([`Coordination::Markers`], `repo/coord.rs`). On such a backend `lock`
//!   returns a guard that holds nothing, `rename` is copy + delete (only used
//!   to quarantine), and directories are implicit.
//!
//! Keys are `/`-separated relative paths built from validated names
//! (`chunks/ab/<hex>`, `backups/vm/100/<time>/manifest.blob`). The contract
//! every backend keeps:
//! - `put` is atomic and durable when it returns: a reader sees the old
//!   object or the whole new one, never a prefix (local: temp file, fsync,
//!   rename, fsync the directory, F-31/F-32);
//! - a failed `put` leaves no object under the final key (F-33/F-34); a
//!   failed fsync is never retried on the same file (F-34);
//! - `list` fails rather than returning a partial listing (F-41);
//! - locks are advisory and released when the holder dies (`flock`), so no
//!   stale lock outlives a killed process (F-31, F-38).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{RepoError, Result};
use crate::failpoint::{self, FsOp};
use crate::fsutil::{self, Existing};

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders.
    Shared,
    /// One holder, no shared holders.
    Exclusive,
}

/// How long to wait for a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail with `Busy` at once.
    NoWait,
    /// Wait up to this long, then fail with `Busy`.
    Timeout(Duration),
    /// Block until granted.
    Forever,
}

/// A held lock; dropping it releases the lock.
pub struct LockGuard {
    _held: Box<dyn std::any::Any + Send + Sync>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LockGuard")
    }
}

impl LockGuard {
    /// Wraps whatever keeps a backend's lock alive.
    pub fn new(held: Box<dyn std::any::Any + Send + Sync>) -> Self {
        LockGuard { _held: held }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// Name (last key component).
    pub name: String,
    /// True for a "directory" (a prefix with children).
    pub is_dir: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// How writers, pruners and GC coordinate on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordination {
    /// `flock` locks that die with their holder (local directory).
    Locks,
    /// No locks: in-progress markers with heartbeats, condemned lists
    /// (object stores; `repo/coord.rs`).
    Markers,
}

/// One object of a recursive listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification as the *store* recorded it (server clock), in
    /// milliseconds since the epoch.
    pub modified_ms: i64,
}

/// Object storage as the repository uses it.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Human-readable location for messages.
    fn location(&self) -> String;
    /// Stores `data` under `key` atomically and durably, replacing any object.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object, failing with `Corrupt` if it is larger than
    /// `max_len` (checked before reading) and `NotFound` if absent.
    fn get(&self, key: &str, max_len: usize) -> Result<Vec<u8>>;
    /// Reads up to `len` bytes from the start; `None` if absent.
    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>>;
    /// Size of an object; `None` if absent.
    fn size(&self, key: &str) -> Result<Option<u64>>;
    /// Deletes an object durably; `false` if it was absent.
    fn delete(&self, key: &str) -> Result<bool>;
    /// Renames an object (or prefix) durably.
    fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Lists the direct children of a prefix. A missing prefix is `NotFound`.
    fn list(&self, prefix: &str) -> Result<Vec<ListEntry>>;
    /// Creates a new, empty prefix durably; `AlreadyExists` if present.
    fn create_dir(&self, key: &str) -> Result<()>;
    /// Creates a prefix and its parents if missing, durably.
    fn ensure_dir(&self, key: &str) -> Result<()>;
    /// Removes a prefix and everything below it.
    fn remove_tree(&self, key: &str) -> Result<()>;
    /// Takes a lock named by `key` (an existing object or prefix).
    fn lock(&self, key: &str, mode: LockMode, wait: LockWait) -> Result<LockGuard>;
    /// Whether `name` is a leftover of an interrupted `put`.
    fn is_temp_name(&self, name: &str) -> bool;
    /// How this backend coordinates (see the module docs).
    fn coordination(&self) -> Coordination {
        Coordination::Locks
    }
    /// Every object below a prefix (recursive) with its store-side
    /// modification time. A missing prefix is an empty list.
    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let mut stack = vec![prefix.to_owned()];
        while let Some(dir) = stack.pop() {
            let entries = match self.list(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == super::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let key = if dir.is_empty() {
                    e.name.clone()
                } else {
                    format!("{dir}/{}", e.name)
                };
                if e.is_dir {
                    stack.push(key);
                } else {
                    let modified_ms = self.modified_ms(&key)?.unwrap_or(0);
                    out.push(ObjectInfo {
                        key,
                        size: e.size,
                        modified_ms,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
    /// Store-side modification time of an object (ms since the epoch);
    /// `None` if absent. (Default: present objects at time 0.)
    fn modified_ms(&self, key: &str) -> Result<Option<i64>> {
        Ok(self.size(key)?.map(|_| 0))
    }
    /// Sets the Object Lock retention of new chunks, indexes and manifests
    /// (repo/immut.rs). Backends without Object Lock refuse `Some`.
    fn set_object_lock(&self, lock: Option<super::immut::ObjectLock>) -> Result<()> {
        match lock {
            None => Ok(()),
            Some(_) => Err(RepoError::invalid(
                "object lock",
                format!("{} does not support Object Lock (S3 only)", self.location()),
            )),
        }
    }
    /// The retention of an object's current version; `None` if it has
    /// none (or the backend has no Object Lock).
    fn retention(&self, _key: &str) -> Result<Option<super::immut::Retention>> {
        Ok(None)
    }
    /// Extends the retention of an object's current version to `until_ms`.
    fn extend_retention(&self, key: &str, _until_ms: i64) -> Result<()> {
        Err(RepoError::invalid(
            "object lock",
            format!("{key}: {} has no Object Lock", self.location()),
        ))
    }
    /// Fails unless the store has Object Lock enabled.
    fn check_object_lock(&self) -> Result<()> {
        Err(RepoError::invalid(
            "object lock",
            format!("{} does not support Object Lock (S3 only)", self.location()),
        ))
    }
}

/// A repository in a local directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// Uses `root` (which must be an existing directory).
    pub fn new(root: &Path) -> Result<Self> {
        let meta = fs::metadata(root).map_err(|e| RepoError::io("open repository", root, e))?;
        if !meta.is_dir() {
            return Err(RepoError::NotARepository {
                path: root.to_owned(),
                reason: "not a directory".into(),
            });
        }
        Ok(LocalBackend {
            root: root.to_owned(),
        })
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps a key to a path, refusing anything that could escape the root.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty() {
            return Ok(self.root.clone());
        }
        for comp in key.split('/') {
            if comp.is_empty() || comp == "." || comp == ".." || comp.contains('\0') {
                return Err(RepoError::invalid("storage key", format!("{key:?}")));
            }
        }
        Ok(self.root.join(key))
    }

    fn sync_dir(dir: &Path) -> Result<()> {
        Ok(fsutil::sync_dir(dir)?)
    }

    /// Logs the removal of `path` and everything below it, bottom-up, as
    /// unlinks and rmdirs (crash replay, F-32). Called before removing.
    fn record_tree_removal(path: &Path) {
        if !failpoint::recording() {
            return;
        }
        fn walk(p: &Path) {
            match fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    if let Ok(rd) = fs::read_dir(p) {
                        for e in rd.flatten() {
                            walk(&e.path());
                        }
                    }
                    failpoint::record(|| FsOp::Rmdir(p.to_owned()));
                }
                Ok(_) => failpoint::record(|| FsOp::Unlink(p.to_owned())),
                Err(_) => {}
            }
        }
        walk(path);
    }

    fn hit(path: &Path, step: &str) -> Result<()> {
        failpoint::hit(failpoint::kind_of(path), step)
            .map_err(|e| RepoError::io("failpoint", path, e))
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        fsutil::write_atomic(&path, data, Existing::Replace)?;
        Ok(())
    }

    fn get(&self, key: &str, max_len: usize) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let f = File::open(&path).map_err(|e| RepoError::io("open", &path, e))?;
        let len = f
            .metadata()
            .map_err(|e| RepoError::io("stat", &path, e))?
            .len();
        if len > max_len as u64 {
            return Err(RepoError::corrupt(
                key,
                format!("{len} bytes, larger than the limit {max_len}"),
            ));
        }
        // len <= max_len (a usize).
        let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(max_len));
        f.take(max_len as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| RepoError::io("read", &path, e))?;
        if buf.len() > max_len {
            return Err(RepoError::corrupt(
                key,
                "grew past the size limit while read",
            ));
        }
        Ok(buf)
    }

    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RepoError::io("open", &path, e)),
        };
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RepoError::io("read", &path, e)),
            }
        }
        buf.truncate(got);
        Ok(Some(buf))
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Err(RepoError::corrupt(key, "not a regular file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io("stat", &path, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        Self::hit(&path, "delete")?;
        match fs::remove_file(&path) {
            Ok(()) => {
                failpoint::record(|| FsOp::Unlink(path.clone()));
                Self::sync_dir(fsutil::parent_dir(&path))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RepoError::io("delete", &path, e)),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (a, b) = (self.path(from)?, self.path(to)?);
        Self::hit(&a, "rename")?;
        fs::rename(&a, &b).map_err(|e| RepoError::io("rename", &a, e))?;
        failpoint::record(|| FsOp::Rename(a.clone(), b.clone()));
        Self::sync_dir(fsutil::parent_dir(&b))?;
        if fsutil::parent_dir(&a) != fsutil::parent_dir(&b) {
            Self::sync_dir(fsutil::parent_dir(&a))?;
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ListEntry>> {
        let path = self.path(prefix)?;
        let rd = fs::read_dir(&path).map_err(|e| RepoError::io("list", &path, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| RepoError::io("list", &path, e))?;
            let Ok(name) = ent.file_name().into_string() else {
                // Not a name we write; keep it visible to the caller as odd.
                out.push(ListEntry {
                    name: ent.file_name().to_string_lossy().into_owned(),
                    is_dir: false,
                    size: 0,
                });
                continue;
            };
            let ft = ent
                .file_type()
                .map_err(|e| RepoError::io("stat", ent.path(), e))?;
            let size = if ft.is_file() {
                ent.metadata().map(|m| m.len()).unwrap_or(0)
            } else {
                0
            };
            out.push(ListEntry {
                name,
                is_dir: ft.is_dir(),
                size,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create_dir(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        Self::hit(&path, "mkdir")?;
        fs::create_dir(&path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => RepoError::AlreadyExists {
                what: format!("{key} in {}", self.root.display()),
            },
            _ => RepoError::io("create directory", &path, e),
        })?;
        failpoint::record(|| FsOp::Mkdir(path.clone()));
        // Not durable: take it back rather than leave an empty directory
        // that a caller was told does not exist (F-34).
        Self::sync_dir(fsutil::parent_dir(&path)).inspect_err(|_| {
            let _ = fs::remove_dir(&path);
        })
    }

    fn ensure_dir(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        if path.is_dir() {
            return Ok(());
        }
        let mut cur = String::new();
        for comp in key.split('/') {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(comp);
            let p = self.path(&cur)?;
            if !p.is_dir() {
                Self::hit(&p, "mkdir")?;
            }
            match fs::create_dir(&p) {
                Ok(()) => {
                    failpoint::record(|| FsOp::Mkdir(p.clone()));
                    Self::sync_dir(fsutil::parent_dir(&p))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
                Err(e) => return Err(RepoError::io("create directory", &p, e)),
            }
        }
        Ok(())
    }

    fn remove_tree(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        Self::hit(&path, "remove-tree")?;
        Self::record_tree_removal(&path);
        match fs::remove_dir_all(&path) {
            Ok(()) => Self::sync_dir(fsutil::parent_dir(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io("remove directory", &path, e)),
        }
    }

    fn lock(&self, key: &str, mode: LockMode, wait: LockWait) -> Result<LockGuard> {
        let path = self.path(key)?;
        let f = File::open(&path).map_err(|e| RepoError::io("open lock", &path, e))?;
        let deadline = match wait {
            LockWait::Timeout(d) => Some(Instant::now() + d),
            _ => None,
        };
        loop {
            let res = match (mode, wait) {
                (LockMode::Shared, LockWait::Forever) => f.lock_shared().map_err(Some),
                (LockMode::Exclusive, LockWait::Forever) => f.lock().map_err(Some),
                (LockMode::Shared, _) => f.try_lock_shared().map_err(try_err),
                (LockMode::Exclusive, _) => f.try_lock().map_err(try_err),
            };
            match res {
                Ok(()) => return Ok(LockGuard::new(Box::new(f))),
                Err(Some(e)) => return Err(RepoError::io("lock", &path, e)),
                Err(None) => {}
            }
            match deadline {
                Some(d) if Instant::now() < d => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    return Err(RepoError::Busy {
                        what: format!(
                            "{key} is locked by another process ({} lock wanted)",
                            match mode {
                                LockMode::Shared => "shared",
                                LockMode::Exclusive => "exclusive",
                            }
                        ),
                    })
                }
            }
        }
    }

    fn is_temp_name(&self, name: &str) -> bool {
        fsutil::is_temp_name(name)
    }

    fn modified_ms(&self, key: &str) -> Result<Option<i64>> {
        let path = self.path(key)?;
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(Some(
                m.modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io("stat", &path, e)),
        }
    }
}

/// `None` = would block; `Some` = a real error.
fn try_err(e: fs::TryLockError) -> Option<io::Error> {
    match e {
        fs::TryLockError::WouldBlock => None,
        fs::TryLockError::Error(e) => Some(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path()).unwrap();
        b.ensure_dir("a/b").unwrap();
        b.put("a/b/x", b"hello").unwrap();
        assert_eq!(b.get("a/b/x", 5).unwrap(), b"hello");
        b.get("a/b/x", 4).unwrap_err();
        assert_eq!(b.get_prefix("a/b/x", 2).unwrap().unwrap(), b"he");
        assert_eq!(b.size("a/b/x").unwrap(), Some(5));
        let l = b.list("a/b").unwrap();
        assert_eq!(l.len(), 1, "no temp file left: {l:?}");
        assert!(b.delete("a/b/x").unwrap());
        assert!(!b.delete("a/b/x").unwrap());
        b.path("../x").unwrap_err();
        b.path("a//x").unwrap_err();
        b.list("nope").unwrap_err();
    }

    #[test]
    fn locks_conflict_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path()).unwrap();
        b.put("lock", b"").unwrap();
        let s1 = b.lock("lock", LockMode::Shared, LockWait::NoWait).unwrap();
        let _s2 = b.lock("lock", LockMode::Shared, LockWait::NoWait).unwrap();
        let e = b
            .lock("lock", LockMode::Exclusive, LockWait::NoWait)
            .unwrap_err();
        assert!(matches!(e, RepoError::Busy { .. }));
        drop(s1);
        drop(_s2);
        let _x = b
            .lock(
                "lock",
                LockMode::Exclusive,
                LockWait::Timeout(Duration::from_millis(50)),
            )
            .unwrap();
    }
}

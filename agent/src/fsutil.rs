//! Durable file writes: the one atomic-write helper of the agent.
//!
//! Everything shear writes that must survive a crash (run records,
//! repository objects, key files, restore outputs) goes through
//! [`write_atomic`] or [`publish`]: a private temp file next to the target,
//! written and fsynced, moved to its name, then the directory fsynced. A
//! reader sees either the old file or the whole new one, never a torn one;
//! a crash leaves at most a temp file ([`is_temp_name`]) that nothing reads.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::failpoint::{self, FsOp};

/// Marker inside temp file names (`<name>.tmp-<pid>-<n>`).
const TMP_MARK: &str = ".tmp-";

/// Temp files created by this process so far (makes names unique).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Which step of a durable write failed, on which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}", path.display())]
pub struct WriteError {
    /// The step, e.g. `"sync temp file"`.
    pub op: &'static str,
    /// The file or directory it was done to.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: io::Error,
}

impl WriteError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        WriteError {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// What to do when the target name already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (`rename(2)`: replaces a file or symlink at the name, never
    /// follows it).
    Replace,
    /// Fail with `AlreadyExists` (`link(2)`: never overwrites, even if the
    /// name appeared while the temp file was written).
    Keep,
}

/// Whether `name` is a leftover temp file of an interrupted [`write_atomic`].
pub fn is_temp_name(name: &str) -> bool {
    name.contains(TMP_MARK)
}

/// Remove the temp files an interrupted [`write_atomic`] of `path` left
/// beside it (`<path>.tmp-*`). Only for a caller that excludes every
/// other writer of `path` (e.g. under its lock). Returns how many went.
pub fn remove_temps_of(path: &Path) -> io::Result<u64> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(0);
    };
    let mut prefix = name.to_owned();
    prefix.push(TMP_MARK);
    let prefix = prefix.as_encoded_bytes();
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().as_encoded_bytes().starts_with(prefix) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// A fresh temp path next to `path`: `<path>.tmp-<pid>-<n>`, unique within
/// this process (and across processes by the pid).
pub fn temp_path(path: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!("{TMP_MARK}{}-{n}", std::process::id()));
    PathBuf::from(name)
}

/// Creates a fresh temp file beside `path` ([`temp_path`]). A name can be
/// taken: a process SIGKILLed mid-write leaves its temp file, and with
/// pid_max 32768 a later process gets its pid again (the 1000-kill
/// campaign hit this after 2551 runs); the next name is tried then.
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    let mut tries = 0;
    loop {
        let tmp = temp_path(path);
        match create_private(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 64 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Creates `path` new (never an existing file, never through a symlink),
/// mode 0600.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// fsyncs a directory, so a rename, link or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    sync_dir_of(failpoint::kind_of(dir), dir)
}

/// [`sync_dir`] for a write of a `kind` object (names the failpoint).
pub(crate) fn sync_dir_of(kind: &str, dir: &Path) -> Result<(), WriteError> {
    failpoint::hit(kind, "dir-fsync")
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| WriteError::new("sync directory", dir, e))?;
    failpoint::record(|| FsOp::FsyncDir(dir.to_owned()));
    Ok(())
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `data` to `path` atomically and durably: a private temp file in
/// the same directory (unique name), write, fsync, move to `path`
/// ([`Existing`] says whether an existing file is replaced), fsync the
/// directory. On any error the temp file is removed. A failed fsync is
/// final: the page cache may have dropped the data, so the temp file is
/// discarded, never re-synced (F-34).
pub fn write_atomic(path: &Path, data: &[u8], existing: Existing) -> Result<(), WriteError> {
    let kind = failpoint::kind_of(path);
    let (tmp, mut f) = failpoint::hit(kind, "create")
        .and_then(|()| create_temp(path))
        .map_err(|e| WriteError::new("create temp file", path, e))?;
    failpoint::record(|| FsOp::Create(tmp.clone()));
    let written = failpoint::hit(kind, "write")
        .and_then(|()| write_contents(&mut f, data).map(drop))
        .map_err(|e| WriteError::new("write temp file", &tmp, e))
        .and_then(|()| {
            failpoint::record(|| FsOp::Write(tmp.clone(), data.to_vec()));
            failpoint::hit(kind, "fsync")
                .and_then(|()| f.sync_all())
                .map_err(|e| WriteError::new("sync temp file", &tmp, e))
        });
    drop(f);
    if let Err(e) = written {
        remove_temp(&tmp);
        return Err(e);
    }
    failpoint::record(|| FsOp::Fsync(tmp.clone()));
    publish(&tmp, path, existing)
}

/// Objects at least this large are written with `O_DIRECT` ([`write_contents`]).
const DIRECT_MIN_LEN: usize = 256 << 10;
/// Buffer address, file offset and length alignment of a direct write (the
/// page size: enough for every block size Linux filesystems use).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// The aligned copy of a direct write, reused per thread (a 4 MiB chunk
    /// store thread keeps one: its pages stay resident).
    static DIRECT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How [`write_contents`] wrote a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `O_DIRECT` from an aligned, reused buffer, then truncated.
    Direct,
    /// Through the page cache.
    Buffered,
}

/// Writes `data` into the empty file `f` (a fresh temp file); the caller
/// fsyncs. A large object goes with `O_DIRECT` from a reused aligned
/// buffer, zero-padded to [`DIRECT_ALIGN`], then the file is truncated to
/// `data.len()`: a backup's chunks neither pass through nor evict the
/// host's page cache, and the copy into fresh page-cache pages (77 % of
/// the store threads' CPU in the bench's profile) is gone. A filesystem
/// that refuses `O_DIRECT` (`EINVAL`: tmpfs before Linux 6.6, some
/// network filesystems) gets the buffered write.
pub fn write_contents(f: &mut File, data: &[u8]) -> io::Result<WriteMode> {
    if data.len() >= DIRECT_MIN_LEN && write_direct(f, data)? {
        return Ok(WriteMode::Direct);
    }
    f.write_all(data)?;
    Ok(WriteMode::Buffered)
}

/// The direct write of [`write_contents`]: `Ok(false)` (file empty and
/// buffered again) where the filesystem refuses it.
fn write_direct(f: &mut File, data: &[u8]) -> io::Result<bool> {
    use rustix::fs::{fcntl_setfl, OFlags};
    let padded = data.len().next_multiple_of(DIRECT_ALIGN);
    DIRECT_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < padded + DIRECT_ALIGN {
            buf.resize(padded + DIRECT_ALIGN, 0);
        }
        // The aligned window inside the buffer (no allocator with an
        // alignment needed).
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let Some(window) = buf.get_mut(start..start + padded) else {
            return Ok(false);
        };
        let (body, pad) = window.split_at_mut(data.len());
        body.copy_from_slice(data);
        pad.fill(0);
        if let Err(e) = fcntl_setfl(&*f, OFlags::DIRECT) {
            return if e == rustix::io::Errno::INVAL {
                Ok(false)
            } else {
                Err(e.into())
            };
        }
        let written = refused_in_test(f, window).and_then(|()| f.write_all(window));
        fcntl_setfl(&*f, OFlags::empty())?;
        match written {
            Ok(()) => {
                f.set_len(data.len() as u64)?;
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Alignment the filesystem does not take: start over.
                f.set_len(0)?;
                f.rewind()?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    })
}

#[cfg(test)]
thread_local! {
    /// Tests: direct writes on this thread fail with `EINVAL` after a
    /// partial write, as on a filesystem that takes the open but not the
    /// alignment (every tmpfs and ext4 here takes both).
    static REFUSE_DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn refused_in_test(f: &mut File, window: &[u8]) -> io::Result<()> {
    if !REFUSE_DIRECT.get() {
        return Ok(());
    }
    f.write_all(&window[..DIRECT_ALIGN])?;
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(not(test))]
fn refused_in_test(_: &mut File, _: &[u8]) -> io::Result<()> {
    Ok(())
}

/// Removes a temp file after a failed write (best effort).
fn remove_temp(tmp: &Path) {
    if fs::remove_file(tmp).is_ok() {
        failpoint::record(|| FsOp::Unlink(tmp.to_owned()));
    }
}

/// Moves the written and fsynced temp file `tmp` to `path` (in the same
/// directory) and fsyncs the directory. The temp file is gone afterwards,
/// whether this succeeds or not.
pub fn publish(tmp: &Path, path: &Path, existing: Existing) -> Result<(), WriteError> {
    let kind = failpoint::kind_of(path);
    let moved = failpoint::hit(kind, "rename").and_then(|()| match existing {
        Existing::Replace => fs::rename(tmp, path).map(|()| {
            failpoint::record(|| FsOp::Rename(tmp.to_owned(), path.to_owned()));
        }),
        Existing::Keep => fs::hard_link(tmp, path).map(|()| {
            failpoint::record(|| FsOp::Link(tmp.to_owned(), path.to_owned()));
            remove_temp(tmp);
        }),
    });
    if let Err(e) = moved {
        remove_temp(tmp);
        return Err(WriteError::new("move temp file to", path, e));
    }
    sync_dir_of(kind, parent_dir(path))?;
    failpoint::hit(kind, "done").map_err(|e| WriteError::new("finish", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes no two offsets of which repeat for a while.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7 + i / 251) % 256).to_le_bytes()[0])
            .collect()
    }

    #[test]
    fn large_objects_go_direct_and_come_back_exact_small_ones_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let ext4 = rustix::fs::statfs(dir.path()).unwrap().f_type == 0xEF53;
        for len in [
            0,
            5000,
            DIRECT_MIN_LEN - 1,
            DIRECT_MIN_LEN,
            (4 << 20) + 123,
            4 << 20,
        ] {
            let data = pattern(len);
            let p = dir.path().join(format!("obj-{len}"));
            let mut f = create_private(&p).unwrap();
            let mode = write_contents(&mut f, &data).unwrap();
            f.sync_all().unwrap();
            drop(f);
            assert_eq!(fs::read(&p).unwrap(), data, "{len} bytes");
            if len < DIRECT_MIN_LEN {
                assert_eq!(mode, WriteMode::Buffered, "{len} bytes");
            } else if ext4 {
                assert_eq!(mode, WriteMode::Direct, "{len} bytes");
            }
            // And through the atomic write, replacing what is there.
            let again = pattern(len + 1);
            write_atomic(&p, &again, Existing::Replace).unwrap();
            assert_eq!(fs::read(&p).unwrap(), again, "{len} + 1 bytes");
        }
    }

    #[test]
    fn direct_write_refused_after_a_partial_write_starts_over_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern((1 << 20) + 17);
        let p = dir.path().join("obj");
        REFUSE_DIRECT.set(true);
        let mut f = create_private(&p).unwrap();
        let mode = write_contents(&mut f, &data);
        REFUSE_DIRECT.set(false);
        assert_eq!(mode.unwrap(), WriteMode::Buffered);
        drop(f);
        assert_eq!(
            fs::read(&p).unwrap(),
            data,
            "nothing of the refused write is left"
        );
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_steps_over_a_dead_process_temp_file_with_our_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        // Leftovers of an earlier process that had our pid, at the next
        // names this process would pick.
        let next = TMP_COUNTER.load(Ordering::Relaxed);
        for n in next..next + 8 {
            let mut name = p.as_os_str().to_owned();
            name.push(format!("{TMP_MARK}{}-{n}", std::process::id()));
            fs::write(PathBuf::from(name), b"stale").unwrap();
        }
        write_atomic(&p, b"new", Existing::Replace).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", Existing::Replace).unwrap();
        write_atomic(&p, b"two", Existing::Replace).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["f"]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn keep_refuses_an_existing_name_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"theirs").unwrap();
        let e = write_atomic(&p, b"ours", Existing::Keep).unwrap_err();
        assert_eq!(e.source.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"theirs");
        assert_eq!(names(dir.path()), ["f"]);
        let q = dir.path().join("g");
        write_atomic(&q, b"new", Existing::Keep).unwrap();
        assert_eq!(fs::read(&q).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["f", "g"]);
    }

    #[test]
    fn failed_write_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a directory: the rename fails after the temp file
        // was written, and the temp file must not stay behind.
        let p = dir.path().join("d");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("x"), b"x").unwrap();
        let e = write_atomic(&p, b"data", Existing::Replace).unwrap_err();
        assert_eq!(e.op, "move temp file to");
        assert_eq!(names(dir.path()), ["d"]);
    }

    #[test]
    fn temp_names_are_unique_and_recognised() {
        let p = Path::new("/r/chunks/ab");
        let (a, b) = (temp_path(p), temp_path(p));
        assert_ne!(a, b);
        assert!(is_temp_name(&a.to_string_lossy()));
        assert!(!is_temp_name("ab"));
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
    }
}

//! Reading backups and restoring disk images (raw or qcow2).
//!
//! Restore checks before it creates anything: the key (at open), the
//! manifest, the index digest, and that the index folds to the manifest's
//! image digest. While it writes, every chunk is decoded and re-hashed
//! against its index entry; at the end the image digest is recomputed from
//! the verified per-chunk digests and compared with the manifest. The output
//! is written to a temp file opened `O_CREAT|O_EXCL|O_NOFOLLOW` in the target
//! directory and moved into place only after success: a failed restore leaves
//! no output, and `--force` replaces an existing *regular file* only then
//! (F-46). A file any process holds open (a running VM's disk) is never
//! replaced, and a block device target is written in place
//! ([`super::target`]).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use super::backend::{LockGuard, LockMode, LockWait};
use super::blob;
use super::error::{ErrorKind, RepoError, Result};
use super::format::{self, chunk_len, FixedIndex, ZERO_ENTRY};
use super::manifest::{DiskEntry, Manifest};
use super::names::{validate_name, BackupId};
use super::qcow2::Qcow2Writer;
use super::{Repository, MAX_CHUNK_BLOB};
use crate::fsutil::{self, Existing};

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw, sparse.
    Raw,
    /// qcow2 v3.
    Qcow2,
}

impl ImageFormat {
    /// File extension.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Options of a restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Output format.
    pub format: ImageFormat,
    /// Replace an existing regular file.
    pub force: bool,
    /// Decoder threads (at least 1).
    pub threads: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            format: ImageFormat::Raw,
            force: false,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(4),
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Disk name.
    pub disk: String,
    /// Output file.
    pub path: PathBuf,
    /// Virtual size.
    pub virtual_size: u64,
    /// Non-zero bytes decoded and written.
    pub data_bytes: u64,
    /// Zero chunks left as holes.
    pub zero_chunks: u64,
    /// Verified whole-image digest (hex).
    pub image_digest: String,
    /// Wall time.
    #[serde(serialize_with = "ser_duration_ms")]
    pub elapsed: Duration,
}

fn ser_duration_ms<S: serde::Serializer>(
    d: &Duration,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An open, locked backup. Prune skips it while this lives.
pub struct BackupReader {
    repo: Repository,
    id: BackupId,
    manifest: Manifest,
    _snapshot_lock: LockGuard,
    _repo_lock: LockGuard,
}

impl std::fmt::Debug for BackupReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupReader")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One disk of an open backup.
#[derive(Debug)]
pub struct DiskReader<'a> {
    reader: &'a BackupReader,
    entry: DiskEntry,
    index: FixedIndex,
}

impl Repository {
    /// Opens a committed backup for reading (shared locks; needs the key if
    /// encrypted).
    pub fn open_backup(&self, id: &BackupId) -> Result<BackupReader> {
        self.key_for_data()?;
        let repo_lock = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
        let snap = self.lock_snapshot(id, LockMode::Shared, LockWait::NoWait)?;
        let manifest = self.load_manifest(id)?;
        Ok(BackupReader {
            repo: self.clone(),
            id: id.clone(),
            manifest,
            _snapshot_lock: snap,
            _repo_lock: repo_lock,
        })
    }

    /// Restores one disk of a backup into `target_dir/<disk>.<ext>`.
    pub fn restore_disk(
        &self,
        id: &BackupId,
        disk: &str,
        target_dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        self.open_backup(id)?.restore_disk(disk, target_dir, opts)
    }
}

impl BackupReader {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The backup id.
    pub fn id(&self) -> &BackupId {
        &self.id
    }

    /// The repository it was opened from.
    pub(super) fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Opens a disk: loads and checks its index.
    pub fn open_disk(&self, name: &str) -> Result<DiskReader<'_>> {
        validate_name("disk name", name)?;
        let entry = self.manifest.disk(name)?.clone();
        let index = self.repo.load_index(&self.id, &entry)?;
        let reader = DiskReader {
            reader: self,
            entry,
            index,
        };
        let digest = reader.index_image_digest()?;
        if hex::encode(digest) != reader.entry.image_digest {
            return Err(RepoError::corrupt(
                format!("index of disk {name} in {}", self.id),
                "its entries do not fold to the manifest's image digest",
            ));
        }
        Ok(reader)
    }

    /// Restores one disk (see the module docs for the checks made).
    pub fn restore_disk(
        &self,
        disk: &str,
        target_dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        let started = Instant::now();
        let d = self.open_disk(disk)?;
        let name = format!("{disk}.{}", opts.format.extension());
        let out = OutputFile::create(target_dir, &name, opts.force)?;
        match d.write_image(&out.file, &out.tmp, opts, false) {
            Ok((data_bytes, zero_chunks, digest)) => {
                let path = out.commit()?;
                Ok(RestoreReport {
                    disk: disk.to_owned(),
                    path,
                    virtual_size: d.entry.virtual_size,
                    data_bytes,
                    zero_chunks,
                    image_digest: hex::encode(digest),
                    elapsed: started.elapsed(),
                })
            }
            Err(e) => {
                out.discard();
                Err(e)
            }
        }
    }
}

impl BackupReader {
    /// Restores one disk onto block device `device` (raw only; see
    /// [`super::target`]): data written, the rest discarded or zeroed. A
    /// failed restore leaves the device partly written.
    pub fn restore_disk_to_device(
        &self,
        disk: &str,
        device: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        let started = Instant::now();
        if opts.format != ImageFormat::Raw {
            return Err(RepoError::invalid(
                "restore format",
                "a block device is written raw (--format raw)",
            ));
        }
        let d = self.open_disk(disk)?;
        if !opts.force {
            return Err(RepoError::AlreadyExists {
                what: format!(
                    "block device {} (use --force to overwrite it)",
                    device.display()
                ),
            });
        }
        let file = super::target::open_block_device(device, d.entry.virtual_size)?;
        let (data_bytes, zero_chunks, digest) = d.write_image(&file, device, opts, true)?;
        Ok(RestoreReport {
            disk: disk.to_owned(),
            path: device.to_owned(),
            virtual_size: d.entry.virtual_size,
            data_bytes,
            zero_chunks,
            image_digest: hex::encode(digest),
            elapsed: started.elapsed(),
        })
    }
}

impl BackupReader {
    /// Restores several disks onto block devices, one device per disk
    /// (`(disk, device)` pairs; raw, `opts.force` required). Before
    /// anything is written every pair is checked: a disk of the backup,
    /// named once; a block device, no device twice (by device number, so
    /// two paths of one device are caught); each device not in use and
    /// large enough, and opened exclusively ([`super::target`]) — so one
    /// refused device leaves all the others untouched. A failure while
    /// writing leaves the devices written so far restored and the current
    /// one partly written.
    pub fn restore_disks_to_devices(
        &self,
        map: &[(String, PathBuf)],
        opts: &RestoreOptions,
    ) -> Result<Vec<RestoreReport>> {
        if opts.format != ImageFormat::Raw {
            return Err(RepoError::invalid(
                "restore format",
                "a block device is written raw (--format raw)",
            ));
        }
        for (disk, _) in map {
            self.manifest.disk(disk)?;
        }
        super::target::check_device_map(map)?;
        if !opts.force {
            return Err(RepoError::AlreadyExists {
                what: format!(
                    "block device(s) {} (use --force to overwrite them)",
                    map.iter()
                        .map(|(_, d)| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let mut opened = Vec::with_capacity(map.len());
        for (disk, dev) in map {
            let d = self.open_disk(disk)?;
            let file = super::target::open_block_device(dev, d.entry.virtual_size)?;
            opened.push((d, file, dev));
        }
        let mut reports = Vec::with_capacity(map.len());
        for (d, file, dev) in &opened {
            let started = Instant::now();
            let (data_bytes, zero_chunks, digest) = d.write_image(file, dev, opts, true)?;
            reports.push(RestoreReport {
                disk: d.entry.name.clone(),
                path: dev.to_path_buf(),
                virtual_size: d.entry.virtual_size,
                data_bytes,
                zero_chunks,
                image_digest: hex::encode(digest),
                elapsed: started.elapsed(),
            });
        }
        Ok(reports)
    }
}

impl DiskReader<'_> {
    /// Manifest entry of the disk.
    pub fn entry(&self) -> &DiskEntry {
        &self.entry
    }

    /// Index entries ([`ZERO_ENTRY`] = zero chunk).
    pub fn entries(&self) -> &[format::Digest] {
        &self.index.entries
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.index.entries.len() as u64
    }

    /// Length of chunk `i`.
    pub fn chunk_len(&self, i: u64) -> usize {
        chunk_len(self.index.virtual_size, self.index.chunk_size, i)
    }

    fn index_image_digest(&self) -> Result<format::Digest> {
        let repo = &self.reader.repo;
        let cs = self.index.chunk_size;
        let full = repo.zero_digest(cs as usize)?;
        let mut last = None;
        let tail_len = chunk_len(
            self.index.virtual_size,
            cs,
            self.chunk_count().saturating_sub(1),
        );
        if tail_len != cs as usize {
            last = Some(repo.zero_digest(tail_len)?);
        }
        Ok(format::image_digest(
            self.index.virtual_size,
            cs,
            &self.index.entries,
            |len| {
                if len == cs as usize {
                    full
                } else {
                    last.unwrap_or(full)
                }
            },
        ))
    }

    /// Reads and verifies chunk `i` (zeros for a zero entry).
    pub fn read_chunk(&self, i: u64) -> Result<Vec<u8>> {
        read_chunk_of(&self.reader.repo, &self.entry, &self.index, i)
    }

    /// The entry and index, for an owned reader ([`super::shared`]).
    pub(super) fn into_parts(self) -> (DiskEntry, FixedIndex) {
        (self.entry, self.index)
    }

    /// Decodes every chunk on `opts.threads` workers and writes the image.
    /// Returns (data bytes, zero chunks, recomputed image digest).
    fn write_image(
        &self,
        file: &File,
        path: &Path,
        opts: &RestoreOptions,
        device: bool,
    ) -> Result<(u64, u64, format::Digest)> {
        let vsize = self.index.virtual_size;
        let cs = u64::from(self.index.chunk_size);
        let count = self.chunk_count();
        let mut qcow = match opts.format {
            ImageFormat::Raw if device => None,
            ImageFormat::Raw => {
                file.set_len(vsize)
                    .map_err(|e| RepoError::io("size restore output", path, e))?;
                None
            }
            ImageFormat::Qcow2 => Some(Qcow2Writer::new(
                file.try_clone()
                    .map_err(|e| RepoError::io("clone restore output", path, e))?,
                vsize,
            )),
        };
        let next = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let threads = opts.threads.max(1);
        let mut verified: Vec<format::Digest> = vec![ZERO_ENTRY; self.index.entries.len()];
        let mut data_bytes = 0u64;
        let mut zero_chunks = 0u64;
        let result: Result<()> = std::thread::scope(|s| {
            let (tx, rx) = sync_channel::<Result<(u64, Option<Vec<u8>>)>>(threads * 2);
            for _ in 0..threads {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                s.spawn(move || loop {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    if i >= count {
                        return;
                    }
                    let item = if self.index.entries[format::to_usize(i)] == ZERO_ENTRY {
                        Ok((i, None))
                    } else {
                        self.read_chunk(i).map(|d| (i, Some(d)))
                    };
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                });
            }
            drop(tx);
            let mut res = Ok(());
            for item in rx.iter() {
                let step = item.and_then(|(i, data)| {
                    let n = format::to_usize(i);
                    match data {
                        None => {
                            zero_chunks += 1;
                            if device {
                                super::target::zero_range(file, i * cs, self.chunk_len(i) as u64)
                                    .map_err(|e| RepoError::io("zero restore output", path, e))
                            } else {
                                Ok(())
                            }
                        }
                        Some(data) => {
                            verified[n] = self.index.entries[n];
                            data_bytes += data.len() as u64;
                            let off = i * cs;
                            match qcow.as_mut() {
                                Some(q) => q.write_at(off, &data),
                                None => write_sparse(file, off, &data, device),
                            }
                            .map_err(|e| RepoError::io("write restore output", path, e))
                        }
                    }
                });
                if let Err(e) = step {
                    stop.store(true, Ordering::Release);
                    res = Err(e);
                    break;
                }
            }
            // Dropping rx (end of scope) unblocks any worker still sending.
            drop(rx);
            res
        });
        result?;
        match qcow {
            Some(q) => {
                q.finish()
                    .map_err(|e| RepoError::io("finish qcow2 output", path, e))?;
            }
            None => file
                .sync_all()
                .map_err(|e| RepoError::io("sync restore output", path, e))?,
        }
        // Recompute from what was verified (zero entries stayed zero).
        let repo = &self.reader.repo;
        let csz = self.index.chunk_size;
        let full = repo.zero_digest(csz as usize)?;
        let tail = repo.zero_digest(chunk_len(vsize, csz, count.saturating_sub(1)))?;
        let digest = format::image_digest(vsize, csz, &verified, |len| {
            if len == csz as usize {
                full
            } else {
                tail
            }
        });
        if hex::encode(digest) != self.entry.image_digest {
            return Err(RepoError::ImageDigestMismatch {
                expected: self.entry.image_digest.clone(),
                actual: hex::encode(digest),
            });
        }
        Ok((data_bytes, zero_chunks, digest))
    }
}

/// Reads and verifies chunk `i` of a disk (zeros for a zero entry).
pub(super) fn read_chunk_of(
    repo: &Repository,
    entry: &DiskEntry,
    index: &FixedIndex,
    i: u64,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    read_chunk_into(repo, entry, index, i, &mut out)?;
    Ok(out)
}

/// [`read_chunk_of`] into `out` (cleared first; its allocation is reused).
pub(super) fn read_chunk_into(
    repo: &Repository,
    entry: &DiskEntry,
    index: &FixedIndex,
    i: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let Some(digest) = usize::try_from(i).ok().and_then(|n| index.entries.get(n)) else {
        return Err(RepoError::invalid(
            "chunk index",
            format!("{i} out of range"),
        ));
    };
    let len = chunk_len(index.virtual_size, index.chunk_size, i);
    if *digest == ZERO_ENTRY {
        out.clear();
        out.resize(len, 0);
        return Ok(());
    }
    let key = repo.key_for_data()?;
    let bytes = repo
        .inner
        .backend
        .get(&Repository::chunk_key(digest), MAX_CHUNK_BLOB)
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => RepoError::ChunkMissing {
                digest: hex::encode(digest),
            },
            _ => e,
        })?;
    blob::decode_chunk_into(&bytes, digest, key, len, out).map_err(|e| match e {
        RepoError::Corrupt { what, reason } => RepoError::Corrupt {
            what: format!(
                "{what} (disk {} offset {})",
                entry.name,
                i * u64::from(index.chunk_size)
            ),
            reason,
        },
        e => e,
    })
}

/// Writes the non-zero 4 KiB runs of `data` at `offset`; zero runs stay
/// holes (a file) or are discarded/zeroed (`device`).
fn write_sparse(file: &File, offset: u64, data: &[u8], device: bool) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let mut run_start: Option<usize> = None;
    let mut zero_from = 0;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + BLOCK).min(data.len());
        let zero = format::is_zero(&data[pos..end]);
        match (zero, run_start) {
            (false, None) => {
                if device {
                    super::target::zero_range(
                        file,
                        offset + zero_from as u64,
                        (pos - zero_from) as u64,
                    )?;
                }
                run_start = Some(pos);
            }
            (true, Some(s)) => {
                file.write_all_at(&data[s..pos], offset + s as u64)?;
                run_start = None;
                zero_from = pos;
            }
            _ => {}
        }
        pos = end;
    }
    match run_start {
        Some(s) => file.write_all_at(&data[s..], offset + s as u64)?,
        None if device => super::target::zero_range(
            file,
            offset + zero_from as u64,
            (data.len() - zero_from) as u64,
        )?,
        None => {}
    }
    Ok(())
}

/// A restore output: a private temp file in the target directory, moved to
/// its final name only on success.
struct OutputFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    force: bool,
}

impl OutputFile {
    fn create(dir: &Path, name: &str, force: bool) -> Result<Self> {
        let meta = fs::metadata(dir).map_err(|e| RepoError::io("open restore target", dir, e))?;
        if !meta.is_dir() {
            return Err(RepoError::invalid(
                "restore target",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let path = dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if !force => {
                let _ = m;
                return Err(RepoError::AlreadyExists {
                    what: format!("{} (use --force to replace it)", path.display()),
                });
            }
            Ok(m) if !m.file_type().is_file() => {
                return Err(RepoError::invalid(
                    "restore target",
                    format!(
                        "{} exists and is not a regular file (symlink, directory or device): refusing even with --force",
                        path.display()
                    ),
                ));
            }
            Ok(m) => super::target::refuse_if_held(&path, &m)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(RepoError::io("stat restore target", &path, e)),
        }
        let tmp = dir.join(format!(
            ".{name}.partial-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = fsutil::create_private(&tmp)
            .map_err(|e| RepoError::io("create restore output", &tmp, e))?;
        Ok(OutputFile {
            file,
            tmp,
            path,
            force,
        })
    }

    /// Moves the output (already written and fsynced) to its name:
    /// replacing what is there only with `--force`.
    fn commit(self) -> Result<PathBuf> {
        // Checked again: a VM may have been started on it meanwhile.
        if let Ok(m) = fs::metadata(&self.path) {
            if let Err(e) = super::target::refuse_if_held(&self.path, &m) {
                self.discard();
                return Err(e);
            }
        }
        let existing = if self.force {
            Existing::Replace
        } else {
            Existing::Keep
        };
        match fsutil::publish(&self.tmp, &self.path, existing) {
            Ok(()) => Ok(self.path),
            Err(e) if e.path == self.path => Err(match e.source.kind() {
                io::ErrorKind::AlreadyExists => RepoError::AlreadyExists {
                    what: format!("{} (use --force to replace it)", self.path.display()),
                },
                _ => RepoError::io("move restore output to", &self.path, e.source),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn discard(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

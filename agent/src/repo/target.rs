//! Where a restore may write, and how it writes zeros there.
//!
//! A restore never writes to something another process has open: a disk
//! image a running QEMU holds (replacing it would leave QEMU writing to a
//! deleted file, and everything written since would be lost when the VM
//! stops), nor a block device that is mounted, claimed by the kernel (a
//! device-mapper or md holder) or open in any process. Who holds a file is
//! found as `fuser` does: every `/proc/<pid>/fd/*` is stat'ed and compared
//! with the target's device and inode (or, for a block device, its device
//! number). This sees every process only when shear runs as root (as on a
//! Proxmox node); a process it cannot inspect is not seen.
//!
//! A block device target (an LVM-thin volume, a ZFS zvol, any `/dev/…`
//! device at least the disk's virtual size) is written in place: data where
//! the backup has data, and `fallocate(PUNCH_HOLE)` (a discard that reads
//! back as zeros) elsewhere, so a thin volume stays thin; where the device
//! cannot discard, zeros are written (`fallocate(ZERO_RANGE)`, then plain
//! writes).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::FallocateFlags;

use super::error::{RepoError, Result};

/// A process holding a file open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.comm, self.pid)
    }
}

/// Every other process with `target` open (compared by device and inode;
/// for a block device, by device number).
pub fn holders(target: &fs::Metadata) -> Vec<Holder> {
    let me = std::process::id();
    let is_blk = target.file_type().is_block_device();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let held = fds.flatten().any(|fd| {
            fs::metadata(fd.path()).is_ok_and(|m| {
                if is_blk {
                    m.file_type().is_block_device() && m.rdev() == target.rdev()
                } else {
                    m.dev() == target.dev() && m.ino() == target.ino()
                }
            })
        });
        if held {
            let comm = fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            out.push(Holder { pid, comm });
        }
    }
    out
}

/// Refuses `path` if any other process has it open.
pub fn refuse_if_held(path: &Path, meta: &fs::Metadata) -> Result<()> {
    let h = holders(meta);
    if h.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = h.iter().map(ToString::to_string).collect();
    Err(RepoError::invalid(
        "restore target",
        format!(
            "{} is open in {}: refusing to replace a disk a running process (a VM?) uses, even with --force; stop it first",
            path.display(),
            list.join(", ")
        ),
    ))
}

/// Checks a disk → block device mapping before anything is opened or
/// written: each disk named once, each path a block device, no device
/// twice (by device number: two paths of one device are caught).
pub fn check_device_map(map: &[(String, std::path::PathBuf)]) -> Result<()> {
    if map.is_empty() {
        return Err(RepoError::invalid(
            "restore target",
            "no disk mapped to a device",
        ));
    }
    let mut devices: Vec<(u64, &Path)> = Vec::new();
    for (i, (disk, dev)) in map.iter().enumerate() {
        if map[..i].iter().any(|(d, _)| d == disk) {
            return Err(RepoError::invalid(
                "restore target",
                format!("disk {disk} is mapped to more than one device"),
            ));
        }
        let meta = fs::metadata(dev).map_err(|e| RepoError::io("stat restore target", dev, e))?;
        if !meta.file_type().is_block_device() {
            return Err(RepoError::invalid(
                "restore target",
                format!("{} (for disk {disk}) is not a block device", dev.display()),
            ));
        }
        if let Some((_, first)) = devices.iter().find(|(r, _)| *r == meta.rdev()) {
            return Err(RepoError::invalid(
                "restore target",
                format!(
                    "{} and {} are the same device: one device per disk",
                    first.display(),
                    dev.display()
                ),
            ));
        }
        devices.push((meta.rdev(), dev));
    }
    Ok(())
}

/// Opens block device `path` for a restore of `virtual_size` bytes:
/// exclusively (`O_EXCL` fails on a mounted or kernel-claimed device),
/// after checking that no process has it open and that it is large enough.
pub fn open_block_device(path: &Path, virtual_size: u64) -> Result<File> {
    let meta = fs::metadata(path).map_err(|e| RepoError::io("stat restore target", path, e))?;
    if !meta.file_type().is_block_device() {
        return Err(RepoError::invalid(
            "restore target",
            format!("{} is not a block device", path.display()),
        ));
    }
    refuse_if_held(path, &meta)?;
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => RepoError::invalid(
                "restore target",
                format!(
                    "{} is in use (mounted, or held by device-mapper/md): refusing",
                    path.display()
                ),
            ),
            _ => RepoError::io("open restore target", path, e),
        })?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| RepoError::io("size restore target", path, e))?;
    if size < virtual_size {
        return Err(RepoError::invalid(
            "restore target",
            format!(
                "{} has {size} bytes, the disk needs {virtual_size}",
                path.display()
            ),
        ));
    }
    Ok(file)
}

/// Makes `len` bytes at `offset` of a block device read back as zeros:
/// discard if the device can (thin volumes stay thin), else zero them.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let keep = FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(file, FallocateFlags::PUNCH_HOLE | keep, offset, len).is_ok()
        || rustix::fs::fallocate(file, FallocateFlags::ZERO_RANGE | keep, offset, len).is_ok()
    {
        return Ok(());
    }
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; usize::try_from(STEP.min(len)).unwrap_or(1 << 20)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        file.write_all_at(
            &zeros[..usize::try_from(n).unwrap_or(zeros.len())],
            offset + done,
        )?;
        done += n;
    }
    Ok(())
}

//! Where fleecing images may go, checked before the guest is touched.
//!
//! A fleecing image receives the old data of every block the guest
//! overwrites before shear has read it: on a busy guest during a long
//! backup it can grow up to the size of the disks. On a RAM-backed
//! filesystem (tmpfs, ramfs — `/run`, `/dev/shm`, often `/tmp`) that growth
//! takes the host's memory, so such a target is refused unless the admin
//! allows it explicitly (`fleecing_allow_tmpfs`, `--fleecing-allow-tmpfs`).
//! And a target with too little free space is refused before the guest is
//! frozen, saying how much is needed and how much is free
//! (`fleecing_min_free`, `--fleecing-min-free`).

use std::path::{Path, PathBuf};

use crate::repo::qcow2;

/// Default fleecing directory: on the host's disk, next to the other
/// persistent state of a PVE host (`/var/lib/vz`, `/var/lib/pve-manager`),
/// never in RAM.
pub const DEFAULT_FLEECING_DIR: &str = "/var/lib/shear/fleece";

/// A disk's fleece image, as the data path samples it.
#[derive(Debug, Clone)]
pub struct FleeceImage {
    /// The image file.
    pub path: PathBuf,
    /// shear's own image as it was empty; `None` for a file shear did not
    /// make (libvirt's scratch file), counted whole.
    empty: Option<EmptyFleece>,
}

/// A fresh fleece image of shear's own, before QEMU opened it.
#[derive(Debug, Clone, Copy)]
struct EmptyFleece {
    /// Bytes allocated on the host (header, L1 and refcount tables).
    allocated: u64,
    /// Its L2 tables and refcount blocks (see `qcow2::metadata_clusters`).
    metadata_clusters: u64,
}

impl FleeceImage {
    /// shear's fleece image at `path`, right after it was made empty.
    pub fn created(path: PathBuf) -> FleeceImage {
        let empty = std::fs::File::open(&path).ok().and_then(|f| {
            Some(EmptyFleece {
                allocated: allocated_bytes(&f)?,
                metadata_clusters: qcow2::metadata_clusters(&f).ok()?,
            })
        });
        FleeceImage { path, empty }
    }

    /// A fleece image made by someone else: its whole allocation counts.
    pub fn foreign(path: PathBuf) -> FleeceImage {
        FleeceImage { path, empty: None }
    }

    /// The guest data the image holds now: what it allocated beyond the
    /// empty image, less the L2 tables and refcount blocks QEMU added to
    /// map that data (64 KiB each). The metadata is counted before the
    /// allocation, so a table added in between is counted as data: the
    /// figure errs high, never low. `None` if the file cannot be read.
    pub fn held_bytes(&self) -> Option<u64> {
        let f = std::fs::File::open(&self.path).ok()?;
        let Some(empty) = self.empty else {
            return allocated_bytes(&f);
        };
        let added = qcow2::metadata_clusters(&f)
            .map(|n| n.saturating_sub(empty.metadata_clusters) * qcow2::CLUSTER_SIZE)
            .unwrap_or(0);
        let allocated = allocated_bytes(&f)?;
        Some(
            allocated
                .saturating_sub(empty.allocated)
                .saturating_sub(added),
        )
    }
}

/// Bytes `file` has allocated on its filesystem (`st_blocks`).
fn allocated_bytes(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| m.blocks() * 512)
}

/// `statfs` magic of tmpfs (also `/dev/shm`).
const TMPFS_MAGIC: i128 = 0x0102_1994;
/// `statfs` magic of ramfs.
const RAMFS_MAGIC: i128 = 0x8584_58f6;

/// How much free space the fleecing directory must have before a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    /// A fixed number of bytes.
    Bytes(u64),
    /// A percentage of the disks' allocated size (host allocation; the
    /// virtual size where QEMU does not know the allocation).
    Percent(u32),
}

impl Default for MinFree {
    /// 10 % of the disks' allocated size.
    fn default() -> Self {
        MinFree::Percent(10)
    }
}

impl MinFree {
    /// Parse `10%`, `4G`, `512M`, `1048576` (binary units K, M, G, T).
    pub fn parse(s: &str) -> Result<MinFree, String> {
        let s = s.trim();
        let bad = || format!("bad fleecing minimum free space {s:?} (e.g. 10%, 4G, 0)");
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| bad())?;
            if p > 1000 {
                return Err(bad());
            }
            return Ok(MinFree::Percent(p));
        }
        let (num, shift) = match s.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'B' => 0,
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&s[..i], shift)
            }
            _ => (s, 0),
        };
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift)
            .map(MinFree::Bytes)
            .ok_or_else(bad)
    }

    /// Bytes needed for disks of `allocated` bytes in all.
    pub fn needed(self, allocated: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => {
                let n = u128::from(allocated) * u128::from(p) / 100;
                u64::try_from(n).unwrap_or(u64::MAX)
            }
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{b} bytes"),
            MinFree::Percent(p) => write!(f, "{p}% of the disks' allocated size"),
        }
    }
}

/// The fleecing policy of a backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleecePolicy {
    /// Accept a RAM-backed directory (tmpfs, ramfs).
    pub allow_tmpfs: bool,
    /// Free space required before the backup starts.
    pub min_free: MinFree,
}

/// Why the fleecing directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleeceError {
    /// The directory is on a RAM-backed filesystem.
    #[error(
        "fleecing directory {path} is on {fs} (host RAM): a busy guest could fill the \
         host's memory during the backup; use a directory on disk (--fleecing-dir, \
         config fleecing_dir) or allow it (--fleecing-allow-tmpfs, config \
         fleecing_allow_tmpfs = true)"
    )]
    RamBacked {
        /// The directory.
        path: PathBuf,
        /// `tmpfs` or `ramfs`.
        fs: &'static str,
    },
    /// Not enough free space.
    #[error(
        "not enough free space for fleecing in {path}: {needed} bytes needed ({policy}, \
         disks allocate {allocated} bytes), {free} bytes free (--fleecing-min-free, \
         config fleecing_min_free)"
    )]
    NoSpace {
        /// The directory.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free (for an unprivileged writer).
        free: u64,
        /// The disks' allocated size.
        allocated: u64,
        /// The bound, as configured.
        policy: MinFree,
    },
    /// `statfs` failed.
    #[error("cannot inspect fleecing directory {path}")]
    Stat {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the check found (for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleeceSpace {
    /// Bytes free in the directory's filesystem.
    pub free: u64,
    /// Bytes the policy required.
    pub needed: u64,
    /// Whether the filesystem is RAM-backed (allowed by the policy).
    pub ram_backed: bool,
}

/// The RAM-backed filesystem `dir` is on, if any (`tmpfs`, `ramfs`).
pub fn ram_backed_fs(dir: &Path) -> Result<Option<&'static str>, FleeceError> {
    let st = rustix::fs::statfs(dir).map_err(|e| FleeceError::Stat {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    #[allow(clippy::useless_conversion)] // FsWord's width depends on the target
    let magic = i128::from(st.f_type) & 0xffff_ffff;
    Ok(match magic {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    })
}

/// Bytes an unprivileged writer may still use in `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> Result<u64, FleeceError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| FleeceError::Stat {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Check `dir` (which must exist) against `policy` for disks that allocate
/// `allocated` bytes in all.
pub fn check(dir: &Path, allocated: u64, policy: FleecePolicy) -> Result<FleeceSpace, FleeceError> {
    let ram = ram_backed_fs(dir)?;
    if let (Some(fs), false) = (ram, policy.allow_tmpfs) {
        return Err(FleeceError::RamBacked {
            path: dir.to_path_buf(),
            fs,
        });
    }
    let free = free_bytes(dir)?;
    let needed = policy.min_free.needed(allocated);
    if free < needed {
        return Err(FleeceError::NoSpace {
            path: dir.to_path_buf(),
            needed,
            free,
            allocated,
            policy: policy.min_free,
        });
    }
    Ok(FleeceSpace {
        free,
        needed,
        ram_backed: ram.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk_dir() -> Option<tempfile::TempDir> {
        for base in [std::env::temp_dir(), PathBuf::from("/var/tmp")] {
            if let Ok(d) = tempfile::tempdir_in(&base) {
                if ram_backed_fs(d.path()).unwrap().is_none() {
                    return Some(d);
                }
            }
        }
        None
    }

    #[test]
    fn dev_shm_is_tmpfs_and_refused_unless_allowed() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        assert_eq!(ram_backed_fs(shm).unwrap(), Some("tmpfs"));
        let err = check(shm, 0, FleecePolicy::default()).unwrap_err();
        assert!(
            matches!(&err, FleeceError::RamBacked { fs: "tmpfs", .. }),
            "{err}"
        );
        let ok = check(
            shm,
            0,
            FleecePolicy {
                allow_tmpfs: true,
                min_free: MinFree::Bytes(0),
            },
        )
        .unwrap();
        assert!(ok.ram_backed);
    }

    #[test]
    fn disk_dir_is_accepted_and_too_little_space_refused() {
        let Some(d) = on_disk_dir() else { return };
        let ok = check(d.path(), 1 << 30, FleecePolicy::default()).unwrap();
        assert!(!ok.ram_backed);
        assert_eq!(ok.needed, (1 << 30) / 10);
        let free = free_bytes(d.path()).unwrap();
        let err = check(
            d.path(),
            0,
            FleecePolicy {
                allow_tmpfs: false,
                min_free: MinFree::Bytes(free.saturating_mul(4).max(1 << 50)),
            },
        )
        .unwrap_err();
        match err {
            FleeceError::NoSpace {
                needed, free: f, ..
            } => {
                assert!(needed > f);
                assert!(f > 0);
            }
            e => panic!("wrong error: {e}"),
        }
        // The percentage applies to the allocation.
        let err = check(d.path(), u64::MAX / 2, FleecePolicy::default()).unwrap_err();
        assert!(matches!(err, FleeceError::NoSpace { .. }), "{err}");
    }

    #[test]
    fn missing_dir_is_a_typed_error() {
        let err = check(
            Path::new("/nonexistent/shear-fleece"),
            0,
            FleecePolicy::default(),
        )
        .unwrap_err();
        assert!(matches!(err, FleeceError::Stat { .. }), "{err}");
    }

    #[test]
    fn min_free_parses() {
        assert_eq!(MinFree::parse("10%").unwrap(), MinFree::Percent(10));
        assert_eq!(MinFree::parse("0").unwrap(), MinFree::Bytes(0));
        assert_eq!(MinFree::parse("4G").unwrap(), MinFree::Bytes(4 << 30));
        assert_eq!(MinFree::parse("512m").unwrap(), MinFree::Bytes(512 << 20));
        assert_eq!(MinFree::parse("1048576").unwrap(), MinFree::Bytes(1 << 20));
        for bad in [
            "",
            "x",
            "10%%",
            "-1",
            "4Q",
            "99999999999999999999T",
            "2000%",
        ] {
            MinFree::parse(bad).unwrap_err();
        }
        assert_eq!(MinFree::Percent(10).needed(1000), 100);
        assert_eq!(MinFree::Percent(200).needed(u64::MAX), u64::MAX);
    }
}

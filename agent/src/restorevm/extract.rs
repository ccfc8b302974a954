//! Paths from a guest are hostile: names with newlines, `..`, absolute or
//! escaping symlinks. This module turns them into checked component lists
//! and creates files under the extraction directory openat-style: every
//! directory is opened with `O_NOFOLLOW | O_DIRECTORY` relative to its
//! parent's descriptor and every file created with `O_CREAT | O_EXCL |
//! O_NOFOLLOW`, so nothing (not even a symlink planted earlier in the same
//! extraction) can lead a write outside `--to DIR`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// A `..` component.
    #[error("{0:?}: a \"..\" component is not allowed")]
    DotDot(String),
    /// A NUL byte.
    #[error("{0:?}: contains a NUL byte")]
    Nul(String),
    /// A component longer than a file name may be.
    #[error("{0:?}: a component is longer than 255 bytes")]
    TooLong(String),
    /// Nothing left (the root itself, where a name is needed).
    #[error("{0:?}: names no file")]
    Empty(String),
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Splits a path (from the user or the guest) into plain components:
/// empty and `.` components are dropped, a leading `/` is ignored (paths
/// are relative to the backed-up filesystem's root), `..` and NUL are
/// refused.
pub fn components(path: &[u8]) -> Result<Vec<OsString>, PathError> {
    if path.contains(&0) {
        return Err(PathError::Nul(show(path)));
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot(show(path))),
            c if c.len() > 255 => return Err(PathError::TooLong(show(path))),
            c => out.push(OsStr::from_bytes(c).to_owned()),
        }
    }
    Ok(out)
}

/// `components` joined with `/` (no leading slash; empty for the root).
pub fn join(comps: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c.as_bytes());
    }
    out
}

/// Whether a symlink at `link` (components below the extraction root)
/// with target `target` stays inside the root when followed lexically:
/// relative, and its `..`s never climb above the root.
pub fn symlink_stays_inside(link: &[OsString], target: &[u8]) -> bool {
    if target.is_empty() || target.starts_with(b"/") || target.contains(&0) {
        return false;
    }
    // Depth of the directory holding the link.
    let mut depth = i64::try_from(link.len().saturating_sub(1)).unwrap_or(i64::MAX);
    if link.is_empty() {
        return false;
    }
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// The extraction directory, held open.
#[derive(Debug)]
pub struct ExtractRoot {
    fd: OwnedFd,
}

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC);

impl ExtractRoot {
    /// Opens (creating it, mode 0700, if missing) the directory `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ExtractRoot> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let fd = rustix::fs::open(dir, DIR_FLAGS, Mode::empty())?;
        Ok(ExtractRoot { fd })
    }

    /// Opens (creating) each directory of `comps` below the root, never
    /// following a symlink.
    pub fn dir(&self, comps: &[OsString]) -> std::io::Result<OwnedFd> {
        let mut cur = rustix::fs::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())?;
        for c in comps {
            match rustix::fs::mkdirat(&cur, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            cur = rustix::fs::openat(&cur, c.as_os_str(), DIR_FLAGS, Mode::empty())?;
        }
        Ok(cur)
    }

    /// Creates a new file at `comps` (its parents as directories); fails
    /// if anything exists at the name.
    pub fn create_file(&self, comps: &[OsString]) -> std::io::Result<File> {
        let (name, parents) = comps
            .split_last()
            .ok_or_else(|| std::io::Error::other("no file name"))?;
        let parent = self.dir(parents)?;
        let fd = rustix::fs::openat(
            &parent,
            name.as_os_str(),
            OFlags::CREATE
                .union(OFlags::EXCL)
                .union(OFlags::NOFOLLOW)
                .union(OFlags::WRONLY)
                .union(OFlags::CLOEXEC),
            Mode::from_raw_mode(0o644),
        )?;
        Ok(File::from(fd))
    }

    /// Creates a symlink at `comps` if its target stays inside the root;
    /// `Ok(false)` (nothing created) otherwise.
    pub fn symlink(&self, comps: &[OsString], target: &[u8]) -> std::io::Result<bool> {
        if !symlink_stays_inside(comps, target) {
            return Ok(false);
        }
        let (name, parents) = comps
            .split_last()
            .ok_or_else(|| std::io::Error::other("no file name"))?;
        let parent = self.dir(parents)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), &parent, name.as_os_str())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Vec<OsString> {
        components(p.as_bytes()).unwrap()
    }

    #[test]
    fn components_refuse_dotdot_and_nul_and_drop_dots() {
        assert_eq!(
            c("/etc//./passwd"),
            vec![OsString::from("etc"), "passwd".into()]
        );
        assert_eq!(c("/"), Vec::<OsString>::new());
        assert_eq!(c("a\nb/c"), vec![OsString::from("a\nb"), "c".into()]);
        assert!(matches!(components(b"a/../b"), Err(PathError::DotDot(_))));
        assert!(matches!(components(b".."), Err(PathError::DotDot(_))));
        assert!(matches!(components(b"a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(
            components(&[b'x'; 256]),
            Err(PathError::TooLong(_))
        ));
        // "..." and "..x" are ordinary names.
        assert_eq!(c("...").len(), 1);
        assert_eq!(c("..x").len(), 1);
        assert_eq!(join(&c("/a/b\n/c")), b"a/b\n/c");
    }

    #[test]
    fn symlinks_must_stay_inside() {
        assert!(symlink_stays_inside(&c("a/link"), b"b"));
        assert!(symlink_stays_inside(&c("a/link"), b"../x"));
        assert!(!symlink_stays_inside(&c("a/link"), b"../../x"));
        assert!(!symlink_stays_inside(&c("link"), b"../x"));
        assert!(!symlink_stays_inside(&c("link"), b"/etc/passwd"));
        assert!(!symlink_stays_inside(&c("a/link"), b"b/../../../x"));
        assert!(!symlink_stays_inside(&c("link"), b""));
    }

    #[test]
    fn writes_never_follow_symlinks_out_of_the_root() {
        let base = std::env::temp_dir().join(format!(
            "shear-extract-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let outside = base.join("outside");
        let root_dir = base.join("root");
        std::fs::create_dir_all(&outside).unwrap();
        let root = ExtractRoot::open(&root_dir).unwrap();
        // A hostile symlink planted in the root (as by an earlier entry):
        // neither a directory walk nor a file create follows it.
        std::os::unix::fs::symlink(&outside, root_dir.join("evil")).unwrap();
        root.create_file(&c("evil/x")).unwrap_err();
        root.create_file(&c("evil")).unwrap_err();
        std::os::unix::fs::symlink(outside.join("f"), root_dir.join("evilfile")).unwrap();
        root.create_file(&c("evilfile")).unwrap_err();
        assert!(!outside.join("x").exists() && !outside.join("f").exists());
        // Escaping symlinks are not created; inside ones are.
        assert!(!root.symlink(&c("abs"), b"/etc/passwd").unwrap());
        assert!(!root.symlink(&c("up"), b"../outside").unwrap());
        assert!(root.symlink(&c("d/ok"), b"../evil2").unwrap());
        // Names with newlines are plain names inside the root.
        use std::io::Write;
        root.create_file(&c("d/new\nline"))
            .unwrap()
            .write_all(b"hi")
            .unwrap();
        assert_eq!(std::fs::read(root_dir.join("d/new\nline")).unwrap(), b"hi");
        // Existing files are not replaced.
        root.create_file(&c("d/new\nline")).unwrap_err();
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! A writable overlay over a read-only source: `DIR/<disk>.overlay` (a
//! sparse raw file of the disk's size) and `DIR/<disk>.overlay.map` (which
//! 64 KiB blocks the overlay holds; format in docs/formats.md).
//!
//! A write to a block not yet in the overlay first copies the block from
//! the backup (copy on write), so a block is either wholly the backup's or
//! wholly the overlay's. Zeroing a whole block punches it out of the overlay
//! file and marks it held (it reads as zeroes). Flush fsyncs the overlay
//! file, then replaces the map atomically: after a crash, writes up to the
//! last flush are there (NBD's promise). The overlay file is locked
//! (flock) while served; an overlay made for another backup or disk is
//! refused. The backup is only ever read.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use nbd_export::server::{BlockSource, SourceExtent};

use super::BackupSource;
use crate::fsutil::{self, Existing};

/// Overlay block size.
pub const BLOCK: u64 = 64 << 10;
/// First bytes of a map file.
pub const MAP_MAGIC: &[u8; 8] = b"SHEAROV1";

/// A writable view: the backup below, the overlay file on top.
pub struct Overlay {
    base: BackupSource,
    file: File,
    path: PathBuf,
    map_path: PathBuf,
    ident: String,
    bits: RwLock<Vec<u64>>,
    write_lock: Mutex<()>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Overlay {
    /// Opens or creates the overlay of `disk` in `dir` over `base`.
    /// `ident` names the backup and disk; an existing overlay must match.
    pub fn open(dir: &Path, disk: &str, ident: &str, base: BackupSource) -> io::Result<Arc<Self>> {
        let size = base.size();
        let path = dir.join(format!("{disk}.overlay"));
        let map_path = dir.join(format!("{disk}.overlay.map"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        file.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("overlay {} is in use by another process", path.display()),
            )
        })?;
        let nblocks = size.div_ceil(BLOCK);
        let words = usize::try_from(nblocks.div_ceil(64))
            .map_err(|_| bad("disk too large for an overlay".into()))?;
        let mut bits = vec![0u64; words];
        match std::fs::read(&map_path) {
            Ok(b) => {
                let head = MAP_MAGIC.len() + 16 + 4;
                let ok = b.len() >= head
                    && &b[..8] == MAP_MAGIC
                    && b[8..16] == size.to_le_bytes()
                    && b[16..24] == BLOCK.to_le_bytes();
                let id_len = if ok {
                    u32::from_le_bytes([b[24], b[25], b[26], b[27]]) as usize
                } else {
                    0
                };
                let rest = b.get(head..).unwrap_or(&[]);
                if !ok
                    || rest.len() != id_len + words * 8
                    || &rest[..id_len.min(rest.len())] != ident.as_bytes()
                {
                    return Err(bad(format!(
                        "overlay map {} does not belong to {ident} ({size} bytes): use another --overlay directory",
                        map_path.display()
                    )));
                }
                for (w, c) in bits.iter_mut().zip(rest[id_len..].chunks_exact(8)) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    *w = u64::from_le_bytes(a);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        file.set_len(size)?;
        let o = Overlay {
            base,
            file,
            path,
            map_path,
            ident: ident.to_owned(),
            bits: RwLock::new(bits),
            write_lock: Mutex::new(()),
        };
        o.save_map()?;
        Ok(Arc::new(o))
    }

    /// The overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn held(bits: &[u64], block: u64) -> bool {
        usize::try_from(block / 64)
            .ok()
            .and_then(|w| bits.get(w))
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    fn mark(&self, block: u64) {
        let mut b = self.bits.write().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = usize::try_from(block / 64).ok().and_then(|w| b.get_mut(w)) {
            *w |= 1 << (block % 64);
        }
    }

    fn save_map(&self) -> io::Result<()> {
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut v = MAP_MAGIC.to_vec();
        v.extend_from_slice(&self.base.size().to_le_bytes());
        v.extend_from_slice(&BLOCK.to_le_bytes());
        v.extend_from_slice(
            &u32::try_from(self.ident.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        v.extend_from_slice(self.ident.as_bytes());
        for w in bits {
            v.extend_from_slice(&w.to_le_bytes());
        }
        fsutil::write_atomic(&self.map_path, &v, Existing::Replace)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn block_len(&self, block: u64) -> u64 {
        BLOCK.min(self.base.size() - block * BLOCK)
    }

    /// Applies `data` (None: zeroes) at `offset`, block by block.
    fn apply(&self, offset: u64, len: u64, data: Option<&[u8]>, punch: bool) -> io::Result<()> {
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK;
            let bstart = block * BLOCK;
            let blen = self.block_len(block);
            let n = (bstart + blen).min(end) - pos;
            let whole = pos == bstart && n == blen;
            let held = Self::held(&self.bits.read().unwrap_or_else(|p| p.into_inner()), block);
            let rel = usize::try_from(pos - offset).map_err(io::Error::other)?;
            let nn = usize::try_from(n).map_err(io::Error::other)?;
            match data {
                None if whole && punch => {
                    crate::repo::target::zero_range(&self.file, bstart, blen)?;
                }
                Some(d) if whole || held => {
                    self.file.write_all_at(&d[rel..rel + nn], pos)?;
                }
                None if held || whole => {
                    self.file.write_all_at(&vec![0u8; nn], pos)?;
                }
                _ => {
                    // Copy on write: the backup's block, patched.
                    let mut buf = vec![0u8; usize::try_from(blen).map_err(io::Error::other)?];
                    self.base.read_at(bstart, &mut buf)?;
                    let at = usize::try_from(pos - bstart).map_err(io::Error::other)?;
                    match data {
                        Some(d) => buf[at..at + nn].copy_from_slice(&d[rel..rel + nn]),
                        None => buf[at..at + nn].fill(0),
                    }
                    self.file.write_all_at(&buf, bstart)?;
                }
            }
            self.mark(block);
            pos += n;
        }
        Ok(())
    }
}

impl BlockSource for Overlay {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK;
            let held = Self::held(&self.bits.read().unwrap_or_else(|p| p.into_inner()), block);
            // A run of blocks with the same owner.
            let mut next = (block + 1) * BLOCK;
            while next < end
                && Self::held(
                    &self.bits.read().unwrap_or_else(|p| p.into_inner()),
                    next / BLOCK,
                ) == held
            {
                next += BLOCK;
            }
            let next = next.min(end);
            let a = usize::try_from(pos - offset).map_err(io::Error::other)?;
            let b = usize::try_from(next - offset).map_err(io::Error::other)?;
            if held {
                self.file.read_exact_at(&mut buf[a..b], pos)?;
            } else {
                self.base.read_at(pos, &mut buf[a..b])?;
            }
            pos = next;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<SourceExtent>> {
        let base = self.base.extents(offset, len)?;
        let bits = self.bits.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SourceExtent> = Vec::new();
        let mut push = |length: u64, hole: bool| match out.last_mut() {
            Some(l) if l.hole == hole => l.length += length,
            _ => out.push(SourceExtent { length, hole }),
        };
        let mut pos = offset;
        for e in base {
            let end = pos + e.length;
            while pos < end {
                let next = ((pos / BLOCK + 1) * BLOCK).min(end);
                let hole = e.hole && !Self::held(&bits, pos / BLOCK);
                push(next - pos, hole);
                pos = next;
            }
        }
        Ok(out)
    }

    fn preferred_block_size(&self) -> u32 {
        64 << 10
    }

    fn writable(&self) -> bool {
        true
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.apply(offset, data.len() as u64, Some(data), false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, trim: bool) -> io::Result<()> {
        self.apply(offset, len, None, trim || len >= BLOCK)
    }

    fn flush(&self) -> io::Result<()> {
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.file.sync_all()?;
        self.save_map()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = self.file.sync_all().and_then(|()| self.save_map()) {
            tracing::warn!(path = %self.path.display(), error = %e, "overlay not saved at exit");
        }
    }
}

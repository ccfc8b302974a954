//! An owned, shareable reader of one disk of a backup: random reads at any
//! offset and length, holes from the index, a bounded cache of decoded
//! chunks. What `shear serve` keeps across connections.
//!
//! Every chunk is decoded and verified against its index entry (as restore
//! does) before a byte of it is served; the index was checked against the
//! manifest's image digest at open. The cache holds decoded chunks up to a
//! byte limit (least recently used out first; at least one chunk); readers
//! of a chunk being decoded wait for that one decode instead of decoding it
//! again. Memory: the cache limit plus the chunks in use by readers, plus
//! a few buffers of evicted chunks kept for the next decodes (a fresh 4 MiB
//! buffer costs a page fault per 4 KiB: about 0.9 CPU s per GiB on the
//! bench host, a tenth of serving's CPU).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::error::{RepoError, Result};
use super::format::{chunk_len, FixedIndex, ZERO_ENTRY};
use super::manifest::DiskEntry;
use super::reader::{read_chunk_into, read_chunk_of, BackupReader};

/// One extent of a disk: data, or a zero chunk (a hole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskExtent {
    /// Start.
    pub offset: u64,
    /// Length (nonzero).
    pub len: u64,
    /// All zero (not stored).
    pub zero: bool,
}

/// Cache counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of decoded chunks held.
    pub bytes: u64,
    /// Chunks held.
    pub chunks: usize,
    /// Reads served from the cache (or from a decode in progress).
    pub hits: u64,
    /// Chunks decoded.
    pub decodes: u64,
    /// Decodes into the kept buffer of an evicted chunk (no fresh memory).
    pub reused_buffers: u64,
}

type Slot = Arc<OnceLock<Option<Arc<Vec<u8>>>>>;

/// Buffers of evicted chunks kept for reuse (beyond the cache limit).
const SPARE_BUFFERS: usize = 4;

struct Lru {
    map: HashMap<u64, (Slot, u64, u64)>, // chunk → (slot, last use, bytes)
    bytes: u64,
    tick: u64,
}

/// One disk of an open backup, owned and `Send + Sync`: the backup stays
/// locked (shared) while any clone of the reader lives.
pub struct SharedDisk {
    backup: Arc<BackupReader>,
    entry: DiskEntry,
    index: FixedIndex,
    cache: Mutex<Lru>,
    limit: u64,
    hits: AtomicU64,
    decodes: AtomicU64,
    reused: AtomicU64,
    /// Buffers of evicted chunks no reader held, for the next decodes.
    spare: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for SharedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDisk")
            .field("backup", self.backup.id())
            .field("disk", &self.entry.name)
            .field("cache_limit", &self.limit)
            .finish_non_exhaustive()
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<SharedDisk>();
};

impl BackupReader {
    /// Opens disk `name` as an owned reader with a cache of at most
    /// `cache_bytes` of decoded chunks (at least one chunk is kept).
    pub fn shared_disk(self: &Arc<Self>, name: &str, cache_bytes: u64) -> Result<SharedDisk> {
        let (entry, index) = self.open_disk(name)?.into_parts();
        Ok(SharedDisk {
            backup: Arc::clone(self),
            entry,
            index,
            cache: Mutex::new(Lru {
                map: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
            limit: cache_bytes,
            hits: AtomicU64::new(0),
            decodes: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            spare: Mutex::new(Vec::new()),
        })
    }
}

impl SharedDisk {
    /// Manifest entry of the disk.
    pub fn entry(&self) -> &DiskEntry {
        &self.entry
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.index.virtual_size
    }

    /// Chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.index.chunk_size
    }

    /// The backup.
    pub fn backup(&self) -> &Arc<BackupReader> {
        &self.backup
    }

    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        CacheStats {
            bytes: c.bytes,
            chunks: c.map.len(),
            hits: self.hits.load(Ordering::Relaxed),
            decodes: self.decodes.load(Ordering::Relaxed),
            reused_buffers: self.reused.load(Ordering::Relaxed),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(RepoError::invalid(
                "read range",
                format!(
                    "{len} bytes at {offset} past the end of disk {} ({} bytes)",
                    self.entry.name,
                    self.size()
                ),
            )),
        }
    }

    fn is_zero(&self, i: u64) -> bool {
        usize::try_from(i)
            .ok()
            .and_then(|n| self.index.entries.get(n))
            .is_none_or(|d| *d == ZERO_ENTRY)
    }

    /// Decoded, verified chunk `i` (not a zero chunk), through the cache.
    fn chunk(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        let mut evicted = Vec::new();
        let slot = {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.tick += 1;
            let tick = c.tick;
            if let Some(e) = c.map.get_mut(&i) {
                e.1 = tick;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Arc::clone(&e.0)
            } else {
                let len = chunk_len(self.index.virtual_size, self.index.chunk_size, i) as u64;
                let slot: Slot = Arc::new(OnceLock::new());
                c.map.insert(i, (Arc::clone(&slot), tick, len));
                c.bytes += len;
                // Evict least recently used, never the one just added.
                while c.bytes > self.limit && c.map.len() > 1 {
                    let Some((&old, _)) = c
                        .map
                        .iter()
                        .filter(|(k, _)| **k != i)
                        .min_by_key(|(_, v)| v.1)
                    else {
                        break;
                    };
                    if let Some((old_slot, _, n)) = c.map.remove(&old) {
                        c.bytes -= n;
                        evicted.push(old_slot);
                    }
                }
                slot
            }
        };
        for old in evicted {
            self.keep_buffer(old);
        }
        let mut err = None;
        let got = slot.get_or_init(|| {
            self.decodes.fetch_add(1, Ordering::Relaxed);
            let kept = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
            if kept.is_some() {
                self.reused.fetch_add(1, Ordering::Relaxed);
            }
            let mut buf = kept.unwrap_or_default();
            match read_chunk_into(self.backup.repo(), &self.entry, &self.index, i, &mut buf) {
                Ok(()) => Some(Arc::new(buf)),
                Err(e) => {
                    err = Some(e);
                    None
                }
            }
        });
        match got {
            Some(d) => Ok(Arc::clone(d)),
            None => {
                // Failed: forget the slot so a later read tries again.
                {
                    let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if c.map.get(&i).is_some_and(|e| Arc::ptr_eq(&e.0, &slot)) {
                        if let Some((_, _, n)) = c.map.remove(&i) {
                            c.bytes -= n;
                        }
                    }
                }
                match err {
                    Some(e) => Err(e),
                    // Another reader's decode failed: get our own error.
                    None => {
                        read_chunk_of(self.backup.repo(), &self.entry, &self.index, i).map(Arc::new)
                    }
                }
            }
        }
    }

    /// Keeps the buffer of an evicted chunk for a later decode, if no
    /// reader holds it any more and fewer than [`SPARE_BUFFERS`] are kept.
    fn keep_buffer(&self, slot: Slot) {
        let Ok(cell) = Arc::try_unwrap(slot) else {
            return;
        };
        let Some(Some(data)) = cell.into_inner() else {
            return;
        };
        let Ok(buf) = Arc::try_unwrap(data) else {
            return;
        };
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// Fills `buf` with the disk's bytes at `offset` (any alignment,
    /// across chunks). Every chunk read is verified.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = u64::from(self.index.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = pos / cs;
            let within = super::format::to_usize(pos % cs);
            let clen = chunk_len(self.index.virtual_size, self.index.chunk_size, i);
            let n = (clen - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.is_zero(i) {
                out.fill(0);
            } else {
                let c = self.chunk(i)?;
                out.copy_from_slice(&c[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// The decoded chunk holding all `len` bytes at `offset`, with the
    /// start of the range in it: what a server sends without copying.
    /// `None` when the range crosses a chunk boundary or is in a zero chunk.
    pub fn chunk_slice(&self, offset: u64, len: usize) -> Result<Option<(Arc<Vec<u8>>, usize)>> {
        let Some((i, within)) = self.data_chunk_of(offset, len)? else {
            return Ok(None);
        };
        Ok(Some((self.chunk(i)?, within)))
    }

    /// The data chunk holding all `len` bytes at `offset` and the start of
    /// the range in it; `None` for an empty range, one across a chunk
    /// boundary or in a zero chunk; an error past the end of the disk.
    fn data_chunk_of(&self, offset: u64, len: usize) -> Result<Option<(u64, usize)>> {
        self.check_range(offset, len as u64)?;
        let cs = u64::from(self.index.chunk_size);
        let i = offset / cs;
        let within = super::format::to_usize(offset % cs);
        let clen = chunk_len(self.index.virtual_size, self.index.chunk_size, i);
        if len == 0 || within + len > clen || self.is_zero(i) {
            return Ok(None);
        }
        Ok(Some((i, within)))
    }

    /// Like [`SharedDisk::chunk_slice`], but only from the cache: the
    /// decoded chunk if it is held and done decoding, else `None` (also
    /// for a range out of bounds, across chunks or in a zero chunk).
    /// Never reads, decodes or waits for a decode.
    pub fn cached_slice(&self, offset: u64, len: usize) -> Option<(Arc<Vec<u8>>, usize)> {
        let (i, within) = self.data_chunk_of(offset, len).ok()??;
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        let e = c.map.get_mut(&i)?;
        let data = Arc::clone(e.0.get()?.as_ref()?);
        e.1 = tick;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some((data, within))
    }

    /// Extents of `len` bytes at `offset`: runs of data chunks and of zero
    /// chunks, merged, clipped to the range.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<DiskExtent>> {
        self.check_range(offset, len)?;
        let cs = u64::from(self.index.chunk_size);
        let end = offset + len;
        let mut out: Vec<DiskExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let next = ((i + 1) * cs).min(end);
            let zero = self.is_zero(i);
            match out.last_mut() {
                Some(l) if l.zero == zero => l.len += next - pos,
                _ => out.push(DiskExtent {
                    offset: pos,
                    len: next - pos,
                    zero,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

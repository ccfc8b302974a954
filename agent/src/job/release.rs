//! Releasing what the backup has stored, and watching the fleece images.
//!
//! The copy-before-write filter preserves every range of the snapshot
//! until it is told otherwise: each first guest write to a cluster waits
//! for a copy of the old data into the fleece image, for the whole backup.
//! Once a range is in the repository shear never reads it again, so it
//! discards it on the `snapshot-access` export (`NBD_CMD_TRIM`; design.md
//! "Freeing what was read"): the filter drops the range from its copy
//! bitmap and discards it in the fleece image. A guest write to a released
//! range then costs no copy, and the fleece image only ever holds data
//! the guest overwrote before shear got to it.
//!
//! **When a range is released.** After its chunk is *stored* (the backend's
//! `put` returned: atomic and durable), not merely read. Trimming right
//! after the read would be defensible (a backup that later fails is
//! discarded as a whole, and nothing but this run ever reads the snapshot),
//! but it would make the chunk in memory the only copy of the freeze
//! instant: a store error, a failed pre-store verification (F-45) or
//! any future in-run retry could then no longer go back to the snapshot.
//! Waiting for the store costs only the pipeline's lag (at most the
//! in-flight bytes of the data path, `datapath::DATA_PATH_BYTES`) of extra
//! fleece growth.
//!
//! **Only what was read is released**, not holes or the clean chunks of an
//! incremental (recorded without reading). The filter passes each discard
//! on to the fleece image, and qcow2 allocates an L2 table for every range
//! discarded where it has none: releasing a 1 TiB sparse disk's holes grew
//! its fleece image to 134 MB of L2 tables (measured; 2.3 MB for a 16 GiB
//! disk with 1 GiB read and released). A read range costs at most one
//! 64 KiB L2 table per 512 MiB. A guest write into a hole or a clean range
//! still costs a copy (of zeroes, for a hole). A chunk re-read because its
//! base chunk is gone (F-35) is released once stored, like any other.
//!
//! Trims are best effort: a failed trim only means the filter keeps
//! preserving that range (the guest pays a copy, the fleece keeps it), so
//! it is logged and the backup goes on. Reads never touch a released range
//! again: the reader hands out each chunk once, its retries (F-18) happen
//! before it hands the chunk out, and the only later reads (F-35 re-reads)
//! are of chunks never released.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::fleece::FleeceImage;

/// How often the fleece images' allocation is sampled. A stat per image
/// per interval costs nothing measurable; at the fleece write rates seen
/// here (≤ 2.5 GB/s) 50 ms misses at most a short peak.
pub(super) const FLEECE_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Ranges taken from the queue in one go at most (then merged: chunks
/// stored one after the other go out as one request).
const TRIM_BATCH: usize = 4096;

/// What a [`Trimmer`] did.
#[derive(Debug, Default, Clone)]
pub(super) struct TrimStats {
    /// Bytes released.
    pub bytes: u64,
    /// `NBD_CMD_TRIM` requests that succeeded (after merging).
    pub requests: u64,
    /// The first error (later trims are not attempted after it).
    pub error: Option<String>,
}

/// Sends `NBD_CMD_TRIM` for released ranges on its own connection and
/// thread, merging neighbours.
pub(super) struct Trimmer {
    tx: Option<Sender<(u64, u64)>>,
    thread: Option<JoinHandle<TrimStats>>,
}

/// A cheap handle for the threads that release ranges.
#[derive(Clone)]
pub(super) struct TrimHandle(Sender<(u64, u64)>);

impl TrimHandle {
    /// Release `len` bytes at `offset` (never blocks; the trimmer thread
    /// keeps up easily: one small request per merged run).
    pub fn release(&self, offset: u64, len: u64) {
        let _ = self.0.send((offset, len));
    }
}

impl Trimmer {
    /// Connects to `source` (which must be a writable export that accepts
    /// trim) and starts the thread. `None` (with the reason) if the export
    /// cannot trim: the backup then runs without releasing.
    pub fn start(source: &nbd_export::ExportSource) -> Result<Trimmer, String> {
        let mut src = source.clone();
        src.dirty_bitmap = None;
        let client = super::datapath::connect_client(&src)
            .map_err(|e| format!("connecting to trim: {}", crate::chain(&e)))?;
        let flags = client.info().flags;
        if flags.read_only() || !flags.can_trim() {
            let _ = client.disconnect();
            return Err("the export does not accept trim".into());
        }
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("shear-trim".into())
            .spawn(move || trim_loop(client, &rx))
            .map_err(|e| format!("starting the trim thread: {e}"))?;
        Ok(Trimmer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// A handle to release ranges with.
    pub fn handle(&self) -> Option<TrimHandle> {
        self.tx.clone().map(TrimHandle)
    }

    /// Sends what is queued, disconnects and reports.
    pub fn finish(mut self) -> TrimStats {
        self.tx = None;
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sorts and merges touching or overlapping ranges.
pub(super) fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.1 > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (off, len) in v {
        match out.last_mut() {
            Some((o, l)) if *o + *l >= off => *l = (*l).max(off + len - *o),
            _ => out.push((off, len)),
        }
    }
    out
}

fn trim_loop(mut client: nbd_export::Client, rx: &Receiver<(u64, u64)>) -> TrimStats {
    let mut stats = TrimStats::default();
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.push(first);
        while batch.len() < TRIM_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if stats.error.is_some() {
            continue; // drain: the sender never blocks
        }
        for (off, len) in merge_ranges(std::mem::take(&mut batch)) {
            match client.trim(off, len) {
                Ok(()) => {
                    stats.bytes += len;
                    stats.requests += 1;
                }
                Err(e) => {
                    let msg = format!(
                        "releasing {len} bytes at {off} failed ({}); the filter keeps \
                         preserving the rest of the disk",
                        crate::chain(&e)
                    );
                    tracing::warn!("{msg}");
                    stats.error = Some(msg);
                    break;
                }
            }
        }
    }
    let _ = client.disconnect();
    stats
}

/// Samples the fleece images' allocated bytes (`st_blocks`) on a thread and
/// keeps each one's peak.
pub(super) struct FleeceWatch {
    peaks: Arc<Vec<AtomicU64>>,
    images: Arc<Vec<Option<FleeceImage>>>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn sample(images: &[Option<FleeceImage>], peaks: &[AtomicU64]) {
    for (image, peak) in images.iter().zip(peaks) {
        if let Some(b) = image.as_ref().and_then(FleeceImage::held_bytes) {
            peak.fetch_max(b, Ordering::Relaxed);
        }
    }
}

impl FleeceWatch {
    /// Starts sampling `images` (one per disk; `None`: no fleece image).
    pub fn start(images: Vec<Option<FleeceImage>>) -> FleeceWatch {
        let peaks: Arc<Vec<AtomicU64>> =
            Arc::new(images.iter().map(|_| AtomicU64::new(0)).collect());
        let images = Arc::new(images);
        let mut w = FleeceWatch {
            peaks: Arc::clone(&peaks),
            images: Arc::clone(&images),
            stop: None,
            thread: None,
        };
        if images.iter().all(Option::is_none) {
            return w;
        }
        sample(&images, &peaks);
        let (tx, rx) = mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("shear-fleece-watch".into())
            .spawn(move || loop {
                match rx.recv_timeout(FLEECE_SAMPLE_INTERVAL) {
                    Err(RecvTimeoutError::Timeout) => sample(&images, &peaks),
                    _ => return,
                }
            });
        if let Ok(t) = t {
            w.stop = Some(tx);
            w.thread = Some(t);
        }
        w
    }

    /// Disk `i`'s peak so far of the data its fleece image held (sampled
    /// once more now; see [`FleeceImage::held_bytes`]). `None` if it has
    /// no fleece image.
    pub fn peak(&self, i: usize) -> Option<u64> {
        let image = self.images.get(i)?.as_ref()?;
        let peak = self.peaks.get(i)?;
        if let Some(b) = image.held_bytes() {
            peak.fetch_max(b, Ordering::Relaxed);
        }
        Some(peak.load(Ordering::Relaxed))
    }
}

impl Drop for FleeceWatch {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn ranges_merge_when_touching_or_overlapping_only() {
        assert_eq!(
            merge_ranges(vec![(8, 4), (0, 4), (4, 4), (20, 4), (22, 10), (40, 0)]),
            vec![(0, 12), (20, 12)]
        );
        assert_eq!(merge_ranges(vec![(0, 10), (2, 3)]), vec![(0, 10)]);
        assert!(merge_ranges(vec![]).is_empty());
    }

    #[test]
    fn fleece_watch_keeps_the_peak_after_the_file_shrinks() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("fleece");
        std::fs::write(&f, vec![1u8; 1 << 20]).unwrap();
        let w = FleeceWatch::start(vec![Some(FleeceImage::foreign(f.clone())), None]);
        std::fs::write(&f, b"x").unwrap();
        let peak = w.peak(0).unwrap();
        assert!(peak >= 1 << 20, "{peak}");
        assert_eq!(w.peak(1), None);
        assert_eq!(w.peak(7), None);
    }

    /// shear's own fresh qcow2 holds 0 bytes until QEMU copies into it;
    /// data then counts, the L2 tables QEMU adds to map it do not.
    #[test]
    fn fleece_peak_counts_data_not_the_qcow2_metadata() {
        use crate::repo::qcow2::{Qcow2Writer, CLUSTER_SIZE};
        const MIB: u64 = 1 << 20;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("fleece.qcow2");
        let file = std::fs::File::create(&f).unwrap();
        Qcow2Writer::new(file, 4 << 30).finish_unsynced().unwrap();
        let image = FleeceImage::created(f.clone());
        let w = FleeceWatch::start(vec![Some(image.clone())]);
        assert_eq!(w.peak(0), Some(0));

        // What QEMU does for copies to two places 1 GiB apart: data
        // clusters appended, one new L2 table for each, linked from L1.
        let header = std::fs::read(&f).unwrap();
        let l1_offset = u64::from_be_bytes(header[40..48].try_into().unwrap());
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        let mut end = file.metadata().unwrap().len();
        for l1_index in [0u64, 2] {
            let l2 = end;
            file.write_all_at(&[0u8; 1 << 16], l2).unwrap();
            file.write_all_at(&(l2 | 1 << 63).to_be_bytes(), l1_offset + l1_index * 8)
                .unwrap();
            file.write_all_at(&vec![9u8; 1 << 20], l2 + CLUSTER_SIZE)
                .unwrap();
            end = l2 + CLUSTER_SIZE + MIB;
        }
        assert_eq!(w.peak(0), Some(2 * MIB));
        // Counted whole when it is not shear's own image.
        let foreign = FleeceWatch::start(vec![Some(FleeceImage::foreign(f.clone()))]);
        assert!(foreign.peak(0).unwrap() > 2 * MIB + 2 * CLUSTER_SIZE);
    }
}

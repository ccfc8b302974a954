//! The data path of a backup: NBD export → chunks → repository, on
//! dedicated threads (called through `spawn_blocking`).
//!
//! The NBD reader (nbd-export) reads allocated extents on its own threads
//! and hands over whole chunks through a channel bounded by a byte budget;
//! this thread passes data chunks to the repository's bounded hash/compress
//! pool and records holes directly. Memory is the reader's budget plus the
//! pool's queue, whatever the disk size.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::backup::{Cancel, DiskReport};
use super::graph::VmDisk;
use super::JobError;
use crate::repo;

/// Data path settings.
#[derive(Debug, Clone)]
pub(super) struct DataPathConfig {
    /// NBD server socket.
    pub socket: PathBuf,
    /// Hash/compress threads.
    pub workers: usize,
    /// NBD connections per export.
    pub connections: usize,
    /// Read limit in bytes/s (0: none).
    pub bwlimit_bytes: u64,
    /// Progress bars on stderr.
    pub progress: bool,
}

/// A token bucket on bytes read (vzdump's `bwlimit`).
#[derive(Debug)]
struct Throttle {
    rate: u64,
    start: Instant,
    consumed: u64,
}

impl Throttle {
    fn new(rate: u64) -> Self {
        Throttle {
            rate,
            start: Instant::now(),
            consumed: 0,
        }
    }
    fn take(&mut self, bytes: u64, cancel: &Cancel) {
        if self.rate == 0 {
            return;
        }
        self.consumed += bytes;
        #[allow(clippy::cast_precision_loss)]
        let due = Duration::from_secs_f64(self.consumed as f64 / self.rate as f64);
        while self.start.elapsed() < due && !cancel.is_cancelled() {
            let left = due.saturating_sub(self.start.elapsed());
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

/// Read every disk's export into the session (blocking; data-plane thread).
pub(super) fn read_all(
    session: &repo::BackupSession,
    jobs: &[(VmDisk, String)],
    dp: &DataPathConfig,
    cancel: &Cancel,
) -> Result<Vec<DiskReport>, JobError> {
    let mut reports = Vec::new();
    let mut throttle = Throttle::new(dp.bwlimit_bytes);
    for (disk, export) in jobs {
        let spec = repo::DiskSpec {
            name: disk.name.clone(),
            device: if disk.device.is_empty() {
                disk.qdev.clone()
            } else {
                disk.device.clone()
            },
            node: disk.node.clone(),
            virtual_size: disk.virtual_size,
        };
        let writer = session
            .add_disk(&spec)
            .map_err(JobError::repo(format!("adding disk {}", disk.name)))?;
        let src = nbd_export::ExportSource::unix(&dp.socket, export.clone());
        // Memory: the reader holds at most its byte budget. With a bandwidth
        // limit, keep it to two chunks so the limit bounds the NBD reads too
        // (not only how fast chunks are consumed).
        // Otherwise the reader's own tuned default (nbd-export's tuning).
        let chunk = u64::from(writer.chunk_size());
        let defaults = nbd_export::ReaderConfig::default();
        let byte_budget = if dp.bwlimit_bytes > 0 {
            2 * chunk
        } else {
            defaults.byte_budget.max(2 * chunk)
        };
        let cfg = nbd_export::ReaderConfig {
            chunk_size: writer.chunk_size(),
            connections: dp.connections,
            byte_budget,
            ..defaults
        };
        let mut stream =
            nbd_export::ChunkReader::start(&src, &cfg).map_err(|source| JobError::Nbd {
                step: format!("connecting to the export of {}", disk.name),
                source,
            })?;
        if stream.export_info().size != disk.virtual_size {
            return Err(JobError::Invalid(format!(
                "export of {} has {} bytes, the disk {}",
                disk.name,
                stream.export_info().size,
                disk.virtual_size
            )));
        }
        let recycler = stream.recycler();
        let pipeline = repo::ChunkPipeline::with_recycler(
            dp.workers,
            dp.workers * 2,
            &(std::sync::Arc::new(move |buf| recycler.recycle(buf)) as repo::BufferRecycler),
        );
        let bar = dp.progress.then(|| {
            let bar = indicatif::ProgressBar::new(disk.virtual_size);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(disk.name.clone());
            bar
        });
        let mut failed = None;
        for item in stream.by_ref() {
            if cancel.is_cancelled() {
                break;
            }
            let chunk = match item {
                Ok(c) => c,
                Err(source) => {
                    failed = Some(JobError::Nbd {
                        step: format!(
                            "reading {} (an EACCES/EPERM here means the copy-before-write \
                             filter broke the snapshot: fleecing storage full or failing)",
                            disk.name
                        ),
                        source,
                    });
                    break;
                }
            };
            if let Some(b) = &bar {
                b.inc(u64::from(chunk.len));
            }
            let r = match chunk.kind {
                nbd_export::ChunkKind::Data(data) => {
                    throttle.take(u64::from(chunk.len), cancel);
                    pipeline.submit(&writer, chunk.index, data)
                }
                nbd_export::ChunkKind::Zero => writer.put_zero(chunk.index),
                nbd_export::ChunkKind::Clean => {
                    failed = Some(JobError::Invalid(format!(
                        "{}: the reader reported a clean chunk in a full backup",
                        disk.name
                    )));
                    break;
                }
            };
            if let Err(e) = r {
                failed = Some(JobError::repo(format!("storing {}", disk.name))(e));
                break;
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let stats = stream.stats();
        if failed.is_some() || cancel.is_cancelled() {
            stream.cancel();
            let _ = pipeline.finish();
            cancel.check()?;
            return Err(failed.unwrap_or_else(|| JobError::Invalid("read stopped".into())));
        }
        pipeline
            .finish()
            .map_err(JobError::repo(format!("storing {}", disk.name)))?;
        let entry = writer.finish().map_err(JobError::repo(format!(
            "writing the index of {}",
            disk.name
        )))?;
        reports.push(DiskReport {
            name: disk.name.clone(),
            virtual_size: disk.virtual_size,
            bytes_read: stats.bytes_read,
            bytes_skipped: disk.virtual_size.saturating_sub(stats.bytes_read),
            bytes_stored: entry.stored_bytes,
            bytes_deduplicated: entry.dedup_bytes,
            image_digest: entry.image_digest,
        });
    }
    Ok(reports)
}

//! The data path of a backup: NBD export → chunks → repository, on
//! dedicated threads (called through `spawn_blocking`).
//!
//! The NBD reader (nbd-export) reads allocated extents on its own threads
//! and hands over whole chunks through a channel; this thread passes data
//! chunks to the repository's bounded hash/compress pool and records holes
//! directly. Every chunk buffer is paid from one byte budget from the read
//! until the pool gives it back ([`data_path_budget`]): memory is that
//! budget, whatever the disk size. This budget and the I/O engine choice
//! (`SHEAR_IO_ENGINE`) are shear's policy and live here; nbd-export only
//! takes them as parameters.

use std::sync::Arc;

use super::cancel::Cancel;
use super::events::{JobEvent, JobObserver};
use super::graph::VmDisk;
use super::priority::{run_lowered, DataPriority};
use super::release::{FleeceWatch, Trimmer};
use super::report::DiskReport;
use super::JobError;
use crate::repo;
use crate::repo::stages::{thread_cpu_ns, Stage, StageMeter};

/// The backup's one bound on chunk memory across all its stages (read in
/// flight, queued, hashed, compressed, waiting in the pool), with the
/// reader's `budget_until_recycled`: 64 MiB, whatever the disk size.
/// Before, the reader's 256 MiB budget was returned on delivery, and under
/// CPU contention it filled while compression lagged: 320 MiB peak RSS on
/// a full backup (bench 2026-11-30). The reader needs far fewer bytes in
/// flight than that to keep two compressing workers busy (reading is ~5×
/// faster than zstd -1 here).
pub const DATA_PATH_BYTES: u64 = 64 << 20;

/// The budget for `workers` hash/compress workers: [`DATA_PATH_BYTES`],
/// or more when the workers alone could hold most of it (each works on one
/// chunk with two queued, and the reader keeps four chunks in flight).
pub fn data_path_budget(workers: usize, chunk_size: u32) -> u64 {
    let per_chunk = u64::from(chunk_size);
    let stages = (workers as u64).saturating_mul(3).saturating_add(4);
    DATA_PATH_BYTES.max(stages.saturating_mul(per_chunk))
}

/// Environment variable that picks the NBD I/O engine: `uring`, `sync` or
/// `auto` (the default: io_uring when the kernel allows it).
pub const IO_ENGINE_ENV: &str = "SHEAR_IO_ENGINE";

/// The I/O engine [`IO_ENGINE_ENV`] asks for (`Auto` when unset).
pub fn io_engine() -> nbd_export::Result<nbd_export::EngineChoice> {
    match std::env::var(IO_ENGINE_ENV) {
        Ok(v) => nbd_export::EngineChoice::parse(&v).map_err(|_| {
            nbd_export::Error::InvalidArgument(format!(
                "{IO_ENGINE_ENV}={v:?}: expected uring, sync or auto"
            ))
        }),
        Err(_) => Ok(nbd_export::EngineChoice::Auto),
    }
}

/// Connects an NBD client with the engine from [`IO_ENGINE_ENV`].
pub fn connect_client(src: &nbd_export::ExportSource) -> nbd_export::Result<nbd_export::Client> {
    let opts = nbd_export::ClientOptions {
        engine: io_engine()?,
        ..nbd_export::ClientOptions::default()
    };
    nbd_export::Client::connect(src, &opts)
}

/// Data path settings.
#[derive(Debug, Clone)]
pub(crate) struct DataPathConfig {
    /// Hash/compress threads.
    pub workers: usize,
    /// NBD connections per export.
    pub connections: usize,
    /// Read limit in bytes/s (0: none).
    pub bwlimit_bytes: u64,
    /// CPU and I/O priority of the data-path threads.
    pub priority: DataPriority,
}

/// One disk to read.
#[derive(Debug, Clone)]
pub(crate) struct DiskJob {
    /// The disk.
    pub disk: VmDisk,
    /// Where its export is (server and export name; the dirty bitmap
    /// context is added from `incremental`).
    pub source: nbd_export::ExportSource,
    /// Incremental: the dirty bitmap exported with it and the base's
    /// index digests (clean chunks reuse them).
    pub incremental: Option<(String, Arc<Vec<repo::Digest>>)>,
    /// How the disk is read (recorded in the manifest).
    pub read: repo::DiskRead,
    /// The disk's fleece image, whose allocation is sampled (`None` for
    /// `--nbd`: no fleece of ours).
    pub fleece: Option<super::fleece::FleeceImage>,
    /// Where to discard each range once stored: a writable export of our
    /// `snapshot-access` node (see `release`); `None`: nothing is released.
    pub release: Option<nbd_export::ExportSource>,
}

/// Read every disk's export into the session (blocking), on a thread of
/// its own at the data path's priority (`dp.priority`; the threads it
/// starts inherit it), so the caller's thread keeps its own.
fn read_all(
    session: &repo::BackupSession,
    jobs: &[DiskJob],
    dp: &DataPathConfig,
    cancel: &Cancel,
    observer: &dyn JobObserver,
) -> Result<Vec<DiskReport>, JobError> {
    let warn = |w: String| tracing::warn!("{w}");
    run_lowered("shear-datapath", dp.priority, &warn, || {
        read_all_here(session, jobs, dp, cancel, observer)
    })
    .map_err(|e| JobError::io("starting the data-path thread", e))?
}

impl DataPathConfig {
    /// From a job's options (workers and connections at least 1; the
    /// bandwidth limit in KiB/s, 0 for none).
    pub(crate) fn new(
        workers: usize,
        connections: usize,
        bwlimit_kib: u64,
        priority: DataPriority,
    ) -> DataPathConfig {
        DataPathConfig {
            workers: workers.max(1),
            connections: connections.max(1),
            bwlimit_bytes: bwlimit_kib.saturating_mul(1024),
            priority,
        }
    }
}

/// Starts the repository session of a backup. Backup ids have one-second
/// resolution: a second backup of the same VM within a second waits for
/// the next one (just past its start, not a whole second more).
pub(crate) async fn begin_session(
    repo: &repo::Repository,
    meta: &repo::BackupMeta,
) -> Result<repo::BackupSession, JobError> {
    match repo.begin_backup(meta) {
        Err(e) if e.kind() == repo::ErrorKind::AlreadyExists => {
            tokio::time::sleep(until_next_second(std::time::SystemTime::now())).await;
            repo.begin_backup(meta)
        }
        r => r,
    }
    .map_err(JobError::repo("starting the backup"))
}

/// From `now` to 5 ms past the next whole second of the wall clock.
fn until_next_second(now: std::time::SystemTime) -> std::time::Duration {
    let into = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::time::Duration::from_nanos(u64::from(1_000_000_000 - into) + 5_000_000)
}

/// [`read_all`] from async code, on a blocking thread. If the read fails
/// the session is aborted (nothing of this backup is listed) before the
/// error is returned; on success the session comes back for the commit.
pub(crate) async fn read_all_blocking(
    session: repo::BackupSession,
    jobs: Vec<DiskJob>,
    dp: DataPathConfig,
    cancel: Cancel,
    observer: super::events::Observer,
) -> Result<(repo::BackupSession, Vec<DiskReport>), JobError> {
    let (session, r) = tokio::task::spawn_blocking(move || {
        let r = read_all(&session, &jobs, &dp, &cancel, observer.as_ref());
        (session, r)
    })
    .await
    .map_err(|e| JobError::Invalid(format!("data path thread failed: {e}")))?;
    match r {
        Ok(disks) => Ok((session, disks)),
        Err(e) => {
            session.abort();
            Err(e)
        }
    }
}

fn read_all_here(
    session: &repo::BackupSession,
    jobs: &[DiskJob],
    dp: &DataPathConfig,
    cancel: &Cancel,
    observer: &dyn JobObserver,
) -> Result<Vec<DiskReport>, JobError> {
    let mut reports = Vec::new();
    let t0 = std::time::Instant::now();
    // The read phase's own steps (`RUST_LOG=shear::timing=debug`), timed
    // from its start: where an incremental's fraction of a second goes.
    let step = |step: &str| {
        tracing::debug!(target: "shear::timing", step, datapath_ms = super::backup::ms(t0.elapsed()));
    };
    // Every disk's fleece grows from the freeze on, also while the disks
    // before it are read: sample them all for the whole data path.
    let watch = FleeceWatch::start(jobs.iter().map(|j| j.fleece.clone()).collect());
    for (disk_no, job) in jobs.iter().enumerate() {
        let disk = &job.disk;
        let spec = repo::DiskSpec {
            name: disk.name.clone(),
            device: if disk.device.is_empty() {
                disk.qdev.clone()
            } else {
                disk.device.clone()
            },
            node: disk.node.clone(),
            virtual_size: disk.virtual_size,
            read: Some(job.read.clone()),
        };
        let writer = session
            .add_disk(&spec)
            .map_err(JobError::repo(format!("adding disk {}", disk.name)))?;
        let mut src = job.source.clone();
        if let Some((bitmap, _)) = &job.incremental {
            src = src.with_dirty_bitmap(bitmap.clone());
        }
        // The bandwidth limit is applied by the reader to the read requests
        // it sends (the bytes actually read, smoothly), not per chunk.
        // Per-stage CPU of this disk (repo::stages): the reader threads
        // charge their whole lifetime to read as they end, this thread its
        // hand-over loop; the pipeline's threads charge the other stages.
        let meter = StageMeter::new();
        let handover_t0 = thread_cpu_ns();
        let engine = io_engine().map_err(|source| JobError::ReadFailed {
            disk: disk.name.clone(),
            offset: None,
            cause: None,
            source: Box::new(source),
        })?;
        let cfg = nbd_export::ReaderConfig {
            engine,
            connections: dp.connections,
            rate_limit: dp.bwlimit_bytes,
            // One bound on chunk memory for every stage (read, queued,
            // hashed, compressed, pooled): the pipeline gives every buffer
            // back through the recycler, stored or not.
            byte_budget: data_path_budget(dp.workers, writer.chunk_size()),
            budget_until_recycled: true,
            thread_end: Some(nbd_export::ThreadHook({
                let meter = Arc::clone(&meter);
                Arc::new(move || meter.add(Stage::Read, thread_cpu_ns(), 0))
            })),
            ..nbd_export::ReaderConfig::new(writer.chunk_size())
        };
        let mut stream =
            nbd_export::ChunkReader::start(&src, &cfg).map_err(|source| JobError::ReadFailed {
                disk: disk.name.clone(),
                offset: None,
                cause: None,
                source: Box::new(source),
            })?;
        step("read: reader started");
        if stream.export_info().size != disk.virtual_size {
            return Err(JobError::Invalid(format!(
                "export of {} has {} bytes, the disk {}",
                disk.name,
                stream.export_info().size,
                disk.virtual_size
            )));
        }
        let recycler = stream.recycler();
        let trimmer = if let Some(rel) = &job.release {
            match Trimmer::start(rel) {
                Ok(t) => Some(t),
                Err(why) => {
                    tracing::warn!("{}: stored ranges are not released: {why}", disk.name);
                    None
                }
            }
        } else {
            None
        };
        let stored: Option<repo::StoredHook> =
            trimmer.as_ref().and_then(Trimmer::handle).map(|h| {
                let (cs, size) = (u64::from(writer.chunk_size()), disk.virtual_size);
                Arc::new(move |index: u64| {
                    let off = index.saturating_mul(cs);
                    h.release(off, cs.min(size.saturating_sub(off)));
                }) as repo::StoredHook
            });
        let pipeline = repo::ChunkPipeline::with_meter(
            dp.workers,
            dp.workers * 2,
            &(Arc::new(move |buf| recycler.recycle(buf)) as repo::BufferRecycler),
            stored,
            Some(&meter),
        );
        observer.event(&JobEvent::DiskStarted {
            disk: &disk.name,
            virtual_size: disk.virtual_size,
            // Known up front only for an incremental read (the dirty bytes).
            to_read: job.incremental.as_ref().and(job.read.dirty_bytes),
        });
        let mut read_so_far = 0u64;
        let mut failed = None;
        let mut first = true;
        // Clean chunks whose base chunk is no longer stored: read them.
        let mut missing: Vec<u64> = Vec::new();
        // Not `for … in stream.by_ref()`: the loop reads the stream's stats.
        #[allow(clippy::while_let_on_iterator)]
        while let Some(item) = stream.next() {
            if cancel.is_cancelled() {
                break;
            }
            let chunk = match item {
                Ok(c) => c,
                Err(source) => {
                    // The cause is found by the caller, with QMP.
                    failed = Some(JobError::ReadFailed {
                        disk: disk.name.clone(),
                        offset: source.offset(),
                        cause: None,
                        source: Box::new(source),
                    });
                    break;
                }
            };
            if first {
                step("read: first chunk");
                first = false;
            }
            let read_now = stream.stats().bytes_read;
            observer.event(&JobEvent::DiskProgress {
                disk: &disk.name,
                bytes: u64::from(chunk.len),
                read: read_now.saturating_sub(read_so_far),
            });
            read_so_far = read_now;
            // Only what was read is released (by the pipeline, once stored):
            // see `release` for why holes and reused chunks are not.
            let r = match chunk.kind {
                nbd_export::ChunkKind::Data(data) => pipeline.submit(&writer, chunk.index, data),
                nbd_export::ChunkKind::Zero => writer.put_zero(chunk.index),
                nbd_export::ChunkKind::Clean => match &job.incremental {
                    Some((_, base)) => reuse_or_mark(&writer, base, chunk.index, &mut missing),
                    None => {
                        failed = Some(JobError::Invalid(format!(
                            "{}: the reader reported a clean chunk in a full backup",
                            disk.name
                        )));
                        break;
                    }
                },
            };
            if let Err(e) = r {
                failed = Some(JobError::repo(format!("storing {}", disk.name))(e));
                break;
            }
        }
        observer.event(&JobEvent::DiskFinished { disk: &disk.name });
        let stats = stream.stats();
        if failed.is_some() || cancel.is_cancelled() {
            stream.cancel();
            let _ = pipeline.finish();
            cancel.check()?;
            return Err(failed.unwrap_or_else(|| JobError::Invalid("read stopped".into())));
        }
        drop(stream);
        step("read: stream drained");
        let mut reread = 0u64;
        if !missing.is_empty() {
            reread = read_missing(&src, &writer, &pipeline, &missing, disk)?;
        }
        meter.add(
            Stage::Read,
            thread_cpu_ns().saturating_sub(handover_t0),
            stats.bytes_read + reread,
        );
        pipeline
            .finish()
            .map_err(JobError::repo(format!("storing {}", disk.name)))?;
        step("read: pipeline finished");
        let stages = meter.figures();
        tracing::debug!(target: "shear::timing", disk = %disk.name, ?stages, "CPU per stage");
        let released = trimmer.map(Trimmer::finish);
        let fleece_peak_bytes = watch.peak(disk_no);
        if let Some(b) = fleece_peak_bytes {
            writer.set_fleece_peak_bytes(b);
        }
        let entry = writer.finish().map_err(JobError::repo(format!(
            "writing the index of {}",
            disk.name
        )))?;
        step("read: index written");
        reports.push(DiskReport {
            name: disk.name.clone(),
            virtual_size: disk.virtual_size,
            bytes_read: stats.bytes_read + reread,
            bytes_skipped: disk.virtual_size.saturating_sub(stats.bytes_read + reread),
            kind: job.read.kind,
            full_reason: job.read.full_reason.clone(),
            base: job.read.base.clone(),
            dirty_bytes: job.read.dirty_bytes,
            bytes_stored: entry.stored_bytes,
            bytes_deduplicated: entry.dedup_bytes,
            image_digest: entry.image_digest,
            fleece_peak_bytes,
            bytes_released: released.map(|s| s.bytes),
            stages,
        });
    }
    Ok(reports)
}

/// Reuse the base's digest for a clean chunk; if that chunk is no longer
/// stored (F-35), remember the index to read it instead.
fn reuse_or_mark(
    writer: &repo::DiskWriter,
    base: &[repo::Digest],
    index: u64,
    missing: &mut Vec<u64>,
) -> Result<(), repo::RepoError> {
    let Some(digest) = usize::try_from(index).ok().and_then(|i| base.get(i)) else {
        return Err(repo::RepoError::invalid(
            "base index",
            format!("has no chunk {index}"),
        ));
    };
    match writer.reuse(index, *digest) {
        Err(e) if e.kind() == repo::ErrorKind::NotFound => {
            missing.push(index);
            Ok(())
        }
        r => r,
    }
}

/// Read whole chunks `indexes` through one plain connection and store them.
fn read_missing(
    src: &nbd_export::ExportSource,
    writer: &Arc<repo::DiskWriter>,
    pipeline: &repo::ChunkPipeline,
    indexes: &[u64],
    disk: &VmDisk,
) -> Result<u64, JobError> {
    let nbd = |step: &str| {
        let step = format!("{step} ({})", disk.name);
        move |source| JobError::Nbd { step, source }
    };
    let mut client =
        connect_client(src).map_err(nbd("connecting to re-read chunks missing from the base"))?;
    let mut bytes = 0u64;
    for &i in indexes {
        let off = i * u64::from(writer.chunk_size());
        let len = writer.chunk_len(i);
        let data = client
            .read(off, len)
            .map_err(nbd("re-reading a chunk missing from the base"))?;
        bytes += len as u64;
        pipeline
            .submit(writer, i, data)
            .map_err(JobError::repo(format!("storing {}", disk.name)))?;
    }
    let _ = client.disconnect();
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::until_next_second;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_backup_id_clash_waits_just_past_the_next_second() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(1_764_590_000_000 + ms);
        assert_eq!(until_next_second(at(0)), Duration::from_millis(1005));
        assert_eq!(until_next_second(at(250)), Duration::from_millis(755));
        assert_eq!(until_next_second(at(999)), Duration::from_millis(6));
        for ms in [0, 1, 500, 998, 999] {
            let next = at(ms) + until_next_second(at(ms));
            let secs = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
            assert_eq!(secs(next), secs(at(ms)) + 1, "from {ms} ms");
        }
    }
}

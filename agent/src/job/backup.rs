//! `shear backup`: a consistent, point-in-time backup of a running VM.
//!
//! A [`BackupRun`] goes through its phases in order, one method each (see
//! [`Phase`]); each graph change is write-ahead logged in the
//! [`RunRecord`] so one undo path serves success, error, signals and a
//! later run after SIGKILL:
//!
//! 1. `start`: lock the VM (one backup per VM), connect QMP, clean up
//!    leftovers of a killed run;
//! 2. `prepare`: discover the disks, connect qemu-ga, create the fleece
//!    images and add their nodes, start the thaw watchdog;
//! 3. `hold` the guest: freeze through qemu-ga (snapshot mode), or `stop`
//!    (suspend mode, or no agent), or an orderly shutdown (stop mode);
//! 4. `insert` the copy-before-write filters on all disks (same instant),
//!    then the snapshot-access nodes;
//! 5. `release` at once: thaw / `cont` / `system_reset`+`cont`;
//! 6. `export`: NBD server on a private socket, one read-only export per disk;
//! 7. `read`: the data path (dedicated threads): block status → read
//!    allocated extents → hash, compress, store → index;
//! 8. `teardown` (reverse order), then `commit`: the manifest, written only
//!    if the guest was released and the graph restored.
//!
//! Whatever fails, the guest is released and the graph restored; no
//! manifest is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::datapath::{self, DataPathConfig, DiskJob};
use super::events::{JobEvent, Observer, Phase};
use super::graph::{self, GraphBuilder, NodeNames, VmDisk};
use super::incremental::{self, DiskTracking};
use super::lock::{lock_vm_waiting, private_dir, VmLock, VM_LOCK_WAIT};
use super::monitor::{Monitor, Reconnect};
use super::record::{record_path, RunRecord, Step};
use super::report::{BackupReport, DiskReport};
use super::watchdog::Watchdog;
use super::{chain, ErrorKind, JobError};
use crate::repo::{self, Consistency, Repository};

pub use super::cancel::Cancel;
pub use super::options::{
    held_hook_from_env, render_notes, BackupOptions, Mode, DEFAULT_CBW_TIMEOUT_S, TEST_HOOKS,
};

/// How long connecting to qemu-ga may take before the backup goes on
/// crash-consistent (F-01 asks for ≤ 2 s).
const QGA_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Clean up what a killed run left behind (its record), before anything else.
pub async fn cleanup_leftovers(
    qmp: &qmp::Qmp,
    run_dir: &Path,
    vmid: &str,
) -> Result<Option<String>, JobError> {
    let path = record_path(run_dir, vmid);
    let Some(mut rec) = RunRecord::load(&path).map_err(JobError::Record)? else {
        return Ok(None);
    };
    let n = rec.steps.len();
    let pid = rec.pid;
    let qga = rec.qga.clone();
    graph::undo(Some(qmp), qga.as_deref(), &mut rec, &path).await?;
    Ok(Some(format!(
        "cleaned up {n} leftover step(s) of an interrupted backup run (pid {pid})"
    )))
}

/// Run one backup. The repository is opened by the caller; events go to
/// `observer`.
pub async fn run_backup(
    repo: Arc<Repository>,
    opts: BackupOptions,
    cancel: Cancel,
    observer: Observer,
) -> Result<BackupReport, JobError> {
    let mut run = BackupRun::start(repo, opts, cancel, observer).await?;
    // A monitor lost in any phase means QEMU exited: say so (F-28), with
    // the step it happened in, whatever the phase's own error was.
    let result = run.phases().await.map_err(|e| match e {
        JobError::VmGone(_) => e,
        e if e.kind() == ErrorKind::QemuGone => JobError::VmGone(chain(&e)),
        e => e,
    });
    let teardown = run.teardown().await;
    run.commit(result, teardown)
}

/// One backup run of one VM, phase by phase. Fields are filled in as the
/// phases go; `teardown` undoes whatever the record still holds.
#[derive(Debug)]
pub(super) struct BackupRun {
    pub(super) repo: Arc<Repository>,
    pub(super) opts: BackupOptions,
    pub(super) cancel: Cancel,
    pub(super) observer: Observer,
    pub(super) monitor: Monitor,
    pub(super) record: RunRecord,
    pub(super) rpath: PathBuf,
    pub(super) watchdog: Option<Watchdog>,
    pub(super) warnings: Vec<String>,
    pub(super) t0: Instant,
    _lock: VmLock,
    // prepare
    pub(super) disks: Vec<VmDisk>,
    pub(super) names: Vec<NodeNames>,
    pub(super) was_running: bool,
    pub(super) vm_name: String,
    pub(super) vm_config: serde_json::Value,
    pub(super) agent: Option<guest_agent::GuestAgent>,
    pub(super) nbd_dir: PathBuf,
    /// The fleece image of each disk (same order as `disks`).
    pub(super) fleece_files: Vec<super::fleece::FleeceImage>,
    // hold / release
    pub(super) hold: Hold,
    pub(super) hold_start: Instant,
    pub(super) consistency: Consistency,
    pub(super) freeze_window_ms: Option<u64>,
    /// A freeze whose thaw the guard could not confirm (the run fails).
    pub(super) thaw_unconfirmed: Option<guest_agent::Error>,
    /// Change tracking per disk (same order as `disks`); empty when
    /// tracking could not be set up (every disk read in full).
    pub(super) tracking: Vec<DiskTracking>,
    /// Dirty bytes per disk of the frozen bitmap (incremental disks).
    pub(super) dirty_bytes: Vec<Option<u64>>,
    // export
    pub(super) export_names: Vec<String>,
    /// Names of the writable exports stored ranges are released through.
    pub(super) release_names: Vec<String>,
    pub(super) setup_ms: u64,
}

/// A backup whose data and indexes are durable; committing writes the
/// manifest.
#[derive(Debug)]
pub(super) struct PendingCommit {
    session: repo::BackupSession,
    disks: Vec<DiskReport>,
    read_ms: u64,
}

impl BackupRun {
    /// Lock the VM, connect QMP, clean up what a killed run left.
    async fn start(
        repo: Arc<Repository>,
        opts: BackupOptions,
        cancel: Cancel,
        observer: Observer,
    ) -> Result<BackupRun, JobError> {
        let t0 = Instant::now();
        observer.event(&JobEvent::Phase {
            vmid: &opts.vmid,
            phase: Phase::Prepare,
        });
        private_dir(&opts.run_dir)?;
        let lock = lock_vm_waiting(&opts.run_dir, &opts.vmid, VM_LOCK_WAIT).await?;
        let monitor = Monitor::connect(&opts.qmp).await?;
        let rpath = record_path(&opts.run_dir, &opts.vmid);
        let record = RunRecord::new(&opts.vmid, &opts.qmp, opts.qga.as_deref());
        // Before anything changes in it (leftovers included): is it this VM?
        let identity = super::identity::verify(monitor.get()?, &opts.vmid).await?;
        let mut run = BackupRun {
            repo,
            cancel,
            observer,
            monitor,
            record,
            rpath,
            watchdog: None,
            warnings: Vec::new(),
            t0,
            _lock: lock,
            disks: Vec::new(),
            names: Vec::new(),
            was_running: false,
            vm_name: String::new(),
            vm_config: serde_json::Value::Null,
            agent: None,
            nbd_dir: PathBuf::new(),
            fleece_files: Vec::new(),
            hold: Hold::None,
            hold_start: t0,
            consistency: Consistency::Crash,
            freeze_window_ms: None,
            thaw_unconfirmed: None,
            tracking: Vec::new(),
            dirty_bytes: Vec::new(),
            export_names: Vec::new(),
            release_names: Vec::new(),
            setup_ms: 0,
            opts,
        };
        if let Some(w) = identity {
            run.warn(w);
        }
        if let Some(w) =
            cleanup_leftovers(run.monitor.get()?, &run.opts.run_dir, &run.opts.vmid).await?
        {
            run.warn(w);
        }
        run.cancel.check()?;
        Ok(run)
    }

    /// Every phase from prepare to read; the caller tears down whatever
    /// the outcome.
    async fn phases(&mut self) -> Result<PendingCommit, JobError> {
        self.prepare().await?;
        self.phase(Phase::Hold);
        self.hold().await?;
        self.phase(Phase::Insert);
        let inserted = self.insert().await;
        // Release at once, whatever happened.
        self.phase(Phase::Release);
        if inserted.is_err() {
            let released = self.release().await;
            inserted?;
            released?;
        }
        // The exports go in while the guest thaws (see release_and_export).
        let (released, exported) = self.release_and_export().await;
        released?;
        exported.unwrap_or(Ok(()))?;
        self.cancel.check()?;
        // Let the monitor go for the whole read: QEMU serves one client per
        // monitor, and the host's own tools need it.
        self.monitor.release();
        self.phase(Phase::Read);
        let pending = self.read().await?;
        self.mark("read: done");
        self.retire_bitmaps()?;
        Ok(pending)
    }

    pub(super) fn phase(&self, phase: Phase) {
        self.mark(phase.as_str());
        self.observer.event(&JobEvent::Phase {
            vmid: &self.opts.vmid,
            phase,
        });
    }

    /// Time since the run began, at a step (`RUST_LOG=shear::timing=debug`
    /// prints them: where a run's fixed cost goes).
    pub(super) fn mark(&self, step: &str) {
        tracing::debug!(target: "shear::timing", step, ms = ms(self.t0.elapsed()));
    }

    /// Record a warning for the report and tell the observer.
    pub(super) fn warn(&mut self, message: String) {
        self.observer.event(&JobEvent::Warning {
            vmid: &self.opts.vmid,
            message: &message,
        });
        self.warnings.push(message);
    }

    /// Phase `prepare`: disks, VM facts, qemu-ga, fleece images, watchdog.
    /// Nothing the guest sees changes here.
    async fn prepare(&mut self) -> Result<(), JobError> {
        let status = self
            .monitor
            .get()?
            .query_status()
            .await
            .map_err(JobError::qmp("query-status"))?;
        self.was_running = status.running;
        // qemu-ga from here to the confirmed thaw (only when the guest
        // runs: a paused guest cannot answer). Its first answer on a new
        // connection takes a guest round trip (under TCG 20-60 ms), so it
        // connects while everything else of this phase is done; joined
        // before the hold. Dropped (aborted) if the phase fails first:
        // nothing is frozen before the hold.
        let qga = (self.opts.mode == Mode::Snapshot && self.was_running).then(|| {
            AbortOnDrop(tokio::spawn(connect_qga(
                self.opts.qga.clone(),
                self.opts.freeze_timeout,
            )))
        });
        let mut skipped = Vec::new();
        let all = graph::discover_disks(self.monitor.get()?, &mut skipped, self.opts.include_cdrom)
            .await?;
        self.disks = super::select::apply_exclude(all, &self.opts.exclude, &skipped)?;
        for w in skipped {
            self.warn(w);
        }
        if self.disks.is_empty() {
            return Err(JobError::Invalid(format!(
                "VM {} has no disks to back up",
                self.opts.vmid
            )));
        }
        if let Some(w) = check_fleecing(&self.opts, &self.disks)? {
            self.warn(w);
        }
        self.vm_name = qmp_vm_name(self.monitor.get()?).await;
        self.mark("prepare: disks, status, name");
        self.vm_config =
            super::definition::capture(self.monitor.get()?, &self.disks, &self.opts.pve_config)
                .await;
        self.mark("prepare: definition");
        self.plan_tracking().await?;
        self.mark("prepare: tracking plan");

        if !self.was_running {
            self.warn(format!(
                "VM is {} (not running): no freeze; backup is crash-consistent",
                status.status
            ));
        }
        self.cancel.check()?;

        // Private directories, fleece files, watchdog: no QMP needed, so
        // the monitor is let go meanwhile (qemu-img takes a while).
        self.monitor.release();
        let tag = random_hex(3);
        self.nbd_dir = self
            .opts
            .run_dir
            .join(format!("nbd-{}-{tag}", self.opts.vmid));
        private_dir(&self.opts.fleecing_dir)?;
        self.names = (0..self.disks.len())
            .map(|i| NodeNames::new(&tag, i))
            .collect();
        let files: Vec<PathBuf> = self
            .disks
            .iter()
            .map(|disk| {
                self.opts.fleecing_dir.join(format!(
                    "{}-{}-{tag}.fleece.qcow2",
                    self.opts.vmid, disk.name
                ))
            })
            .collect();
        // Every setup step up to the NBD server, written ahead in one save.
        let mut ahead = vec![Step::Dir {
            path: self.nbd_dir.clone(),
        }];
        ahead.extend(files.iter().map(|f| Step::FleeceFile { path: f.clone() }));
        ahead.extend(self.names.iter().map(|n| Step::Node {
            name: n.fleece.clone(),
        }));
        ahead.push(Step::NbdServer {
            socket: self.nbd_socket(),
        });
        graph::log_ahead(&mut self.record, &self.rpath, ahead)?;
        private_dir(&self.nbd_dir)?;
        let mut made = Vec::with_capacity(files.len());
        for (disk, file) in self.disks.iter().zip(&files) {
            made.push(graph::create_fleece_file(&mut self.record, &self.rpath, disk, file).await?);
            self.cancel.check()?;
        }
        self.fleece_files = made;
        self.mark("prepare: fleece files");
        self.watchdog = Some(
            Watchdog::spawn(
                &self.opts.qmp,
                self.opts.qga.as_deref(),
                &self.opts.run_dir,
                &self.opts.vmid,
            )
            .map_err(|e| JobError::io("starting the thaw watchdog", e))?,
        );
        self.mark("prepare: watchdog");
        // The monitor again, from here through the exports.
        self.reconnect_for_setup().await?;
        self.mark("prepare: reconnect");
        let mut g = GraphBuilder::new(self.monitor.get()?, &mut self.record, &self.rpath);
        for ((disk, n), file) in self.disks.iter().zip(&self.names).zip(&files) {
            g.add_fleece(disk, n, file).await?;
            self.cancel.check()?;
        }
        // Before the guest is touched: an NBD server someone else runs
        // fails the backup here, and is left alone.
        // Per disk: the reader's connections, one to re-read chunks missing
        // from the base (F-35) and one to release what is stored.
        let max_conn = u32::try_from(self.disks.len() * (self.opts.connections.max(1) + 2))
            .unwrap_or(u32::MAX);
        g.start_nbd_server(&self.nbd_dir.join("nbd.sock"), max_conn)
            .await?;
        self.mark("prepare: fleece nodes, nbd server");
        if let Some(qga) = qga {
            let agent = qga.join().await.unwrap_or_else(|e| {
                Err(format!(
                    "qemu-ga connection task failed ({e}); backup is crash-consistent"
                ))
            });
            self.set_agent(agent);
            self.mark("prepare: qemu-ga");
        }
        Ok(())
    }

    /// Takes the outcome of [`connect_qga`]: the agent, or the warning
    /// that the backup is crash-consistent.
    fn set_agent(&mut self, agent: Result<guest_agent::GuestAgent, String>) {
        match agent {
            Ok(a) => self.agent = Some(a),
            Err(w) => self.warn(w),
        }
    }

    /// Phase `insert`: filters on every disk at the same instant, then the
    /// access nodes; then the test-only held hook. Runs while held.
    async fn insert(&mut self) -> Result<(), JobError> {
        // The filter and access steps of every disk are written ahead with
        // the split, in one save: the guest is held meanwhile.
        let mut ahead = Vec::new();
        for (disk, n) in self.disks.iter().zip(&self.names) {
            ahead.push(Step::Node {
                name: n.cbw.clone(),
            });
            ahead.push(Step::DriveSwap {
                qdev: disk.qdev.clone(),
                original: disk.node.clone(),
                filter: n.cbw.clone(),
            });
        }
        ahead.extend(self.names.iter().map(|n| Step::Node {
            name: n.access.clone(),
        }));
        self.split_bitmaps(ahead).await?;
        self.mark("insert: bitmap split");
        let mut g = GraphBuilder::new(self.monitor.get()?, &mut self.record, &self.rpath);
        for (disk, n) in self.disks.iter().zip(&self.names) {
            g.insert_filter(disk, n, self.opts.cbw_timeout_s).await?;
        }
        for (disk, n) in self.disks.iter().zip(&self.names) {
            g.add_access(disk, n).await?;
        }
        match &self.opts.held_hook {
            Some(hook) if TEST_HOOKS => {
                run_held_hook(hook, &self.opts, &self.disks, &self.names).await
            }
            _ => Ok(()),
        }
    }

    /// Phase `export`: one read-only export per disk under a random name
    /// on the NBD server started (on a private socket) in `prepare`.
    pub(super) async fn export(&mut self) -> Result<(), JobError> {
        self.export_names = (0..self.disks.len()).map(|_| random_hex(16)).collect();
        self.release_names = (0..self.disks.len()).map(|_| random_hex(16)).collect();
        let mut g = GraphBuilder::new(self.monitor.get()?, &mut self.record, &self.rpath);
        g.log_ahead(self.names.iter().flat_map(|n| {
            [
                Step::Export {
                    id: n.export.clone(),
                },
                Step::Export {
                    id: n.release.clone(),
                },
            ]
        }))?;
        for (i, ((disk, n), name)) in self
            .disks
            .iter()
            .zip(&self.names)
            .zip(&self.export_names)
            .enumerate()
        {
            let bitmap = self
                .tracking
                .get(i)
                .filter(|t| t.base.is_some())
                .and_then(|t| Some((t.node.as_str(), t.old_bitmap.as_deref()?)));
            g.add_export(disk, n, name, bitmap).await?;
            g.add_release_export(disk, n, &self.release_names[i])
                .await?;
        }
        self.mark("export: exports");
        self.dirty_bytes = self.frozen_dirty_bytes().await?;
        self.setup_ms = ms(self.t0.elapsed());
        Ok(())
    }

    /// Phase `prepare`, change tracking: which disks can be read
    /// incrementally, and our unusable bitmaps removed (they cannot serve
    /// any backup; keeping them would only cost the guest).
    async fn plan_tracking(&mut self) -> Result<(), JobError> {
        let plan = incremental::plan(
            self.monitor.get()?,
            &self.repo,
            &self.opts.vmid,
            &self.disks,
            self.opts.full,
        )
        .await?;
        for (node, name) in &plan.remove {
            if let Err(e) = incremental::remove_bitmap(self.monitor.get()?, node, name).await {
                self.warn(format!(
                    "could not remove stale change-tracking bitmap {name}: {}",
                    chain(&e)
                ));
            }
        }
        for w in plan.warnings {
            self.warn(w);
        }
        self.tracking = plan.disks;
        Ok(())
    }

    /// Phase `insert`, first step: the bitmap split of every disk in one
    /// transaction, while the guest is held. If QEMU refuses it, the
    /// backup goes on with full reads and no tracking (said in the output).
    async fn split_bitmaps(&mut self, ahead: Vec<Step>) -> Result<(), JobError> {
        if self.tracking.is_empty() {
            return graph::log_ahead(&mut self.record, &self.rpath, ahead);
        }
        let mut actions = Vec::new();
        for t in &self.tracking {
            self.record.steps.push(Step::BitmapSplit {
                node: t.node.clone(),
                old: t.old_bitmap.clone(),
                new: t.new_bitmap.clone(),
            });
            actions.extend(t.split_actions());
        }
        graph::log_ahead(&mut self.record, &self.rpath, ahead)?;
        if let Err(e) = self.monitor.get()?.transaction(&actions).await {
            // The transaction is atomic: nothing changed; drop the steps.
            self.record
                .steps
                .retain(|s| !matches!(s, Step::BitmapSplit { .. }));
            self.record.save(&self.rpath).map_err(JobError::Record)?;
            self.tracking.clear();
            self.warn(format!(
                "QEMU refused the change-tracking bitmaps ({}); every disk is read in full and \
                 the next backup will be full too",
                chain(&JobError::qmp("transaction")(e))
            ));
        }
        Ok(())
    }

    /// The dirty byte count of each incremental disk's frozen bitmap.
    async fn frozen_dirty_bytes(&self) -> Result<Vec<Option<u64>>, JobError> {
        if self.tracking.iter().all(|t| t.base.is_none()) {
            return Ok(vec![None; self.disks.len()]);
        }
        let nodes = self
            .monitor
            .get()?
            .query_named_block_nodes()
            .await
            .map_err(JobError::qmp("query-named-block-nodes"))?;
        Ok((0..self.disks.len())
            .map(|i| {
                let t = self.tracking.get(i).filter(|t| t.base.is_some())?;
                let old = t.old_bitmap.as_deref()?;
                nodes
                    .iter()
                    .find(|n| n.node_name == t.node)?
                    .dirty_bitmaps
                    .iter()
                    .find(|b| b.name == old)
                    .map(|b| b.count)
            })
            .collect())
    }

    /// After a successful read: the split stays (the new bitmaps count from
    /// this backup's freeze); the old bitmaps go at teardown.
    fn retire_bitmaps(&mut self) -> Result<(), JobError> {
        let steps = std::mem::take(&mut self.record.steps);
        self.record.steps = steps
            .into_iter()
            .filter_map(|s| match s {
                Step::BitmapSplit {
                    node,
                    old: Some(old),
                    ..
                } => Some(Step::BitmapRetire { node, name: old }),
                Step::BitmapSplit { old: None, .. } => None,
                s => Some(s),
            })
            .collect();
        self.record.save(&self.rpath).map_err(JobError::Record)
    }

    /// What the data path needs to read disk `i`.
    fn disk_job(&self, i: usize, disk: &VmDisk, export: &str) -> DiskJob {
        let dirty = self.dirty_bytes.get(i).copied().flatten();
        let (incremental, read) = match self.tracking.get(i) {
            Some(t) => (
                t.base
                    .as_ref()
                    .and_then(|b| Some((t.old_bitmap.clone()?, Arc::clone(&b.digests)))),
                t.read_record(&disk.filename, dirty),
            ),
            None => (
                None,
                repo::DiskRead {
                    kind: repo::ReadKind::Full,
                    full_reason: Some("change tracking could not be set up".into()),
                    base: None,
                    dirty_bytes: None,
                    bitmap: None,
                    bitmap_persistent: false,
                    filename: disk.filename.clone(),
                    fleece_peak_bytes: None,
                },
            ),
        };
        DiskJob {
            disk: disk.clone(),
            source: nbd_export::ExportSource::unix(self.nbd_socket(), export),
            incremental,
            read,
            fleece: self.fleece_files.get(i).cloned(),
            release: self
                .release_names
                .get(i)
                .map(|r| nbd_export::ExportSource::unix(self.nbd_socket(), r)),
        }
    }

    fn nbd_socket(&self) -> PathBuf {
        self.nbd_dir.join("nbd.sock")
    }

    /// Phase `read`: the data path on dedicated threads, into a new
    /// repository session. The session is aborted on failure.
    async fn read(&mut self) -> Result<PendingCommit, JobError> {
        let t_read = Instant::now();
        let base = self
            .tracking
            .iter()
            .find_map(|t| t.base.as_ref().map(|b| b.backup.clone()));
        let meta = repo::BackupMeta {
            zstd_level: self.opts.zstd_level,
            base,
            ..repo::BackupMeta::new(&self.opts.vmid, &self.vm_name)
        };
        let session = datapath::begin_session(&self.repo, &meta).await?;
        let jobs: Vec<DiskJob> = self
            .disks
            .iter()
            .zip(&self.export_names)
            .enumerate()
            .map(|(i, (disk, export))| self.disk_job(i, disk, export))
            .collect();
        let dp = DataPathConfig::new(
            self.opts.workers,
            self.opts.connections,
            self.opts.bwlimit_kib,
            self.opts.priority,
        );
        let read = datapath::read_all_blocking(
            session,
            jobs,
            dp,
            self.cancel.clone(),
            self.observer.clone(),
        )
        .await;
        match read {
            Ok((session, disks)) => Ok(PendingCommit {
                session,
                disks,
                read_ms: ms(t_read.elapsed()),
            }),
            Err(e) => {
                let _ = self.reconnect().await;
                Err(super::diagnose::explain(self.monitor.conn(), &self.opts.fleecing_dir, e).await)
            }
        }
    }

    /// Phase `teardown`: undo whatever the record still holds (on every
    /// path), then let the watchdog go if the guest is released.
    async fn teardown(&mut self) -> Result<(), JobError> {
        self.phase(Phase::Teardown);
        if let Err(e) = self.reconnect().await {
            // Someone holds the monitor: the record stays for the watchdog,
            // `shear cleanup` and the next run.
            self.release_watchdog_if_released();
            return Err(e);
        }
        let teardown = graph::undo(
            self.monitor.conn(),
            self.opts.qga.as_deref(),
            &mut self.record,
            &self.rpath,
        )
        .await;
        self.mark("teardown: graph undone");
        let released = !self.still_held();
        match (&teardown, self.watchdog.take()) {
            (Ok(()), Some(w)) => w.finish(),
            // Teardown failed: if the guest may still be held, leave the
            // watchdog's pipe to close so it rescues the guest.
            (Err(_), Some(w)) if released => w.finish(),
            (_, w) => drop(w),
        }
        if !released {
            let cause = match (self.thaw_unconfirmed.take(), teardown) {
                (_, Err(e)) => e,
                (Some(e), Ok(())) => JobError::qga("thaw")(e),
                (None, Ok(())) => JobError::Invalid("the release step is still recorded".into()),
            };
            return Err(JobError::GuestNotReleased {
                vmid: self.opts.vmid.clone(),
                state: if self.record.steps.contains(&Step::Freeze) {
                    "frozen"
                } else {
                    "paused"
                },
                source: Box::new(cause),
            });
        }
        teardown
    }

    /// Reconnect the monitor (let go during the read) and act on what
    /// changed while away: QEMU gone or replaced means its graph is gone
    /// (or not ours): teardown then only removes our files.
    async fn reconnect(&mut self) -> Result<(), JobError> {
        match self.monitor.reconnect().await? {
            Reconnect::Same => {}
            Reconnect::Gone(why) => self.warn(format!(
                "QEMU is gone since the read began ({why}): its graph went with it"
            )),
            Reconnect::Replaced { was, now } => self.warn(format!(
                "another QEMU process (pid {now}, was {was}) answers on {} now: the graph shear \
                 changed went with the old one; the new one is left alone",
                self.opts.qmp.display()
            )),
        }
        Ok(())
    }

    /// Setup reconnects after letting the monitor go for the fleece files:
    /// anything but the same QEMU fails the backup (nothing of ours is in
    /// the graph yet).
    async fn reconnect_for_setup(&mut self) -> Result<(), JobError> {
        match self.monitor.reconnect().await? {
            Reconnect::Same => Ok(()),
            Reconnect::Gone(why) => Err(JobError::Invalid(format!(
                "QEMU went away during setup ({why})"
            ))),
            Reconnect::Replaced { was, now } => Err(JobError::Invalid(format!(
                "another QEMU process (pid {now}, was {was}) answers on {} since setup began",
                self.opts.qmp.display()
            ))),
        }
    }

    /// Teardown could not run: let the watchdog go only if nothing holds
    /// the guest (it rescues a held guest when its pipe closes).
    fn release_watchdog_if_released(&mut self) {
        if let Some(w) = self.watchdog.take() {
            if self.still_held() {
                drop(w);
            } else {
                w.finish();
            }
        }
    }

    /// Whether the record still holds a freeze or pause of ours.
    fn still_held(&self) -> bool {
        self.record
            .steps
            .iter()
            .any(|s| matches!(s, Step::Freeze | Step::Pause))
    }

    /// Phase `commit`: the manifest, only if the data path succeeded and
    /// the guest is released. A teardown that failed after the guest was
    /// released (a filter that could not be removed) is a warning.
    fn commit(
        mut self,
        result: Result<PendingCommit, JobError>,
        teardown: Result<(), JobError>,
    ) -> Result<BackupReport, JobError> {
        let pending = match (result, teardown) {
            (Err(e), teardown) => {
                return Err(match teardown {
                    // A guest that may still be held matters more than why
                    // the backup failed; the failure is logged.
                    Err(t @ JobError::GuestNotReleased { .. }) => {
                        tracing::error!(error = %chain(&e), "backup failed");
                        t
                    }
                    Err(te) => {
                        tracing::error!(error = %chain(&te), "teardown after a failed backup also failed");
                        e
                    }
                    Ok(()) => e,
                });
            }
            (Ok(p), Err(e @ JobError::GuestNotReleased { .. })) => {
                p.session.abort();
                return Err(e);
            }
            (Ok(p), Err(e)) => {
                self.warn(format!("teardown: {}", chain(&e)));
                p
            }
            (Ok(p), Ok(())) => p,
        };
        self.phase(Phase::Commit);
        let incremental = pending
            .disks
            .iter()
            .any(|d| d.kind == repo::ReadKind::Incremental);
        let info = repo::CommitInfo {
            mode: if incremental {
                repo::BackupMode::Incremental
            } else {
                repo::BackupMode::Full
            },
            consistency: self.consistency,
            vm_mode: self.opts.mode.as_str().to_string(),
            vm_config: std::mem::take(&mut self.vm_config),
            notes: render_notes(
                &self.opts.notes_template,
                &self.opts.vmid,
                &self.vm_name,
                &self.opts.node,
            ),
            freeze_window_ms: self.freeze_window_ms,
        };
        let id = pending
            .session
            .commit(&info)
            .map_err(JobError::repo("committing the manifest"))?;
        self.mark("commit: manifest");
        Ok(BackupReport {
            backup_id: id.to_string(),
            vmid: self.opts.vmid.clone(),
            mode: self.opts.mode,
            consistency: self.consistency,
            freeze_window_ms: self.freeze_window_ms,
            disks: pending.disks,
            setup_ms: self.setup_ms,
            read_ms: pending.read_ms,
            total_ms: ms(self.t0.elapsed()),
            warnings: self.warnings,
        })
    }
}

/// Refuse a RAM-backed or too small fleecing directory before the guest is
/// touched (see [`super::fleece`]); a warning when RAM was allowed.
fn check_fleecing(opts: &BackupOptions, disks: &[VmDisk]) -> Result<Option<String>, JobError> {
    private_dir(&opts.fleecing_dir)?;
    let allocated = disks
        .iter()
        .map(|d| d.allocated_size.unwrap_or(d.virtual_size))
        .fold(0u64, u64::saturating_add);
    let space = super::fleece::check(&opts.fleecing_dir, allocated, opts.fleecing)?;
    Ok(space.ram_backed.then(|| {
        format!(
            "fleecing directory {} is in RAM (allowed by configuration)",
            opts.fleecing_dir.display()
        )
    }))
}

/// A spawned task aborted when dropped (a phase that fails before it
/// joins the task does not leave it running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects to qemu-ga at `path` (greeting and sync within
/// [`QGA_CONNECT_TIMEOUT`]); the error is the warning to print.
async fn connect_qga(
    path: Option<PathBuf>,
    freeze_timeout: Duration,
) -> Result<guest_agent::GuestAgent, String> {
    match path {
        Some(path) if path.exists() => {
            let mut cfg = guest_agent::Config::default();
            cfg.connect_timeout = QGA_CONNECT_TIMEOUT;
            cfg.freeze_timeout = freeze_timeout;
            guest_agent::GuestAgent::connect(&path, cfg)
                .await
                .map_err(|e| {
                    format!(
                        "qemu-ga not answering ({}); backup is crash-consistent",
                        chain(&e)
                    )
                })
        }
        Some(path) => Err(format!(
            "no qemu-ga socket at {}; backup is crash-consistent",
            path.display()
        )),
        None => Err("no qemu-ga socket configured; backup is crash-consistent".into()),
    }
}

/// The VM's name (`query-name`), or empty.
async fn qmp_vm_name(qmp: &qmp::Qmp) -> String {
    qmp.execute_value("query-name", serde_json::Value::Null)
        .await
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// Test-only (feature `test-hooks`): run the held hook while the guest is
/// held with every filter in place.
async fn run_held_hook(
    hook: &Path,
    opts: &BackupOptions,
    disks: &[VmDisk],
    names: &[NodeNames],
) -> Result<(), JobError> {
    let nodes: Vec<String> = disks.iter().map(|d| d.node.clone()).collect();
    let cbws: Vec<String> = names.iter().map(|n| n.cbw.clone()).collect();
    let st = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(hook)
            .env("SHEAR_VMID", &opts.vmid)
            .env("SHEAR_SOURCE_NODES", nodes.join(" "))
            .env("SHEAR_CBW_NODES", cbws.join(" "))
            .kill_on_drop(true)
            .status(),
    )
    .await
    .map_err(|_| JobError::Invalid("held hook timed out".into()))?
    .map_err(|e| JobError::io(format!("running held hook {}", hook.display()), e))?;
    if !st.success() {
        return Err(JobError::Invalid(format!("held hook exited with {st}")));
    }
    Ok(())
}

/// How the guest is held while the filters go in.
#[derive(Debug, Default)]
pub(super) enum Hold {
    /// Frozen through qemu-ga by us (boxed: the guard is large).
    Frozen(Box<guest_agent::FreezeGuard>),
    /// Paused (`stop`) by us.
    Paused,
    /// Shut down (stop mode); resumed with `system_reset` + `cont`.
    ShutDown,
    /// Not held (the VM was already paused by someone else, or released).
    #[default]
    None,
}

/// Milliseconds of a duration, saturating.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

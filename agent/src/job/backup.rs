//! `shear backup`: a consistent, point-in-time backup of a running VM.
//!
//! Order of operations (design.md §2), each graph change write-ahead logged
//! in the [`RunRecord`] so one undo path serves success, error, signals and
//! a later run after SIGKILL:
//!
//! 1. lock the VM (one backup per VM), connect QMP, clean up leftovers of a
//!    killed run, discover the disks;
//! 2. start the thaw watchdog; create the fleece images and add their nodes;
//! 3. **hold** the guest: freeze through qemu-ga (snapshot mode), or `stop`
//!    (suspend mode, or no agent), or an orderly shutdown (stop mode);
//! 4. insert the copy-before-write filters on all disks (same instant),
//!    then the snapshot-access nodes;
//! 5. **release** at once: thaw / `cont` / `system_reset`+`cont`;
//! 6. NBD server on a private socket, one read-only export per disk;
//! 7. the data path (dedicated threads): block status → read allocated
//!    extents → hash, compress, store → index;
//! 8. teardown (reverse order), then the manifest: the commit point.
//!
//! Whatever fails, the guest is released and the graph restored; no
//! manifest is written.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::datapath::{read_all, DataPathConfig};
use super::graph::{self, GraphBuilder, NodeNames, VmDisk};
use super::record::{record_path, RunRecord, Step};
use super::watchdog::Watchdog;
use super::{chain, JobError};
use crate::repo::{self, Consistency, Repository};

/// How long connecting to QMP may take.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to qemu-ga may take before the backup goes on
/// crash-consistent (F-01 asks for ≤ 2 s).
const QGA_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `cbw-timeout`: below every guest's disk timeout (virtio-win: 60 s).
pub const DEFAULT_CBW_TIMEOUT_S: u32 = 45;

/// Backup mode, as vzdump names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Live: freeze (if qemu-ga answers), insert filters, thaw at once.
    Snapshot,
    /// Pause the vCPUs while the filters go in.
    Suspend,
    /// Orderly shutdown, filters in, boot again at once; back up the clean state.
    Stop,
}

impl Mode {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Snapshot => "snapshot",
            Mode::Suspend => "suspend",
            Mode::Stop => "stop",
        }
    }
}

/// Everything a backup run needs to know.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// VM id.
    pub vmid: String,
    /// QMP socket (a monitor of our own).
    pub qmp: PathBuf,
    /// qemu-ga socket; `None` or absent means crash-consistent.
    pub qga: Option<PathBuf>,
    /// Mode.
    pub mode: Mode,
    /// Run directory (record, lock, NBD socket dir).
    pub run_dir: PathBuf,
    /// Fleecing images directory.
    pub fleecing_dir: PathBuf,
    /// What the fleecing directory must satisfy (not RAM, free space).
    pub fleecing: super::fleece::FleecePolicy,
    /// zstd level; `None` = the repository's default.
    pub zstd_level: Option<i32>,
    /// Hash/compress worker threads.
    pub workers: usize,
    /// NBD connections per disk.
    pub connections: usize,
    /// Bandwidth limit on reads, KiB/s (0 = none).
    pub bwlimit_kib: u64,
    /// Disk names to skip.
    pub exclude: Vec<String>,
    /// Notes template (vzdump's): `{{vmid}}`, `{{guestname}}`, `{{node}}`.
    pub notes_template: String,
    /// This host's name, for `{{node}}`.
    pub node: String,
    /// Deadline of `guest-fsfreeze-freeze`; on expiry the backup goes on
    /// crash-consistent (the guest is thawed first).
    pub freeze_timeout: Duration,
    /// `cbw-timeout` in seconds.
    pub cbw_timeout_s: u32,
    /// Stop mode: how long the guest may take to shut down.
    pub stop_timeout: Duration,
    /// Show a progress bar per disk on stderr (the CLI sets it on a TTY).
    pub progress: bool,
    /// Test-only: a program run while the guest is held with every filter
    /// in place (to take a ground-truth copy). From `$SHEAR_TEST_FROZEN_HOOK`.
    pub held_hook: Option<PathBuf>,
}

/// Render a vzdump notes template (`\n` in the template is a newline).
pub fn render_notes(template: &str, vmid: &str, guestname: &str, node: &str) -> String {
    template
        .replace("{{vmid}}", vmid)
        .replace("{{guestname}}", guestname)
        .replace("{{node}}", node)
        .replace("\\n", "\n")
}

/// Per-disk figures of a finished backup.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// Disk name.
    pub name: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// Bytes read from the export.
    pub bytes_read: u64,
    /// Bytes skipped without reading (holes / zero extents).
    pub bytes_skipped: u64,
    /// Bytes written to the repository (compressed, new chunks only).
    pub bytes_stored: u64,
    /// Plaintext bytes already in the repository.
    pub bytes_deduplicated: u64,
    /// Whole-image digest.
    pub image_digest: String,
}

/// What `shear backup --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The committed backup id.
    pub backup_id: String,
    /// VM id.
    pub vmid: String,
    /// Mode used.
    pub mode: Mode,
    /// `application` or `crash`.
    pub consistency: Consistency,
    /// Milliseconds the guest was held (frozen or paused); `None` if never.
    pub freeze_window_ms: Option<u64>,
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// Setup (lock → exports ready), ms.
    pub setup_ms: u64,
    /// Data path, ms.
    pub read_ms: u64,
    /// Whole run, ms.
    pub total_ms: u64,
    /// Things the user should know (crash-consistent fallback, leftovers
    /// cleaned up, teardown trouble).
    pub warnings: Vec<String>,
}

/// Set by SIGINT/SIGTERM handlers; checked between steps and per chunk.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>, Arc<std::sync::Mutex<Option<&'static str>>>);

impl Cancel {
    /// Request cancellation, naming the cause (`SIGINT`, …).
    pub fn cancel(&self, why: &'static str) {
        if let Ok(mut w) = self.1.lock() {
            w.get_or_insert(why);
        }
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub(super) fn check(&self) -> Result<(), JobError> {
        if self.is_cancelled() {
            let why = self.1.lock().ok().and_then(|w| *w).unwrap_or("a signal");
            return Err(JobError::Interrupted(why));
        }
        Ok(())
    }
}

/// Exclusive per-VM lock in the run directory (F-30: one backup per VM).
#[derive(Debug)]
pub(crate) struct VmLock {
    _file: std::fs::File,
}

pub(crate) fn lock_vm(run_dir: &Path, vmid: &str) -> Result<VmLock, JobError> {
    let path = run_dir.join(format!("backup-{vmid}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| JobError::io(format!("opening lock {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(VmLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(JobError::Busy(vmid.to_string())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(JobError::io(format!("locking {}", path.display()), e))
        }
    }
}

fn private_dir(path: &Path) -> Result<(), JobError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| JobError::io(format!("creating {}", path.display()), e))
}

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

/// How the guest is held while the filters go in.
enum Hold {
    /// Frozen through qemu-ga by us (boxed: the guard is large).
    Frozen(Box<guest_agent::FreezeGuard>),
    /// Paused (`stop`) by us.
    Paused,
    /// Shut down (stop mode); resumed with `system_reset` + `cont`.
    ShutDown,
    /// Not held (the VM was already paused by someone else).
    None,
}

/// Run one backup. The repository is opened by the caller.
pub async fn run_backup(
    repo: Arc<Repository>,
    opts: BackupOptions,
    cancel: Cancel,
) -> Result<BackupReport, JobError> {
    let t0 = Instant::now();
    private_dir(&opts.run_dir)?;
    let _lock = lock_vm(&opts.run_dir, &opts.vmid)?;
    let (qmp, _events) = qmp::Qmp::connect(&opts.qmp, QMP_CONNECT_TIMEOUT)
        .await
        .map_err(JobError::qmp("connect"))?;
    let mut warnings = Vec::new();
    // Before anything changes in it (leftovers included): is it this VM?
    warnings.extend(super::identity::verify(&qmp, &opts.vmid).await?);
    if let Some(w) = cleanup_leftovers(&qmp, &opts.run_dir, &opts.vmid).await? {
        tracing::warn!("{w}");
        warnings.push(w);
    }
    cancel.check()?;

    let rpath = record_path(&opts.run_dir, &opts.vmid);
    let mut record = RunRecord::new(&opts.vmid, &opts.qmp, opts.qga.as_deref());
    let mut watchdog = None;
    let result = backup_inner(
        &repo,
        &opts,
        &cancel,
        &qmp,
        &mut record,
        &rpath,
        &mut watchdog,
        &mut warnings,
        t0,
    )
    .await;

    // Teardown on every path: undo whatever is still recorded.
    let teardown = graph::undo(Some(&qmp), opts.qga.as_deref(), &mut record, &rpath).await;
    let released = !record
        .steps
        .iter()
        .any(|s| matches!(s, Step::Freeze | Step::Pause));
    match (&teardown, watchdog) {
        (Ok(()), Some(w)) => w.finish(),
        // Teardown failed: if the guest may still be held, leave the
        // watchdog's pipe to close so it rescues the guest.
        (Err(_), Some(w)) if released => w.finish(),
        _ => {}
    }
    match result {
        Ok(pending) => {
            if let Err(e) = &teardown {
                if !released {
                    // Never report success while the guest may be held.
                    pending.session.abort();
                    return Err(JobError::NotReleased(chain(e)));
                }
                warnings.push(format!("teardown: {}", chain(e)));
            }
            pending.commit(t0, warnings)
        }
        Err(e) => {
            if let Err(te) = &teardown {
                tracing::error!(error = %chain(te), "teardown after a failed backup also failed");
            }
            Err(e)
        }
    }
}

/// A backup whose data and indexes are durable; committing writes the
/// manifest.
struct PendingCommit {
    session: repo::BackupSession,
    info: repo::CommitInfo,
    report: BackupReport,
}

impl PendingCommit {
    fn commit(self, t0: Instant, warnings: Vec<String>) -> Result<BackupReport, JobError> {
        let id = self
            .session
            .commit(&self.info)
            .map_err(JobError::repo("committing the manifest"))?;
        let mut report = self.report;
        report.backup_id = id.to_string();
        report.total_ms = ms(t0.elapsed());
        report.warnings = warnings;
        Ok(report)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[allow(clippy::too_many_arguments)]
async fn backup_inner(
    repo: &Arc<Repository>,
    opts: &BackupOptions,
    cancel: &Cancel,
    qmp: &qmp::Qmp,
    record: &mut RunRecord,
    rpath: &Path,
    watchdog: &mut Option<Watchdog>,
    warnings: &mut Vec<String>,
    t0: Instant,
) -> Result<PendingCommit, JobError> {
    let all = graph::discover_disks(qmp).await?;
    let disks: Vec<VmDisk> = all
        .into_iter()
        .filter(|d| !opts.exclude.iter().any(|x| x == &d.name))
        .collect();
    if disks.is_empty() {
        return Err(JobError::Invalid(format!(
            "VM {} has no disks to back up",
            opts.vmid
        )));
    }
    warnings.extend(check_fleecing(opts, &disks)?);
    let status = qmp
        .query_status()
        .await
        .map_err(JobError::qmp("query-status"))?;
    let was_running = status.running;
    let vm_name = qmp_vm_name(qmp).await;
    let vm_config = vm_config_json(qmp, &disks).await;

    // qemu-ga, only when the guest runs (a paused guest cannot answer).
    let mut agent = None;
    if opts.mode == Mode::Snapshot && was_running {
        match &opts.qga {
            Some(path) if path.exists() => {
                let mut cfg = guest_agent::Config::default();
                cfg.connect_timeout = QGA_CONNECT_TIMEOUT;
                cfg.freeze_timeout = opts.freeze_timeout;
                match guest_agent::GuestAgent::connect(path, cfg).await {
                    Ok(a) => agent = Some(a),
                    Err(e) => warnings.push(format!(
                        "qemu-ga not answering ({}); backup is crash-consistent",
                        chain(&e)
                    )),
                }
            }
            Some(path) => warnings.push(format!(
                "no qemu-ga socket at {}; backup is crash-consistent",
                path.display()
            )),
            None => {
                warnings.push("no qemu-ga socket configured; backup is crash-consistent".into());
            }
        }
    } else if !was_running {
        warnings.push(format!(
            "VM is {} (not running): no freeze; backup is crash-consistent",
            status.status
        ));
    }
    cancel.check()?;

    // Private directories, watchdog, fleece images (nothing the guest sees).
    let tag = random_hex(3);
    let nbd_dir = opts.run_dir.join(format!("nbd-{}-{tag}", opts.vmid));
    private_dir(&opts.fleecing_dir)?;
    let names: Vec<NodeNames> = (0..disks.len()).map(|i| NodeNames::new(&tag, i)).collect();
    {
        let mut g = GraphBuilder::new(qmp, record, rpath);
        g.log(Step::Dir {
            path: nbd_dir.clone(),
        })?;
        private_dir(&nbd_dir)?;
        for (disk, n) in disks.iter().zip(&names) {
            let file = opts
                .fleecing_dir
                .join(format!("{}-{}-{tag}.fleece.qcow2", opts.vmid, disk.name));
            g.add_fleece(disk, n, &file).await?;
            cancel.check()?;
        }
    }
    *watchdog = Some(
        Watchdog::spawn(&opts.qmp, opts.qga.as_deref(), &opts.run_dir, &opts.vmid)
            .map_err(|e| JobError::io("starting the thaw watchdog", e))?,
    );

    // Hold the guest.
    let mut consistency = Consistency::Crash;
    let mut hold_start = Instant::now();
    let mut hold = match opts.mode {
        // A VM someone else paused is not ours to shut down, reset or
        // resume (F-29): back it up as it is.
        Mode::Stop if !was_running => Hold::None,
        Mode::Stop => {
            stop_guest(qmp, record, rpath, watchdog, opts.stop_timeout, cancel).await?;
            consistency = Consistency::Application;
            Hold::ShutDown
        }
        Mode::Snapshot if agent.is_some() => {
            let a = agent
                .take()
                .ok_or_else(|| JobError::Invalid("agent vanished".into()))?;
            GraphBuilder::new(qmp, record, rpath).log(Step::Freeze)?;
            report(watchdog, "frozen");
            match guest_agent::FreezeGuard::freeze(a, guest_agent::FreezeScope::All).await {
                Ok(guard) => {
                    consistency = Consistency::Application;
                    Hold::Frozen(Box::new(guard))
                }
                Err(e) => {
                    let already = matches!(e, guest_agent::Error::AlreadyFrozen);
                    // The guard ran its thaw loop; it says whether the guest
                    // is confirmed thawed. If not, the recorded freeze stays:
                    // teardown (and the watchdog, and the next run) keep
                    // trying to thaw it.
                    let thaw_unconfirmed = matches!(
                        &e,
                        guest_agent::Error::FreezeFailed {
                            thaw_error: Some(_),
                            ..
                        }
                    );
                    if already {
                        // Not ours: never thaw it (F-05).
                        GraphBuilder::new(qmp, record, rpath).forget(&Step::Freeze)?;
                        report(watchdog, "thawed");
                        warnings.push(
                            "guest filesystems already frozen by someone else: not freezing, \
                             not thawing; backup is crash-consistent"
                                .into(),
                        );
                    } else if thaw_unconfirmed {
                        warnings.push(format!(
                            "fsfreeze failed and the guest could not be confirmed thawed ({}); \
                             will keep trying; pausing instead; backup is crash-consistent",
                            chain(&e)
                        ));
                    } else {
                        GraphBuilder::new(qmp, record, rpath).forget(&Step::Freeze)?;
                        report(watchdog, "thawed");
                        warnings.push(format!(
                            "fsfreeze failed ({}); guest thawed, pausing instead; backup is \
                             crash-consistent",
                            chain(&e)
                        ));
                    }
                    hold_start = Instant::now();
                    pause(qmp, record, rpath, watchdog, was_running).await?
                }
            }
        }
        _ => pause(qmp, record, rpath, watchdog, was_running).await?,
    };
    let held = !matches!(hold, Hold::None);

    // Filters on every disk at the same instant, then the access nodes.
    let inserted = async {
        let mut g = GraphBuilder::new(qmp, record, rpath);
        for (disk, n) in disks.iter().zip(&names) {
            g.insert_filter(disk, n, opts.cbw_timeout_s).await?;
        }
        for (disk, n) in disks.iter().zip(&names) {
            g.add_access(disk, n).await?;
        }
        Ok::<(), JobError>(())
    }
    .await;
    let inserted = match (inserted, &opts.held_hook) {
        (Ok(()), Some(hook)) => run_held_hook(hook, opts, &disks, &names).await,
        (r, _) => r,
    };

    // Release at once, whatever happened. The window is the freeze as the
    // guard measured it (freeze sent → thaw answered), else hold → release.
    let release = release(qmp, record, rpath, watchdog, &mut hold).await;
    let freeze_window_ms = match &release {
        Ok(Some(w)) => Some(ms(*w)),
        _ => held.then(|| ms(hold_start.elapsed())),
    };
    inserted?;
    release?;
    cancel.check()?;

    // NBD exports on a private socket.
    let socket = nbd_dir.join("nbd.sock");
    let export_names: Vec<String> = (0..disks.len()).map(|_| random_hex(16)).collect();
    {
        let mut g = GraphBuilder::new(qmp, record, rpath);
        let max_conn = u32::try_from(disks.len() * opts.connections.max(1)).unwrap_or(u32::MAX);
        g.start_nbd_server(&socket, max_conn).await?;
        for ((disk, n), name) in disks.iter().zip(&names).zip(&export_names) {
            g.add_export(disk, n, name).await?;
        }
    }
    let setup_ms = ms(t0.elapsed());
    cancel.check()?;

    // The data path, on dedicated threads.
    let t_read = Instant::now();
    let meta = repo::BackupMeta {
        zstd_level: opts.zstd_level,
        ..repo::BackupMeta::new(&opts.vmid, &vm_name)
    };
    let session = match repo.begin_backup(&meta) {
        // Backup ids have one-second resolution: a second backup of the
        // same VM within a second waits for the next one.
        Err(e) if e.kind() == repo::ErrorKind::AlreadyExists => {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            repo.begin_backup(&meta)
        }
        r => r,
    }
    .map_err(JobError::repo("starting the backup"))?;
    let jobs: Vec<(VmDisk, String)> = disks.iter().cloned().zip(export_names).collect();
    let dp = DataPathConfig {
        socket: socket.clone(),
        workers: opts.workers.max(1),
        connections: opts.connections.max(1),
        bwlimit_bytes: opts.bwlimit_kib.saturating_mul(1024),
        progress: opts.progress,
    };
    let cancel2 = cancel.clone();
    let (session, disk_reports) = tokio::task::spawn_blocking(move || {
        let r = read_all(&session, &jobs, &dp, &cancel2);
        (session, r)
    })
    .await
    .map_err(|e| JobError::Invalid(format!("data path thread failed: {e}")))?;
    let disk_reports = match disk_reports {
        Ok(r) => r,
        Err(e) => {
            session.abort();
            return Err(e);
        }
    };
    let read_ms = ms(t_read.elapsed());

    let info = repo::CommitInfo {
        mode: repo::BackupMode::Full,
        consistency,
        vm_mode: opts.mode.as_str().to_string(),
        vm_config,
        notes: render_notes(&opts.notes_template, &opts.vmid, &vm_name, &opts.node),
        freeze_window_ms,
    };
    Ok(PendingCommit {
        session,
        info,
        report: BackupReport {
            backup_id: String::new(),
            vmid: opts.vmid.clone(),
            mode: opts.mode,
            consistency,
            freeze_window_ms,
            disks: disk_reports,
            setup_ms,
            read_ms,
            total_ms: 0,
            warnings: Vec::new(),
        },
    })
}

fn report(w: &mut Option<Watchdog>, state: &str) {
    if let Some(w) = w.as_mut() {
        if let Err(e) = w.report(state) {
            tracing::warn!("thaw watchdog unreachable: {e}");
        }
    }
}

/// Pause the vCPUs (unless someone else already paused the VM: then it is
/// not ours to resume, F-29).
async fn pause(
    qmp: &qmp::Qmp,
    record: &mut RunRecord,
    rpath: &Path,
    watchdog: &mut Option<Watchdog>,
    was_running: bool,
) -> Result<Hold, JobError> {
    if !was_running {
        return Ok(Hold::None);
    }
    GraphBuilder::new(qmp, record, rpath).log(Step::Pause)?;
    report(watchdog, "paused");
    qmp.stop().await.map_err(JobError::qmp("stop"))?;
    Ok(Hold::Paused)
}

/// Release the hold; returns the measured freeze window for a freeze.
async fn release(
    qmp: &qmp::Qmp,
    record: &mut RunRecord,
    rpath: &Path,
    watchdog: &mut Option<Watchdog>,
    hold: &mut Hold,
) -> Result<Option<Duration>, JobError> {
    match std::mem::replace(hold, Hold::None) {
        Hold::Frozen(guard) => {
            let thawed = guard
                .thaw()
                .await
                .map_err(JobError::qga("guest-fsfreeze-thaw"))?;
            report(watchdog, "thawed");
            GraphBuilder::new(qmp, record, rpath).forget(&Step::Freeze)?;
            Ok(thawed.freeze_window)
        }
        Hold::Paused => {
            qmp.cont().await.map_err(JobError::qmp("cont"))?;
            report(watchdog, "resumed");
            GraphBuilder::new(qmp, record, rpath).forget(&Step::Pause)?;
            Ok(None)
        }
        Hold::ShutDown => {
            qmp.system_reset()
                .await
                .map_err(JobError::qmp("system_reset"))?;
            qmp.cont().await.map_err(JobError::qmp("cont"))?;
            report(watchdog, "resumed");
            GraphBuilder::new(qmp, record, rpath).forget(&Step::Pause)?;
            Ok(None)
        }
        Hold::None => Ok(None),
    }
}

/// Stop mode: make a guest shutdown pause the VM instead of ending QEMU,
/// ask the guest to power down, wait until it has.
async fn stop_guest(
    qmp: &qmp::Qmp,
    record: &mut RunRecord,
    rpath: &Path,
    watchdog: &mut Option<Watchdog>,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), JobError> {
    let mut g = GraphBuilder::new(qmp, record, rpath);
    // QEMU has no query for the current action; restore its default.
    g.log(Step::ShutdownAction {
        restore: "poweroff".into(),
    })?;
    qmp.execute_value(
        "set-action",
        serde_json::json!({"shutdown": "pause", "reboot": "reset"}),
    )
    .await
    .map_err(JobError::qmp("set-action shutdown=pause"))?;
    // From here the VM is "held": if we die, the watchdog (or the next
    // run) boots it again.
    g.log(Step::Pause)?;
    report(watchdog, "paused");
    qmp.system_powerdown()
        .await
        .map_err(JobError::qmp("system_powerdown"))?;
    let deadline = Instant::now() + timeout;
    loop {
        cancel.check()?;
        let st = qmp
            .query_status()
            .await
            .map_err(JobError::qmp("query-status"))?;
        if !st.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(JobError::Invalid(format!(
                "the guest did not shut down within {timeout:?} (stop mode)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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

/// The VM's name (`query-name`), or empty.
async fn qmp_vm_name(qmp: &qmp::Qmp) -> String {
    qmp.execute_value("query-name", serde_json::Value::Null)
        .await
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// The VM configuration as QEMU reports it: disks, machine, CPUs, memory.
async fn vm_config_json(qmp: &qmp::Qmp, disks: &[VmDisk]) -> serde_json::Value {
    let q = |cmd: &'static str| async move {
        qmp.execute_value(cmd, serde_json::Value::Null)
            .await
            .unwrap_or(serde_json::Value::Null)
    };
    serde_json::json!({
        "name": q("query-name").await,
        "version": q("query-version").await,
        "cpus": q("query-cpus-fast").await,
        "memory": q("query-memory-size-summary").await,
        "machine": q("query-target").await,
        "disks": disks.iter().map(|d| serde_json::json!({
            "name": d.name, "device": d.device, "qdev": d.qdev, "node": d.node,
            "format": d.format, "filename": d.filename, "virtual-size": d.virtual_size,
        })).collect::<Vec<_>>(),
    })
}

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

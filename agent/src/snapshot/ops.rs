//! The snapshot operations on one VM: create, list, rename, describe,
//! rollback, delete, prune. Each connects to QMP for the command only
//! (the hypervisor shares that monitor) and takes the per-VM lock a backup
//! takes (list excepted: it changes nothing).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::record::{self, Listed, QemuSnapshot, SnapshotDisk, SnapshotEntry, SnapshotRecord};
use super::SnapshotError;
use crate::job::lock::{lock_vm_as, private_dir, LockRole, VmLock};
use crate::job::monitor::QMP_CONNECT_TIMEOUT;
use crate::job::watchdog::Watchdog;
use crate::job::JobError;

/// Default age past which a snapshot is flagged (48 h).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(48 * 3600);
/// Default deadline of a `snapshot-save`/`snapshot-load` job.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// Prefix of shear's change-tracking bitmaps (see job::incremental).
const TRACKING_PREFIX: &str = "shear-";

/// Which VM, and where its sockets and shear's state are.
#[derive(Debug, Clone)]
pub struct Target {
    /// VM id.
    pub vmid: String,
    /// QMP socket.
    pub qmp: PathBuf,
    /// qemu-ga socket.
    pub qga: Option<PathBuf>,
    /// Run directory (locks).
    pub run_dir: PathBuf,
    /// State directory (the snapshot records).
    pub state_dir: PathBuf,
    /// Age past which `list` marks a snapshot.
    pub max_age: Duration,
}

/// What `create` is asked to do.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// shear's name.
    pub name: String,
    /// Save the VM's memory and device state too.
    pub vmstate: bool,
    /// The disk to hold it (default: the first disk).
    pub vmstate_disk: Option<String>,
    /// Description.
    pub description: String,
    /// Deadline of `guest-fsfreeze-freeze`.
    pub freeze_timeout: Duration,
    /// Deadline of the `snapshot-save` job.
    pub job_timeout: Duration,
}

/// What `create` did.
#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    /// VM id.
    pub vmid: String,
    /// shear's name.
    pub name: String,
    /// QEMU tag.
    pub tag: String,
    /// With memory.
    pub vmstate: bool,
    /// The disk holding the memory.
    pub vmstate_disk: Option<String>,
    /// `application`, `crash` or `memory`.
    pub consistency: String,
    /// The disks snapshotted.
    pub disks: Vec<String>,
    /// How long the guest was frozen (freeze sent → thaw answered).
    pub freeze_window_ms: Option<u64>,
    /// Whole operation.
    pub took_ms: u64,
    /// Warnings.
    pub warnings: Vec<String>,
}

/// What `rollback` did.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    /// VM id.
    pub vmid: String,
    /// shear's name.
    pub name: String,
    /// `memory` (snapshot-load on the running VM) or `offline` (qemu-img
    /// on the stopped VM's images).
    pub how: String,
    /// Disks rolled back.
    pub disks: Vec<String>,
    /// Tracking bitmaps removed (the next backup reads those disks in full).
    pub bitmaps_removed: Vec<String>,
    /// Whole operation.
    pub took_ms: u64,
    /// Warnings.
    pub warnings: Vec<String>,
}

/// One disk as the snapshot code sees it.
#[derive(Debug, Clone)]
struct Disk {
    name: String,
    node: String,
    format: String,
    filename: String,
    read_only: bool,
    snapshots: Vec<QemuSnapshot>,
    bitmaps: Vec<String>,
}

impl Disk {
    fn has(&self, tag: &str) -> bool {
        self.snapshots.iter().any(|s| s.tag == tag)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn lock(t: &Target) -> Result<VmLock, SnapshotError> {
    private_dir(&t.run_dir)?;
    lock_vm_as(&t.run_dir, &t.vmid, LockRole::Snapshot).map_err(|e| match e {
        JobError::Busy(v) => SnapshotError::Busy(v),
        e => e.into(),
    })
}

/// Whether QEMU listens on the QMP socket (else the VM is stopped).
fn qemu_listening(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Connect and check that it is this VM's QEMU; warnings returned.
async fn connect(t: &Target, warnings: &mut Vec<String>) -> Result<qmp::Qmp, SnapshotError> {
    let (q, _events) = qmp::Qmp::connect(&t.qmp, QMP_CONNECT_TIMEOUT)
        .await
        .map_err(SnapshotError::qmp(format!(
            "connect to {}",
            t.qmp.display()
        )))?;
    if let Some(w) = crate::job::identity::verify(&q, &t.vmid).await? {
        warnings.push(w);
    }
    Ok(q)
}

/// Refuse a VM being migrated, or (`strict`) one not running or
/// never-started (`prelaunch`): paused by someone else, shut down,
/// crashed. Returns whether the vCPUs run.
async fn check_state(q: &qmp::Qmp, vmid: &str, strict: bool) -> Result<bool, SnapshotError> {
    use qmp::RunState;
    let st = q
        .query_status()
        .await
        .map_err(SnapshotError::qmp("query-status"))?;
    let refuse = |why: String| SnapshotError::Refused {
        vmid: vmid.to_string(),
        why,
    };
    let mig = q
        .execute_value("query-migrate", serde_json::Value::Null)
        .await
        .map_err(SnapshotError::qmp("query-migrate"))?;
    let mstatus = mig.get("status").and_then(|s| s.as_str()).unwrap_or("none");
    if !matches!(mstatus, "none" | "completed" | "failed" | "cancelled") {
        return Err(refuse(format!(
            "it is being migrated (migration status {mstatus}); try again when the migration \
             has ended"
        )));
    }
    match st.status {
        RunState::Running | RunState::Prelaunch => Ok(st.running),
        RunState::InMigrate | RunState::PostMigrate | RunState::FinishMigrate => Err(refuse(
            format!("it is in migration state {:?}", st.status.as_str()),
        )),
        _ if !strict => Ok(st.running),
        RunState::Paused => Err(refuse(
            "it is paused by someone else (not by shear); resume it (`cont`) or try again \
             when whoever paused it is done"
                .into(),
        )),
        other => Err(refuse(format!(
            "it is {:?}, not running; a snapshot needs a running (or not yet started) VM",
            other.as_str()
        ))),
    }
}

/// The VM's disks (CD-ROMs skipped) with their snapshots and bitmaps.
async fn vm_disks(q: &qmp::Qmp, notes: &mut Vec<String>) -> Result<Vec<Disk>, SnapshotError> {
    let found = crate::job::graph::discover_disks(q, notes, false).await?;
    let blocks = q
        .query_block()
        .await
        .map_err(SnapshotError::qmp("query-block"))?;
    let nodes = q
        .query_named_block_nodes()
        .await
        .map_err(SnapshotError::qmp("query-named-block-nodes"))?;
    Ok(found
        .into_iter()
        .map(|d| {
            let snaps = blocks
                .iter()
                .filter_map(|b| b.inserted.as_ref())
                .find(|n| n.node_name == d.node)
                .and_then(|n| n.image.as_ref())
                .map(|i| record::parse_qemu_snapshots(i.other.get("snapshots")))
                .unwrap_or_default();
            let bitmaps = nodes
                .iter()
                .find(|n| n.node_name == d.node)
                .map(|n| n.dirty_bitmaps.iter().map(|b| b.name.clone()).collect())
                .unwrap_or_default();
            Disk {
                name: d.name,
                node: d.node,
                format: d.format,
                filename: d.filename,
                read_only: d.read_only,
                snapshots: snaps,
                bitmaps,
            }
        })
        .collect())
}

/// The writable disks, each able to hold internal snapshots (else
/// [`SnapshotError::Unsupported`], before anything changes).
fn snapshot_disks(
    vmid: &str,
    all: Vec<Disk>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Disk>, SnapshotError> {
    let mut out = Vec::new();
    for d in all {
        if d.read_only {
            warnings.push(format!(
                "disk {} is read-only: it cannot change, so it is not snapshotted",
                d.name
            ));
            continue;
        }
        if d.format != "qcow2" {
            return Err(SnapshotError::Unsupported {
                vmid: vmid.to_string(),
                disk: d.name,
                format: d.format,
                filename: d.filename,
            });
        }
        out.push(d);
    }
    if out.is_empty() {
        return Err(SnapshotError::Refused {
            vmid: vmid.to_string(),
            why: "it has no writable disk to snapshot".into(),
        });
    }
    Ok(out)
}

/// Delete `tag` on every disk that has it now (cleanup of a failed create,
/// or `delete`). Returns the disks it was deleted on; errors name the disk.
async fn delete_tag(q: &qmp::Qmp, disks: &[Disk], tag: &str) -> Result<Vec<String>, SnapshotError> {
    let mut notes = Vec::new();
    let now = vm_disks(q, &mut notes).await?;
    let mut done = Vec::new();
    for d in now
        .iter()
        .filter(|d| disks.iter().any(|x| x.node == d.node) && d.has(tag))
    {
        q.execute_value(
            "blockdev-snapshot-delete-internal-sync",
            serde_json::json!({"device": d.node, "name": tag}),
        )
        .await
        .map_err(SnapshotError::qmp(format!(
            "delete snapshot {tag} on disk {}",
            d.name
        )))?;
        done.push(d.name.clone());
    }
    Ok(done)
}

/// After a failed create: take back whatever QEMU left of `tag`, and say
/// so in the error.
async fn undo_create(q: &qmp::Qmp, disks: &[Disk], tag: &str, err: SnapshotError) -> SnapshotError {
    match delete_tag(q, disks, tag).await {
        Ok(v) if v.is_empty() => err,
        Ok(v) => {
            tracing::warn!("removed the partial snapshot {tag} from {}", v.join(", "));
            err
        }
        Err(e) => SnapshotError::Offline(format!(
            "{}; and removing what it left failed: {} — delete snapshot {tag} by hand \
             (QMP blockdev-snapshot-delete-internal-sync)",
            crate::chain(&err),
            crate::chain(&e)
        )),
    }
}

/// `create`: see the module documentation.
pub async fn create(t: &Target, o: &CreateOptions) -> Result<CreateReport, SnapshotError> {
    let t0 = Instant::now();
    record::check_name(&o.name)?;
    let _lock = lock(t)?;
    let mut rec = record::load(&t.state_dir, &t.vmid)?;
    if rec.by_name(&o.name).is_some() {
        return Err(SnapshotError::Exists {
            vmid: t.vmid.clone(),
            name: o.name.clone(),
        });
    }
    let mut warnings = Vec::new();
    let q = connect(t, &mut warnings).await?;
    let running = check_state(&q, &t.vmid, true).await?;
    let all = vm_disks(&q, &mut warnings).await?;
    let disks = snapshot_disks(&t.vmid, all, &mut warnings)?;
    let in_qemu: Vec<String> = disks
        .iter()
        .flat_map(|d| d.snapshots.iter().map(|s| s.tag.clone()))
        .collect();
    let tag = rec.fresh_tag(&o.name, &in_qemu);
    let mut freeze_window_ms = None;
    let (consistency, vmstate_disk) =
        if o.vmstate {
            let vd =
                match &o.vmstate_disk {
                    Some(n) => disks.iter().find(|d| &d.name == n).ok_or_else(|| {
                        SnapshotError::Refused {
                            vmid: t.vmid.clone(),
                            why: format!(
                        "--vmstate-disk {n} is not a writable qcow2 disk of this VM; its disks: {}",
                        disks
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                        }
                    })?,
                    None => &disks[0],
                };
            // No freeze: the saved memory holds the guest's state as it ran
            // (a frozen guest would resume frozen after a rollback).
            let job = format!("shear-snap-{}", random_hex(4));
            let devices: Vec<&str> = disks.iter().map(|d| d.node.as_str()).collect();
            let r = async {
                q.snapshot_save(&job, &tag, &vd.node, &devices)
                    .await
                    .map_err(SnapshotError::qmp("snapshot-save"))?;
                wait_job(&q, &job, o.job_timeout, "snapshot-save").await
            }
            .await;
            if let Err(e) = r {
                return Err(undo_create(&q, &disks, &tag, e).await);
            }
            ("memory".to_string(), Some(vd.name.clone()))
        } else {
            let held = hold_guest(t, running, o.freeze_timeout, &mut warnings).await?;
            let actions: Vec<qmp::TransactionAction> = disks
                .iter()
                .map(|d| {
                    qmp::TransactionAction::raw(
                        "blockdev-snapshot-internal-sync",
                        serde_json::json!({"device": d.node, "name": tag}),
                    )
                })
                .collect();
            let r = q.transaction(&actions).await.map_err(SnapshotError::qmp(
                "transaction blockdev-snapshot-internal-sync",
            ));
            // Thaw on every path, before anything else.
            let consistency = if held.is_some() {
                "application"
            } else {
                "crash"
            };
            freeze_window_ms = release_guest(held).await?;
            if let Err(e) = r {
                return Err(undo_create(&q, &disks, &tag, e).await);
            }
            (consistency.to_string(), None)
        };
    rec.snapshots.push(SnapshotEntry {
        name: o.name.clone(),
        tag: tag.clone(),
        description: o.description.clone(),
        created_unix: now_unix(),
        vmstate: o.vmstate,
        vmstate_disk: vmstate_disk.clone(),
        consistency: consistency.clone(),
        disks: disks
            .iter()
            .map(|d| SnapshotDisk {
                name: d.name.clone(),
                filename: d.filename.clone(),
            })
            .collect(),
    });
    if let Err(e) = record::save(&t.state_dir, &rec) {
        // A snapshot shear cannot name is one nobody will clean up.
        return Err(undo_create(&q, &disks, &tag, e).await);
    }
    Ok(CreateReport {
        vmid: t.vmid.clone(),
        name: o.name.clone(),
        tag,
        vmstate: o.vmstate,
        vmstate_disk,
        consistency,
        disks: disks.iter().map(|d| d.name.clone()).collect(),
        freeze_window_ms,
        took_ms: ms(t0.elapsed()),
        warnings,
    })
}

/// Wait for a snapshot job with a deadline and dismiss it; on timeout
/// cancel it first.
async fn wait_job(
    q: &qmp::Qmp,
    job: &str,
    timeout: Duration,
    what: &str,
) -> Result<(), SnapshotError> {
    match q.wait_job_and_dismiss(job, timeout).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == qmp::ErrorKind::Timeout => {
            let _ = q.job_cancel(job).await;
            let _ = q.wait_job_and_dismiss(job, Duration::from_secs(30)).await;
            Err(SnapshotError::Qmp {
                step: format!(
                    "{what} did not finish within {} s (cancelled)",
                    timeout.as_secs()
                ),
                source: e,
            })
        }
        Err(e) => Err(SnapshotError::Qmp {
            step: what.to_string(),
            source: e,
        }),
    }
}

/// A freeze shear holds, with its watchdog.
struct Held {
    guard: guest_agent::FreezeGuard,
    watchdog: Option<Watchdog>,
}

/// Freeze through qemu-ga when the guest runs and qemu-ga answers; `None`
/// means crash-consistent (the reason is a warning).
async fn hold_guest(
    t: &Target,
    running: bool,
    freeze_timeout: Duration,
    warnings: &mut Vec<String>,
) -> Result<Option<Held>, SnapshotError> {
    if !running {
        warnings.push("the VM is not running: no freeze; the snapshot is crash-consistent".into());
        return Ok(None);
    }
    let Some(qga) = t.qga.as_ref().filter(|p| p.exists()) else {
        warnings.push("no qemu-ga socket: no freeze; the snapshot is crash-consistent".into());
        return Ok(None);
    };
    let mut cfg = guest_agent::Config::default();
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.freeze_timeout = freeze_timeout;
    let agent = match guest_agent::GuestAgent::connect(qga, cfg).await {
        Ok(a) => a,
        Err(e) => {
            warnings.push(format!(
                "qemu-ga not answering ({}); the snapshot is crash-consistent",
                crate::chain(&e)
            ));
            return Ok(None);
        }
    };
    // The watchdog thaws the guest if shear dies while it is frozen.
    let mut watchdog = match Watchdog::spawn(&t.qmp, Some(qga), &t.run_dir, &t.vmid) {
        Ok(w) => Some(w),
        Err(e) => {
            return Err(JobError::io("starting the thaw watchdog", e).into());
        }
    };
    tell(&mut watchdog, "frozen");
    match guest_agent::FreezeGuard::freeze(agent, guest_agent::FreezeScope::All).await {
        Ok(guard) => Ok(Some(Held { guard, watchdog })),
        Err(guest_agent::Error::AlreadyFrozen) => {
            tell(&mut watchdog, "thawed");
            finish(watchdog);
            warnings.push(
                "the guest's filesystems are already frozen by someone else: not freezing, not \
                 thawing; the snapshot is crash-consistent"
                    .into(),
            );
            Ok(None)
        }
        Err(
            e @ guest_agent::Error::FreezeFailed {
                thaw_error: Some(_),
                ..
            },
        ) => {
            // The watchdog (dropped without `done`) keeps thawing.
            drop(watchdog);
            Err(JobError::qga("guest-fsfreeze-freeze")(e).into())
        }
        Err(e) => {
            tell(&mut watchdog, "thawed");
            finish(watchdog);
            warnings.push(format!(
                "fsfreeze failed ({}); guest thawed; the snapshot is crash-consistent",
                crate::chain(&e)
            ));
            Ok(None)
        }
    }
}

fn tell(w: &mut Option<Watchdog>, state: &str) {
    if let Some(w) = w.as_mut() {
        if let Err(e) = w.report(state) {
            tracing::warn!("thaw watchdog unreachable: {e}");
        }
    }
}

fn finish(w: Option<Watchdog>) {
    if let Some(w) = w {
        w.finish();
    }
}

/// Thaw (the guard retries until qemu-ga confirms); the freeze window.
async fn release_guest(held: Option<Held>) -> Result<Option<u64>, SnapshotError> {
    let Some(Held {
        guard,
        mut watchdog,
    }) = held
    else {
        return Ok(None);
    };
    let window = match guard.thaw().await {
        Ok(r) => r.freeze_window.map(ms),
        Err(e) => {
            // Not confirmed: the watchdog goes on trying.
            drop(watchdog);
            return Err(JobError::qga("guest-fsfreeze-thaw")(e).into());
        }
    };
    tell(&mut watchdog, "thawed");
    finish(watchdog);
    Ok(window)
}

/// `list`: what QEMU has, joined with the record. Without a running QEMU,
/// the recorded image files are read (`qemu-img info`).
pub async fn list(t: &Target) -> Result<(Vec<Listed>, Vec<String>), SnapshotError> {
    let rec = record::load(&t.state_dir, &t.vmid)?;
    let mut warnings = Vec::new();
    let per_disk: Vec<(String, Vec<QemuSnapshot>)> = if qemu_listening(&t.qmp) {
        let q = connect(t, &mut warnings).await?;
        let mut notes = Vec::new();
        vm_disks(&q, &mut notes)
            .await?
            .into_iter()
            .filter(|d| !d.read_only)
            .map(|d| (d.name, d.snapshots))
            .collect()
    } else {
        warnings.push(format!(
            "QEMU is not running ({}): listed from the image files recorded at creation",
            t.qmp.display()
        ));
        let mut v = Vec::new();
        for d in recorded_disks(&rec) {
            let info = offline::info(Path::new(&d.filename)).await?;
            v.push((d.name, info.snapshots));
        }
        v
    };
    let max = i64::try_from(t.max_age.as_secs()).unwrap_or(i64::MAX);
    Ok((
        record::reconcile(&rec, &per_disk, now_unix(), max),
        warnings,
    ))
}

/// The disks of the newest record entry (the VM's layout as shear last
/// saw it).
fn recorded_disks(rec: &SnapshotRecord) -> Vec<SnapshotDisk> {
    rec.snapshots
        .iter()
        .max_by_key(|s| s.created_unix)
        .map(|s| s.disks.clone())
        .unwrap_or_default()
}

/// `rename`: the record only (the QEMU tag stays).
pub fn rename(t: &Target, old: &str, new: &str) -> Result<(), SnapshotError> {
    let _lock = lock(t)?;
    let mut rec = record::load(&t.state_dir, &t.vmid)?;
    rec.rename(old, new)?;
    record::save(&t.state_dir, &rec)
}

/// `describe`: the record only.
pub fn describe(t: &Target, name: &str, text: &str) -> Result<(), SnapshotError> {
    let _lock = lock(t)?;
    let mut rec = record::load(&t.state_dir, &t.vmid)?;
    rec.describe(name, text)?;
    record::save(&t.state_dir, &rec)
}

/// The record entry named `name`.
pub fn entry(t: &Target, name: &str) -> Result<SnapshotEntry, SnapshotError> {
    let rec = record::load(&t.state_dir, &t.vmid)?;
    rec.by_name(name)
        .cloned()
        .ok_or_else(|| SnapshotError::NotFound {
            vmid: t.vmid.clone(),
            name: name.to_string(),
        })
}

/// `delete`: the snapshot on every disk that has it, then the record
/// entry. Only snapshots shear made (in the record).
pub async fn delete(t: &Target, name: &str) -> Result<Vec<String>, SnapshotError> {
    let _lock = lock(t)?;
    delete_locked(t, name).await
}

async fn delete_locked(t: &Target, name: &str) -> Result<Vec<String>, SnapshotError> {
    let mut rec = record::load(&t.state_dir, &t.vmid)?;
    let e = rec
        .by_name(name)
        .cloned()
        .ok_or_else(|| SnapshotError::NotFound {
            vmid: t.vmid.clone(),
            name: name.to_string(),
        })?;
    let done = if qemu_listening(&t.qmp) {
        let mut warnings = Vec::new();
        let q = connect(t, &mut warnings).await?;
        check_state(&q, &t.vmid, false).await?;
        let mut notes = Vec::new();
        let disks = vm_disks(&q, &mut notes).await?;
        delete_tag(&q, &disks, &e.tag).await?
    } else {
        let mut done = Vec::new();
        for d in &e.disks {
            let f = Path::new(&d.filename);
            if offline::info(f)
                .await?
                .snapshots
                .iter()
                .any(|s| s.tag == e.tag)
            {
                offline::qemu_img(&["snapshot", "-d", &e.tag, &d.filename]).await?;
                done.push(d.name.clone());
            }
        }
        done
    };
    rec.remove_tag(&e.tag);
    record::save(&t.state_dir, &rec)?;
    Ok(done)
}

/// `rollback`: see the module documentation.
pub async fn rollback(
    t: &Target,
    name: &str,
    job_timeout: Duration,
) -> Result<RollbackReport, SnapshotError> {
    let t0 = Instant::now();
    let _lock = lock(t)?;
    let e = entry(t, name)?;
    let mut warnings = Vec::new();
    if !qemu_listening(&t.qmp) {
        return rollback_offline(t, &e, t0, warnings).await;
    }
    if !e.vmstate {
        return Err(SnapshotError::NeedsStop {
            vmid: t.vmid.clone(),
            name: name.to_string(),
        });
    }
    let q = connect(t, &mut warnings).await?;
    check_state(&q, &t.vmid, true).await?;
    let all = vm_disks(&q, &mut warnings).await?;
    let disks = snapshot_disks(&t.vmid, all, &mut warnings)?;
    if let Some(d) = disks.iter().find(|d| !d.has(&e.tag)) {
        return Err(SnapshotError::Refused {
            vmid: t.vmid.clone(),
            why: format!(
                "snapshot {name:?} (tag {}) is not on disk {} (deleted outside shear, or the disk \
                 was added after it): a rollback must cover every disk; nothing was changed",
                e.tag, d.name
            ),
        });
    }
    let vd_name = e.vmstate_disk.clone().unwrap_or_default();
    let vd = disks
        .iter()
        .find(|d| d.name == vd_name)
        .ok_or_else(|| SnapshotError::Refused {
            vmid: t.vmid.clone(),
            why: format!("the disk holding the snapshot's memory ({vd_name}) is gone from the VM"),
        })?;
    // QEMU refuses to load a snapshot over a disk with dirty bitmaps
    // ("Device has active dirty bitmaps", and the VM is left stopped):
    // refuse over someone else's bitmap before anything changes; shear's
    // own tracking bitmaps go (the rollback makes them wrong anyway: the
    // next backup reads in full, saying why).
    refuse_foreign_bitmaps(&t.vmid, disks.iter().map(|d| (d.name.as_str(), &d.bitmaps)))?;
    let mut removed = Vec::new();
    for d in &disks {
        for b in d.bitmaps.iter().filter(|b| b.starts_with(TRACKING_PREFIX)) {
            crate::job::incremental::remove_bitmap(&q, &d.node, b).await?;
            removed.push(format!("{}:{b}", d.name));
        }
    }
    let job = format!("shear-load-{}", random_hex(4));
    let devices: Vec<&str> = disks.iter().map(|d| d.node.as_str()).collect();
    q.snapshot_load(&job, &e.tag, &vd.node, &devices)
        .await
        .map_err(SnapshotError::qmp("snapshot-load"))?;
    if let Err(err) = wait_job(&q, &job, job_timeout, "snapshot-load").await {
        let st = q
            .query_status()
            .await
            .map(|s| s.status.as_str().to_string())
            .unwrap_or_else(|_| "unknown".into());
        return Err(SnapshotError::Offline(format!(
            "{}; the VM is now {st}: its memory may be partly loaded — reset it or roll back again",
            crate::chain(&err)
        )));
    }
    Ok(RollbackReport {
        vmid: t.vmid.clone(),
        name: name.to_string(),
        how: "memory".into(),
        disks: disks.iter().map(|d| d.name.clone()).collect(),
        bitmaps_removed: removed,
        took_ms: ms(t0.elapsed()),
        warnings,
    })
}

async fn rollback_offline(
    t: &Target,
    e: &SnapshotEntry,
    t0: Instant,
    mut warnings: Vec<String>,
) -> Result<RollbackReport, SnapshotError> {
    // Every image first: all disks or none.
    let mut infos = Vec::new();
    for d in &e.disks {
        let info = offline::info(Path::new(&d.filename)).await?;
        if info.format != "qcow2" || !info.snapshots.iter().any(|s| s.tag == e.tag) {
            return Err(SnapshotError::Refused {
                vmid: t.vmid.clone(),
                why: format!(
                    "image {} of disk {} ({}) has no snapshot {} (deleted outside shear, or the \
                     image was replaced): nothing was changed",
                    d.filename, d.name, info.format, e.tag
                ),
            });
        }
        infos.push(info);
    }
    if e.vmstate {
        warnings.push(
            "the VM is stopped: only the disks were rolled back; its saved memory is not \
             loaded (the guest boots fresh from the snapshot's disk state)"
                .into(),
        );
    }
    refuse_foreign_bitmaps(
        &t.vmid,
        e.disks
            .iter()
            .zip(&infos)
            .map(|(d, i)| (d.name.as_str(), &i.bitmaps)),
    )?;
    let mut removed = Vec::new();
    for (d, info) in e.disks.iter().zip(&infos) {
        for b in info
            .bitmaps
            .iter()
            .filter(|b| b.starts_with(TRACKING_PREFIX))
        {
            offline::qemu_img(&["bitmap", "--remove", &d.filename, b]).await?;
            removed.push(format!("{}:{b}", d.name));
        }
    }
    for d in &e.disks {
        offline::qemu_img(&["snapshot", "-a", &e.tag, &d.filename]).await?;
    }
    Ok(RollbackReport {
        vmid: t.vmid.clone(),
        name: e.name.clone(),
        how: "offline".into(),
        disks: e.disks.iter().map(|d| d.name.clone()).collect(),
        bitmaps_removed: removed,
        took_ms: ms(t0.elapsed()),
        warnings,
    })
}

/// QEMU cannot roll a disk back under a dirty bitmap; one shear did not
/// make is not shear's to remove.
fn refuse_foreign_bitmaps<'a>(
    vmid: &str,
    disks: impl Iterator<Item = (&'a str, &'a Vec<String>)>,
) -> Result<(), SnapshotError> {
    for (disk, bitmaps) in disks {
        if let Some(b) = bitmaps.iter().find(|b| !b.starts_with(TRACKING_PREFIX)) {
            return Err(SnapshotError::Refused {
                vmid: vmid.to_string(),
                why: format!(
                    "disk {disk} has dirty bitmap {b:?}, which shear did not make: QEMU cannot \
                     roll a disk back under a dirty bitmap; remove it (block-dirty-bitmap-remove) \
                     if its owner no longer needs it; nothing was changed"
                ),
            });
        }
    }
    Ok(())
}

/// One snapshot `prune` removed (or would remove).
#[derive(Debug, Clone, Serialize)]
pub struct Pruned {
    /// VM id.
    pub vmid: String,
    /// shear's name.
    pub name: String,
    /// Age in seconds.
    pub age_s: i64,
    /// Removed (false with --dry-run or on error).
    pub removed: bool,
    /// Why not, on error.
    pub error: Option<String>,
}

/// `prune`: delete the snapshots shear made on `t`'s VM older than
/// `older_than` (snapshots made outside shear are never touched).
pub async fn prune(
    t: &Target,
    older_than: Duration,
    dry_run: bool,
) -> Result<Vec<Pruned>, SnapshotError> {
    let rec = record::load(&t.state_dir, &t.vmid)?;
    let now = now_unix();
    let limit = i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    for e in rec
        .snapshots
        .iter()
        .filter(|e| now - e.created_unix > limit)
    {
        let mut p = Pruned {
            vmid: t.vmid.clone(),
            name: e.name.clone(),
            age_s: now - e.created_unix,
            removed: false,
            error: None,
        };
        if !dry_run {
            match delete(t, &e.name).await {
                Ok(_) => p.removed = true,
                Err(err) => p.error = Some(crate::chain(&err)),
            }
        }
        out.push(p);
    }
    Ok(out)
}

/// The VM ids that have a snapshot record in `state_dir`.
pub fn recorded_vmids(state_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state_dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_string();
            let id = n.strip_suffix(".json")?;
            (!crate::fsutil::is_temp_name(&n)).then(|| id.to_string())
        })
        .collect();
    v.sort();
    v
}

/// Per VM with a snapshot record: (vmid, snapshots, age of the oldest in
/// seconds at `now_unix`). Unreadable records are skipped (metrics must
/// not fail on them; `shear snapshot VMID list` reports them).
pub fn recorded_ages(state_dir: &Path, now_unix: i64) -> Vec<(String, usize, i64)> {
    recorded_created(state_dir)
        .into_iter()
        .filter_map(|(v, created)| {
            let oldest = created.iter().copied().min()?;
            Some((v, created.len(), (now_unix - oldest).max(0)))
        })
        .collect()
}

/// Per VM with a snapshot record in `state_dir`: the creation times
/// (Unix seconds) of its snapshots. Unreadable records are skipped, as in
/// [`recorded_ages`].
pub fn recorded_created(state_dir: &Path) -> Vec<(String, Vec<i64>)> {
    recorded_vmids(state_dir)
        .into_iter()
        .filter_map(|v| {
            let r = record::load(state_dir, &v).ok()?;
            let c = r.snapshots.iter().map(|s| s.created_unix).collect();
            Some((v, c))
        })
        .collect()
}

/// The stopped VM's images through `qemu-img`.
pub(crate) mod offline {
    use std::path::Path;
    use std::time::Duration;

    use super::super::record::{parse_qemu_snapshots, QemuSnapshot};
    use super::SnapshotError;

    /// Deadline of one `qemu-img` run.
    const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(300);

    /// What `qemu-img info` says about an image.
    #[derive(Debug, Clone, Default)]
    pub struct ImageInfo {
        pub format: String,
        pub snapshots: Vec<QemuSnapshot>,
        pub bitmaps: Vec<String>,
    }

    /// Run `qemu-img ARGS` with a deadline; its stdout.
    pub async fn qemu_img(args: &[&str]) -> Result<String, SnapshotError> {
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(args).kill_on_drop(true);
        let out = tokio::time::timeout(QEMU_IMG_TIMEOUT, cmd.output())
            .await
            .map_err(|_| {
                SnapshotError::Offline(format!(
                    "qemu-img {} did not finish within {} s",
                    args.join(" "),
                    QEMU_IMG_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| SnapshotError::Offline(format!("cannot run qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(SnapshotError::Offline(format!(
                "qemu-img {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `qemu-img info --output=json` (takes the image lock: fails while
    /// another process, such as a running QEMU, has it open).
    pub async fn info(path: &Path) -> Result<ImageInfo, SnapshotError> {
        let p = path.to_string_lossy();
        let text = qemu_img(&["info", "--output=json", &p]).await?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| SnapshotError::Offline(format!("qemu-img info {p}: not JSON: {e}")))?;
        Ok(ImageInfo {
            format: v
                .get("format")
                .and_then(|f| f.as_str())
                .unwrap_or_default()
                .to_string(),
            snapshots: parse_qemu_snapshots(v.get("snapshots")),
            bitmaps: v
                .pointer("/format-specific/data/bitmaps")
                .and_then(|b| b.as_array())
                .into_iter()
                .flatten()
                .filter_map(|b| b.get("name")?.as_str().map(str::to_string))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_ages_give_the_oldest_per_vm_and_skip_bad_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = SnapshotRecord::new("100");
        for (name, t) in [("a", 1000), ("b", 400)] {
            r.snapshots.push(SnapshotEntry {
                name: name.into(),
                tag: name.into(),
                description: String::new(),
                created_unix: t,
                vmstate: false,
                vmstate_disk: None,
                consistency: "crash".into(),
                disks: Vec::new(),
            });
        }
        record::save(dir.path(), &r).unwrap();
        record::save(dir.path(), &SnapshotRecord::new("101")).unwrap();
        std::fs::write(record::record_path(dir.path(), "102"), "not json").unwrap();
        assert_eq!(
            recorded_vmids(dir.path()),
            vec!["100".to_string(), "101".into(), "102".into()]
        );
        // 101 has no snapshots, 102 is unreadable: neither has an age.
        assert_eq!(
            recorded_ages(dir.path(), 2000),
            vec![("100".to_string(), 2, 1600)]
        );
    }
}

//! `shear backup DOMAIN --libvirt`: a libvirt pull-mode backup read by
//! shear's data path.
//!
//! 1. check libvirt's version, lock the domain, take back what a killed run
//!    left (its record: the job, its checkpoint, its directories);
//! 2. read the domain XML (captured into the backup) and pick the
//!    checkpoint this repository's chain continues from: one of ours
//!    (`shear-<repository id>-<generation>`, as the QMP path names its
//!    bitmaps) that a committed backup of this domain started; every other
//!    one of ours is a leftover and goes;
//! 3. freeze through the guest agent (`domfsfreeze`), `backup-begin` (pull
//!    mode: NBD server on a unix socket in a private directory, scratch
//!    files in shear's fleecing directory, a new checkpoint), thaw at once;
//!    thaw on every path, and a watchdog process thaws if shear dies
//!    meanwhile; if libvirt refuses the incremental (checkpoint broken:
//!    QEMU was killed, bitmap inconsistent or gone), the broken checkpoint
//!    goes and the backup begins again as a full one, with the reason;
//! 4. read each disk's export (block status; for an incremental only what
//!    `qemu:dirty-bitmap:backup-<disk>` marks, the rest reuses the base);
//! 5. end the job (`domjobabort`), commit the manifest, delete the
//!    previous checkpoint. On failure: end the job, delete the new
//!    checkpoint (libvirt keeps its changes for the older one), no backup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::rescue::ResumeStep;
use super::virsh::{Virsh, QUERY};
use super::xml::{self, DomainDisk};
use super::LibvirtError;
use crate::hookscript::HookPhase;
use crate::job::backup::ms;
use crate::job::cancel::Cancel;
use crate::job::datapath::{begin_session, DataPathConfig, DiskJob};
use crate::job::events::{JobEvent, Observer, Phase};
use crate::job::fleece::{self, FleecePolicy};
use crate::job::graph::VmDisk;
use crate::job::hold::tell_watchdog;
use crate::job::incremental::bitmap_prefix;
use crate::job::lock::{lock_vm, private_dir};
use crate::job::options::Mode;
use crate::job::priority::DataPriority;
use crate::job::report::BackupReport;
use crate::job::watchdog::Watchdog;
use crate::job::JobError;
use crate::repo::{self, BackupId, Consistency, Repository, VmId};

/// How long the job may take to end after `domjobabort`.
pub(crate) const JOB_END: Duration = Duration::from_secs(60);
/// How long thawing is retried.
const THAW_FOR: Duration = Duration::from_secs(30);

/// Options of a libvirt backup.
#[derive(Debug, Clone)]
pub struct LibvirtBackupOptions {
    /// Domain name (also the VM id in the repository).
    pub domain: String,
    /// Connection URI.
    pub uri: String,
    /// Run directory (lock, record, NBD socket directory).
    pub run_dir: PathBuf,
    /// Where the scratch (fleece) files go.
    pub fleecing_dir: PathBuf,
    /// What the fleecing directory must satisfy.
    pub fleecing: FleecePolicy,
    /// zstd level; `None` = the repository's default.
    pub zstd_level: Option<i32>,
    /// Hash/compress worker threads.
    pub workers: usize,
    /// NBD connections per disk.
    pub connections: usize,
    /// Read limit, KiB/s (0: none).
    pub bwlimit_kib: u64,
    /// CPU and I/O priority of the data path.
    pub priority: DataPriority,
    /// Notes.
    pub notes: String,
    /// Read every disk in full.
    pub full: bool,
    /// How long `domfsfreeze` may take before the backup goes on
    /// crash-consistent.
    pub freeze_timeout: Duration,
    /// Disks (targets) left out.
    pub exclude: Vec<String>,
    /// Test-only: run while the guest is frozen with the backup begun (to
    /// take a ground-truth copy); see `job::options::held_hook_from_env`.
    pub held_hook: Option<PathBuf>,
    /// How the guest is held while the backup begins: snapshot (freeze),
    /// suspend (`virsh suspend`), stop (shutdown, start paused).
    pub mode: Mode,
    /// Stop mode: how long the guest may take to shut down.
    pub stop_timeout: Duration,
    /// The vzdump hook script's stop-mode phases (pre-stop, pre-restart,
    /// post-restart), run by the job as the QMP path runs them.
    pub script: Option<crate::hookscript::VmHooks>,
}

/// What a run changed in libvirt, written before it changes it, so a
/// later run takes back what a killed one left.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LibvirtRecord {
    /// The connection URI.
    pub uri: String,
    /// The domain.
    pub domain: String,
    /// The pid of the run.
    pub pid: u32,
    /// The checkpoint the run creates.
    pub checkpoint: String,
    /// Directories the run made (NBD socket, scratch files).
    pub dirs: Vec<PathBuf>,
}

pub(crate) fn record_path(run_dir: &Path, domain: &str) -> PathBuf {
    run_dir.join(format!("libvirt-{domain}.json"))
}

fn lv(step: impl Into<String>) -> impl FnOnce(LibvirtError) -> JobError {
    let step = step.into();
    move |source| JobError::Libvirt { step, source }
}

fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The checkpoint names of this repository's chain.
pub fn checkpoint_prefix(repo_id: &str) -> String {
    bitmap_prefix(repo_id)
}

/// Every committed backup of `vmid`, by the checkpoint it started (newest
/// first wins).
fn started_checkpoints(
    repo: &Repository,
    vmid: &VmId,
) -> Result<HashMap<String, BackupId>, JobError> {
    let mut out = HashMap::new();
    let list = repo
        .list_backups(Some(vmid))
        .map_err(JobError::repo("listing backups"))?;
    for info in list.iter().rev() {
        let Ok(m) = repo.load_manifest(&info.id) else {
            continue;
        };
        for e in &m.disks {
            if let Some(cp) = e.read.as_ref().and_then(|r| r.bitmap.clone()) {
                out.entry(cp).or_insert_with(|| info.id.clone());
            }
        }
    }
    Ok(out)
}

/// Where the chain continues from: `(checkpoint, backup)` and the
/// checkpoints of ours to delete; or why every disk is read in full.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainPlan {
    /// Our checkpoint a committed backup started (newest such backup).
    pub from: Option<(String, BackupId)>,
    /// Why there is no `from`.
    pub full_reason: Option<String>,
    /// Our newest committed checkpoint, deleted once the new backup is
    /// committed (also with `--full`).
    pub previous: Option<String>,
    /// Checkpoints of ours no committed backup started, or older ones.
    pub stale: Vec<String>,
}

/// Decide the chain from the domain's checkpoints and the committed
/// backups' checkpoints (`started`: name → backup).
pub fn plan_chain(
    checkpoints: &[String],
    prefix: &str,
    started: &HashMap<String, BackupId>,
    force_full: bool,
) -> ChainPlan {
    let mut plan = ChainPlan::default();
    let ours: Vec<&String> = checkpoints
        .iter()
        .filter(|c| c.starts_with(prefix))
        .collect();
    let mut best: Option<(&String, &BackupId)> = None;
    for c in &ours {
        if let Some(b) = started.get(*c) {
            if best.is_none_or(|(_, bb)| b > bb) {
                best = Some((c, b));
            }
        }
    }
    for c in &ours {
        if best.is_none_or(|(bc, _)| bc != *c) {
            plan.stale.push((*c).clone());
        }
    }
    plan.previous = best.map(|(c, _)| c.clone());
    match best {
        Some((c, b)) if !force_full => plan.from = Some((c.clone(), b.clone())),
        Some(_) => plan.full_reason = Some("--full was given".into()),
        None if ours.is_empty() => {
            plan.full_reason = Some(
                "no checkpoint of this repository on the domain (first backup to this \
                 repository, or libvirt lost it: a transient domain that stopped, a checkpoint \
                 deleted by hand)"
                    .into(),
            );
        }
        None => {
            plan.full_reason = Some(
                "the domain's checkpoints of this repository belong to no backup in it (pruned, \
                 forgotten, or their run never committed)"
                    .into(),
            );
        }
    }
    plan
}

/// The base of one disk in `backup`, or why there is none.
fn disk_base(
    repo: &Repository,
    backup: &BackupId,
    disk: &str,
    size: u64,
    filename: &str,
) -> Result<Arc<Vec<repo::Digest>>, String> {
    let m = repo
        .load_manifest(backup)
        .map_err(|e| format!("backup {backup} is unreadable: {}", crate::chain(&e)))?;
    let e = m
        .disks
        .iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| format!("backup {backup} has no disk {disk} (a new disk)"))?;
    if e.virtual_size != size {
        return Err(format!(
            "the disk's size changed ({} → {size} bytes) since backup {backup}",
            e.virtual_size
        ));
    }
    if e.chunk_size != repo.config().chunk_size {
        return Err(format!(
            "backup {backup} has another chunk size than the repository"
        ));
    }
    if let Some(read) = &e.read {
        if !read.filename.is_empty() && read.filename != filename {
            return Err(format!(
                "the disk's image was replaced ({} → {filename}) since backup {backup}",
                read.filename
            ));
        }
    }
    let fingerprint = repo
        .config()
        .encryption
        .as_ref()
        .map(|e| e.key_fingerprint.clone());
    if m.encryption.map(|e| e.key_fingerprint) != fingerprint {
        return Err(format!("backup {backup} was written with another key"));
    }
    match repo.verify_state(backup) {
        Ok(Some(v)) if v.state != "ok" => {
            return Err(format!(
                "backup {backup} failed verify; its chunks are not reused"
            ))
        }
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "the verify state of backup {backup} is unreadable: {}",
                crate::chain(&e)
            ))
        }
    }
    let reader = repo
        .open_backup(backup)
        .map_err(|e| format!("backup {backup} cannot be opened: {}", crate::chain(&e)))?;
    let d = reader.open_disk(disk).map_err(|e| {
        format!(
            "the index of {disk} in {backup} is unreadable: {}",
            crate::chain(&e)
        )
    })?;
    Ok(Arc::new(d.entries().to_vec()))
}

/// The uid QEMU of a `qemu:///system` domain runs as (its pidfile), so
/// the private directories it must create a socket and files in can be
/// given to it alone.
fn qemu_uid(uri: &str, domain: &str) -> Option<(u32, u32)> {
    if !uri.starts_with("qemu:///system") {
        return None;
    }
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// A 0700 directory of ours, owned by QEMU's user when it is not root.
fn make_private(path: &Path, owner: Option<(u32, u32)>) -> Result<(), JobError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| JobError::io(format!("creating {}", path.display()), e))?;
    if let Some((uid, gid)) = owner.filter(|(u, _)| *u != 0) {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| JobError::io(format!("giving {} to QEMU's user", path.display()), e))?;
    }
    Ok(())
}

/// How shear holds the domain while the backup begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LvHold {
    /// Not held (a paused domain someone else paused, F-29; a failed
    /// freeze: crash-consistent).
    None,
    /// Filesystems frozen through the guest agent (snapshot mode).
    Frozen,
    /// vCPUs paused by `virsh suspend` (suspend mode).
    Suspended,
    /// Shut down, started again paused (stop mode).
    ShutDown,
}

/// Hold the domain as `opts.mode` says. Returns what is held (also when
/// holding failed half way: the release takes it back), the consistency
/// the backup gets or why holding failed, and warnings. Each hold is
/// reported to the watchdog before it is made.
async fn hold_domain(
    virsh: &Virsh,
    dom: &str,
    opts: &LibvirtBackupOptions,
    state: &str,
    cancel: &Cancel,
    watchdog: &mut Option<Watchdog>,
) -> (LvHold, Result<Consistency, JobError>, Vec<String>) {
    let mut notes = Vec::new();
    if state != "running" {
        // Someone else paused it: not ours to freeze, suspend, shut down
        // or resume (F-29).
        notes.push(format!(
            "domain {dom} is {state} (not by shear): backed up as it is, crash-consistent; \
             shear neither holds nor resumes it"
        ));
        return (LvHold::None, Ok(Consistency::Crash), notes);
    }
    match opts.mode {
        // `Nbd` is the --nbd path's (never given here): as snapshot.
        Mode::Snapshot | Mode::Nbd => {
            tell_watchdog(watchdog, "frozen");
            match virsh.fsfreeze(dom, opts.freeze_timeout).await {
                Ok(()) => (LvHold::Frozen, Ok(Consistency::Application), notes),
                Err(e) => {
                    // A freeze that timed out may still complete in the
                    // guest: thaw (as briefly: an agent that did not answer
                    // the freeze will not answer this either).
                    if virsh.fsthaw(dom, opts.freeze_timeout).await.is_ok() {
                        tell_watchdog(watchdog, "thawed");
                    }
                    notes.push(format!(
                        "the guest's filesystems could not be frozen ({}): the backup is \
                         crash-consistent",
                        crate::chain(&e)
                    ));
                    (LvHold::None, Ok(Consistency::Crash), notes)
                }
            }
        }
        Mode::Suspend => {
            tell_watchdog(watchdog, "paused");
            match virsh.suspend(dom).await {
                Ok(()) => (LvHold::Suspended, Ok(Consistency::Crash), notes),
                Err(e) => (LvHold::Suspended, Err(lv("virsh suspend")(e)), notes),
            }
        }
        Mode::Stop => {
            if let Some(hooks) = &opts.script {
                notes.extend(hooks.run_or_warn(HookPhase::PreStop).await);
            }
            tell_watchdog(watchdog, "stopped");
            if let Err(e) = virsh.shutdown_acpi(dom).await {
                // Refused (no ACPI, …): nothing happened to the guest.
                tell_watchdog(watchdog, "resumed");
                return (LvHold::None, Err(lv("virsh shutdown")(e)), notes);
            }
            let r = wait_off_and_start_paused(virsh, dom, opts.stop_timeout, cancel).await;
            (
                LvHold::ShutDown,
                r.map(|()| Consistency::Application),
                notes,
            )
        }
    }
}

/// Stop mode, once the ACPI shutdown is asked for: wait until the domain
/// is off, start it again with its vCPUs paused (the backup begins before
/// the guest runs).
async fn wait_off_and_start_paused(
    virsh: &Virsh,
    dom: &str,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), JobError> {
    let deadline = Instant::now() + timeout;
    loop {
        cancel.check()?;
        let st = virsh.domstate(dom).await.map_err(lv("domain state"))?;
        if st == "shut off" {
            break;
        }
        if Instant::now() >= deadline {
            return Err(JobError::Invalid(format!(
                "the guest did not shut down within {timeout:?} (stop mode)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    virsh
        .start(dom, true)
        .await
        .map_err(lv("virsh start --paused"))
}

/// Release what [`hold_domain`] holds: thaw, resume, or (stop mode) resume
/// the domain started paused — starting it if it is still off. Returns
/// whether the domain is still there, whether the watchdog must stay (a
/// stop-mode shutdown still under way after a failure: it starts the
/// domain once off), and warnings; `Err` when the release could not be
/// confirmed (the watchdog goes on).
async fn release_domain(
    virsh: &Virsh,
    dom: &str,
    hold: LvHold,
    opts: &LibvirtBackupOptions,
    watchdog: &mut Option<Watchdog>,
) -> Result<(bool, bool, Vec<String>), JobError> {
    let mut notes = Vec::new();
    let not_released = |what: &str, e: LibvirtError| {
        JobError::NotReleased(format!("virsh {what} failed: {}", crate::chain(&e)))
    };
    match hold {
        LvHold::None => Ok((true, false, notes)),
        LvHold::Frozen => match thaw(virsh, dom).await {
            Ok(there) => {
                tell_watchdog(watchdog, "thawed");
                Ok((there, false, notes))
            }
            Err(e) => Err(not_released("domfsthaw", e)),
        },
        LvHold::Suspended | LvHold::ShutDown => {
            let stopped = hold == LvHold::ShutDown;
            if stopped {
                if let Some(hooks) = &opts.script {
                    notes.extend(hooks.run_or_warn(HookPhase::PreRestart).await);
                }
            }
            let t0 = Instant::now();
            let mut acted = false;
            let (there, handoff) = loop {
                let st = match super::rescue::state(virsh, dom).await {
                    Ok(s) => s,
                    Err(e) if t0.elapsed() > THAW_FOR => return Err(not_released("domstate", e)),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let step = match super::rescue::resume_step(st.as_deref(), stopped, true) {
                    // Still running after a stop-mode failure: the
                    // shutdown may be under way; the watchdog watches.
                    ResumeStep::Done if stopped && !acted && st.as_deref() == Some("running") => {
                        break (true, true)
                    }
                    ResumeStep::Done => break (st.is_some_and(|s| s != "shut off"), false),
                    step => step,
                };
                let r = match step {
                    ResumeStep::Resume => Some(virsh.resume(dom).await),
                    ResumeStep::Start => Some(virsh.start(dom, false).await),
                    _ => None,
                };
                match r {
                    Some(Ok(())) => acted = true,
                    Some(Err(e)) if t0.elapsed() > THAW_FOR => {
                        return Err(not_released("resume", e))
                    }
                    _ => {}
                }
                if t0.elapsed() > THAW_FOR {
                    return Err(JobError::NotReleased(format!(
                        "domain {dom} did not run again within {THAW_FOR:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            if !handoff {
                tell_watchdog(watchdog, "resumed");
            }
            if stopped && there && !handoff {
                if let Some(hooks) = &opts.script {
                    notes.extend(hooks.run_or_warn(HookPhase::PostRestart).await);
                }
            }
            Ok((there, handoff, notes))
        }
    }
}

/// Thaw, retrying until [`THAW_FOR`] passes. `Ok(false)`: the domain is
/// no longer running (shut off, destroyed, undefined): nothing is frozen.
async fn thaw(virsh: &Virsh, domain: &str) -> Result<bool, LibvirtError> {
    let t0 = Instant::now();
    loop {
        match virsh.fsthaw(domain, QUERY).await {
            Ok(()) => return Ok(true),
            Err(e) => {
                let gone = match virsh.domstate(domain).await {
                    Ok(st) => st != "running" && st != "paused",
                    Err(LibvirtError::Failed { .. }) => true,
                    Err(_) => false,
                };
                if gone {
                    return Ok(false);
                }
                if t0.elapsed() > THAW_FOR {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Take back what a killed run left: end the job, delete its checkpoint
/// (unless a committed backup started it), remove its directories.
async fn heal_leftovers(
    virsh: &Virsh,
    repo: &Repository,
    vmid: &VmId,
    path: &Path,
) -> Result<Option<String>, JobError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(JobError::io(format!("reading {}", path.display()), e)),
    };
    let rec: LibvirtRecord = serde_json::from_slice(&text).map_err(|e| {
        JobError::Invalid(format!(
            "the run record {} is unreadable ({e}); remove it once the domain has no backup job",
            path.display()
        ))
    })?;
    virsh
        .job_end(&rec.domain, JOB_END)
        .await
        .map_err(lv("ending a killed run's backup job"))?;
    let started = started_checkpoints(repo, vmid)?;
    let present = virsh
        .checkpoints(&rec.domain)
        .await
        .map_err(lv("listing checkpoints"))?;
    if !started.contains_key(&rec.checkpoint) && present.contains(&rec.checkpoint) {
        virsh
            .checkpoint_delete(&rec.domain, &rec.checkpoint)
            .await
            .map_err(lv(format!("deleting checkpoint {}", rec.checkpoint)))?;
    }
    for d in &rec.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    std::fs::remove_file(path)
        .map_err(|e| JobError::io(format!("removing {}", path.display()), e))?;
    Ok(Some(format!(
        "took back what an interrupted run (pid {}) left: its backup job, checkpoint {} and files",
        rec.pid, rec.checkpoint
    )))
}

/// A disk to back up, with what planning found.
#[derive(Debug)]
struct Planned {
    disk: DomainDisk,
    scratch: PathBuf,
}

/// Run one libvirt backup.
pub async fn run_libvirt_backup(
    repo: Arc<Repository>,
    opts: LibvirtBackupOptions,
    cancel: Cancel,
    observer: Observer,
) -> Result<BackupReport, JobError> {
    let t0 = Instant::now();
    let dom = opts.domain.clone();
    observer.event(&JobEvent::Phase {
        vmid: &dom,
        phase: Phase::Prepare,
    });
    let vmid = VmId::new(&dom).map_err(JobError::repo("domain name as VM id"))?;
    let virsh = Virsh::new(&opts.uri);
    virsh
        .check_version()
        .await
        .map_err(lv("checking libvirt's version"))?;
    private_dir(&opts.run_dir)?;
    let _lock = lock_vm(&opts.run_dir, &format!("libvirt-{dom}"))?;
    let mut warnings: Vec<String> = Vec::new();
    let warn = |warnings: &mut Vec<String>, m: String| {
        observer.event(&JobEvent::Warning {
            vmid: &dom,
            message: &m,
        });
        warnings.push(m);
    };
    let rpath = record_path(&opts.run_dir, &dom);
    if let Some(w) = heal_leftovers(&virsh, &repo, &vmid, &rpath).await? {
        warn(&mut warnings, w);
    }
    let state = virsh.domstate(&dom).await.map_err(lv("domain state"))?;
    if state != "running" && state != "paused" {
        return Err(JobError::Invalid(format!(
            "domain {dom} is {state}: a libvirt backup needs it running"
        )));
    }
    if opts.mode == Mode::Stop
        && state == "running"
        && !virsh.is_persistent(&dom).await.map_err(lv("dominfo"))?
    {
        return Err(JobError::Invalid(format!(
            "stop mode needs a persistent domain: {dom} is transient and would be gone once \
             shut down (use --mode snapshot or suspend)"
        )));
    }
    let domain_xml = virsh.dumpxml(&dom).await.map_err(lv("dumpxml"))?;
    let info = xml::parse_domain(&domain_xml).map_err(lv("the domain XML"))?;
    let all_targets: Vec<String> = info.disks.iter().map(|d| d.target.clone()).collect();
    for x in &opts.exclude {
        if !all_targets.contains(x) {
            return Err(JobError::Invalid(format!(
                "--exclude {x}: domain {dom} has no such disk (its disks: {})",
                all_targets.join(", ")
            )));
        }
    }
    let token = random_hex(4);
    let scratch_dir = opts.fleecing_dir.join(format!("libvirt-{dom}-{token}"));
    let nbd_dir = opts.run_dir.join(format!("libvirt-{dom}-{token}"));
    let mut planned = Vec::new();
    let mut allocated = 0u64;
    for d in &info.disks {
        if !d.backed_up() || opts.exclude.contains(&d.target) {
            continue;
        }
        if d.kind == "network" || d.source.is_none() {
            warn(
                &mut warnings,
                format!(
                    "disk {} ({} disk) is read through libvirt like the others",
                    d.target, d.kind
                ),
            );
        }
        if let Some(m) = d.source.as_ref().and_then(|s| std::fs::metadata(s).ok()) {
            allocated += std::os::unix::fs::MetadataExt::blocks(&m) * 512;
        }
        planned.push(Planned {
            disk: d.clone(),
            scratch: scratch_dir.join(format!("{}.scratch.qcow2", d.target)),
        });
    }
    if planned.is_empty() {
        return Err(JobError::Invalid(format!(
            "domain {dom} has no disk to back up"
        )));
    }
    private_dir(&opts.fleecing_dir)?;
    fleece::check(&opts.fleecing_dir, allocated, opts.fleecing)?;
    // The chain.
    let prefix = checkpoint_prefix(&repo.repo_id());
    let checkpoints = virsh
        .checkpoints(&dom)
        .await
        .map_err(lv("listing checkpoints"))?;
    let started = started_checkpoints(&repo, &vmid)?;
    let mut chain = plan_chain(&checkpoints, &prefix, &started, opts.full);
    for c in std::mem::take(&mut chain.stale) {
        match virsh.checkpoint_delete(&dom, &c).await {
            Ok(()) => warn(
                &mut warnings,
                format!("deleted checkpoint {c}: no backup in this repository started it"),
            ),
            Err(e) => warn(
                &mut warnings,
                format!(
                    "could not delete leftover checkpoint {c}: {}",
                    crate::chain(&e)
                ),
            ),
        }
    }
    // Dirty bytes per disk since the checkpoint (just before the freeze).
    let dirty: Vec<(String, u64)> = match &chain.from {
        Some((c, _)) => virsh.checkpoint_sizes(&dom, c).await.unwrap_or_default(),
        None => Vec::new(),
    };
    let new_cp = format!("{prefix}{}", random_hex(6));
    // Directories and the record, before libvirt is asked for anything.
    let owner = qemu_uid(&opts.uri, &dom);
    let record = LibvirtRecord {
        uri: opts.uri.clone(),
        domain: dom.clone(),
        pid: std::process::id(),
        checkpoint: new_cp.clone(),
        dirs: vec![nbd_dir.clone(), scratch_dir.clone()],
    };
    let rec_json = serde_json::to_vec_pretty(&record)
        .map_err(|e| JobError::Invalid(format!("encoding the run record: {e}")))?;
    crate::fsutil::write_atomic(&rpath, &rec_json, crate::fsutil::Existing::Replace)
        .map_err(|e| JobError::io(format!("writing {} ({})", rpath.display(), e.op), e.source))?;
    let run = Run {
        virsh: virsh.clone(),
        dom: dom.clone(),
        rpath,
        dirs: record.dirs.clone(),
        new_cp: new_cp.clone(),
    };
    let result = async {
        make_private(&nbd_dir, owner)?;
        make_private(&scratch_dir, owner)?;
        let socket = nbd_dir.join("nbd.sock");
        let targets: Vec<String> = planned.iter().map(|p| p.disk.target.clone()).collect();
        let cp_file = nbd_dir.join("checkpoint.xml");
        std::fs::write(
            &cp_file,
            xml::checkpoint_xml(&new_cp, &targets, &all_targets),
        )
        .map_err(|e| JobError::io("writing the checkpoint XML", e))?;
        let bdisks: Vec<xml::BackupDisk> = planned
            .iter()
            .map(|p| xml::BackupDisk {
                target: p.disk.target.clone(),
                scratch: p.scratch.clone(),
            })
            .collect();
        // Both backup XMLs before the guest is held (the full one is used
        // when libvirt refuses the incremental).
        let write_backup_xml = |incremental: Option<&str>| -> Result<PathBuf, JobError> {
            let f = nbd_dir.join(if incremental.is_some() {
                "backup-incremental.xml"
            } else {
                "backup-full.xml"
            });
            std::fs::write(
                &f,
                xml::backup_xml(&socket, &bdisks, &all_targets, incremental),
            )
            .map_err(|e| JobError::io("writing the backup XML", e))?;
            Ok(f)
        };
        let full_xml = write_backup_xml(None)?;
        let incremental_xml = match &chain.from {
            Some((c, _)) => Some(write_backup_xml(Some(c.as_str()))?),
            None => None,
        };
        cancel.check()?;
        // Hold, begin, release; the watchdog (shared with the QMP path)
        // releases the domain if shear dies meanwhile.
        observer.event(&JobEvent::Phase {
            vmid: &dom,
            phase: Phase::Hold,
        });
        let mut watchdog = Some(
            Watchdog::spawn_libvirt(&opts.uri, &dom, &opts.run_dir, opts.stop_timeout)
                .map_err(|e| JobError::io("starting the watchdog", e))?,
        );
        let hold_start = Instant::now();
        let (hold, held, notes) =
            hold_domain(&virsh, &dom, &opts, &state, &cancel, &mut watchdog).await;
        for n in notes {
            warn(&mut warnings, n);
        }
        let mut begin = Ok(());
        let mut hook = None;
        if held.is_ok() {
            begin = virsh
                .backup_begin(
                    &dom,
                    incremental_xml.as_deref().unwrap_or(full_xml.as_path()),
                    Some(&cp_file),
                )
                .await;
            if let (Err(e), Some((c, _))) = (&begin, &chain.from) {
                // The checkpoint is broken (QEMU killed: bitmap inconsistent;
                // bitmap gone): it goes, and the backup is a full one.
                let reason = format!(
                    "libvirt refused an incremental backup from checkpoint {c} ({}); it was \
                     deleted",
                    crate::chain(e)
                );
                let c = c.clone();
                let _ = virsh.checkpoint_delete(&dom, &c).await;
                chain.from = None;
                chain.previous = None;
                chain.full_reason = Some(reason);
                begin = virsh.backup_begin(&dom, &full_xml, Some(&cp_file)).await;
            }
            hook = match (&begin, &opts.held_hook) {
                (Ok(()), Some(h)) => Some(run_held_hook(h, &dom).await),
                _ => None,
            };
        }
        let released = release_domain(&virsh, &dom, hold, &opts, &mut watchdog).await;
        let window = ms(hold_start.elapsed());
        let (still_there, handoff, notes) = match released {
            Ok(r) => r,
            Err(e) => {
                // Dropping the watchdog unfinished: it keeps trying.
                drop(watchdog);
                return Err(e);
            }
        };
        for n in notes {
            warn(&mut warnings, n);
        }
        match watchdog.take() {
            // A stop-mode shutdown still under way: the watchdog starts
            // the domain again once it is off.
            Some(w) if handoff => drop(w),
            Some(w) => w.finish(),
            None => {}
        }
        let consistency = held?;
        if !still_there {
            return Err(JobError::VmGone(format!(
                "domain {dom} stopped during the backup"
            )));
        }
        // Explain a refusal by an old daemon (asked after the release: it
        // takes seconds).
        if let Err(e) = &begin {
            if let Some(old) = virsh.daemon_too_old().await {
                tracing::debug!("backup-begin failed: {}", crate::chain(e));
                begin = Err(old);
            }
        }
        observer.event(&JobEvent::Phase {
            vmid: &dom,
            phase: Phase::Release,
        });
        begin.map_err(lv("backup-begin"))?;
        if let Some(h) = hook {
            h?;
        }
        let frozen = hold != LvHold::None;
        if let Some(r) = &chain.full_reason {
            warn(&mut warnings, format!("every disk is read in full: {r}"));
        }
        // Read.
        observer.event(&JobEvent::Phase {
            vmid: &dom,
            phase: Phase::Export,
        });
        let mut jobs = Vec::new();
        for p in &planned {
            let t = &p.disk.target;
            let src = nbd_export::ExportSource::unix(socket.display().to_string(), t.clone());
            let s2 = src.clone();
            let size = tokio::task::spawn_blocking(move || {
                crate::job::datapath::connect_client(&s2).map(|c| {
                    let size = c.info().size;
                    let _ = c.disconnect();
                    size
                })
            })
            .await
            .map_err(|e| JobError::Invalid(format!("probe thread failed: {e}")))?
            .map_err(|source| JobError::Nbd {
                step: format!("connecting to libvirt's export of {t}"),
                source,
            })?;
            let filename = p.disk.source.clone().unwrap_or_default();
            let (incremental, full_reason, base) = match &chain.from {
                Some((_, b)) => match disk_base(&repo, b, t, size, &filename) {
                    Ok(d) => (Some((format!("backup-{t}"), d)), None, Some(b.to_string())),
                    Err(why) => {
                        warn(&mut warnings, format!("disk {t} is read in full: {why}"));
                        (None, Some(why), None)
                    }
                },
                None => (None, chain.full_reason.clone(), None),
            };
            jobs.push(DiskJob {
                disk: VmDisk {
                    name: t.clone(),
                    device: t.clone(),
                    qdev: t.clone(),
                    node: String::new(),
                    format: p.disk.format.clone().unwrap_or_default(),
                    filename: filename.clone(),
                    virtual_size: size,
                    allocated_size: None,
                    read_only: false,
                },
                source: src,
                // libvirt makes and fills its scratch file before shear
                // sees it: no empty size to count from.
                fleece: Some(fleece::FleeceImage::foreign(p.scratch.clone())),
                release: None,
                read: repo::DiskRead {
                    kind: if incremental.is_some() {
                        repo::ReadKind::Incremental
                    } else {
                        repo::ReadKind::Full
                    },
                    full_reason,
                    base,
                    dirty_bytes: incremental
                        .as_ref()
                        .and_then(|_| dirty.iter().find(|(n, _)| n == t).map(|(_, b)| *b)),
                    bitmap: Some(new_cp.clone()),
                    bitmap_persistent: true,
                    filename,
                    fleece_peak_bytes: None,
                },
                incremental,
            });
        }
        cancel.check()?;
        let setup_ms = ms(t0.elapsed());
        observer.event(&JobEvent::Phase {
            vmid: &dom,
            phase: Phase::Read,
        });
        let t_read = Instant::now();
        let base = jobs
            .iter()
            .find_map(|j| j.read.base.as_deref())
            .and_then(|b| b.parse::<BackupId>().ok());
        let meta = repo::BackupMeta {
            zstd_level: opts.zstd_level,
            base,
            ..repo::BackupMeta::new(&dom, &info.name)
        };
        let session = begin_session(&repo, &meta).await?;
        let dp = DataPathConfig::new(
            opts.workers,
            opts.connections,
            opts.bwlimit_kib,
            opts.priority,
        );
        let vm_config = serde_json::json!({
            "source": "libvirt",
            "connect": opts.uri,
            "name": info.name,
            "uuid": info.uuid,
            "disks": jobs.iter().map(|j| serde_json::json!({
                "name": j.disk.name, "format": j.disk.format, "filename": j.disk.filename,
                "virtual-size": j.disk.virtual_size,
            })).collect::<Vec<_>>(),
            "checkpoint": new_cp,
            "libvirt_xml": domain_xml,
        });
        let (session, disks) = crate::job::datapath::read_all_blocking(
            session,
            jobs,
            dp,
            cancel.clone(),
            observer.clone(),
        )
        .await?;
        let read_ms = ms(t_read.elapsed());
        // End the job before the commit: a backup is recorded only when
        // libvirt let go of the domain.
        observer.event(&JobEvent::Phase {
            vmid: &dom,
            phase: Phase::Teardown,
        });
        if let Err(e) = virsh.job_end(&dom, JOB_END).await {
            session.abort();
            return Err(lv("ending the backup job")(e));
        }
        observer.event(&JobEvent::Phase {
            vmid: &dom,
            phase: Phase::Commit,
        });
        let incremental = disks.iter().any(|d| d.kind == repo::ReadKind::Incremental);
        let commit = repo::CommitInfo {
            mode: if incremental {
                repo::BackupMode::Incremental
            } else {
                repo::BackupMode::Full
            },
            consistency,
            vm_mode: opts.mode.as_str().into(),
            vm_config,
            notes: opts.notes.clone(),
            freeze_window_ms: frozen.then_some(window),
        };
        let id = session
            .commit(&commit)
            .map_err(JobError::repo("committing the manifest"))?;
        Ok((
            id,
            disks,
            consistency,
            frozen.then_some(window),
            setup_ms,
            read_ms,
        ))
    }
    .await;
    match result {
        Ok((id, disks, consistency, window, setup_ms, read_ms)) => {
            // The chain goes on from the new checkpoint: the old one goes.
            if let Some(old) = &chain.previous {
                if let Err(e) = virsh.checkpoint_delete(&dom, old).await {
                    warn(
                        &mut warnings,
                        format!(
                            "could not delete the previous checkpoint {old} (the next backup \
                             does): {}",
                            crate::chain(&e)
                        ),
                    );
                }
            }
            run.finish_ok();
            Ok(BackupReport {
                backup_id: id.to_string(),
                vmid: dom,
                mode: opts.mode,
                consistency,
                freeze_window_ms: window,
                disks,
                setup_ms,
                read_ms,
                total_ms: ms(t0.elapsed()),
                warnings,
            })
        }
        Err(e) => {
            if let Err(undo) = run.undo().await {
                return Err(JobError::Invalid(format!(
                    "{}; and taking it back failed: {undo} (the next run retries)",
                    crate::chain(&e)
                )));
            }
            Err(e)
        }
    }
}

/// Test-only: run the held hook (the guest frozen, the backup begun).
async fn run_held_hook(hook: &Path, domain: &str) -> Result<(), JobError> {
    let st = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(hook)
            .env("SHEAR_VMID", domain)
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

/// What a run must take back.
struct Run {
    virsh: Virsh,
    dom: String,
    rpath: PathBuf,
    dirs: Vec<PathBuf>,
    new_cp: String,
}

impl Run {
    fn remove_files(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&self.rpath);
    }

    fn finish_ok(self) {
        self.remove_files();
    }

    /// End the job, delete the new checkpoint, remove our files. The
    /// record stays when something could not be taken back.
    async fn undo(self) -> Result<(), String> {
        // A job may exist even when backup-begin reported failure late.
        let ended = self.virsh.job_end(&self.dom, JOB_END).await;
        let present = self.virsh.checkpoints(&self.dom).await;
        let deleted = match present {
            Ok(p) if p.contains(&self.new_cp) => {
                self.virsh.checkpoint_delete(&self.dom, &self.new_cp).await
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match (ended, deleted) {
            (Ok(()), Ok(())) => {
                self.remove_files();
                Ok(())
            }
            (e1, e2) => Err([e1.err(), e2.err()]
                .into_iter()
                .flatten()
                .map(|e| crate::chain(&e))
                .collect::<Vec<_>>()
                .join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> BackupId {
        s.parse().unwrap()
    }

    #[test]
    fn the_chain_continues_from_the_newest_committed_checkpoint_of_this_repository() {
        let p = "shear-aaaa-";
        let cps: Vec<String> = ["shear-aaaa-1", "shear-aaaa-2", "shear-bbbb-9", "other"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut started = HashMap::new();
        started.insert("shear-aaaa-1".to_string(), id("vm/d/2026-01-01T00:00:00Z"));
        started.insert("shear-aaaa-2".to_string(), id("vm/d/2026-01-02T00:00:00Z"));
        let plan = plan_chain(&cps, p, &started, false);
        assert_eq!(
            plan.from,
            Some(("shear-aaaa-2".into(), id("vm/d/2026-01-02T00:00:00Z")))
        );
        assert_eq!(plan.stale, vec!["shear-aaaa-1".to_string()]);
        assert!(plan.full_reason.is_none());
        // Another repository's chain and foreign checkpoints are untouched.
        let other = plan_chain(&cps, "shear-bbbb-", &HashMap::new(), false);
        assert_eq!(other.from, None);
        assert_eq!(other.stale, vec!["shear-bbbb-9".to_string()]);
        assert!(other.full_reason.unwrap().contains("belong to no backup"));
        let none = plan_chain(&cps, "shear-cccc-", &started, false);
        assert!(none.stale.is_empty());
        assert!(none.full_reason.unwrap().contains("no checkpoint"));
        let full = plan_chain(&cps, p, &started, true);
        assert_eq!(full.from, None);
        assert_eq!(full.full_reason.as_deref(), Some("--full was given"));
        assert_eq!(full.stale, vec!["shear-aaaa-1".to_string()]);
        assert_eq!(
            full.previous.as_deref(),
            Some("shear-aaaa-2"),
            "retired after the commit"
        );
    }

    #[test]
    fn the_run_record_round_trips() {
        let r = LibvirtRecord {
            uri: "qemu:///system".into(),
            domain: "d".into(),
            pid: 1,
            checkpoint: "shear-aaaa-1".into(),
            dirs: vec!["/run/shear/x".into()],
        };
        let j = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<LibvirtRecord>(&j).unwrap(), r);
    }
}

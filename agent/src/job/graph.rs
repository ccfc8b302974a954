//! QEMU block-graph changes for a pull backup (design.md §2):
//! fleece image → copy-before-write filter on the device's node → device
//! `drive` swapped to the filter → `snapshot-access` on the filter → NBD
//! export. Each change is first written to the [`RunRecord`]; [`undo`] takes
//! them back in reverse order, which is the documented teardown order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::backup::TEST_HOOKS;
use super::record::{RunRecord, Step};
use super::JobError;

/// How long one QMP command of setup or teardown may take.
pub const QMP_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `block-export-del` may take until `BLOCK_EXPORT_DELETED`.
pub const EXPORT_DEL_TIMEOUT: Duration = Duration::from_secs(10);

/// One disk of the VM, as QEMU reports it.
#[derive(Debug, Clone)]
pub struct VmDisk {
    /// Name used in the backup: the qdev id (`scsi0`, `virtio0`, `d0`), else
    /// the BlockBackend name, else the node name.
    pub name: String,
    /// BlockBackend name (`drive-scsi0` on PVE; empty with `-blockdev`).
    pub device: String,
    /// qdev path (for `qom-set … drive`).
    pub qdev: String,
    /// The node the device uses now (the CBW filter's `file`).
    pub node: String,
    /// Image format driver of that node.
    pub format: String,
    /// Image file name.
    pub filename: String,
    /// Exact virtual size in bytes.
    pub virtual_size: u64,
    /// Host allocation of the image in bytes, when QEMU knows it.
    pub allocated_size: Option<u64>,
    /// Read-only medium.
    pub read_only: bool,
}

/// The disks of the VM (devices with a medium inserted). CD-ROM drives
/// (`ide-cd`, `scsi-cd`: a removable medium such as an installer ISO) are
/// not disks of the VM and are skipped, as Proxmox does, unless
/// `include_cdrom`; each skip is described in `notes` for the backup report.
///
/// With `-blockdev` the node is the device's format node (`drv-d0`); with a
/// legacy `-drive` (Proxmox VE 8, libvirt) it is `inserted.node-name`, often
/// auto-generated (`#block144`), and `qom-get <qdev> drive` returns the
/// BlockBackend name (`drive-scsi0`) instead, so only `query-block` says
/// which node a device uses.
pub async fn discover_disks(
    qmp: &qmp::Qmp,
    notes: &mut Vec<String>,
    include_cdrom: bool,
) -> Result<Vec<VmDisk>, JobError> {
    let blocks = qmp
        .query_block()
        .await
        .map_err(JobError::qmp("query-block"))?;
    let mut disks = Vec::new();
    for b in blocks {
        let Some(qdev) = b.qdev.clone().filter(|q| !q.is_empty()) else {
            continue;
        };
        let name = qdev_id(&qdev)
            .or_else(|| (!b.device.is_empty()).then(|| b.device.clone()))
            .or_else(|| b.inserted.as_ref().map(|n| n.node_name.clone()))
            .unwrap_or_else(|| qdev.clone());
        if b.removable {
            // `removable` alone is not enough (`scsi-hd,removable=on` is a
            // disk): ask the device's type.
            let kind = qmp
                .qom_get(&qdev, "type")
                .await
                .ok()
                .and_then(|v| v.as_str().map(str::to_string));
            if !include_cdrom
                && is_cdrom(kind.as_deref(), b.inserted.as_ref().is_some_and(|n| n.ro))
            {
                if let Some(node) = &b.inserted {
                    notes.push(format!(
                        "skipped CD-ROM {name} ({}: {}): removable media are not backed up \
                         (--include-cdrom to back them up)",
                        kind.as_deref().unwrap_or("removable"),
                        node.file
                    ));
                }
                continue;
            }
        }
        let Some(node) = b.inserted else { continue };
        let Some(image) = node.image.as_ref() else {
            continue;
        };
        disks.push(VmDisk {
            name,
            device: b.device.clone(),
            qdev,
            node: node.node_name.clone(),
            format: node.drv.clone(),
            filename: node.file.clone(),
            virtual_size: image.virtual_size,
            allocated_size: image.actual_size,
            read_only: node.ro,
        });
    }
    Ok(disks)
}

/// Whether a removable device is a CD-ROM drive: its qdev type when QEMU
/// told it, else a read-only removable medium.
fn is_cdrom(qdev_type: Option<&str>, read_only: bool) -> bool {
    match qdev_type {
        Some(t) => matches!(t, "ide-cd" | "scsi-cd" | "usb-storage-cd") || t.ends_with("-cd"),
        None => read_only,
    }
}

/// The node the device `qdev` uses now, from `query-block` (the entry whose
/// `qdev` is `qdev`): `Ok(None)` when no entry has that qdev (the device
/// was unplugged) or the device has no medium.
pub async fn current_node(qmp: &qmp::Qmp, qdev: &str) -> Result<Option<String>, JobError> {
    let blocks = qmp
        .query_block()
        .await
        .map_err(JobError::qmp("query-block"))?;
    Ok(blocks
        .into_iter()
        .find(|b| b.qdev.as_deref() == Some(qdev))
        .and_then(|b| b.inserted)
        .map(|n| n.node_name))
}

/// `/machine/peripheral/<id>[/virtio-backend]` → `<id>`; QEMU reports
/// some devices (scsi-hd) by their bare id.
fn qdev_id(qdev: &str) -> Option<String> {
    let id = match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next()?,
        None if !qdev.starts_with('/') => qdev,
        None => return None,
    };
    (!id.is_empty()).then(|| id.to_string())
}

/// Node names for disk number `i` of a run tagged `tag`. QEMU limits node
/// names to 31 characters, so they use the index, not the disk name.
#[derive(Debug, Clone)]
pub struct NodeNames {
    /// Fleece image node.
    pub fleece: String,
    /// copy-before-write filter.
    pub cbw: String,
    /// snapshot-access node (what is exported).
    pub access: String,
    /// Export id.
    pub export: String,
    /// Id of the writable export shear releases stored ranges through.
    pub release: String,
}

impl NodeNames {
    /// Names for disk `i`.
    pub fn new(tag: &str, i: usize) -> Self {
        NodeNames {
            fleece: format!("shear-fl{i}-{tag}"),
            cbw: format!("shear-cbw{i}-{tag}"),
            access: format!("shear-acc{i}-{tag}"),
            export: format!("shear-exp{i}-{tag}"),
            release: format!("shear-rel{i}-{tag}"),
        }
    }
}

/// Applies steps, recording each before it is attempted.
#[derive(Debug)]
pub struct GraphBuilder<'a> {
    qmp: &'a qmp::Qmp,
    record: &'a mut RunRecord,
    record_path: PathBuf,
}

impl<'a> GraphBuilder<'a> {
    /// A builder writing to `record` at `record_path`.
    pub fn new(qmp: &'a qmp::Qmp, record: &'a mut RunRecord, record_path: &Path) -> Self {
        GraphBuilder {
            qmp,
            record,
            record_path: record_path.to_path_buf(),
        }
    }

    /// Append a step to the record and persist it (write-ahead). A step
    /// already written ahead by [`GraphBuilder::log_ahead`] is not saved
    /// again.
    pub fn log(&mut self, step: Step) -> Result<(), JobError> {
        if self.record.steps.contains(&step) {
            return Ok(());
        }
        self.record.steps.push(step);
        self.record
            .save(&self.record_path)
            .map_err(JobError::Record)
    }

    /// Write several steps ahead in one save, in the order they will be
    /// taken (one fsync pair instead of one per step). Safe because the
    /// undo of every graph step tolerates a step never taken: a node or
    /// export that does not exist, a device not on our filter, a server not
    /// on our socket, a file not there.
    pub fn log_ahead(&mut self, steps: impl IntoIterator<Item = Step>) -> Result<(), JobError> {
        log_ahead(self.record, &self.record_path, steps)
    }

    /// Drop a step that has been undone in the normal flow (thaw, cont).
    pub fn forget(&mut self, step: &Step) -> Result<(), JobError> {
        self.record.steps.retain(|s| s != step);
        self.record
            .save(&self.record_path)
            .map_err(JobError::Record)
    }

    /// Add the node of a fleece image made by [`create_fleece_file`].
    /// Done before the freeze: it does not change what the guest sees.
    pub async fn add_fleece(
        &mut self,
        disk: &VmDisk,
        names: &NodeNames,
        path: &Path,
    ) -> Result<(), JobError> {
        self.log(Step::Node {
            name: names.fleece.clone(),
        })?;
        self.qmp
            .blockdev_add(json!({
                "driver": "qcow2",
                "node-name": names.fleece,
                "discard": "unmap",
                "file": fleece_file(path),
            }))
            .await
            .map_err(JobError::qmp_at("blockdev-add fleece", &disk.name))?;
        failpoint("fleece-node", &disk.name)
    }

    /// Insert the copy-before-write filter and point the device at it.
    /// Must run while the guest is frozen or paused.
    pub async fn insert_filter(
        &mut self,
        disk: &VmDisk,
        names: &NodeNames,
        cbw_timeout_s: u32,
    ) -> Result<(), JobError> {
        self.log(Step::Node {
            name: names.cbw.clone(),
        })?;
        self.qmp
            .blockdev_add(json!({
                "driver": "copy-before-write",
                "node-name": names.cbw,
                "file": disk.node,
                "target": names.fleece,
                "on-cbw-error": "break-snapshot",
                "cbw-timeout": cbw_timeout_s,
            }))
            .await
            .map_err(JobError::qmp_at(
                "blockdev-add copy-before-write",
                &disk.name,
            ))?;
        failpoint("cbw-node", &disk.name)?;
        self.log(Step::DriveSwap {
            qdev: disk.qdev.clone(),
            original: disk.node.clone(),
            filter: names.cbw.clone(),
        })?;
        self.qmp
            .qom_set(&disk.qdev, "drive", json!(names.cbw))
            .await
            .map_err(JobError::qmp_at("qom-set drive to the filter", &disk.name))?;
        failpoint("drive-swap", &disk.name)
    }

    /// Add the snapshot-access node over the filter.
    pub async fn add_access(&mut self, disk: &VmDisk, names: &NodeNames) -> Result<(), JobError> {
        self.log(Step::Node {
            name: names.access.clone(),
        })?;
        self.qmp
            .blockdev_add(json!({
                "driver": "snapshot-access",
                "node-name": names.access,
                "file": names.cbw,
                // Without it QEMU answers every discard with success and
                // does nothing (bdrv_co_pdiscard without BDRV_O_UNMAP):
                // the release export's trims would be silently ignored.
                "discard": "unmap",
            }))
            .await
            .map_err(JobError::qmp_at("blockdev-add snapshot-access", &disk.name))?;
        failpoint("access-node", &disk.name)
    }

    /// Start QEMU's NBD server on `socket` (one connection per export we
    /// read; nobody else can reach the socket: its directory is 0700).
    pub async fn start_nbd_server(&mut self, socket: &Path, max_conn: u32) -> Result<(), JobError> {
        self.log(Step::NbdServer {
            socket: socket.to_path_buf(),
        })?;
        let path = socket
            .to_str()
            .ok_or_else(|| JobError::Invalid(format!("socket path {socket:?} is not UTF-8")))?;
        match self.qmp.nbd_server_start_unix(path, Some(max_conn)).await {
            Ok(()) => failpoint("nbd-server", "the VM"),
            // QEMU runs one NBD server; this one is someone else's (another
            // tool's, a migration's). Never touch it (undo leaves it alone:
            // it does not listen on our socket).
            Err(e)
                if e.qemu_class() == Some("GenericError")
                    && e.qemu_desc().is_some_and(|d| d.contains("already running")) =>
            {
                Err(JobError::ForeignNbdServer)
            }
            Err(e) => Err(JobError::qmp("nbd-server-start")(e)),
        }
    }

    /// Export the snapshot-access node read-only under a random name,
    /// with the frozen dirty bitmap `(node, name)` for an incremental.
    pub async fn add_export(
        &mut self,
        disk: &VmDisk,
        names: &NodeNames,
        export_name: &str,
        bitmap: Option<(&str, &str)>,
    ) -> Result<(), JobError> {
        self.log(Step::Export {
            id: names.export.clone(),
        })?;
        let mut exp =
            qmp::NbdExport::new(names.export.clone(), names.access.clone()).name(export_name);
        if let Some((node, name)) = bitmap {
            exp = exp.bitmap(node, name);
        }
        self.qmp
            .block_export_add(&exp)
            .await
            .map_err(JobError::qmp_at("block-export-add", &disk.name))?;
        failpoint("export", &disk.name)
    }

    /// Export the snapshot-access node a second time, writable, under a
    /// random name: shear discards what it has stored through it
    /// (`NBD_CMD_TRIM`; see `job::release`). On `snapshot-access` a
    /// discard makes the copy-before-write filter stop preserving the
    /// range, so a guest write there costs no copy and the fleece image
    /// shrinks (design.md "Freeing what was read"). Writes through it
    /// fail (ENOTSUP: snapshot-access implements only read and discard),
    /// and nobody but shear can reach the socket (0700 directory).
    ///
    /// A separate export because QEMU advertises multi-conn only on
    /// read-only exports (QEMU 10 has no `multi-conn` option for
    /// `block-export-add`): the reader keeps its several connections on
    /// the read-only one.
    pub async fn add_release_export(
        &mut self,
        disk: &VmDisk,
        names: &NodeNames,
        export_name: &str,
    ) -> Result<(), JobError> {
        self.log(Step::Export {
            id: names.release.clone(),
        })?;
        let exp = qmp::NbdExport::new(names.release.clone(), names.access.clone())
            .name(export_name)
            .writable(true);
        self.qmp
            .block_export_add(&exp)
            .await
            .map_err(JobError::qmp_at(
                "block-export-add (writable, to release)",
                &disk.name,
            ))?;
        failpoint("release-export", &disk.name)
    }
}

/// [`GraphBuilder::log_ahead`] without a monitor (before QMP is needed).
pub fn log_ahead(
    record: &mut RunRecord,
    record_path: &Path,
    steps: impl IntoIterator<Item = Step>,
) -> Result<(), JobError> {
    for step in steps {
        if !record.steps.contains(&step) {
            record.steps.push(step);
        }
    }
    record.save(record_path).map_err(JobError::Record)
}

/// Create the fleece image of `disk` (qcow2, exact virtual size) at `path`,
/// recorded first; the empty image as the data path samples it. Needs no
/// QMP connection (the monitor is let go meanwhile).
pub async fn create_fleece_file(
    record: &mut RunRecord,
    record_path: &Path,
    disk: &VmDisk,
    path: &Path,
) -> Result<super::fleece::FleeceImage, JobError> {
    let step = Step::FleeceFile {
        path: path.to_path_buf(),
    };
    if !record.steps.contains(&step) {
        record.steps.push(step);
        record.save(record_path).map_err(JobError::Record)?;
    }
    create_qcow2(path, disk.virtual_size).await?;
    failpoint("fleece-file", &disk.name)?;
    Ok(super::fleece::FleeceImage::created(path.to_path_buf()))
}

/// Test-only failpoint (F-14; honoured only when [`TEST_HOOKS`]): with
/// `SHEAR_TEST_FAIL_AFTER=<step>`, setup fails right after `step` succeeded
/// (`fleece-file`, `fleece-node`, `nbd-server`, `cbw-node`, `drive-swap`,
/// `access-node`, `export`, `release-export`), so the rollback of a
/// half-built graph can be tested step by step.
fn failpoint(step: &str, disk: &str) -> Result<(), JobError> {
    if TEST_HOOKS && std::env::var("SHEAR_TEST_FAIL_AFTER").is_ok_and(|v| v == step) {
        return Err(JobError::Invalid(format!(
            "setup failed after step {step} of {disk} (test failpoint)"
        )));
    }
    Ok(())
}

/// The fleece image's protocol node. Test-only wrappers (honoured only
/// when [`TEST_HOOKS`]): `SHEAR_TEST_FLEECE_BLKDEBUG=<errno>` fails the
/// first data write to the fleece image with that errno (F-11: EIO on the
/// fleecing target); `SHEAR_TEST_FLEECE_THROTTLE_GROUP=<id>` puts the file
/// under that (test-created) throttle group (F-13: slow fleecing storage).
fn fleece_file(path: &Path) -> Value {
    let mut file = json!({"driver": "file", "filename": path, "discard": "unmap"});
    if !TEST_HOOKS {
        return file;
    }
    if let Some(errno) = std::env::var("SHEAR_TEST_FLEECE_BLKDEBUG")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        file = json!({
            "driver": "blkdebug",
            "image": file,
            "inject-error": [{"event": "write_aio", "errno": errno,
                              "immediately": false, "once": true}],
        });
    }
    if let Ok(group) = std::env::var("SHEAR_TEST_FLEECE_THROTTLE_GROUP") {
        file = json!({"driver": "throttle", "throttle-group": group, "file": file});
    }
    file
}

/// Create an empty qcow2 image of exactly `size` bytes (64 KiB clusters,
/// v3, as `qemu-img create -f qcow2` makes it), owner-only. Written in
/// process: `qemu-img create` cost 40-150 ms per disk here, a fixed cost
/// of every backup that an incremental of a quiet disk mostly consists of.
/// Not fsynced: a fleece image is scratch, never read after a crash.
async fn create_qcow2(path: &Path, size: u64) -> Result<(), JobError> {
    let owned = path.to_path_buf();
    let made = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&owned)?;
        crate::repo::qcow2::Qcow2Writer::new(file, size).finish_unsynced()?;
        Ok(())
    })
    .await
    .map_err(|e| JobError::Invalid(format!("creating {}: {e}", path.display())))?;
    made.map_err(|e| JobError::io(format!("creating the fleece image {}", path.display()), e))
}

/// Undo every step of `record` in reverse order. Best effort: every step is
/// attempted even when an earlier one fails; the first error is returned.
/// Steps that never happened (or were already undone) are skipped. A step
/// whose undo failed stays in the record (so the next run retries it),
/// unless it failed because QEMU is gone — then there is nothing to undo.
pub async fn undo(
    qmp: Option<&qmp::Qmp>,
    qga: Option<&Path>,
    record: &mut RunRecord,
    record_path: &Path,
) -> Result<(), JobError> {
    let mut first_err: Option<JobError> = None;
    let mut failed: Vec<Step> = Vec::new();
    while let Some(step) = record.steps.pop() {
        let save = !redo_safe(&step);
        if let Err(e) = undo_step(qmp, qga, &step).await {
            tracing::warn!(error = %crate::job::chain(&e), ?step, "teardown step failed");
            if !qemu_gone(&e) {
                failed.push(step);
            }
            first_err.get_or_insert(e);
        }
        // Persist progress after a step that must not be redone after a
        // crash (a resume or thaw could hit a hold that is not ours; a
        // bitmap merge must happen once). Graph and file steps are safe to
        // redo (their undo checks first), so they are not saved one by
        // one: the record on disk only ever holds more steps than remain,
        // never fewer.
        if save {
            let mut snapshot = record.clone();
            snapshot.steps.extend(failed.iter().rev().cloned());
            if let Err(e) = snapshot.save(record_path) {
                first_err.get_or_insert(JobError::Record(e));
            }
        }
    }
    failed.reverse();
    record.steps = failed;
    if record.steps.is_empty() {
        record.undone = true;
        RunRecord::remove(record_path).map_err(JobError::Record)?;
    } else {
        record.save(record_path).map_err(JobError::Record)?;
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Steps whose undo may run twice: each checks what is there first, and
/// every name in them is ours alone (random per run).
fn redo_safe(step: &Step) -> bool {
    matches!(
        step,
        Step::FleeceFile { .. }
            | Step::Dir { .. }
            | Step::Node { .. }
            | Step::DriveSwap { .. }
            | Step::Export { .. }
            | Step::NbdServer { .. }
            | Step::BitmapRetire { .. }
    )
}

/// Whether an undo failed only because QEMU is no longer there (its
/// process ended: nodes, exports and filters died with it).
fn qemu_gone(e: &JobError) -> bool {
    e.kind() == super::ErrorKind::QemuGone
}

/// Resume a VM this agent held: `cont` if paused; `system_reset` + `cont`
/// if its guest was shut down (stop mode). Only called for a recorded hold
/// of ours, never for a VM someone else paused (F-29).
pub async fn resume_held(qmp: &qmp::Qmp) -> Result<(), JobError> {
    let st = qmp
        .query_status()
        .await
        .map_err(JobError::qmp("query-status"))?;
    match st.status {
        qmp::RunState::Paused => qmp.cont().await.map_err(JobError::qmp("cont")),
        qmp::RunState::Shutdown => {
            qmp.system_reset()
                .await
                .map_err(JobError::qmp("system_reset"))?;
            qmp.cont().await.map_err(JobError::qmp("cont"))
        }
        _ => Ok(()),
    }
}

async fn node_exists(qmp: &qmp::Qmp, name: &str) -> Result<bool, JobError> {
    Ok(qmp
        .query_named_block_nodes()
        .await
        .map_err(JobError::qmp("query-named-block-nodes"))?
        .iter()
        .any(|n| n.node_name == name))
}

/// Whether a server listens on the unix socket `path`. A connection that
/// neither succeeds nor fails within 2 s (a full backlog) also means one.
async fn listening(path: &Path) -> bool {
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::UnixStream::connect(path),
    )
    .await
    {
        Ok(r) => r.is_ok(),
        Err(_) => true,
    }
}

async fn undo_step(
    qmp: Option<&qmp::Qmp>,
    qga: Option<&Path>,
    step: &Step,
) -> Result<(), JobError> {
    let need_qmp = || {
        qmp.ok_or(JobError::QmpNotConnected {
            what: "undo a graph step",
        })
    };
    match step {
        Step::FleeceFile { path } => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JobError::io(
                format!("removing fleece image {}", path.display()),
                e,
            )),
        },
        Step::Dir { path } => match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JobError::io(format!("removing {}", path.display()), e)),
        },
        Step::Node { name } => {
            let qmp = need_qmp()?;
            if node_exists(qmp, name).await? {
                qmp.blockdev_del(name)
                    .await
                    .map_err(JobError::qmp_at("blockdev-del", name))?;
            }
            Ok(())
        }
        Step::DriveSwap {
            qdev,
            original,
            filter,
        } => {
            let qmp = need_qmp()?;
            // Which node the device uses comes from query-block: for a
            // legacy `-drive` disk, qom-get answers the BlockBackend name
            // (`drive-scsi0`) whatever node is inserted.
            let on_filter = match current_node(qmp, qdev).await? {
                Some(node) => node == *filter,
                // Not in query-block: unplugged, or a qdev path spelled
                // differently; qom-get answers a node name for a
                // `-blockdev` device, or DeviceNotFound.
                None => match qmp.qom_get(qdev, "drive").await {
                    Ok(v) => v.as_str() == Some(filter.as_str()),
                    Err(e) if e.qemu_class() == Some("DeviceNotFound") => false,
                    Err(e) => return Err(JobError::qmp_at("qom-get drive", qdev)(e)),
                },
            };
            if on_filter {
                qmp.qom_set(qdev, "drive", Value::from(original.as_str()))
                    .await
                    .map_err(JobError::qmp_at("qom-set drive back", qdev))?;
            }
            Ok(())
        }
        Step::Export { id } => {
            let qmp = need_qmp()?;
            let exists = qmp
                .query_block_exports()
                .await
                .map_err(JobError::qmp("query-block-exports"))?
                .iter()
                .any(|e| &e.id == id);
            if exists {
                qmp.block_export_del_wait(id, qmp::ExportRemoveMode::Hard, EXPORT_DEL_TIMEOUT)
                    .await
                    .map_err(JobError::qmp_at("block-export-del", id))?;
            }
            Ok(())
        }
        Step::NbdServer { socket } => {
            // The step is logged before `nbd-server-start`, so it may name a
            // server that never started — and another server (someone
            // else's) may run. Stop the server only when it is ours: it
            // listens on our private socket, which nobody else knows.
            if !listening(socket).await {
                let _ = std::fs::remove_file(socket);
                return Ok(());
            }
            let qmp = need_qmp()?;
            match qmp.nbd_server_stop().await {
                Ok(()) => {}
                // Not running (already stopped, or QEMU restarted).
                Err(e) if e.qemu_class() == Some("GenericError") => {}
                Err(e) => return Err(JobError::qmp("nbd-server-stop")(e)),
            }
            let _ = std::fs::remove_file(socket);
            Ok(())
        }
        Step::Pause => resume_held(need_qmp()?).await,
        Step::BitmapSplit { node, old, new } => {
            undo_split(need_qmp()?, node, old.as_deref(), new).await
        }
        Step::BitmapRetire { node, name } => remove_bitmap(need_qmp()?, node, name).await,
        Step::ShutdownAction { restore } => {
            let qmp = need_qmp()?;
            qmp.execute_value("set-action", json!({"shutdown": restore}))
                .await
                .map(|_| ())
                .map_err(JobError::qmp("set-action (restore shutdown action)"))
        }
        Step::Freeze => {
            let Some(qga) = qga else {
                return Err(JobError::Invalid(
                    "the record holds a freeze but no qemu-ga socket is known".into(),
                ));
            };
            super::freeze::thaw_recorded(qga, qmp.map(qmp::Qmp::path)).await
        }
    }
}

/// The undo of a split that did not end in a committed backup: re-enable
/// the old bitmap, merge the new one into it, remove the new one; without
/// an old bitmap, remove the new one. Tolerates a split that never
/// happened (no new bitmap) and a node that is gone.
pub async fn undo_split(
    qmp: &qmp::Qmp,
    node: &str,
    old: Option<&str>,
    new: &str,
) -> Result<(), JobError> {
    let Some(bitmaps) = bitmaps_on(qmp, node).await? else {
        return Ok(());
    };
    let find = |n: &str| bitmaps.iter().find(|b| b.name == n);
    let mut actions = Vec::new();
    match old.and_then(&find) {
        Some(o) => {
            if !o.recording {
                actions.push(qmp::TransactionAction::bitmap_enable(node, &o.name));
            }
            if find(new).is_some() {
                actions.push(qmp::TransactionAction::bitmap_merge(
                    node,
                    &o.name,
                    &[qmp::BitmapSource::from(new)],
                ));
                actions.push(qmp::TransactionAction::bitmap_remove(node, new));
            }
        }
        None => {
            if find(new).is_some() {
                actions.push(qmp::TransactionAction::bitmap_remove(node, new));
            }
        }
    }
    if actions.is_empty() {
        return Ok(());
    }
    qmp.transaction(&actions).await.map_err(JobError::qmp_at(
        "transaction (merge the bitmap back)",
        node,
    ))
}

/// Remove bitmap `name` from `node` if it is there.
pub async fn remove_bitmap(qmp: &qmp::Qmp, node: &str, name: &str) -> Result<(), JobError> {
    let Some(bitmaps) = bitmaps_on(qmp, node).await? else {
        return Ok(());
    };
    if bitmaps.iter().any(|b| b.name == name) {
        qmp.block_dirty_bitmap_remove(node, name)
            .await
            .map_err(JobError::qmp_at("block-dirty-bitmap-remove", name))?;
    }
    Ok(())
}

/// The bitmaps on `node`, or `None` if the node is gone.
pub(super) async fn bitmaps_on(
    qmp: &qmp::Qmp,
    node: &str,
) -> Result<Option<Vec<qmp::DirtyBitmapInfo>>, JobError> {
    Ok(qmp
        .query_named_block_nodes()
        .await
        .map_err(JobError::qmp("query-named-block-nodes"))?
        .into_iter()
        .find(|n| n.node_name == node)
        .map(|n| n.dirty_bitmaps))
}

#[cfg(test)]
mod tests {
    use super::{is_cdrom, qdev_id};

    #[test]
    fn cdrom_drives_are_recognised_by_type() {
        assert!(is_cdrom(Some("ide-cd"), true));
        assert!(is_cdrom(Some("scsi-cd"), false));
        assert!(!is_cdrom(Some("scsi-hd"), false));
        assert!(is_cdrom(None, true));
        assert!(!is_cdrom(None, false));
    }

    #[test]
    fn disk_names_come_from_the_qdev_id() {
        assert_eq!(
            qdev_id("/machine/peripheral/d0/virtio-backend").as_deref(),
            Some("d0")
        );
        assert_eq!(
            qdev_id("/machine/peripheral/scsi0").as_deref(),
            Some("scsi0")
        );
        assert_eq!(qdev_id("scsi0").as_deref(), Some("scsi0"));
        assert_eq!(qdev_id("/machine/unattached/device[3]"), None);
    }
}

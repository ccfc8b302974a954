//! Live restore (`shear restore BACKUP --live`): the VM runs at once from
//! the backup while QEMU copies the data into the final images.
//!
//! # How
//!
//! 1. A `shear serve` process (own process group, so it outlives the
//!    command and a Ctrl-C) serves the backup's disks read-only on a
//!    private unix socket in the state directory.
//! 2. Each target image is a qcow2 file of the disk's full virtual size
//!    whose **header** names the served disk as its backing file
//!    (`json:{"driver":"raw","file":{"driver":"nbd",…,"reconnect-delay":N}}`).
//!    The VM is started on these images: reads of what is not copied yet
//!    go to the server, every guest write lands in the target image.
//! 3. shear connects to the VM's QMP socket and runs `block-stream`
//!    (`on-error: stop`) on each image's node: QEMU copies the backing
//!    data into the image, and when the job ends it rewrites the image
//!    header without the backing file and drops the NBD node. From then on
//!    the VM does not depend on the server, which shear stops.
//!
//! # Safety at every step
//!
//! | what dies | what happens | how it finishes |
//! |---|---|---|
//! | the server | QEMU's NBD client holds reads for `reconnect-delay` s (default 600) waiting for it; after that reads of uncopied data fail: the stream job pauses (`on-error: stop`), and the guest's read, through the copy-on-read filter the job inserted, was seen to return zeros instead of an error (QEMU 10.0.2) — hence the long delay | the supervising `shear restore` restarts the server within a second and resumes the job; else `--resume` does (before the delay ends) |
//! | shear (the supervisor) | nothing: the job runs inside QEMU, the server in its own process group | `--resume` watches it to the end and stops the server |
//! | QEMU | the images keep the guest's writes and still name the backup as their backing file: nothing opens them as complete by mistake (without the server they fail to open) | start the VM again on the same images, `--resume` |
//!
//! A raw target (a file, or a block device: QEMU's `host_device`, the
//! node capped at the disk's size) is filled by a write-blocking
//! `blockdev-mirror` from a qcow2 overlay the VM starts on; the device is
//! switched over to it once in sync. What dies there:
//!
//! | what dies | what happens | how it finishes |
//! |---|---|---|
//! | the server, mid-mirror | a guest read of data not copied yet fails once `reconnect-delay` passed: the VM pauses (`rerror=stop`, status `io-error`, never zeros); the mirror pauses (`on-source-error: stop`) | the supervisor (or `--resume`) serves again, resumes the mirror, continues the VM |
//! | QEMU, after the mirror's READY was recorded | the raw target holds every write the guest was told is done | `--resume` with no VM finishes from the record (the overlay is unlocked); a VM started on the overlay again is refused |
//! | shear, after the switch (stale record) | nothing: the VM runs on the raw target | `--resume` sees the device on it, drops the overlay, stops the server |
//!
//! No state is ever only in memory: the [`LiveRecord`] (written
//! atomically) says which backup, images, socket and server process belong
//! to a live restore, and its phase. docs/formats.md describes it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{write_atomic, Existing, WriteError};

/// Version of [`LiveRecord`].
pub const RECORD_VERSION: u32 = 1;

/// Where a live restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Server up, images made; the VM has not been seen yet.
    Serving,
    /// The VM runs on the images; the copy runs (or waits to be resumed).
    Streaming,
    /// Every image holds all its data and has no backing file; the server
    /// was stopped.
    Complete,
}

/// One disk of a live restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDisk {
    /// Disk name (the export name on the socket).
    pub name: String,
    /// The target image (absolute).
    pub image: PathBuf,
    /// Virtual size, bytes.
    pub size: u64,
    /// The copy of this disk ended (no backing file any more; with a raw
    /// target: the VM runs on it).
    pub done: bool,
    /// Raw target (file or block device) the disk is mirrored into while
    /// the VM runs on `image`, a temporary qcow2 overlay; None: `image`
    /// itself is the target (block-stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_target: Option<PathBuf>,
    /// The mirror into `raw_target` reached READY. It copies in
    /// write-blocking mode, so from then on the target holds every write
    /// the guest was told is done: it is the disk's data, whatever dies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror_ready: bool,
}

impl LiveDisk {
    /// QEMU node name of the raw target (`blockdev-add` by shear).
    pub fn raw_node(&self) -> String {
        format!("shear-live-raw-{}", self.name)
    }
}

/// The durable record of one live restore:
/// `<state_dir>/live-restore/<key>.json` ([`record_path`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The exact backup id served.
    pub backup: String,
    /// Repository (as given).
    pub repo: PathBuf,
    /// Key file of an encrypted repository.
    pub keyfile: Option<PathBuf>,
    /// Passphrase file for it, if one was given.
    pub passphrase_file: Option<PathBuf>,
    /// Target directory (absolute).
    pub target: PathBuf,
    /// The server's unix socket.
    pub socket: PathBuf,
    /// The VM's QMP socket, once known.
    pub qmp: Option<PathBuf>,
    /// `reconnect-delay` written into the images' backing, seconds.
    pub reconnect_delay_secs: u64,
    /// Copy speed limit, bytes/s (0: none).
    pub speed: u64,
    /// The disks.
    pub disks: Vec<LiveDisk>,
    /// Phase.
    pub phase: Phase,
    /// The serving process (a `shear serve`), while it should run.
    pub server_pid: Option<u32>,
    /// How often the server was restarted.
    pub server_restarts: u32,
    /// Unix ms: the command started.
    pub started_ms: u64,
    /// Unix ms: the VM's QMP first answered with the images attached.
    pub vm_attached_ms: Option<u64>,
    /// Unix ms: every copy ended (the VM no longer needs the backup).
    pub complete_ms: Option<u64>,
    /// The last notable event, for humans.
    pub detail: String,
}

/// `<state_dir>/live-restore/<key>.json` for `target` (absolute): the key
/// is the first 16 hex digits of the BLAKE3 of the target path, short
/// enough for the socket beside it (`<key>.sock`) to fit a unix path.
pub fn record_path(state_dir: &Path, target: &Path) -> PathBuf {
    state_dir
        .join("live-restore")
        .join(format!("{}.json", key(target)))
}

fn key(target: &Path) -> String {
    let h = blake3::hash(target.as_os_str().as_encoded_bytes());
    h.to_hex()[..16].to_string()
}

/// The server socket for `target`'s live restore.
pub fn socket_path(state_dir: &Path, target: &Path) -> PathBuf {
    state_dir
        .join("live-restore")
        .join(format!("{}.sock", key(target)))
}

/// The qcow2 overlay a VM runs on while disk `disk` is mirrored into the
/// block device `target`: a device has no directory beside it, so the
/// overlay lives in the state directory, beside the record.
pub fn device_overlay_path(state_dir: &Path, target: &Path, disk: &str) -> PathBuf {
    state_dir
        .join("live-restore")
        .join(format!("{}.{disk}.live.qcow2", key(target)))
}

/// Errors reading or writing a [`LiveRecord`].
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading the file.
    #[error("cannot read live-restore record {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Bad JSON or version.
    #[error("live-restore record {path} is not valid: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Writing it.
    #[error("cannot write live-restore record")]
    Write(#[from] WriteError),
}

impl LiveRecord {
    /// Loads the record at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<LiveRecord>, RecordError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let r: LiveRecord = serde_json::from_slice(&bytes).map_err(|e| RecordError::Invalid {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        if r.version != RECORD_VERSION {
            return Err(RecordError::Invalid {
                path: path.to_owned(),
                why: format!("version {} (this shear reads {RECORD_VERSION})", r.version),
            });
        }
        Ok(Some(r))
    }

    /// Writes the record atomically (temp file, fsync, rename, directory
    /// fsync), creating its directory (0700).
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| RecordError::Read {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let text = serde_json::to_vec_pretty(self).map_err(|e| RecordError::Invalid {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        write_atomic(path, &text, Existing::Replace)?;
        Ok(())
    }
}

/// The backing-file string written into a target image's header: the
/// served export through QEMU's NBD client, which waits up to
/// `reconnect_delay` s for a lost server before failing a read.
pub fn backing_spec(socket: &Path, export: &str, reconnect_delay: u64) -> String {
    let v = serde_json::json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": {"type": "unix", "path": socket},
            "export": export,
            "reconnect-delay": reconnect_delay,
        }
    });
    format!("json:{v}")
}

/// What QEMU shows of one disk at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// No node of the VM has this image open.
    Absent,
    /// The image's node (name) still has a backing file.
    Backed(String),
    /// The image's node has no backing file: copied.
    Independent,
}

/// The stream job of one disk, as `query-block-jobs` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobSeen {
    /// No such job.
    None,
    /// Running (or ready, waiting, pending: QEMU finishes it by itself).
    Running,
    /// Paused after an I/O error (`on-error: stop`).
    PausedOnError,
    /// Paused by someone else: left alone.
    PausedByUser,
}

/// What to do for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing now.
    Wait,
    /// Start `block-stream` on this node.
    Start(String),
    /// `block-job-resume` (the server is up again).
    Resume,
    /// Mark the disk done.
    Done,
}

/// The decision for one disk, given what QEMU shows and whether the
/// server is up. Pure: unit-tested.
pub fn decide(seen: &Seen, job: JobSeen, server_up: bool) -> Action {
    match (seen, job) {
        (Seen::Independent, _) => Action::Done,
        (Seen::Absent, _) => Action::Wait,
        (Seen::Backed(node), JobSeen::None) if server_up => Action::Start(node.clone()),
        (Seen::Backed(_), JobSeen::PausedOnError) if server_up => Action::Resume,
        _ => Action::Wait,
    }
}

/// Classifies a `query-block-jobs` entry.
pub fn job_seen(job: &serde_json::Value) -> JobSeen {
    let paused = job["paused"].as_bool() == Some(true) || job["status"] == "paused";
    if !paused {
        return JobSeen::Running;
    }
    if job["io-status"] == "ok" {
        JobSeen::PausedByUser
    } else {
        JobSeen::PausedOnError
    }
}

/// How to read shear's own job once shear continued the VM (`cont`):
/// QEMU's `cont` also resets the io-status of every block job, so a job
/// paused on a read error (the server's restart races QEMU's reconnect
/// backoff: the job may fail again right after it was resumed) then looks
/// paused by a user, and would never be resumed. After a `cont` of
/// shear's, a paused job of shear's is taken as paused on an error.
pub fn after_cont(job: JobSeen, sent_cont: bool) -> JobSeen {
    match job {
        JobSeen::PausedByUser if sent_cont => JobSeen::PausedOnError,
        j => j,
    }
}

/// What QEMU's `query-named-block-nodes` shows of `image`: the qcow2 node
/// whose file is `image`, and whether it still has a backing file.
pub fn seen_in(nodes: &serde_json::Value, image: &Path) -> Seen {
    let want = image.to_string_lossy();
    let node = nodes.as_array().into_iter().flatten().find(|n| {
        n["drv"] == "qcow2"
            && (n["file"].as_str() == Some(&want) || n["image"]["filename"].as_str() == Some(&want))
    });
    match node {
        None => Seen::Absent,
        Some(n) => {
            let depth = n["backing_file_depth"].as_u64().unwrap_or(0);
            let has_backing = n["image"]["backing-filename"].is_string()
                || n["backing_file"].is_string()
                || depth > 0;
            match (has_backing, n["node-name"].as_str()) {
                (false, _) => Seen::Independent,
                (true, Some(name)) => Seen::Backed(name.to_owned()),
                (true, None) => Seen::Absent,
            }
        }
    }
}

/// Named nodes (not QEMU's `#block…`) that have `image` open: its format
/// node and a separately named protocol node, format node first.
pub fn nodes_of(nodes: &serde_json::Value, image: &Path) -> Vec<String> {
    let want = image.to_string_lossy();
    let mut v: Vec<(bool, String)> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["file"].as_str() == Some(&want))
        .filter_map(|n| {
            let name = n["node-name"].as_str()?;
            (!name.starts_with('#')).then(|| (n["drv"] != "qcow2", name.to_owned()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// Whether a device of the VM (`query-block`) runs on node `node`.
pub fn device_on(blocks: &serde_json::Value, node: &str) -> bool {
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| b["inserted"]["node-name"] == node)
}

/// Whether any node of the VM still reads from `socket` (an NBD node the
/// stream did not drop).
pub fn references_socket(nodes: &serde_json::Value, socket: &Path) -> bool {
    let s = socket.to_string_lossy();
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n["drv"] == "nbd" && n["file"].as_str().is_some_and(|f| f.contains(&*s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decide_covers_each_state() {
        let b = Seen::Backed("n".into());
        assert_eq!(
            decide(&Seen::Independent, JobSeen::None, false),
            Action::Done
        );
        assert_eq!(decide(&Seen::Absent, JobSeen::None, true), Action::Wait);
        assert_eq!(decide(&b, JobSeen::None, true), Action::Start("n".into()));
        // No stream is started while the server is down: its first read
        // would fail.
        assert_eq!(decide(&b, JobSeen::None, false), Action::Wait);
        assert_eq!(decide(&b, JobSeen::PausedOnError, true), Action::Resume);
        assert_eq!(decide(&b, JobSeen::PausedOnError, false), Action::Wait);
        // A job someone else paused is theirs.
        assert_eq!(decide(&b, JobSeen::PausedByUser, true), Action::Wait);
        // Unless shear's `cont` of the VM cleared the job's error.
        assert_eq!(
            after_cont(JobSeen::PausedByUser, true),
            JobSeen::PausedOnError
        );
        assert_eq!(
            after_cont(JobSeen::PausedByUser, false),
            JobSeen::PausedByUser
        );
        assert_eq!(after_cont(JobSeen::Running, true), JobSeen::Running);
        assert_eq!(decide(&b, JobSeen::Running, true), Action::Wait);
    }

    #[test]
    fn jobs_and_nodes_are_read_from_qemu_replies() {
        assert_eq!(
            job_seen(&json!({"status": "running", "paused": false, "io-status": "ok"})),
            JobSeen::Running
        );
        assert_eq!(
            job_seen(&json!({"status": "paused", "paused": true, "io-status": "failed"})),
            JobSeen::PausedOnError
        );
        assert_eq!(
            job_seen(&json!({"status": "paused", "paused": true, "io-status": "ok"})),
            JobSeen::PausedByUser
        );
        let img = Path::new("/t/scsi0.qcow2");
        let nodes = json!([
            {"node-name": "#block1", "drv": "nbd", "file": "nbd+unix:///scsi0?socket=/s/x.sock"},
            {"node-name": "drv0", "drv": "qcow2", "file": "/t/scsi0.qcow2", "backing_file_depth": 1,
             "backing_file": "json:{}", "image": {"filename": "/t/scsi0.qcow2"}},
            {"node-name": "#block2", "drv": "file", "file": "/t/scsi0.qcow2"}
        ]);
        assert_eq!(seen_in(&nodes, img), Seen::Backed("drv0".into()));
        assert!(references_socket(&nodes, Path::new("/s/x.sock")));
        let done = json!([
            {"node-name": "drv0", "drv": "qcow2", "file": "/t/scsi0.qcow2", "backing_file_depth": 0,
             "image": {"filename": "/t/scsi0.qcow2"}}
        ]);
        assert_eq!(seen_in(&done, img), Seen::Independent);
        assert!(!references_socket(&done, Path::new("/s/x.sock")));
        assert_eq!(seen_in(&done, Path::new("/t/other.qcow2")), Seen::Absent);
        // A raw target: the overlay's named nodes (format first), and the
        // device on the raw node after the pivot.
        assert_eq!(nodes_of(&nodes, img), vec!["drv0".to_owned()]);
        let split = json!([
            {"node-name": "file-scsi0", "drv": "file", "file": "/t/scsi0.qcow2"},
            {"node-name": "drive-scsi0", "drv": "qcow2", "file": "/t/scsi0.qcow2"}
        ]);
        assert_eq!(nodes_of(&split, img), ["drive-scsi0", "file-scsi0"]);
        let blocks = json!([{"device": "", "qdev": "vd0", "inserted": {"node-name": "shear-live-raw-scsi0"}}]);
        assert!(device_on(&blocks, "shear-live-raw-scsi0"));
        assert!(!device_on(&blocks, "drv0"));
    }

    #[test]
    fn record_round_trips_and_rejects_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let target = Path::new("/restore/vm100");
        let p = record_path(dir.path(), target);
        assert!(LiveRecord::load(&p).unwrap().is_none());
        let mut r = LiveRecord {
            version: RECORD_VERSION,
            backup: "vm/100/2026-11-30T10:00:00Z".into(),
            repo: "/repo".into(),
            keyfile: None,
            passphrase_file: None,
            target: target.into(),
            socket: socket_path(dir.path(), target),
            qmp: None,
            reconnect_delay_secs: 30,
            speed: 0,
            disks: vec![LiveDisk {
                name: "scsi0".into(),
                image: target.join("scsi0.qcow2"),
                size: 1 << 30,
                done: false,
                raw_target: None,
                mirror_ready: false,
            }],
            phase: Phase::Serving,
            server_pid: Some(42),
            server_restarts: 0,
            started_ms: 1,
            vm_attached_ms: None,
            complete_ms: None,
            detail: String::new(),
        };
        r.save(&p).unwrap();
        assert_eq!(LiveRecord::load(&p).unwrap().unwrap(), r);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"phase\": \"serving\""), "{text}");
        r.version = 9;
        r.save(&p).unwrap();
        assert!(matches!(
            LiveRecord::load(&p),
            Err(RecordError::Invalid { .. })
        ));
        // The socket path stays short: a unix path holds 107 bytes.
        assert!(
            socket_path(Path::new("/var/lib/shear"), target)
                .as_os_str()
                .len()
                < 60
        );
        let spec = backing_spec(Path::new("/s/x.sock"), "scsi0", 30);
        assert!(spec.starts_with("json:{"), "{spec}");
        let v: serde_json::Value = serde_json::from_str(&spec[5..]).unwrap();
        assert_eq!(v["file"]["reconnect-delay"], 30);
        assert_eq!(v["file"]["server"]["path"], "/s/x.sock");
    }
}

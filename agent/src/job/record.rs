//! The run record: a write-ahead log of every change a backup makes to a VM.
//!
//! Before each change to QEMU's block graph (or the guest's freeze state) the
//! job appends the step to `<run_dir>/backup-<vmid>.json` (atomically:
//! temp, fsync, rename, fsync dir). Undoing the steps in reverse order is the
//! one teardown path for success, error, Ctrl-C, and — when the agent was
//! killed with SIGKILL — for the next `shear` run on that VM, which finds the
//! record and cleans up before doing anything else.
//!
//! Steps are recorded *before* they are attempted, so undo must tolerate a
//! step that never happened (a node that does not exist, a drive that
//! already points at its original node).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, Existing};

/// One change made to the VM, in the order made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// qemu-ga `guest-fsfreeze-freeze` sent by us.
    Freeze,
    /// QMP `stop` sent by us (suspend mode, or no agent).
    Pause,
    /// A fleecing image file we created.
    FleeceFile {
        /// Its path.
        path: PathBuf,
    },
    /// A block node we added with `blockdev-add`.
    Node {
        /// Node name.
        name: String,
    },
    /// A device whose `drive` we pointed at our filter.
    DriveSwap {
        /// qdev path.
        qdev: String,
        /// The node it used before.
        original: String,
        /// Our filter node.
        filter: String,
    },
    /// `nbd-server-start` by us.
    NbdServer {
        /// Its unix socket.
        socket: PathBuf,
    },
    /// A block export we added.
    Export {
        /// Export id.
        id: String,
    },
    /// A private directory we created (removed last).
    Dir {
        /// Its path.
        path: PathBuf,
    },
    /// A dirty-bitmap split (incremental tracking): `new` added, `old`
    /// disabled. Undo merges `new` back into `old` (re-enabled) and removes
    /// `new`, so no change is lost.
    BitmapSplit {
        /// Node holding both bitmaps.
        node: String,
        /// Our bitmap that counted up to this run (if any).
        old: Option<String>,
        /// The bitmap this run added.
        new: String,
    },
    /// A split whose backup succeeded: undo removes the old bitmap.
    BitmapRetire {
        /// Node holding it.
        node: String,
        /// The old bitmap.
        name: String,
    },
    /// `set-action` changed by us; restore the previous shutdown action.
    ShutdownAction {
        /// Action to restore (`poweroff` is QEMU's default).
        restore: String,
    },
}

/// The record of one backup run on one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Format version of this file.
    pub version: u32,
    /// VM id.
    pub vmid: String,
    /// Agent process id.
    pub pid: u32,
    /// QMP socket used.
    pub qmp: PathBuf,
    /// qemu-ga socket used (if any).
    pub qga: Option<PathBuf>,
    /// Steps made, in order; undone in reverse.
    pub steps: Vec<Step>,
    /// Whether the steps have been undone (the record is then removed).
    #[serde(default)]
    pub undone: bool,
}

/// Run record format version.
pub const RECORD_VERSION: u32 = 1;

/// Errors reading or writing the record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// I/O on the record file.
    #[error("run record {path}: {op}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The record is not valid JSON of this version.
    #[error("run record {path} is unreadable")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Largest record accepted when reading (it holds a few dozen steps).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Path of the record for `vmid` in `run_dir`.
pub fn record_path(run_dir: &Path, vmid: &str) -> PathBuf {
    run_dir.join(format!("backup-{vmid}.json"))
}

impl RunRecord {
    /// A new, empty record.
    pub fn new(vmid: &str, qmp: &Path, qga: Option<&Path>) -> Self {
        RunRecord {
            version: RECORD_VERSION,
            vmid: vmid.to_string(),
            pid: std::process::id(),
            qmp: qmp.to_path_buf(),
            qga: qga.map(Path::to_path_buf),
            steps: Vec::new(),
            undone: false,
        }
    }

    /// Read the record at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<RunRecord>, RecordError> {
        use std::io::Read;
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Io {
                    path: path.into(),
                    op: "open",
                    source,
                })
            }
        };
        let mut buf = Vec::new();
        f.take(MAX_RECORD_BYTES)
            .read_to_end(&mut buf)
            .map_err(|source| RecordError::Io {
                path: path.into(),
                op: "read",
                source,
            })?;
        Self::decode(&buf)
            .map(Some)
            .map_err(|source| RecordError::Corrupt {
                path: path.into(),
                source,
            })
    }

    /// Parses a record's bytes (what [`RunRecord::load`] read; fuzzed by
    /// `agent/fuzz`).
    pub fn decode(bytes: &[u8]) -> Result<RunRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Write the record atomically and durably ([`fsutil::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Corrupt {
            path: path.into(),
            source,
        })?;
        fsutil::write_atomic(path, &bytes, Existing::Replace).map_err(|e| RecordError::Io {
            path: path.into(),
            op: e.op,
            source: e.source,
        })
    }

    /// Remove what an interrupted save of the record at `path` left beside
    /// it (a run killed while rewriting its record). The caller holds the
    /// per-VM lock, so no live writer's temp file is touched.
    pub fn remove_temps(path: &Path) -> Result<u64, RecordError> {
        fsutil::remove_temps_of(path).map_err(|source| RecordError::Io {
            path: path.into(),
            op: "remove temp files",
            source,
        })
    }

    /// Remove the record file (after a complete undo).
    pub fn remove(path: &Path) -> Result<(), RecordError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Io {
                path: path.into(),
                op: "remove",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = record_path(dir.path(), "100");
        assert!(RunRecord::load(&p).unwrap().is_none());
        let mut r = RunRecord::new("100", Path::new("/q.sock"), None);
        r.steps.push(Step::Freeze);
        r.steps.push(Step::Node {
            name: "shear-cbw-d0".into(),
        });
        r.steps.push(Step::DriveSwap {
            qdev: "/machine/peripheral/d0/virtio-backend".into(),
            original: "drv-d0".into(),
            filter: "shear-cbw-d0".into(),
        });
        r.save(&p).unwrap();
        let back = RunRecord::load(&p).unwrap().unwrap();
        assert_eq!(back.steps, r.steps);
        assert_eq!(back.vmid, "100");
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        RunRecord::remove(&p).unwrap();
        assert!(RunRecord::load(&p).unwrap().is_none());
    }

    #[test]
    fn corrupt_record_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = record_path(dir.path(), "7");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            RunRecord::load(&p),
            Err(RecordError::Corrupt { .. })
        ));
    }
}

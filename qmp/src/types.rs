//! Typed arguments and replies for the commands the agent uses.
//!
//! Replies are lenient: every field has a default, unknown fields are kept
//! in `other`, and enums carry an `Other(String)` variant for values newer
//! QEMUs may send. Only a reply whose basic shape is wrong (a list where an
//! object belongs) is a decode error.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Declares a string enum that round-trips unknown values as `Other`.
macro_rules! lenient_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this crate does not know (kept verbatim).
            Other(String),
        }

        impl $name {
            /// The QAPI string.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $text, )*
                    Self::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $( $text => Self::$variant, )*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Any JSON value: a non-string becomes Other(its JSON text).
                Ok(match Value::deserialize(d)? {
                    Value::String(s) => Self::from(s.as_str()),
                    other => Self::Other(other.to_string()),
                })
            }
        }
    };
}

lenient_enum! {
    /// VM run state (`query-status`).
    pub enum RunState {
        /// `debug`
        Debug = "debug",
        /// `inmigrate`
        InMigrate = "inmigrate",
        /// `internal-error`
        InternalError = "internal-error",
        /// `io-error`
        IoError = "io-error",
        /// `paused`
        Paused = "paused",
        /// `postmigrate`
        PostMigrate = "postmigrate",
        /// `prelaunch` (started with `-S`, never run)
        Prelaunch = "prelaunch",
        /// `finish-migrate`
        FinishMigrate = "finish-migrate",
        /// `restore-vm`
        RestoreVm = "restore-vm",
        /// `running`
        Running = "running",
        /// `save-vm`
        SaveVm = "save-vm",
        /// `shutdown`
        Shutdown = "shutdown",
        /// `suspended`
        Suspended = "suspended",
        /// `watchdog`
        Watchdog = "watchdog",
        /// `guest-panicked`
        GuestPanicked = "guest-panicked",
        /// `colo`
        Colo = "colo",
    }
}

impl Default for RunState {
    fn default() -> Self {
        Self::Other(String::new())
    }
}

lenient_enum! {
    /// Job status (`query-jobs`, `JOB_STATUS_CHANGE`).
    pub enum JobStatus {
        /// `undefined`
        Undefined = "undefined",
        /// `created`
        Created = "created",
        /// `running`
        Running = "running",
        /// `paused`
        Paused = "paused",
        /// `ready`
        Ready = "ready",
        /// `standby`
        Standby = "standby",
        /// `waiting`
        Waiting = "waiting",
        /// `pending`
        Pending = "pending",
        /// `aborting`
        Aborting = "aborting",
        /// `concluded`: finished, waiting for `job-dismiss`.
        Concluded = "concluded",
        /// `null`: dismissed.
        Null = "null",
    }
}

impl Default for JobStatus {
    fn default() -> Self {
        Self::Other(String::new())
    }
}

lenient_enum! {
    /// `block-export-del` mode.
    pub enum ExportRemoveMode {
        /// Fail if clients are connected.
        Safe = "safe",
        /// Disconnect clients, then remove.
        Hard = "hard",
    }
}

lenient_enum! {
    /// `set-action` reboot action.
    pub enum RebootAction {
        /// Reset the VM.
        Reset = "reset",
        /// Treat a reboot as a shutdown.
        Shutdown = "shutdown",
    }
}

lenient_enum! {
    /// `set-action` shutdown action.
    pub enum ShutdownAction {
        /// Power off (QEMU exits).
        Poweroff = "poweroff",
        /// Pause the VM instead.
        Pause = "pause",
    }
}

lenient_enum! {
    /// `set-action` panic action.
    pub enum PanicAction {
        /// Pause the VM.
        Pause = "pause",
        /// Shut down.
        Shutdown = "shutdown",
        /// Exit QEMU with a failure status.
        ExitFailure = "exit-failure",
        /// Continue.
        None = "none",
    }
}

lenient_enum! {
    /// `set-action` watchdog action.
    pub enum WatchdogAction {
        /// Reset.
        Reset = "reset",
        /// Shut down.
        Shutdown = "shutdown",
        /// Power off.
        Poweroff = "poweroff",
        /// Pause.
        Pause = "pause",
        /// Debug.
        Debug = "debug",
        /// Nothing.
        None = "none",
        /// Inject an NMI.
        InjectNmi = "inject-nmi",
    }
}

/// QEMU version triple.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(default)]
pub struct VersionTriple {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

/// `query-version` reply (also the greeting's `version`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VersionInfo {
    /// Version numbers.
    pub qemu: VersionTriple,
    /// Distribution package string.
    pub package: String,
}

/// The server greeting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Offered capabilities (`oob`); this client enables none.
    pub capabilities: Vec<String>,
}

/// `query-status` reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusInfo {
    /// Whether vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Image information inside a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Image file name.
    pub filename: String,
    /// Image format.
    pub format: String,
    /// Guest-visible size in bytes (a fleece image must match it exactly).
    pub virtual_size: u64,
    /// Host allocation in bytes.
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have one.
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty.
    pub dirty_flag: Option<bool>,
    /// Backing file name.
    pub backing_filename: Option<String>,
    /// Fields this crate does not model (including `backing-image`).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A dirty bitmap as listed on a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DirtyBitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Dirty bytes.
    pub count: u64,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Whether it records writes (enabled).
    pub recording: bool,
    /// Whether a job or export is using it.
    pub busy: bool,
    /// Whether it is stored in the image.
    pub persistent: bool,
    /// Whether it was found inconsistent (QEMU died while it was in use).
    pub inconsistent: bool,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A block node (`query-named-block-nodes`, or `inserted` in `query-block`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct BlockNodeInfo {
    /// Node name.
    pub node_name: String,
    /// Driver (`qcow2`, `file`, `copy-before-write`, ...).
    pub drv: String,
    /// File name or JSON description.
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Image information.
    pub image: Option<ImageInfo>,
    /// Dirty bitmaps on this node.
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of `query-block`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockInfo {
    /// Legacy device (drive) name; empty for `-blockdev` setups.
    pub device: String,
    /// The guest device's QOM path or id: the path to `qom-set ... drive`.
    pub qdev: Option<String>,
    /// Removable medium.
    pub removable: bool,
    /// Medium locked.
    pub locked: bool,
    /// The root node attached to the device, if any.
    pub inserted: Option<BlockNodeInfo>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of `query-block-exports`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Export type (`nbd`, ...).
    #[serde(rename = "type")]
    pub export_type: String,
    /// Exported node.
    pub node_name: String,
    /// True after `block-export-del` while clients drain.
    pub shutting_down: bool,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of `query-jobs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type (`snapshot-save`, `backup`, ...), verbatim.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Status.
    pub status: JobStatus,
    /// Progress so far.
    pub current_progress: u64,
    /// Progress total (an estimate).
    pub total_progress: u64,
    /// Set when the job failed.
    pub error: Option<String>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Options for `block-dirty-bitmap-add`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BitmapAddOptions {
    /// Granularity in bytes (power of two; QEMU's default 64 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Store the bitmap in the image (qcow2 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Create it disabled (not recording).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// A bitmap named by node and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapRef {
    /// Node holding the bitmap.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

impl BitmapRef {
    /// A bitmap on `node`.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            name: name.into(),
        }
    }
}

/// A merge source: a bitmap on the target's node (by name) or on any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BitmapSource {
    /// A bitmap on the same node as the merge target.
    Name(String),
    /// A bitmap on another node.
    Node(BitmapRef),
}

impl From<&str> for BitmapSource {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<BitmapRef> for BitmapSource {
    fn from(r: BitmapRef) -> Self {
        Self::Node(r)
    }
}

/// Arguments of `block-export-add` for a read-only or writable NBD export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdExport {
    #[serde(rename = "type")]
    export_type: &'static str,
    /// Export id (for `block-export-del` and the deleted event).
    pub id: String,
    /// Node to export.
    pub node_name: String,
    /// NBD export name (defaults to the node name in QEMU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-text description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Writable export (default read-only).
    pub writable: bool,
    /// Dirty bitmaps to expose as `qemu:dirty-bitmap:NAME`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<BitmapRef>,
    /// Expose `qemu:allocation-depth`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allocation_depth: bool,
}

impl NbdExport {
    /// A read-only NBD export of `node_name` with id `id`.
    pub fn new(id: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self {
            export_type: "nbd",
            id: id.into(),
            node_name: node_name.into(),
            name: None,
            description: None,
            writable: false,
            bitmaps: Vec::new(),
            allocation_depth: false,
        }
    }

    /// Set the NBD export name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Expose a dirty bitmap (`{node, name}` form; QEMU 7.1+).
    #[must_use]
    pub fn bitmap(mut self, node: impl Into<String>, name: impl Into<String>) -> Self {
        self.bitmaps.push(BitmapRef::new(node, name));
        self
    }

    /// Make the export writable.
    #[must_use]
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Expose `qemu:allocation-depth`.
    #[must_use]
    pub fn allocation_depth(mut self, on: bool) -> Self {
        self.allocation_depth = on;
        self
    }
}

/// Arguments of `set-action`; `None` fields are left unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetAction {
    /// What a guest reboot does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootAction>,
    /// What a guest shutdown does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownAction>,
    /// What a guest panic does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic: Option<PanicAction>,
    /// What a watchdog expiry does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<WatchdogAction>,
}

/// One action of a `transaction`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransactionAction {
    /// Action type, e.g. `block-dirty-bitmap-add`.
    #[serde(rename = "type")]
    pub action_type: String,
    /// Its arguments.
    pub data: Value,
}

impl TransactionAction {
    /// Any action, for types without a constructor here.
    pub fn raw(action_type: impl Into<String>, data: Value) -> Self {
        Self {
            action_type: action_type.into(),
            data,
        }
    }

    fn bitmap(action_type: &str, node: &str, name: &str) -> Self {
        Self::raw(
            action_type,
            serde_json::json!({ "node": node, "name": name }),
        )
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(node: &str, name: &str, opts: BitmapAddOptions) -> Self {
        let mut data = serde_json::json!({ "node": node, "name": name });
        if let (Value::Object(map), Ok(Value::Object(extra))) =
            (&mut data, serde_json::to_value(opts))
        {
            map.extend(extra);
        }
        Self::raw("block-dirty-bitmap-add", data)
    }

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(node: &str, name: &str) -> Self {
        Self::bitmap("block-dirty-bitmap-remove", node, name)
    }

    /// `block-dirty-bitmap-clear`.
    pub fn bitmap_clear(node: &str, name: &str) -> Self {
        Self::bitmap("block-dirty-bitmap-clear", node, name)
    }

    /// `block-dirty-bitmap-enable`.
    pub fn bitmap_enable(node: &str, name: &str) -> Self {
        Self::bitmap("block-dirty-bitmap-enable", node, name)
    }

    /// `block-dirty-bitmap-disable`.
    pub fn bitmap_disable(node: &str, name: &str) -> Self {
        Self::bitmap("block-dirty-bitmap-disable", node, name)
    }

    /// `block-dirty-bitmap-merge` of `sources` into `node`/`target`.
    pub fn bitmap_merge(node: &str, target: &str, sources: &[BitmapSource]) -> Self {
        Self::raw(
            "block-dirty-bitmap-merge",
            serde_json::json!({ "node": node, "target": target, "bitmaps": sources }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_enum_values_and_fields_are_kept() {
        let s: StatusInfo = serde_json::from_value(
            json!({"running": false, "status": "hibernating", "new-field": [1]}),
        )
        .unwrap();
        assert_eq!(s.status, RunState::Other("hibernating".into()));
        assert_eq!(s.other["new-field"], json!([1]));
        let j: JobInfo =
            serde_json::from_value(json!({"id":"j","type":"x-new","status":7})).unwrap();
        assert_eq!(j.status, JobStatus::Other("7".into()));
        let r: StatusInfo = serde_json::from_value(json!({"status": "running"})).unwrap();
        assert_eq!(r.status, RunState::Running);
        assert_eq!(RunState::Prelaunch.to_string(), "prelaunch");
    }

    #[test]
    fn arguments_serialize_as_qemu_expects() {
        let e = NbdExport::new("exp0", "access-d0")
            .name("d0")
            .bitmap("drv-d0", "shear-tmp");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type":"nbd","id":"exp0","node-name":"access-d0","name":"d0",
                   "writable":false,"bitmaps":[{"node":"drv-d0","name":"shear-tmp"}]})
        );
        let a = TransactionAction::bitmap_add(
            "n",
            "b",
            BitmapAddOptions {
                disabled: Some(true),
                ..Default::default()
            },
        );
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"type":"block-dirty-bitmap-add","data":{"node":"n","name":"b","disabled":true}})
        );
        let m = TransactionAction::bitmap_merge(
            "n",
            "t",
            &["a".into(), BitmapRef::new("m", "c").into()],
        );
        assert_eq!(
            m.data,
            json!({"node":"n","target":"t","bitmaps":["a",{"node":"m","name":"c"}]})
        );
        assert_eq!(
            serde_json::to_value(SetAction {
                shutdown: Some(ShutdownAction::Pause),
                ..Default::default()
            })
            .unwrap(),
            json!({"shutdown":"pause"})
        );
    }
}

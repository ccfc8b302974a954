//! Typed QGA commands and replies.
//!
//! Each command is a struct that serializes to the command's `arguments`,
//! names the command, and says what its `return` must deserialize to.
//! Replies are checked field by field; unknown fields are ignored (newer
//! agents add some), unknown enum values are errors where acting on them
//! would be unsafe (freeze status).

use serde::{Deserialize, Serialize};

/// A QGA command with a typed reply.
pub trait Command: Serialize {
    /// The wire name, e.g. `guest-ping`.
    const NAME: &'static str;
    /// What `return` must deserialize to.
    type Ok: serde::de::DeserializeOwned;
    /// Checks beyond the type (ranges, consistency). `Err` is a sanitized
    /// description of what is wrong.
    fn check(_reply: &Self::Ok) -> Result<(), String> {
        Ok(())
    }
}

/// An empty `return` object (`{}`); anything else is a type error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `guest-ping`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestPing {}

impl Command for GuestPing {
    const NAME: &'static str = "guest-ping";
    type Ok = Empty;
}

/// `guest-info`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestInfo {}

/// One entry of `guest-info`'s command list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CommandInfo {
    /// Command name.
    pub name: String,
    /// Whether the guest admin enabled it.
    pub enabled: bool,
    /// Whether it replies on success (`guest-shutdown` does not).
    #[serde(rename = "success-response")]
    pub success_response: bool,
}

/// `guest-info`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentInfo {
    /// qemu-ga version string.
    pub version: String,
    /// Commands the agent knows.
    pub supported_commands: Vec<CommandInfo>,
}

impl AgentInfo {
    /// Whether `name` is known and enabled.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == name && c.enabled)
    }
}

impl Command for GuestInfo {
    const NAME: &'static str = "guest-info";
    type Ok = AgentInfo;
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsFreezeStatusCmd {}

/// Freeze state as qemu-ga reports it. Any other string is rejected: an
/// unknown state must never be read as "thawed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsFreezeStatus {
    /// Not frozen.
    Thawed,
    /// Frozen (by anyone).
    Frozen,
}

impl Command for FsFreezeStatusCmd {
    const NAME: &'static str = "guest-fsfreeze-status";
    type Ok = FsFreezeStatus;
}

/// Upper bound on a plausible filesystem count; larger is a lie.
const MAX_FILESYSTEMS: u32 = 1 << 16;

fn check_count(count: u32) -> Result<(), String> {
    if count > MAX_FILESYSTEMS {
        Err(format!("{count} filesystems is implausible"))
    } else {
        Ok(())
    }
}

/// `guest-fsfreeze-freeze`: freeze every freezable filesystem. Prefer
/// [`crate::FreezeGuard`], which thaws on every path.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsFreezeFreeze {}

impl Command for FsFreezeFreeze {
    const NAME: &'static str = "guest-fsfreeze-freeze";
    /// Filesystems frozen.
    type Ok = u32;
    fn check(reply: &u32) -> Result<(), String> {
        check_count(*reply)
    }
}

/// `guest-fsfreeze-freeze-list`: freeze the given mountpoints (qemu-ga
/// silently ignores ones that are not mounted).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsFreezeFreezeList {
    /// Mountpoints to freeze.
    pub mountpoints: Vec<String>,
}

impl Command for FsFreezeFreezeList {
    const NAME: &'static str = "guest-fsfreeze-freeze-list";
    /// Filesystems frozen.
    type Ok = u32;
    fn check(reply: &u32) -> Result<(), String> {
        check_count(*reply)
    }
}

/// `guest-fsfreeze-thaw`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsFreezeThaw {}

impl Command for FsFreezeThaw {
    const NAME: &'static str = "guest-fsfreeze-thaw";
    /// Filesystems thawed.
    type Ok = u32;
    fn check(reply: &u32) -> Result<(), String> {
        check_count(*reply)
    }
}

/// `guest-get-fsinfo`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GetFsInfo {}

/// PCI address of a disk controller (fields are -1 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PciAddress {
    /// PCI domain.
    pub domain: i64,
    /// PCI bus.
    pub bus: i64,
    /// PCI slot.
    pub slot: i64,
    /// PCI function.
    pub function: i64,
}

/// Where a filesystem's disk sits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DiskAddress {
    /// The controller.
    #[serde(rename = "pci-controller")]
    pub pci_controller: PciAddress,
    /// Bus type (`virtio`, `scsi`, …; kept as a string so new values are
    /// not an error).
    #[serde(rename = "bus-type")]
    pub bus_type: String,
    /// Bus id.
    pub bus: i64,
    /// Target id.
    pub target: i64,
    /// Unit id.
    pub unit: i64,
    /// Disk serial.
    #[serde(default)]
    pub serial: Option<String>,
    /// Device node, e.g. `/dev/vda`.
    #[serde(default)]
    pub dev: Option<String>,
}

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FilesystemInfo {
    /// Device name, e.g. `vda1`.
    pub name: String,
    /// Mountpoint (valid input for `guest-fsfreeze-freeze-list`).
    pub mountpoint: String,
    /// Filesystem type, e.g. `ext4`.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes used.
    #[serde(rename = "used-bytes", default)]
    pub used_bytes: Option<u64>,
    /// Bytes total (non-root).
    #[serde(rename = "total-bytes", default)]
    pub total_bytes: Option<u64>,
    /// Disks the filesystem lies on; may be empty or absent.
    #[serde(default)]
    pub disk: Vec<DiskAddress>,
}

impl Command for GetFsInfo {
    const NAME: &'static str = "guest-get-fsinfo";
    type Ok = Vec<FilesystemInfo>;
}

/// `guest-exec`. Build with [`GuestExec::new`].
#[derive(Debug, Clone, Serialize)]
pub struct GuestExec {
    /// Executable path (or name looked up in the agent's `PATH`).
    pub path: String,
    /// Arguments (without argv\[0]).
    #[serde(rename = "arg", skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// `NAME=value` environment entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Base64 stdin for the process.
    #[serde(rename = "input-data", skip_serializing_if = "Option::is_none")]
    pub input_data: Option<String>,
    /// Whether to capture stdout/stderr.
    #[serde(rename = "capture-output")]
    pub capture_output: bool,
}

impl GuestExec {
    /// `path args…` with output captured.
    pub fn new<I, S>(path: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        GuestExec {
            path: path.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            input_data: None,
            capture_output: true,
        }
    }

    /// Sets stdin.
    pub fn stdin(mut self, data: &[u8]) -> Self {
        use base64::Engine as _;
        self.input_data = Some(base64::engine::general_purpose::STANDARD.encode(data));
        self
    }
}

/// `guest-exec`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ExecStarted {
    /// Guest pid.
    pub pid: i64,
}

impl Command for GuestExec {
    const NAME: &'static str = "guest-exec";
    type Ok = ExecStarted;
    fn check(reply: &ExecStarted) -> Result<(), String> {
        if reply.pid <= 0 {
            return Err(format!("pid {} is not positive", reply.pid));
        }
        Ok(())
    }
}

/// `guest-exec-status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestExecStatus {
    /// Pid from `guest-exec`.
    pub pid: i64,
}

/// `guest-exec-status`'s reply as sent (base64 not yet decoded).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExecStatusWire {
    /// Whether the process ended.
    pub exited: bool,
    /// Exit code, when it exited normally.
    #[serde(default)]
    pub exitcode: Option<i64>,
    /// Signal, when it was killed.
    #[serde(default)]
    pub signal: Option<i64>,
    /// Base64 stdout.
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    /// Base64 stderr.
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
    /// Stdout was cut by the agent's own cap.
    #[serde(rename = "out-truncated", default)]
    pub out_truncated: bool,
    /// Stderr was cut by the agent's own cap.
    #[serde(rename = "err-truncated", default)]
    pub err_truncated: bool,
}

impl Command for GuestExecStatus {
    const NAME: &'static str = "guest-exec-status";
    type Ok = ExecStatusWire;
    fn check(reply: &ExecStatusWire) -> Result<(), String> {
        if !reply.exited && (reply.exitcode.is_some() || reply.signal.is_some()) {
            return Err("exit code or signal reported for a running process".into());
        }
        Ok(())
    }
}

/// `guest-file-open`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFileOpen {
    /// Guest path.
    pub path: String,
    /// `fopen(3)` mode.
    pub mode: String,
}

impl Command for GuestFileOpen {
    const NAME: &'static str = "guest-file-open";
    /// Handle.
    type Ok = i64;
    fn check(reply: &i64) -> Result<(), String> {
        if *reply < 0 {
            return Err(format!("file handle {reply} is negative"));
        }
        Ok(())
    }
}

/// `guest-file-read`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestFileRead {
    /// Handle.
    pub handle: i64,
    /// Bytes to read.
    pub count: u64,
}

/// `guest-file-read`'s reply as sent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileReadWire {
    /// Bytes read (before base64).
    pub count: u64,
    /// Base64 data.
    #[serde(rename = "buf-b64")]
    pub buf_b64: String,
    /// End of file reached.
    pub eof: bool,
}

impl Command for GuestFileRead {
    const NAME: &'static str = "guest-file-read";
    type Ok = FileReadWire;
}

/// `guest-file-write`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFileWrite {
    /// Handle.
    pub handle: i64,
    /// Base64 data.
    #[serde(rename = "buf-b64")]
    pub buf_b64: String,
}

/// `guest-file-write`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct FileWriteWire {
    /// Bytes written.
    pub count: u64,
    /// End of file reached.
    pub eof: bool,
}

impl Command for GuestFileWrite {
    const NAME: &'static str = "guest-file-write";
    type Ok = FileWriteWire;
}

/// `guest-file-close`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestFileClose {
    /// Handle.
    pub handle: i64,
}

impl Command for GuestFileClose {
    const NAME: &'static str = "guest-file-close";
    type Ok = Empty;
}

/// `guest-shutdown` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// ACPI-style power off (the default).
    Powerdown,
    /// Halt.
    Halt,
    /// Reboot.
    Reboot,
}

/// `guest-shutdown` (no reply on success).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct GuestShutdown {
    pub(crate) mode: ShutdownMode,
}

/// Name of `guest-shutdown`.
pub(crate) const GUEST_SHUTDOWN: &str = "guest-shutdown";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_serialize_as_qga_expects() {
        assert_eq!(
            serde_json::to_value(GuestPing {}).unwrap(),
            serde_json::json!({})
        );
        let exec = GuestExec::new("/bin/sh", ["-c", "echo hi"]).stdin(b"in");
        assert_eq!(
            serde_json::to_value(&exec).unwrap(),
            serde_json::json!({
                "path": "/bin/sh", "arg": ["-c", "echo hi"],
                "input-data": "aW4=", "capture-output": true
            })
        );
        let list = FsFreezeFreezeList {
            mountpoints: vec!["/mnt".into()],
        };
        assert_eq!(
            serde_json::to_value(&list).unwrap(),
            serde_json::json!({"mountpoints": ["/mnt"]})
        );
    }

    #[test]
    fn replies_are_type_checked() {
        serde_json::from_value::<u32>(serde_json::json!(-5)).unwrap_err();
        serde_json::from_value::<u32>(serde_json::json!("frozen")).unwrap_err();
        serde_json::from_value::<FsFreezeStatus>(serde_json::json!("thawing")).unwrap_err();
        serde_json::from_value::<Empty>(serde_json::json!({"x": 1})).unwrap_err();
        serde_json::from_value::<Empty>(serde_json::json!(5)).unwrap_err();
        assert!(FsFreezeFreeze::check(&u32::MAX).is_err());
        assert!(GuestExec::check(&ExecStarted { pid: 0 }).is_err());
    }
}

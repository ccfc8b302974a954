//! What a backup run is asked to do: its mode and options. Shared by the
//! job's phases (`backup`, `hold`) and its report.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Default `cbw-timeout`: below every guest's disk timeout (virtio-win: 60 s).
pub const DEFAULT_CBW_TIMEOUT_S: u32 = 45;

/// Backup mode, as vzdump names them, plus `nbd` (`--nbd`: shear reads
/// exports someone else made and holds nothing itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Live: freeze (if qemu-ga answers), insert filters, thaw at once.
    Snapshot,
    /// Pause the vCPUs while the filters go in.
    Suspend,
    /// Orderly shutdown, filters in, boot again at once; back up the clean state.
    Stop,
    /// Read NBD exports given on the command line; no QMP, no freeze.
    Nbd,
}

impl Mode {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Snapshot => "snapshot",
            Mode::Suspend => "suspend",
            Mode::Stop => "stop",
            Mode::Nbd => "nbd",
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
    /// The Proxmox VM config file captured into the backup, if it exists.
    pub pve_config: PathBuf,
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
    /// CPU and I/O priority of the data path (nice, `SCHED_BATCH`, ionice).
    pub priority: super::priority::DataPriority,
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
    /// Read every disk in full even where change tracking would allow an
    /// incremental read (tracking still starts anew).
    pub full: bool,
    /// Back up CD-ROM media too (skipped by default, as vzdump does).
    pub include_cdrom: bool,
    /// Test-only: a program run while the guest is held with every filter
    /// in place (to take a ground-truth copy). Only honoured when
    /// [`TEST_HOOKS`] (see [`held_hook_from_env`]).
    pub held_hook: Option<PathBuf>,
    /// vzdump hook script for the stop-mode phases (`pre-stop`,
    /// `pre-restart`, `post-restart`); the caller runs the others.
    pub script: Option<crate::hookscript::VmHooks>,
}

/// Whether this build honours test hooks: debug builds (the test suite's)
/// and builds with the `test-hooks` feature. A release build, which is what
/// `cargo install` and packages ship, never runs them.
pub const TEST_HOOKS: bool = cfg!(any(debug_assertions, feature = "test-hooks"));

/// The held hook named by `$SHEAR_TEST_FROZEN_HOOK` when [`TEST_HOOKS`];
/// `None` in the builds users install, whatever the environment says.
pub fn held_hook_from_env() -> Option<PathBuf> {
    if TEST_HOOKS {
        std::env::var_os("SHEAR_TEST_FROZEN_HOOK").map(PathBuf::from)
    } else {
        None
    }
}

/// Render a vzdump notes template (`\n` in the template is a newline).
pub fn render_notes(template: &str, vmid: &str, guestname: &str, node: &str) -> String {
    template
        .replace("{{vmid}}", vmid)
        .replace("{{guestname}}", guestname)
        .replace("{{node}}", node)
        .replace("\\n", "\n")
}

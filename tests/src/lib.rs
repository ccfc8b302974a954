//! Real-VM test harness for shear.
//!
//! [`TestVm`] launches `qemu-system-x86_64 -accel tcg` (the `/dev/kvm` on the
//! project machines cannot boot a guest) with two QMP monitors (one for the
//! harness, one reserved for the code under test), the qemu-guest-agent
//! socket and N data disks. In guest mode it boots the tiny guest built by
//! `vm-images/build-guest` and polls qemu-ga until it answers; in paused mode
//! (`-S`, no guest) QMP is ready in ~0.1 s for block-graph tests.
//!
//! The harness talks to QEMU and qemu-ga through its own small blocking
//! clients (in [`wire`]), deliberately independent of the `qmp` and
//! `guest-agent` crates it is used to test.
//!
//! QEMU is always killed (by pid) and its directory removed on drop, panic or
//! failure; QEMU also gets `SIGKILL` if the test process dies first
//! (`setpriv --pdeathsig`).
//!
//! Prerequisites: a missing qemu, qemu-ga, guest image or tool fails the
//! test, unless skips were asked for with `SHEAR_ALLOW_SKIP=1` ([`prereq`]).
#![forbid(unsafe_code)]

pub mod disk;
pub mod libvirt;
pub mod loopdev;
pub mod prereq;
pub mod s3;
pub mod scaling;
pub mod shear;
pub mod sinks;
pub mod vm;
pub mod wire;

pub use disk::{debugfs_cat, e2fsck_clean, make_ext4_image, DiskBus, DiskFormat, DiskSpec};
pub use loopdev::LoopDevice;
pub use prereq::{guest_image, require_guest, require_qemu, require_tool, GuestImage};
pub use vm::{ExecOutput, TestVm, VmConfig};

use std::fmt;
use std::time::{Duration, Instant};

/// What went wrong in the harness (not in the code under test).
#[derive(Debug)]
pub struct HarnessError(pub String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

/// The text of the error a line read gets when the peer closed the
/// connection before a full line arrived.
pub(crate) const PEER_CLOSED: &str = "connection closed";

impl HarnessError {
    /// The peer closed the connection (EOF) before its reply.
    pub fn is_peer_closed(&self) -> bool {
        self.0 == PEER_CLOSED
    }
}

impl From<std::io::Error> for HarnessError {
    fn from(e: std::io::Error) -> Self {
        HarnessError(format!("io: {e}"))
    }
}

/// Harness result.
pub type Result<T> = std::result::Result<T, HarnessError>;

/// Build a [`HarnessError`] from a format string.
#[macro_export]
macro_rules! herr {
    ($($t:tt)*) => { $crate::HarnessError(format!($($t)*)) };
}

/// Poll `f` every `interval` until it returns `Some`, or fail after `timeout`.
/// Tests wait with this, never with a fixed sleep.
pub fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(herr!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(interval);
    }
}

/// The workspace root (where `Cargo.toml`, `build/` and `vm-images/` live).
pub fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The `shear` binary of this build (`target/<profile>/shear`). The
/// workspace test run (`scripts/test`) builds it; when running one test of
/// this package alone, build it first: `cargo build -p shear`.
pub fn shear_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/shear
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let bin = profile_dir.join("shear");
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build -p shear` (scripts/test builds it)",
        bin.display()
    );
    bin
}

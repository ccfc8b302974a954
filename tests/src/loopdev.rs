//! Loop devices for block-device restore targets (the tests run as root):
//! `losetup --find --show` over a file in the test's directory, detached
//! on drop whatever happens.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a backing file; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub dev: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing`; `None` (said on stderr) when loop devices do not
    /// work here.
    pub fn new(backing: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping the block-device part: losetup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(LoopDevice {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

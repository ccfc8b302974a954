//! Loop devices for block-device restore targets (the tests run as root):
//! `losetup --find --show` over a file in the test's directory, detached
//! on drop whatever happens.
//!
//! Tests using loop devices run one at a time (a lock file held from before
//! `losetup --find` until the last device of the process is detached):
//! `losetup --find` opens free devices while it looks, and shear rightly
//! refuses a device another process holds open (seen when two such tests
//! ran in parallel).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Loop devices this process holds, and the lock file while it holds any.
static HELD: Mutex<(usize, Option<File>)> = Mutex::new((0, None));

const LOCK_FILE: &str = "/tmp/shear-tests-loopdev.lock";

fn acquire() {
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if held.0 == 0 {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|e| panic!("opening {LOCK_FILE}: {e}"));
        f.lock()
            .unwrap_or_else(|e| panic!("locking {LOCK_FILE}: {e}"));
        held.1 = Some(f);
    }
    held.0 += 1;
}

fn release() {
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    held.0 = held.0.saturating_sub(1);
    if held.0 == 0 {
        // Closing the file releases the lock.
        held.1 = None;
    }
}

/// A loop device over a backing file; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub dev: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing`; `None` (said on stderr) when loop devices do not
    /// work here.
    /// Under CI (`CI=true`) a loop device that cannot be made is a failure.
    pub fn new(backing: &Path) -> Option<LoopDevice> {
        acquire();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output();
        let out = match out {
            Ok(o) if o.status.success() => o,
            other => {
                release();
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    !crate::prereq::in_ci(),
                    "losetup failed under CI (block-device targets untested): {why}"
                );
                eprintln!("skipping the block-device part: losetup: {why}");
                return None;
            }
        };
        Some(LoopDevice {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        release();
    }
}

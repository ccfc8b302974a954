//! The restore-test record of a backup (`restore-test.json`, version 1):
//! what `shear verify --boot` found when it booted the backup in an
//! isolated VM (docs/formats.md §6a).
//!
//! A side object beside the manifest, like `verify-state.json`: writing it
//! never touches the manifest, the indexes or their digests (the backup
//! stays immutable); the write is atomic (the backend's `put`). Plain
//! JSON, readable without the key; in an encrypted repository the probe's
//! output is not stored (only its length), since it is guest data.

use serde::{Deserialize, Serialize};

use super::{BackupId, ErrorKind, RepoError, Repository, Result};

/// Object name inside the snapshot directory.
pub(crate) const RESTORE_TEST_NAME: &str = "restore-test.json";
/// Record format version.
pub const RESTORE_TEST_VERSION: u32 = 1;
/// Largest record accepted when reading.
const MAX_RECORD: usize = 256 << 10;
/// Probe output kept in the record (bytes, per stream).
pub const MAX_PROBE_OUTPUT: usize = 16 << 10;

/// One filesystem the booted guest reported (`guest-get-fsinfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenFilesystem {
    /// Device name (`vda1`).
    pub name: String,
    /// Mountpoint.
    pub mountpoint: String,
    /// Type (`ext4`).
    #[serde(rename = "type")]
    pub fs_type: String,
}

/// The probe command's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The command as given (run with `/bin/sh -c`).
    pub command: String,
    /// Exit code; `None` when killed or timed out.
    pub exit_code: Option<i64>,
    /// Stdout (lossy UTF-8, at most [`MAX_PROBE_OUTPUT`] bytes; empty in
    /// encrypted repositories).
    pub stdout: String,
    /// Stderr (as stdout).
    pub stderr: String,
    /// Bytes of output the guest sent (stdout + stderr), before any cut.
    pub output_bytes: u64,
    /// Output was cut (by the guest agent or by the record's limit).
    pub truncated: bool,
}

/// The record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTest {
    /// Always "shear-restore-test".
    pub format: String,
    /// [`RESTORE_TEST_VERSION`].
    pub version: u32,
    /// `ok` or `failed`.
    pub state: String,
    /// Why it failed (empty when ok).
    pub reason: String,
    /// When the test started (RFC 3339 UTC).
    pub time: String,
    /// Start of QEMU → first `guest-ping` answer, ms (`None`: never).
    pub ping_ms: Option<u64>,
    /// Whole test, ms.
    pub total_ms: u64,
    /// Accelerator used (`kvm`, `tcg`).
    pub accel: String,
    /// Why `--accel auto` abandoned KVM for TCG (`None`: it did not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_fallback: Option<String>,
    /// How the VM booted: `kernel` (kernel+initrd) or `disk` (firmware).
    pub boot: String,
    /// Filesystems the guest reported.
    pub filesystems: Vec<SeenFilesystem>,
    /// The probe, if one was given and ran.
    pub probe: Option<ProbeResult>,
    /// `shear <version>`.
    pub tool_version: String,
}

impl RestoreTest {
    /// Whether the test passed.
    pub fn ok(&self) -> bool {
        self.state == "ok"
    }
}

/// Cuts `data` to `max` bytes (on a UTF-8 boundary of the lossy text).
pub fn bounded_text(data: &[u8], max: usize) -> (String, bool) {
    let cut = data.len() > max;
    let text = String::from_utf8_lossy(&data[..data.len().min(max)]).into_owned();
    (text, cut)
}

impl Repository {
    /// Records the result of a restore test of a committed backup
    /// (replacing the previous one). The manifest is not touched.
    pub fn put_restore_test(&self, id: &BackupId, record: &RestoreTest) -> Result<()> {
        let b = self.backend();
        if b.size(&format!("{}/{}", id.dir_key(), super::MANIFEST_NAME))?
            .is_none()
        {
            return Err(RepoError::not_found(format!("backup {id}")));
        }
        let mut record = record.clone();
        if self.is_encrypted() {
            if let Some(p) = &mut record.probe {
                p.stdout.clear();
                p.stderr.clear();
            }
        }
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| RepoError::invalid("restore test", e.to_string()))?;
        b.put(&format!("{}/{RESTORE_TEST_NAME}", id.dir_key()), &json)
    }

    /// The last restore test of a backup, if any.
    pub fn restore_test(&self, id: &BackupId) -> Result<Option<RestoreTest>> {
        let k = format!("{}/{RESTORE_TEST_NAME}", id.dir_key());
        match self.backend().get(&k, MAX_RECORD) {
            Ok(b) => {
                let r: RestoreTest = serde_json::from_slice(&b)
                    .map_err(|e| RepoError::corrupt(&k, e.to_string()))?;
                if r.format != "shear-restore-test" || r.version != RESTORE_TEST_VERSION {
                    return Err(RepoError::corrupt(
                        k,
                        format!("unknown format {} version {}", r.format, r.version),
                    ));
                }
                Ok(Some(r))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_cuts_and_says_so() {
        assert_eq!(bounded_text(b"hello", 10), ("hello".into(), false));
        assert_eq!(bounded_text(b"hello", 3), ("hel".into(), true));
        // A cut inside a multi-byte character stays valid text.
        let (t, cut) = bounded_text("é".as_bytes(), 1);
        assert!(cut && t == "\u{fffd}");
    }

    #[test]
    fn a_record_from_before_accel_fallback_still_reads() {
        let old = r#"{"format":"shear-restore-test","version":1,"state":"ok","reason":"",
            "time":"2026-11-30T12:00:00Z","ping_ms":1,"total_ms":2,"accel":"tcg",
            "boot":"kernel","filesystems":[],"probe":null,"tool_version":"shear 0"}"#;
        let r: RestoreTest = serde_json::from_str(old).unwrap();
        assert_eq!(r.accel_fallback, None);
        // And none is written when there was no fallback.
        assert!(!serde_json::to_string(&r)
            .unwrap()
            .contains("accel_fallback"));
    }
}

//! The backup manifest: written last, it is the commit point of a backup.

use serde::{Deserialize, Serialize};

use super::error::{RepoError, Result};
use super::format::MAX_MANIFEST_SIZE;
use super::names::{validate_name, BackupId};

/// Manifest format name (the `format` field).
pub const MANIFEST_FORMAT: &str = "shear-manifest";
/// Manifest version written and accepted.
pub const MANIFEST_VERSION: u32 = 1;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMode {
    /// Every allocated chunk was read.
    Full,
    /// Clean chunks reused from the base backup's index.
    Incremental,
}

/// How consistent the image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Filesystems were frozen by qemu-ga.
    Application,
    /// Crash-consistent (no freeze).
    Crash,
}

/// Encryption facts recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEncryption {
    /// Always "aes-256-gcm".
    pub alg: String,
    /// Fingerprint of the key (32 hex digits).
    pub key_fingerprint: String,
}

/// One disk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Disk name (validated; also the index and restore file name).
    pub name: String,
    /// QEMU device id (informational).
    pub device: String,
    /// QEMU block node name (informational).
    pub node: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Index object name in the snapshot directory.
    pub index_file: String,
    /// BLAKE3 (hex) of the stored index blob bytes.
    pub index_digest: String,
    /// Whole-image digest (hex), see docs/formats.md.
    pub image_digest: String,
    /// Number of chunks.
    pub chunks: u64,
    /// Chunks that are all zero (not stored).
    pub zero_chunks: u64,
    /// Plaintext bytes in non-zero chunks.
    pub data_bytes: u64,
    /// Bytes in zero chunks.
    pub zero_bytes: u64,
    /// Chunks this backup added to the store.
    pub new_chunks: u64,
    /// Plaintext bytes of the chunks added.
    pub new_data_bytes: u64,
    /// Bytes written to the store for this disk (compressed, with headers).
    pub stored_bytes: u64,
    /// Plaintext bytes of non-zero chunks already in the store (dedup hits,
    /// including reused ones).
    pub dedup_bytes: u64,
    /// Chunks taken from the base index without reading (incremental).
    pub reused_chunks: u64,
    /// How the disk was read and the change tracking started with it;
    /// absent in backups made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<DiskRead>,
}

/// Whether a disk was read whole or only where it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadKind {
    /// Every allocated byte was read.
    Full,
    /// Only what the tracking bitmap marked dirty was read; every other
    /// chunk is the base backup's.
    Incremental,
}

/// How a disk was read, and the change tracking this backup starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRead {
    /// Full or incremental.
    pub kind: ReadKind,
    /// Why a full read was needed (no bitmap yet, bitmap inconsistent, base
    /// gone, size changed, `--full`, …); absent for an incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// The backup whose chunks the clean ranges reuse (incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Bytes the bitmap marked dirty (incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    /// The QEMU dirty bitmap that counts writes since this backup's freeze
    /// instant (the next backup's base), if tracking was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// Whether that bitmap is stored in the image (qcow2) and survives a
    /// QEMU restart.
    #[serde(default)]
    pub bitmap_persistent: bool,
    /// The image file the disk was read from (a different file next time
    /// means the image was replaced: full read).
    #[serde(default)]
    pub filename: String,
    /// Most bytes the disk's fleece image allocated on the host while the
    /// backup read it (sampled; absent when there was no fleece image, as
    /// with `--nbd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleece_peak_bytes: Option<u64>,
}

/// Timings of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Start (RFC 3339 UTC).
    pub started: String,
    /// Commit (RFC 3339 UTC).
    pub finished: String,
    /// Milliseconds the guest was frozen (or paused), if it was.
    pub freeze_window_ms: Option<u64>,
    /// Milliseconds from session start to commit.
    pub total_ms: u64,
}

/// The manifest of one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always "shear-manifest".
    pub format: String,
    /// Manifest version.
    pub version: u32,
    /// `vm/<vmid>/<time>`.
    pub backup_id: BackupId,
    /// VM id.
    pub vmid: String,
    /// VM name.
    pub vm_name: String,
    /// Full or incremental.
    pub mode: BackupMode,
    /// Application or crash consistent.
    pub consistency: Consistency,
    /// How the guest was held while the snapshot was taken: `snapshot`,
    /// `suspend` or `stop` (vzdump's modes); empty when not from a VM.
    #[serde(default)]
    pub vm_mode: String,
    /// The backup whose index an incremental reused.
    pub base: Option<BackupId>,
    /// Disks in backup order.
    pub disks: Vec<DiskEntry>,
    /// VM configuration as QEMU reported it.
    pub vm_config: serde_json::Value,
    /// Free-form notes.
    pub notes: String,
    /// Timings.
    pub timings: Timings,
    /// `shear <version>`.
    pub tool_version: String,
    /// Set when the repository is encrypted.
    pub encryption: Option<ManifestEncryption>,
}

impl Manifest {
    /// Serialises to JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| RepoError::invalid("manifest", e.to_string()))
    }

    /// Parses and validates a manifest payload read from `dir_id`'s directory.
    /// serde_json bounds nesting depth (128); size is bounded by the caller.
    pub fn from_json(bytes: &[u8], dir_id: &BackupId) -> Result<Self> {
        let what = format!("manifest of {dir_id}");
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(RepoError::corrupt(&what, "larger than 16 MiB"));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| RepoError::corrupt(&what, e.to_string()))?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(RepoError::corrupt(
                &what,
                format!("unsupported format {} v{}", m.format, m.version),
            ));
        }
        // A manifest copied into another backup's directory is refused.
        if &m.backup_id != dir_id || m.vmid != dir_id.vmid().as_str() {
            return Err(RepoError::corrupt(
                &what,
                format!("it names backup {}", m.backup_id),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &m.disks {
            validate_name("disk name", &d.name)
                .map_err(|e| RepoError::corrupt(&what, e.to_string()))?;
            if d.index_file != index_file_name(&d.name) {
                return Err(RepoError::corrupt(
                    &what,
                    format!("disk {} has index file {:?}", d.name, d.index_file),
                ));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(RepoError::corrupt(&what, format!("disk {} twice", d.name)));
            }
            super::format::check_geometry(d.chunk_size, d.virtual_size)
                .map_err(|e| RepoError::corrupt(&what, e.to_string()))?;
        }
        Ok(m)
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Result<&DiskEntry> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RepoError::not_found(format!("disk {name} in {}", self.backup_id)))
    }
}

/// Index object name of a disk.
pub fn index_file_name(disk: &str) -> String {
    format!("{disk}.fidx")
}

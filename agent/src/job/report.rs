//! What a finished backup reports (`shear backup --json`, the daemon's
//! results). Field names are part of the CLI's JSON contract.

use serde::Serialize;

use super::options::Mode;
use crate::repo::Consistency;

/// Per-disk figures of a finished backup.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// Disk name.
    pub name: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// Bytes read from the export.
    pub bytes_read: u64,
    /// Bytes skipped without reading (holes / zero extents, and for an
    /// incremental the chunks unchanged since the previous backup).
    pub bytes_skipped: u64,
    /// Bytes written to the repository (compressed, new chunks only).
    pub bytes_stored: u64,
    /// Plaintext bytes already in the repository.
    pub bytes_deduplicated: u64,
    /// Whole-image digest.
    pub image_digest: String,
    /// `full` or `incremental`.
    pub kind: crate::repo::ReadKind,
    /// Why the disk was read in full (absent for an incremental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// The backup whose chunks the unchanged ranges reuse (incremental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Bytes the dirty bitmap marked changed since the base (incremental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    /// Most bytes the disk's fleece image allocated on the host during the
    /// read (sampled; absent without a fleece image, as with `--nbd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleece_peak_bytes: Option<u64>,
    /// Bytes discarded from the snapshot once read and stored (absent when
    /// shear does not own the export, as with `--nbd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_released: Option<u64>,
    /// CPU seconds and bytes per data-path stage (read, hash, compress,
    /// verify, encrypt, write; `repo::stages`), summed over the threads.
    pub stages: crate::repo::stages::StageFigures,
}

/// What `shear backup --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The committed backup id.
    pub backup_id: String,
    /// VM id.
    pub vmid: String,
    /// Mode used.
    pub mode: Mode,
    /// `application` or `crash`.
    pub consistency: Consistency,
    /// Milliseconds the guest was held (frozen or paused); `None` if never.
    pub freeze_window_ms: Option<u64>,
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// Setup (lock → exports ready), ms.
    pub setup_ms: u64,
    /// Data path, ms.
    pub read_ms: u64,
    /// Whole run, ms.
    pub total_ms: u64,
    /// Things the user should know (crash-consistent fallback, leftovers
    /// cleaned up, teardown trouble).
    pub warnings: Vec<String>,
}

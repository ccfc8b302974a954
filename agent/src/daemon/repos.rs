//! A repository's status as the daemon shows it (API, metrics, RPO):
//! backups per VM, the newest good one, bytes used, filesystem space.
//! Read without the key (an encrypted repository's manifests stay locked,
//! its listing does not).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::repo::{ManifestState, Repository};

/// One repository.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepoStatus {
    /// Path.
    pub path: String,
    /// Whether it opened.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Encrypted.
    pub encrypted: bool,
    /// Committed backups.
    pub backups: usize,
    /// Backups per VM.
    pub backups_per_vm: BTreeMap<String, usize>,
    /// Unix seconds of each VM's newest good backup (manifest not damaged,
    /// last verify not failed).
    pub newest_good: BTreeMap<String, i64>,
    /// Bytes the repository's files take on disk.
    pub bytes: u64,
    /// Free bytes on its filesystem.
    pub fs_free_bytes: u64,
    /// Size of its filesystem.
    pub fs_total_bytes: u64,
    /// When this was read (RFC 3339).
    pub read_at: String,
}

fn du(path: &Path, depth: usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = md.blocks().saturating_mul(512);
    if !md.is_dir() || depth > 16 {
        return own;
    }
    let Ok(rd) = std::fs::read_dir(path) else {
        return own;
    };
    rd.filter_map(Result::ok)
        .fold(own, |acc, e| acc.saturating_add(du(&e.path(), depth + 1)))
}

impl RepoStatus {
    /// Read the status of the repository at `path` (blocking).
    pub fn read(path: &Path) -> RepoStatus {
        let mut s = RepoStatus {
            path: path.display().to_string(),
            read_at: jiff::Timestamp::now().to_string(),
            ..RepoStatus::default()
        };
        if let Ok(st) = rustix::fs::statvfs(path) {
            s.fs_free_bytes = st.f_bavail.saturating_mul(st.f_frsize);
            s.fs_total_bytes = st.f_blocks.saturating_mul(st.f_frsize);
        }
        let repo = match Repository::open(path, None) {
            Ok(r) => r,
            Err(e) => {
                s.error = Some(crate::chain(&e));
                return s;
            }
        };
        s.encrypted = repo.is_encrypted();
        match repo.list_backups(None) {
            Ok(list) => {
                s.ok = true;
                s.backups = list.len();
                for b in list {
                    let vm = b.id.vmid().as_str().to_owned();
                    *s.backups_per_vm.entry(vm.clone()).or_default() += 1;
                    let good = b.manifest != ManifestState::Damaged
                        && b.verify.as_ref().is_none_or(|v| v.state != "failed");
                    if good {
                        let t = b.id.time().unix_timestamp();
                        let e = s.newest_good.entry(vm).or_insert(t);
                        *e = (*e).max(t);
                    }
                }
            }
            Err(e) => s.error = Some(crate::chain(&e)),
        }
        s.bytes = du(path, 0);
        s
    }
}

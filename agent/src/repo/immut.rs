//! Immutability: append-only repositories and S3 Object Lock (issue 14 §3).
//!
//! # Append-only (any backend; meant for local directories)
//!
//! `shear init --append-only` records in `shear-repo.json` that the
//! repository is append-only, with the BLAKE3 hash of an *admin token*
//! printed once by init (or written to `--admin-token-file`). Every open of
//! such a repository wraps its backend in [`AppendOnlyBackend`], which
//! refuses every delete, rename and tree removal, and every overwrite of a
//! backup's data (chunks, indexes, manifests; an existing chunk is left as
//! it is, identical by construction), until [`super::Repository::authorize_admin`]
//! was given the token. So `backup` and `sync` run as usual; `prune`,
//! `forget`, `gc`, `unprotect` and verify's quarantine need the token
//! (`--admin-token-file`), which the backup host does not have to hold.
//!
//! Who enforces what: the refusal is shear's code. It stops a stolen daemon
//! API token, a mistaken or malicious `shear prune` on the backup host, and
//! a buggy retention job. It does not stop someone with a shell as the user
//! that owns the files: they can `rm` them. Against that, keep the copy
//! where the backup host has no write access: a repository on another host
//! that *pulls* with `shear sync` (its own user, its own credentials), or an
//! S3 bucket with Object Lock (below), enforced by the server.
//!
//! # S3 Object Lock
//!
//! `shear init --object-lock-days N` (S3 only) checks that the bucket has
//! Object Lock enabled and records the mode and period. Every chunk, index
//! and manifest is then written with `x-amz-object-lock-mode` and
//! `x-amz-object-lock-retain-until-date` = now + period: the server refuses
//! to destroy that version before then, whoever asks (COMPLIANCE; GOVERNANCE
//! lets a principal with `s3:BypassGovernanceRetention` do it).
//!
//! - GC extends the retention of every chunk that a committed backup still
//!   references once less than half the period is left ([`needs_extension`]),
//!   to now + period: run GC at least every half period.
//! - GC does not delete an unreferenced chunk still under retention; prune
//!   and forget refuse a backup whose manifest is, saying until when.
//! - A DELETE without a version id on a versioned bucket only adds a delete
//!   marker; the locked version stays and can be restored (S3 console or
//!   `aws s3api delete-object --version-id <the marker>`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backend::{Backend, Coordination, ListEntry, LockGuard, LockMode, LockWait, ObjectInfo};
use super::error::{RepoError, Result};
use super::{CHUNKS_KEY, MANIFEST_NAME, VM_BACKUPS_KEY};

/// Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionMode {
    /// Nobody can shorten or remove the retention (not even the root user).
    Compliance,
    /// Principals with `s3:BypassGovernanceRetention` can.
    Governance,
}

impl RetentionMode {
    /// The S3 header value.
    pub fn as_s3(self) -> &'static str {
        match self {
            RetentionMode::Compliance => "COMPLIANCE",
            RetentionMode::Governance => "GOVERNANCE",
        }
    }
}

/// The repository's Object Lock setting (`object_lock` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectLock {
    /// Mode of every retention shear sets.
    pub mode: RetentionMode,
    /// Retention period of a new object, in seconds.
    pub retention_secs: u64,
}

impl ObjectLock {
    /// The period in milliseconds.
    pub fn retention_ms(&self) -> i64 {
        i64::try_from(self.retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// The append-only setting (`append_only` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendOnly {
    /// Hex BLAKE3 (derive-key mode) of the admin token.
    pub admin_token_hash: String,
}

/// An object's retention as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Its mode.
    pub mode: RetentionMode,
    /// Retained until (Unix ms).
    pub until_ms: i64,
}

/// A new random admin token (64 hex digits).
pub fn new_admin_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The hash stored for `token`.
pub fn admin_token_hash(token: &str) -> String {
    hex::encode(blake3::derive_key(
        "shear append-only admin token v1",
        token.trim().as_bytes(),
    ))
}

/// Whether `key` holds backup data that must never change once written:
/// chunks, indexes and manifests.
pub fn is_immutable_key(key: &str) -> bool {
    if let Some(rest) = key.strip_prefix(CHUNKS_KEY) {
        return rest.starts_with('/') && !key.ends_with(".bad");
    }
    match key.strip_prefix(VM_BACKUPS_KEY) {
        Some(rest) if rest.starts_with('/') => {
            let name = rest.rsplit('/').next().unwrap_or("");
            name == MANIFEST_NAME || name.ends_with(".fidx")
        }
        _ => false,
    }
}

/// Whether a referenced object written at `modified_ms` (and perhaps
/// extended since) must have its retention extended at server time `now`:
/// when its guaranteed retention (`modified + period`) leaves less than half
/// a period. Extending to `now + period` is never a shortening.
pub fn needs_extension(modified_ms: i64, now_ms: i64, lock: &ObjectLock) -> bool {
    let p = lock.retention_ms();
    modified_ms.saturating_add(p) < now_ms.saturating_add(p / 2)
}

/// Formats Unix ms as the RFC 3339 UTC time S3 takes.
pub fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

/// Parses an RFC 3339 time (S3's retain-until date) into Unix ms.
pub fn parse_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A backend that refuses deletions and overwrites of backup data unless the
/// admin token was given (see the module docs).
#[derive(Debug)]
pub struct AppendOnlyBackend {
    inner: Arc<dyn Backend>,
    admin: Arc<AtomicBool>,
}

impl AppendOnlyBackend {
    /// Wraps `inner`; `admin` is flipped by `Repository::authorize_admin`.
    pub fn new(inner: Arc<dyn Backend>, admin: Arc<AtomicBool>) -> AppendOnlyBackend {
        AppendOnlyBackend { inner, admin }
    }

    fn refuse(&self, op: &str, key: &str) -> Result<()> {
        // Markers of the object-store handshake are not backup data.
        if self.admin.load(Ordering::Acquire) || key.starts_with("coord/") {
            return Ok(());
        }
        Err(RepoError::Immutable {
            what: format!(
                "{} is append-only: {op} {key} needs the admin token (--admin-token-file)",
                self.inner.location()
            ),
        })
    }
}

impl Backend for AppendOnlyBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if is_immutable_key(key) && !self.admin.load(Ordering::Acquire) {
            if let Some(size) = self.inner.size(key)? {
                // A chunk is named by its content: the stored one is the
                // same (verify checks it). Never overwritten.
                if key.starts_with(CHUNKS_KEY) && size == data.len() as u64 {
                    return Ok(());
                }
                self.refuse("overwriting", key)?;
            }
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str, max_len: usize) -> Result<Vec<u8>> {
        self.inner.get(key, max_len)
    }
    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        self.inner.get_prefix(key, len)
    }
    fn size(&self, key: &str) -> Result<Option<u64>> {
        self.inner.size(key)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        self.refuse("deleting", key)?;
        self.inner.delete(key)
    }
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.refuse("renaming", from)?;
        self.inner.rename(from, to)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ListEntry>> {
        self.inner.list(prefix)
    }
    fn create_dir(&self, key: &str) -> Result<()> {
        self.inner.create_dir(key)
    }
    fn ensure_dir(&self, key: &str) -> Result<()> {
        self.inner.ensure_dir(key)
    }
    fn remove_tree(&self, key: &str) -> Result<()> {
        self.refuse("removing", key)?;
        self.inner.remove_tree(key)
    }
    fn lock(&self, key: &str, mode: LockMode, wait: LockWait) -> Result<LockGuard> {
        self.inner.lock(key, mode, wait)
    }
    fn is_temp_name(&self, name: &str) -> bool {
        self.inner.is_temp_name(name)
    }
    fn coordination(&self) -> Coordination {
        self.inner.coordination()
    }
    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list_objects(prefix)
    }
    fn modified_ms(&self, key: &str) -> Result<Option<i64>> {
        self.inner.modified_ms(key)
    }
    fn set_object_lock(&self, lock: Option<ObjectLock>) -> Result<()> {
        self.inner.set_object_lock(lock)
    }
    fn retention(&self, key: &str) -> Result<Option<Retention>> {
        self.inner.retention(key)
    }
    fn extend_retention(&self, key: &str, until_ms: i64) -> Result<()> {
        self.inner.extend_retention(key, until_ms)
    }
    fn check_object_lock(&self) -> Result<()> {
        self.inner.check_object_lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immutable_keys_are_chunks_indexes_and_manifests() {
        assert!(is_immutable_key("chunks/ab/ab12"));
        assert!(!is_immutable_key("chunks/ab/ab12.bad"));
        assert!(is_immutable_key(
            "backups/vm/100/2026-01-01T00:00:00Z/manifest.blob"
        ));
        assert!(is_immutable_key(
            "backups/vm/100/2026-01-01T00:00:00Z/drive0.fidx"
        ));
        assert!(!is_immutable_key(
            "backups/vm/100/2026-01-01T00:00:00Z/verify-state.json"
        ));
        assert!(!is_immutable_key(
            "backups/vm/100/2026-01-01T00:00:00Z/protected"
        ));
        assert!(!is_immutable_key("coord/in-progress/x.json"));
        assert!(!is_immutable_key("shear-repo.json"));
        assert!(!is_immutable_key("chunksx/ab"));
    }

    #[test]
    fn retention_is_extended_before_half_the_period_is_left() {
        let lock = ObjectLock {
            mode: RetentionMode::Compliance,
            retention_secs: 100,
        };
        // Written at 0: retained until 100 s. At 49 s, 51 s are left.
        assert!(!needs_extension(0, 49_000, &lock));
        assert!(!needs_extension(0, 50_000, &lock));
        assert!(needs_extension(0, 50_001, &lock));
        assert!(needs_extension(0, 1_000_000, &lock));
    }

    #[test]
    fn retain_until_dates_round_trip() {
        let ms = 1_800_000_123_456;
        let s = format_ms(ms);
        assert!(s.ends_with('Z'), "{s}");
        assert_eq!(parse_ms(&s), Some(ms));
        assert_eq!(
            parse_ms("2026-11-30T13:48:42.573624Z"),
            Some(1_796_046_522_573)
        );
        assert_eq!(parse_ms("yesterday"), None);
    }

    #[test]
    fn admin_token_hash_is_stable_and_token_specific() {
        let t = new_admin_token();
        assert_eq!(t.len(), 64);
        assert_eq!(admin_token_hash(&t), admin_token_hash(&format!("{t}\n")));
        assert_ne!(admin_token_hash(&t), admin_token_hash(&new_admin_token()));
    }
}

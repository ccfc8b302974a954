//! Error objects of `--json` output, with a stable `kind` (documented in
//! `docs/json.md`), and the one-line tail a failed backup ends with.

use crate::job::{ErrorKind as JobKind, JobError};
use crate::repo::{ErrorKind as RepoKind, RepoError};

/// How a backup failed, for the report and the tail line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFailure {
    /// `retryable`, `permanent`, `qemu_gone` or `interrupted`.
    pub kind: &'static str,
    /// What happened to the guest: `untouched`, `released` or `may_be_held`.
    pub guest: &'static str,
    /// The sentence printed after the error (says only what happened).
    pub tail: &'static str,
}

/// Classifies a failed backup; `touched`: the job reached the hold phase.
pub fn backup_failure(e: &JobError, touched: bool) -> BackupFailure {
    let kind = match e.kind() {
        JobKind::Retryable => "retryable",
        JobKind::Permanent => "permanent",
        JobKind::QemuGone => "qemu_gone",
        JobKind::Interrupted => "interrupted",
    };
    let (guest, tail) = match e {
        JobError::GuestNotReleased { .. } => (
            "may_be_held",
            "the guest may still be held (the watchdog keeps trying to release it); no backup was recorded",
        ),
        _ if touched => ("released", "the guest was released and no backup was recorded"),
        _ => ("untouched", "the guest was not touched; no backup was recorded"),
    };
    BackupFailure { kind, guest, tail }
}

/// The `kind` of an error object of a repository command.
pub fn error_kind(err: &anyhow::Error) -> &'static str {
    let Some(r) = err.chain().find_map(|e| e.downcast_ref::<RepoError>()) else {
        return "error";
    };
    match r.kind() {
        RepoKind::NotFound => "not_found",
        RepoKind::AlreadyExists => "already_exists",
        RepoKind::InvalidInput => "invalid_input",
        RepoKind::Corrupt => "corrupt",
        RepoKind::Key => "key",
        RepoKind::Busy => "busy",
        RepoKind::NoSpace => "no_space",
        RepoKind::PermissionDenied => "permission_denied",
        _ => "io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_says_untouched_when_the_guest_was_never_held() {
        let e = JobError::Invalid("VM 100 has no disks to back up".into());
        let f = backup_failure(&e, false);
        assert_eq!(f.guest, "untouched");
        assert!(!f.tail.contains("released"), "{}", f.tail);
        assert_eq!(backup_failure(&e, true).guest, "released");
        assert_eq!(f.kind, "permanent");
    }

    #[test]
    fn repo_error_kinds_are_stable_names() {
        let e = anyhow::Error::new(RepoError::not_found("backup vm/1/x"));
        assert_eq!(error_kind(&e), "not_found");
        assert_eq!(error_kind(&anyhow::anyhow!("plain")), "error");
    }
}

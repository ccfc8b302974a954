//! The repository's one public error type, [`RepoError`].
//!
//! Variants name the step that failed; `Display` never repeats the source
//! (print the chain with [`crate::chain`]).

use std::io;
use std::path::PathBuf;

/// Broad classes of repository failure, stable for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A repository, backup, disk, chunk or key that was asked for is absent.
    NotFound,
    /// Something that must be new already exists (backup id, key file, target).
    AlreadyExists,
    /// A caller-supplied value was rejected (name, size, option).
    InvalidInput,
    /// Stored bytes fail a check (magic, CRC, digest, authentication tag, limits).
    Corrupt,
    /// The key is missing, wrong, or unsafe (permissions).
    Key,
    /// Another process holds a lock we need.
    Busy,
    /// The filesystem is full.
    NoSpace,
    /// The OS refused access.
    PermissionDenied,
    /// Any other I/O failure.
    Io,
}

/// Whether retrying the same operation later may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry may succeed without anyone changing anything (lock contention).
    Temporary,
    /// Retrying as is will fail again.
    Permanent,
}

/// A repository error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A filesystem operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// The step, e.g. "write chunk file".
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path is not a shear repository.
    #[error("{} is not a shear repository ({reason})", path.display())]
    NotARepository {
        /// Repository path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A backup id, disk or snapshot is absent.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// Something that must be new already exists.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What exists.
        what: String,
    },
    /// A caller-supplied value was rejected.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which value.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A stored object failed a check.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// Which object (e.g. "chunk 3fa2…", "index of disk d0 in vm/100/…").
        what: String,
        /// Which check failed.
        reason: String,
    },
    /// A chunk referenced by an index is not in the store.
    #[error("chunk {digest} is missing from the store")]
    ChunkMissing {
        /// Hex digest.
        digest: String,
    },
    /// The repository is encrypted and no key was given.
    #[error("the repository is encrypted: a key file is needed (--keyfile / SHEAR_KEYFILE)")]
    KeyRequired,
    /// The key does not belong to this repository or backup.
    #[error("wrong key: key fingerprint {given} does not match {expected}")]
    WrongKey {
        /// Fingerprint of the key given.
        given: String,
        /// Fingerprint the repository or manifest expects.
        expected: String,
    },
    /// The key file could not be unlocked with the passphrase.
    #[error("wrong passphrase for key file {}", path.display())]
    WrongPassphrase {
        /// Key file.
        path: PathBuf,
    },
    /// The key file is readable by others (F-47).
    #[error("key file {} has mode {mode:04o}: it must not be readable by group or others (chmod 600)", path.display())]
    KeyFileInsecure {
        /// Key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key was given for a repository that is not encrypted.
    #[error("the repository is not encrypted but a key was given")]
    KeyNotExpected,
    /// An append-only repository refused a deletion or overwrite (the
    /// admin token was not given), or Object Lock retains the object.
    #[error("refused: {what}")]
    Immutable {
        /// What was refused, and why.
        what: String,
    },
    /// The listing a deletion would rely on is incomplete (F-41).
    #[error("listing incomplete: {what}; nothing was deleted")]
    ListingIncomplete {
        /// What did not add up.
        what: String,
    },
    /// A lock is held by someone else.
    #[error("repository busy: {what}")]
    Busy {
        /// Who holds what.
        what: String,
    },
    /// A chunk failed the check made before it is stored (F-45).
    #[error(
        "chunk {digest} failed verification before store ({reason}): faulty compressor or memory?"
    )]
    PreStoreVerification {
        /// Hex digest.
        digest: String,
        /// Which check failed.
        reason: String,
    },
    /// A backup session was used after it was aborted or committed.
    #[error("backup session is closed: {reason}")]
    SessionClosed {
        /// Why.
        reason: String,
    },
    /// The digest of the restored image differs from the manifest.
    #[error("restored image digest {actual} differs from the manifest's {expected}")]
    ImageDigestMismatch {
        /// From the manifest.
        expected: String,
        /// Recomputed.
        actual: String,
    },
}

impl RepoError {
    /// The stable class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RepoError::Io { source, .. } => io_kind(source),
            RepoError::NotARepository { .. }
            | RepoError::NotFound { .. }
            | RepoError::ChunkMissing { .. } => ErrorKind::NotFound,
            RepoError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            RepoError::InvalidInput { .. } | RepoError::SessionClosed { .. } => {
                ErrorKind::InvalidInput
            }
            RepoError::Corrupt { .. }
            | RepoError::PreStoreVerification { .. }
            | RepoError::ImageDigestMismatch { .. } => ErrorKind::Corrupt,
            RepoError::KeyRequired
            | RepoError::WrongKey { .. }
            | RepoError::WrongPassphrase { .. }
            | RepoError::KeyFileInsecure { .. }
            | RepoError::KeyNotExpected => ErrorKind::Key,
            RepoError::Busy { .. } => ErrorKind::Busy,
            RepoError::Immutable { .. } => ErrorKind::PermissionDenied,
            RepoError::ListingIncomplete { .. } => ErrorKind::Io,
        }
    }

    /// Whether the operation may succeed if retried unchanged.
    pub fn retry(&self) -> Retry {
        match self.kind() {
            ErrorKind::Busy => Retry::Temporary,
            ErrorKind::Io => match self {
                RepoError::Io { source, .. }
                    if matches!(
                        source.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::WouldBlock
                    ) =>
                {
                    Retry::Temporary
                }
                _ => Retry::Permanent,
            },
            _ => Retry::Permanent,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        RepoError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        RepoError::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        RepoError::InvalidInput {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        RepoError::NotFound { what: what.into() }
    }
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            ErrorKind::PermissionDenied
        }
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    }
}

impl From<crate::fsutil::WriteError> for RepoError {
    fn from(e: crate::fsutil::WriteError) -> Self {
        RepoError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}

/// Result alias for the repository.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

//! The crate's one public error type.
//!
//! Every failure is an [`Error`]; [`Error::kind`] tells the job engine whether
//! retrying (a new connection, the same offset again) can help. Variants name
//! the step that failed; the source error is never repeated in `Display`.

use std::io;
use std::time::Duration;

use crate::violation::Violation;
use crate::wire;

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection broke, timed out, or the server reported a transient
    /// failure (`EIO`, `ESHUTDOWN`, ...): a retry may succeed.
    Temporary,
    /// The server violated the protocol, lacks a required feature, or the
    /// caller asked for something impossible: retrying cannot help.
    Permanent,
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[expect(
    clippy::error_impl_error,
    reason = "team rule: one public error type per crate, `nbd_export::Error`"
)]
pub enum Error {
    /// Opening the socket failed.
    #[error("connecting to {endpoint}")]
    Connect {
        /// Where we tried to connect.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A socket read or write failed.
    #[error("socket I/O failed while {step}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server sent nothing for too long (F-19).
    #[error("no progress from the server for {timeout:?} while {step}")]
    Timeout {
        /// What we were doing.
        step: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("server closed the connection while {step}")]
    Disconnected {
        /// What we were doing.
        step: &'static str,
    },
    /// The server broke the protocol (F-20).
    #[error("NBD protocol violation by the server")]
    Protocol(#[source] Violation),
    /// The server lacks a feature this client needs.
    #[error("server does not support {0}")]
    Unsupported(&'static str),
    /// The export name is not known to the server.
    #[error("export {name:?} not found on the server: {message}")]
    ExportNotFound {
        /// Export name asked for.
        name: String,
        /// Server's message, if any.
        message: String,
    },
    /// The server refused an option.
    #[error("server refused {option} with {reply}: {message}")]
    OptionRefused {
        /// Option name.
        option: &'static str,
        /// Reply type name.
        reply: &'static str,
        /// Server's message, if any.
        message: String,
    },
    /// A metadata context the caller asked for is not offered (F-20: a
    /// missing `qemu:dirty-bitmap:NAME`).
    #[error("server did not select metadata context {0:?}")]
    ContextMissing(String),
    /// The server answered a command with an error (for `NBD_CMD_READ`, F-18:
    /// the range is unread, never zero-filled).
    #[error("server failed {command} at offset {offset} (request {req_offset}+{req_len}): {} {message:?}", wire::errno_name(*errno))]
    Command {
        /// The command.
        command: &'static str,
        /// The failing offset (from `NBD_REPLY_TYPE_ERROR_OFFSET`, else the
        /// request's start).
        offset: u64,
        /// Request start.
        req_offset: u64,
        /// Request length.
        req_len: u32,
        /// NBD error number.
        errno: u32,
        /// Server's message.
        message: String,
    },
    /// The caller asked for something impossible.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Setting up io_uring failed (only when it was explicitly requested).
    #[error("io_uring setup failed at {step}")]
    Uring {
        /// The failing call.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Context: the chunk being read when `source` happened.
    #[error("reading chunk {index} at offset {offset}")]
    Chunk {
        /// Chunk index.
        index: u64,
        /// Chunk offset in the export.
        offset: u64,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// TLS credentials could not be loaded, or are of an unsupported kind
    /// (server half).
    #[error("TLS credentials in {}: {detail}", dir.display())]
    TlsCredentials {
        /// The credentials directory.
        dir: std::path::PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The reader was stopped by its owner.
    #[error("reader cancelled")]
    Cancelled,
    /// A worker thread of the reader panicked (a bug in this crate).
    #[error("reader thread failed: {0}")]
    Internal(String),
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Temporary (retry may help) or Permanent.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. }
            | Error::Io { .. }
            | Error::Timeout { .. }
            | Error::Disconnected { .. } => ErrorKind::Temporary,
            Error::Command { errno, .. } => match *errno {
                wire::NBD_EIO | wire::NBD_ENOMEM | wire::NBD_ESHUTDOWN => ErrorKind::Temporary,
                _ => ErrorKind::Permanent,
            },
            Error::OptionRefused { reply, .. } if *reply == "NBD_REP_ERR_SHUTDOWN" => {
                ErrorKind::Temporary
            }
            Error::Chunk { source, .. } => source.kind(),
            Error::Protocol(_)
            | Error::Unsupported(_)
            | Error::ExportNotFound { .. }
            | Error::OptionRefused { .. }
            | Error::ContextMissing(_)
            | Error::InvalidArgument(_)
            | Error::Uring { .. }
            | Error::TlsCredentials { .. }
            | Error::Cancelled
            | Error::Internal(_) => ErrorKind::Permanent,
        }
    }

    /// The export offset this error is about, when there is one: the failing
    /// offset of a server error, else the chunk being read.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Command { offset, .. } => Some(*offset),
            Error::Chunk { source, offset, .. } => source.offset().or(Some(*offset)),
            _ => None,
        }
    }

    /// The protocol violation, if this is one (looks through chunk context).
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            Error::Protocol(v) => Some(v),
            Error::Chunk { source, .. } => source.violation(),
            _ => None,
        }
    }

    /// The innermost error, without chunk context.
    pub fn root(&self) -> &Error {
        match self {
            Error::Chunk { source, .. } => source.root(),
            other => other,
        }
    }

    pub(crate) fn io(step: &'static str, source: io::Error, timeout: Duration) -> Error {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout { step, timeout },
            io::ErrorKind::UnexpectedEof => Error::Disconnected { step },
            _ => Error::Io { step, source },
        }
    }
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Error::Protocol(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let eio = Error::Command {
            command: "NBD_CMD_READ",
            offset: 5,
            req_offset: 0,
            req_len: 10,
            errno: wire::NBD_EIO,
            message: String::new(),
        };
        assert_eq!(eio.kind(), ErrorKind::Temporary);
        assert_eq!(eio.offset(), Some(5));
        let chunk = Error::Chunk {
            index: 3,
            offset: 12 << 20,
            source: Box::new(eio),
        };
        assert_eq!(chunk.kind(), ErrorKind::Temporary);
        assert_eq!(chunk.offset(), Some(5));
        let proto = Error::Protocol(Violation::UnknownCookie(7));
        assert_eq!(proto.kind(), ErrorKind::Permanent);
        assert!(proto.violation().is_some());
        let timeout = Error::io(
            "reading",
            io::Error::from(io::ErrorKind::WouldBlock),
            Duration::from_secs(1),
        );
        assert!(matches!(timeout, Error::Timeout { .. }));
        assert_eq!(timeout.kind(), ErrorKind::Temporary);
        let msg = chunk.to_string();
        assert!(msg.contains("chunk 3"), "{msg}");
    }
}

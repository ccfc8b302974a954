//! The crate's one error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The transport failed or a deadline passed: a retry (which reconnects
    /// and resyncs) may succeed.
    Temporary,
    /// The agent answered, but with an error or with something we refuse to
    /// accept: the same request is expected to fail the same way.
    Permanent,
}

/// Everything that can go wrong talking to qemu-ga.
///
/// Variant names say which step failed. Text that came from the guest
/// (`class`, `desc`, `detail`) is sanitized and truncated before it is
/// stored, so printing an error never replays control characters or
/// megabytes chosen by the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[expect(
    clippy::error_impl_error,
    reason = "team rule: one public error type per crate, `guest_agent::Error`"
)]
pub enum Error {
    /// `connect(2)` on the agent's socket failed.
    #[error("connecting to the guest agent socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `connect(2)` did not complete within the deadline.
    #[error("connecting to the guest agent socket {path} took longer than {timeout:?}")]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// No `guest-sync-delimited` reply carrying our id arrived in time:
    /// qemu-ga is not running, is busy (e.g. blocked in a freeze hook), or
    /// another client holds the socket (QEMU serves one client at a time).
    #[error("no guest-sync-delimited reply from the guest agent at {path} within {timeout:?}")]
    SyncTimeout {
        /// The socket path.
        path: PathBuf,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The agent sent more than `limit` bytes without the reply to our sync.
    #[error("the guest agent sent more than {limit} bytes without answering guest-sync-delimited")]
    SyncFlood {
        /// The discard budget that was exceeded.
        limit: usize,
    },
    /// Writing a request failed.
    #[error("sending {command} to the guest agent")]
    Send {
        /// The command being sent.
        command: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a reply failed.
    #[error("reading the guest agent's reply to {command}")]
    Receive {
        /// The command whose reply was awaited.
        command: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The connection closed while a reply was awaited.
    #[error("the guest agent connection closed while waiting for the reply to {command}")]
    Eof {
        /// The command whose reply was awaited.
        command: &'static str,
    },
    /// The reply did not arrive within the deadline (which covers the whole
    /// reply, not each byte).
    #[error("no complete reply to {command} within {timeout:?}")]
    Timeout {
        /// The command whose reply was awaited.
        command: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// A reply line grew past the per-reply cap.
    #[error("the guest agent's reply to {command} exceeds {limit} bytes")]
    ReplyTooLarge {
        /// The command whose reply was awaited.
        command: &'static str,
        /// The cap.
        limit: usize,
    },
    /// A reply nests arrays/objects deeper than allowed (checked before
    /// the JSON parser runs).
    #[error("the guest agent's reply to {command} nests JSON deeper than {limit} levels")]
    ReplyTooDeep {
        /// The command whose reply was awaited.
        command: &'static str,
        /// The depth limit.
        limit: usize,
    },
    /// A reply is not UTF-8.
    #[error("the guest agent's reply to {command} is not valid UTF-8")]
    InvalidUtf8 {
        /// The command whose reply was awaited.
        command: &'static str,
    },
    /// A reply is not JSON.
    #[error("the guest agent's reply to {command} is not valid JSON")]
    InvalidJson {
        /// The command whose reply was awaited.
        command: &'static str,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A reply is JSON but not a QGA reply (`{"return": …}` or
    /// `{"error": {"class": …, "desc": …}}`).
    #[error("the guest agent's reply to {command} is malformed: {detail}")]
    MalformedReply {
        /// The command whose reply was awaited.
        command: &'static str,
        /// What is wrong (sanitized).
        detail: String,
    },
    /// The `return` value has the wrong type or an impossible value
    /// (e.g. `-5` filesystems frozen).
    #[error("the guest agent's reply to {command} has an unexpected value: {detail}")]
    UnexpectedReturn {
        /// The command whose reply was checked.
        command: &'static str,
        /// What is wrong (sanitized).
        detail: String,
    },
    /// Too many well-formed replies that are not ours (or too many bytes of
    /// them) arrived while waiting for our reply.
    #[error(
        "the guest agent sent more than {limit} unsolicited replies while waiting for {command}"
    )]
    UnsolicitedFlood {
        /// The command whose reply was awaited.
        command: &'static str,
        /// The budget that was exceeded.
        limit: usize,
    },
    /// The agent answered with an error.
    #[error("the guest agent rejected {command}: {class}: {desc}")]
    Agent {
        /// The command that failed.
        command: &'static str,
        /// QAPI error class, e.g. `GenericError`, `CommandNotFound` (sanitized).
        class: String,
        /// The agent's description (sanitized).
        desc: String,
    },
    /// A request argument is outside what this client will send.
    #[error("invalid argument for {command}: {detail}")]
    InvalidArgument {
        /// The command.
        command: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A base64 field in a reply does not decode.
    #[error("field {field} of the guest agent's reply to {command} is not valid base64")]
    InvalidBase64 {
        /// The command.
        command: &'static str,
        /// The field.
        field: &'static str,
        /// The decoder's complaint.
        #[source]
        source: base64::DecodeError,
    },
    /// `guest-fsfreeze-status` said `frozen` before we froze: someone else
    /// owns that freeze, so we neither freeze nor thaw (F-05).
    #[error(
        "the guest filesystems are already frozen by someone else; not freezing and not thawing"
    )]
    AlreadyFrozen,
    /// The freeze succeeded but froze no filesystem, so nothing is quiesced
    /// (F-06). The guard still thawed (see [`Error::FreezeFailed`]).
    #[error("guest-fsfreeze-freeze froze no filesystem")]
    NoFilesystemFrozen,
    /// Freezing failed. A freeze was sent, so the guard ran its thaw loop;
    /// `thaw_error` is `None` when the guest was confirmed `thawed`.
    ///
    /// The freeze's cause is in the message; the error's `source()` is the
    /// thaw error, so an error-chain printer shows why the guest may still
    /// be frozen.
    #[error("freezing the guest filesystems failed: {source} ({})", match thaw_error {
        None => "the guest was thawed again",
        Some(_) => "AND THAWING FAILED: the guest may still be frozen",
    })]
    FreezeFailed {
        /// Why the freeze failed.
        source: Box<Error>,
        /// Why the thaw that followed failed, if it did.
        #[source]
        thaw_error: Option<Box<Error>>,
    },
    /// The agent still reports `frozen` right after a successful thaw.
    #[error("guest-fsfreeze-status still reports frozen after guest-fsfreeze-thaw")]
    StillFrozen,
    /// The thaw loop hit its final deadline without seeing `thawed`.
    #[error("could not thaw the guest filesystems: {attempts} attempts over {elapsed:?}; the guest may still be frozen")]
    ThawFailed {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last attempt's error.
        #[source]
        last: Box<Error>,
    },
    /// A guest process did not exit within the deadline. It keeps running
    /// in the guest: qemu-ga has no command to kill it.
    #[error("guest process {pid} did not exit within {timeout:?}")]
    ExecTimeout {
        /// The guest pid.
        pid: i64,
        /// The deadline that passed.
        timeout: Duration,
    },
}

impl Error {
    /// Whether retrying may help. See [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::SyncTimeout { .. }
            | Error::Send { .. }
            | Error::Receive { .. }
            | Error::Eof { .. }
            | Error::Timeout { .. }
            | Error::StillFrozen
            | Error::ExecTimeout { .. } => ErrorKind::Temporary,
            Error::SyncFlood { .. }
            | Error::ReplyTooLarge { .. }
            | Error::ReplyTooDeep { .. }
            | Error::InvalidUtf8 { .. }
            | Error::InvalidJson { .. }
            | Error::MalformedReply { .. }
            | Error::UnexpectedReturn { .. }
            | Error::UnsolicitedFlood { .. }
            | Error::Agent { .. }
            | Error::InvalidArgument { .. }
            | Error::InvalidBase64 { .. }
            | Error::AlreadyFrozen
            | Error::NoFilesystemFrozen
            | Error::ThawFailed { .. } => ErrorKind::Permanent,
            Error::FreezeFailed { source, .. } => source.kind(),
        }
    }

    /// True when the connection's byte stream can no longer be trusted to be
    /// in step with our requests (transport failure, deadline, garbage): the
    /// next command must resync, and the freeze guard reconnects.
    pub(crate) fn desyncs_connection(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::ConnectTimeout { .. }
                | Error::SyncTimeout { .. }
                | Error::SyncFlood { .. }
                | Error::Send { .. }
                | Error::Receive { .. }
                | Error::Eof { .. }
                | Error::Timeout { .. }
                | Error::ReplyTooLarge { .. }
                | Error::ReplyTooDeep { .. }
                | Error::InvalidUtf8 { .. }
                | Error::InvalidJson { .. }
                | Error::MalformedReply { .. }
                | Error::UnsolicitedFlood { .. }
        )
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest guest-supplied text kept in an error.
const MAX_GUEST_TEXT: usize = 512;

/// Makes guest-supplied text safe to print: control characters are escaped
/// and the result is truncated, so a hostile guest cannot inject terminal
/// escapes or megabytes into our logs.
pub(crate) fn sanitize_guest_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_GUEST_TEXT) + 8);
    for ch in text.chars() {
        if out.len() >= MAX_GUEST_TEXT {
            out.push('…');
            break;
        }
        if ch.is_control() {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_controls_and_truncates() {
        assert_eq!(sanitize_guest_text("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\n");
        let long = "x".repeat(10_000);
        let cut = sanitize_guest_text(&long);
        assert!(cut.len() <= MAX_GUEST_TEXT + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn freeze_failed_takes_the_kind_of_its_cause() {
        let timeout = Error::FreezeFailed {
            source: Box::new(Error::Timeout {
                command: "guest-fsfreeze-freeze",
                timeout: Duration::from_secs(1),
            }),
            thaw_error: None,
        };
        assert_eq!(timeout.kind(), ErrorKind::Temporary);
        let agent = Error::FreezeFailed {
            source: Box::new(Error::Agent {
                command: "guest-fsfreeze-freeze",
                class: "GenericError".into(),
                desc: "x".into(),
            }),
            thaw_error: None,
        };
        assert_eq!(agent.kind(), ErrorKind::Permanent);
        assert!(agent.to_string().contains("thawed again"));
        assert!(std::error::Error::source(&agent).is_none());
    }

    /// An error-chain printer must reach the thaw error (why the guest may
    /// still be frozen), and the message keeps the freeze's cause.
    #[test]
    fn freeze_failed_chains_to_the_thaw_error() {
        let e = Error::FreezeFailed {
            source: Box::new(Error::Timeout {
                command: "guest-fsfreeze-freeze",
                timeout: Duration::from_secs(1),
            }),
            thaw_error: Some(Box::new(Error::ThawFailed {
                attempts: 3,
                elapsed: Duration::from_secs(2),
                last: Box::new(Error::StillFrozen),
            })),
        };
        assert!(e.to_string().contains("guest-fsfreeze-freeze"), "{e}");
        let thaw = std::error::Error::source(&e).expect("thaw error is the source");
        // Boxed causes are sources as the box itself.
        assert!(matches!(
            thaw.downcast_ref::<Box<Error>>().map(|b| &**b),
            Some(Error::ThawFailed { .. })
        ));
        let last = thaw.source().expect("the last attempt's error");
        assert!(matches!(
            last.downcast_ref::<Box<Error>>().map(|b| &**b),
            Some(Error::StillFrozen)
        ));
    }
}

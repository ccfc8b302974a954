//! The crate's one error type and its classification.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What went wrong, coarsely, so callers can decide without matching every
/// variant. New kinds may be added.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The socket could not be opened or the greeting/negotiation did not
    /// finish in time. Temporary: QEMU may still be starting.
    Connect,
    /// The connection to QEMU was lost (EOF, I/O error). Temporary: every
    /// command pending at that moment failed with this kind; reconnect.
    Disconnected,
    /// A deadline expired while the connection was still up (command reply,
    /// event or job wait). Temporary: QEMU may be stopped or overloaded.
    Timeout,
    /// QEMU (or whatever is on the socket) broke the protocol: oversized
    /// line, too-deep JSON, invalid UTF-8, invalid JSON, bad greeting. The
    /// connection is closed. Permanent: retrying talks to the same peer.
    Protocol,
    /// QEMU answered the command with an error (`class`, `desc` kept).
    /// Permanent except for the classes listed in [`Error::is_retryable`].
    Command,
    /// QEMU's reply did not have the shape the typed helper expects.
    /// Permanent.
    Decode,
    /// A job or wait concluded, but not the way the caller needed (job error,
    /// job vanished). Permanent.
    Failed,
    /// The client was used after it was shut down by this process.
    /// Permanent.
    Closed,
}

impl ErrorKind {
    /// Whether retrying (reconnecting first if the connection is gone) may
    /// succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Connect | Self::Disconnected | Self::Timeout)
    }
}

/// The crate's error type. Each variant names the step that failed; the
/// underlying cause, if any, is in [`std::error::Error::source`] and is not
/// repeated in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[expect(
    clippy::error_impl_error,
    reason = "team rule: one public error type per crate, `qmp::Error`"
)]
pub enum Error {
    /// `connect(2)` on the QMP socket failed.
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting, reading the greeting or negotiating capabilities did not
    /// finish within the connect deadline.
    #[error(
        "QMP connect to {path} did not finish within {timeout:?} (step: {step}){}",
        .holder_hint.as_deref().map(|h| format!(": {h}")).unwrap_or_default()
    )]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// The deadline that expired.
        timeout: Duration,
        /// Which step was running: `connect`, `greeting` or `qmp_capabilities`.
        step: &'static str,
        /// At the greeting step: who is probably holding the monitor.
        holder_hint: Option<String>,
    },
    /// The first message was not a QMP greeting.
    #[error("QMP greeting invalid: {detail}")]
    Greeting {
        /// What was wrong.
        detail: String,
    },
    /// The connection ended before the greeting.
    #[error("QMP connection closed before the greeting")]
    GreetingEof,
    /// Reading from the socket failed.
    #[error("reading from the QMP socket")]
    Read {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a command to the socket failed.
    #[error("writing to the QMP socket")]
    Write {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection (clean EOF).
    #[error("QEMU closed the QMP connection")]
    Eof,
    /// The connection ended in the middle of a line.
    #[error("QMP connection closed in the middle of a message ({partial_bytes} bytes)")]
    EofMidLine {
        /// How many bytes of the unfinished line had arrived.
        partial_bytes: usize,
    },
    /// A line exceeded the configured maximum length.
    #[error("QMP message longer than the {limit}-byte limit")]
    LineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// A message nested JSON arrays/objects deeper than the limit.
    #[error("QMP message nests JSON deeper than the limit of {limit}")]
    TooDeep {
        /// The depth limit.
        limit: usize,
    },
    /// A message was not valid UTF-8.
    #[error("QMP message is not valid UTF-8 (at byte {valid_up_to})")]
    InvalidUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// A message was not valid JSON.
    #[error("QMP message is not valid JSON")]
    InvalidJson {
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A message was valid JSON but not a JSON object.
    #[error("QMP message is not a JSON object: {detail}")]
    NotAnObject {
        /// What it was.
        detail: String,
    },
    /// A command could not be completed because the connection was lost
    /// (before or while it waited). `cause` says why the connection ended;
    /// [`Error::kind`] follows it (EOF/I/O: Disconnected, bad input:
    /// Protocol).
    #[error("command {command}: QMP connection lost")]
    ConnectionLost {
        /// The command that was waiting.
        command: String,
        /// Why the connection ended (shared by every command that failed).
        #[source]
        cause: Arc<Error>,
    },
    /// The command got no reply within its deadline. The connection stays
    /// up; a late reply is discarded.
    #[error("command {command}: no reply within {timeout:?}")]
    CommandTimeout {
        /// The command.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// QEMU answered with an error.
    #[error("command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// Arguments could not be encoded as a JSON object.
    #[error("command {command}: encoding arguments")]
    EncodeArguments {
        /// The command.
        command: String,
        /// The serializer's error (or a note that they were not an object).
        #[source]
        source: serde_json::Error,
    },
    /// The reply did not have the expected shape.
    #[error("command {command}: decoding the reply")]
    DecodeReply {
        /// The command.
        command: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// An event or state did not show up within the deadline.
    #[error("waiting for {what}: not seen within {timeout:?}")]
    WaitTimeout {
        /// What was awaited, e.g. `BLOCK_EXPORT_DELETED id=exp0`.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A QEMU job concluded with an error.
    #[error("job {id} ({job_type}) failed: {desc}")]
    JobFailed {
        /// Job id.
        id: String,
        /// Job type (`snapshot-save`, ...).
        job_type: String,
        /// QEMU's error description for the job.
        desc: String,
    },
    /// A job we were waiting for is no longer listed by `query-jobs`.
    #[error("job {id} vanished from query-jobs before it concluded")]
    JobVanished {
        /// Job id.
        id: String,
    },
    /// The client was shut down by [`crate::Qmp::shutdown`]; the cause of
    /// [`Error::ConnectionLost`] for commands issued afterwards.
    #[error("QMP client was shut down by this process")]
    ClientShutdown,
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Connect { .. } | Self::ConnectTimeout { .. } | Self::GreetingEof => {
                ErrorKind::Connect
            }
            Self::Read { .. } | Self::Write { .. } | Self::Eof | Self::EofMidLine { .. } => {
                ErrorKind::Disconnected
            }
            Self::Greeting { .. }
            | Self::LineTooLong { .. }
            | Self::TooDeep { .. }
            | Self::InvalidUtf8 { .. }
            | Self::InvalidJson { .. }
            | Self::NotAnObject { .. } => ErrorKind::Protocol,
            Self::ConnectionLost { cause, .. } => match cause.kind() {
                ErrorKind::Protocol => ErrorKind::Protocol,
                ErrorKind::Closed => ErrorKind::Closed,
                _ => ErrorKind::Disconnected,
            },
            Self::CommandTimeout { .. } | Self::WaitTimeout { .. } => ErrorKind::Timeout,
            Self::Command { .. } => ErrorKind::Command,
            Self::EncodeArguments { .. } | Self::DecodeReply { .. } => ErrorKind::Decode,
            Self::JobFailed { .. } | Self::JobVanished { .. } => ErrorKind::Failed,
            Self::ClientShutdown => ErrorKind::Closed,
        }
    }

    /// Whether retrying (after reconnecting, if the connection is gone) may
    /// succeed: true for [`ErrorKind::Connect`], [`ErrorKind::Disconnected`]
    /// and [`ErrorKind::Timeout`]. Command errors are permanent: QEMU has no
    /// error class that means "try again".
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// QEMU's error class, if QEMU answered with an error.
    pub fn qemu_class(&self) -> Option<&str> {
        match self {
            Self::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's error description, if QEMU answered with an error.
    pub fn qemu_desc(&self) -> Option<&str> {
        match self {
            Self::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }

    /// For [`Error::ConnectionLost`], why the connection ended; otherwise
    /// `self`.
    pub fn connection_cause(&self) -> &Error {
        match self {
            Self::ConnectionLost { cause, .. } => cause,
            other => other,
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Async client for QEMU's QMP monitor.
//!
//! This crate knows QMP and nothing about backups. It owns its transport
//! (unix socket, line-delimited JSON with a bounded line length) rather than
//! using qapi-rs's, because QEMU 10 sends events older schemas lack.
//!
//! ```no_run
//! # async fn demo() -> qmp::Result<()> {
//! use std::time::Duration;
//! use serde_json::json;
//!
//! let (qmp, mut events) = qmp::Qmp::connect("/run/vm.qmp", Duration::from_secs(5)).await?;
//! let devices = qmp.query_block().await?;
//! qmp.blockdev_add(json!({"driver": "null-co", "node-name": "n0"})).await?;
//! qmp.with_timeout(Duration::from_secs(2)).blockdev_del("n0").await?;
//! while let Some(event) = events.next_event().await {
//!     println!("{} {}", event.name, event.data);
//! }
//! # let _ = devices; Ok(()) }
//! ```
//!
//! # Tasks and threads
//!
//! [`Qmp::connect`] spawns two tokio tasks on the current runtime:
//!
//! - the **reader** owns the read half. It reads one bounded line at a time,
//!   decodes it, hands replies to the waiting command (matched by the
//!   numeric `id` this client puts on every command) and pushes events into
//!   each subscriber's queue. It never waits for anything but the socket, so
//!   a slow event consumer cannot delay replies.
//! - the **writer** owns the write half and writes whole command lines from
//!   a bounded queue. A caller that gives up (deadline, cancellation) can
//!   therefore never leave half a command on the wire; a command whose
//!   caller gave up before it was written is not sent at all. A command that
//!   was written may still execute in QEMU after its caller saw
//!   [`ErrorKind::Timeout`]: QMP has no way to take it back.
//!
//! [`Qmp`] is a cheap clone (`Arc`); any number of tasks may issue commands
//! at once. Both tasks stop, and the socket closes, when the last clone is
//! dropped or on [`Qmp::shutdown`]. No lock is held across an `.await`.
//!
//! # Limits
//!
//! | what | default | where |
//! |---|---|---|
//! | line length | 4 MiB ([`DEFAULT_MAX_LINE_BYTES`]) | [`Limits`] |
//! | JSON nesting | 100 ([`DEFAULT_MAX_DEPTH`]), checked before parsing | [`Limits`] |
//! | command deadline | 30 s ([`DEFAULT_COMMAND_TIMEOUT`]) | [`Qmp::with_timeout`] |
//! | connect deadline | caller's, covering connect + greeting + `qmp_capabilities` | [`Qmp::connect`] |
//! | event queue | 1024 events and 8 MiB per subscriber, oldest dropped | [`ConnectOptions`] |
//!
//! A line over the limit, too-deep JSON, invalid UTF-8, invalid JSON or a
//! non-object message means the peer is broken: the connection is closed and
//! every pending command fails. Objects that are neither reply nor event,
//! and replies whose id matches no waiting command (late replies after a
//! timeout, or a peer's wrong ids), are discarded and counted in
//! [`Qmp::stats`]; the command they might have belonged to then hits its
//! deadline.
//!
//! # Events
//!
//! Every subscriber ([`Events`], one from connect and more from
//! [`Qmp::subscribe`]) has its own bounded queue. On overflow the **oldest**
//! events are dropped and the subscriber receives [`Delivery::Missed`] with
//! the count before the next event. Unknown events are delivered like known
//! ones, with `data` as raw JSON; [`Event::kind`] gives a typed view of the
//! few the agent acts on. The crate's own waits ([`Qmp::block_export_del_wait`],
//! [`Qmp::wait_job`]) use events to wake up and a 250 ms query poll as a
//! backstop, so they finish even if an event was dropped.
//!
//! # Errors
//!
//! One error type, [`Error`]; each variant names the step that failed, and
//! [`Error::kind`] classifies it ([`ErrorKind`]). [`Error::is_retryable`] is
//! true for [`ErrorKind::Connect`], [`ErrorKind::Disconnected`] and
//! [`ErrorKind::Timeout`]: the same operation may succeed later, after a
//! reconnect if the connection is gone. When the connection is lost, every
//! pending command and every later command fails with
//! [`Error::ConnectionLost`], whose `cause` says why (EOF, I/O error:
//! retryable; protocol violation: permanent). Command errors keep QEMU's
//! `class` and `desc` ([`Error::qemu_class`], [`Error::qemu_desc`]) and are
//! permanent. Typed replies are lenient (unknown fields kept in `other`,
//! unknown enum values as `Other(String)`), so a newer QEMU is not a decode
//! error.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod codec;
mod commands;
mod error;
mod events;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod types;

pub use client::{
    Command, ConnectOptions, Qmp, Stats, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
};
pub use codec::{Limits, DEFAULT_MAX_DEPTH, DEFAULT_MAX_LINE_BYTES};
pub use commands::{
    QueryBlock, QueryBlockExports, QueryJobs, QueryNamedBlockNodes, QueryStatus, QueryVersion,
};
pub use error::{Error, ErrorKind, Result};
pub use events::{
    Delivery, Event, EventKind, Events, Timestamp, DEFAULT_EVENT_QUEUE_BYTES,
    DEFAULT_EVENT_QUEUE_EVENTS,
};
pub use types::*;

#[cfg(test)]
mod tests;

//! Client for qemu-guest-agent (QGA).
//!
//! The guest is untrusted: every byte it sends is bounded and validated.
//!
//! # Protocol, as implemented
//!
//! - Transport: the host end of a virtio-serial chardev, a unix socket that
//!   QEMU serves to **one client at a time**. Replies the agent wrote for an
//!   earlier client leak to the next one, so every connection starts with
//!   `0xFF` + `guest-sync-delimited` carrying a random 53-bit value; all
//!   bytes up to the agent's `0xFF` sentinel and every reply that is not
//!   ours are dropped unparsed. Drop a [`GuestAgent`] as soon as you are done
//!   with it: that closes the socket and frees it for the next client.
//! - Replies are matched by a per-request `id` (qemu-ga echoes it; an agent
//!   that does not is detected at sync time and matched by order instead).
//!   Late replies to abandoned requests are dropped within a budget.
//! - Bounds: one reply ≤ [`Config::max_reply_bytes`] (1 MiB), nesting ≤
//!   [`Config::max_json_depth`] (checked on raw bytes as they arrive,
//!   before serde), UTF-8 checked, every exchange under a deadline that
//!   covers the whole reply. Junk and unsolicited replies are budgeted, so a
//!   flood ends in a typed error, not a spin.
//! - Every `return` is type-checked ([`commands`]): `{"return": -5}` to a
//!   freeze or `{"return": "frozen"}` to a thaw is
//!   [`Error::UnexpectedReturn`].
//!
//! # Freezing
//!
//! [`FreezeGuard`] owns a freeze this process made and thaws it on every
//! path; it never thaws a freeze it did not make. See its docs for which
//! path thaws how, and [`thaw_blocking`] for a watchdog process.
//!
//! # Threads
//!
//! Everything is async on tokio except the thaw run by a dropped
//! [`FreezeGuard`] and [`thaw_blocking`], which use a blocking std socket on
//! a dedicated thread so they work without (or after) a runtime.
//!
//! # Reliability catalogue
//!
//! Covered here: F-01 (no agent: connect/sync fails within
//! [`Config::connect_timeout`]), F-02 (freeze hangs: deadline, resync, thaw
//! loop), F-03 (agent EOF mid-freeze: reconnect and thaw), F-04 (agent
//! killed: [`thaw_blocking`] for a watchdog), F-05 ([`Error::AlreadyFrozen`]),
//! F-06 (failed or empty freeze still thaws), F-07 (freeze window measured in
//! [`ThawReport`]), F-08 (hostile byte stream), F-09 (reboot mid-freeze:
//! thaw retried until `thawed`).
//!
//! # Tests
//!
//! `src/tests.rs` drives the client against [`fake::FakeQga`] (feature
//! `test-utils`), a scripted hostile agent on a real unix socket, for every
//! input above. The line/JSON decoder has property tests
//! (`decoder_props`, the crate's fuzz targets); the suite runs them briefly,
//! a long run is `PROPTEST_CASES=1000000 cargo test -p guest-agent --release
//! decoder_props`. Real qemu-ga in a booted guest: `tests/tests/guest_agent_real.rs`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod blocking;
mod client;
pub mod commands;
mod config;
mod error;
mod freeze;
pub mod fuzzing;
mod thaw;
mod wire;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;

#[cfg(test)]
mod tests;

pub use client::{ExecStatus, FileChunk, FileHandle, GuestAgent};
pub use commands::{AgentInfo, FilesystemInfo, FsFreezeStatus, GuestExec, ShutdownMode};
pub use config::{Config, MAX_REPLY_BYTES_CEILING};
pub use error::{Error, ErrorKind, Result};
pub use freeze::{pending_drop_thaws, wait_for_drop_thaws, FreezeGuard, FreezeScope};
pub use thaw::{thaw_blocking, ThawReport};

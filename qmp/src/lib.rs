//! Async client for QEMU's QMP monitor.
//!
//! This crate knows QMP and nothing about backups. It owns its transport
//! (unix socket, line-delimited JSON with a bounded line length) rather than
//! using qapi-rs's, because QEMU 10 sends events older schemas lack.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

//! shear: live backup of QEMU/KVM virtual machines.
//!
//! The library half of the `shear` binary: jobs, repository, CLI glue.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod daemon;
mod error_chain;
pub mod failpoint;
pub mod fsutil;
pub mod hookscript;
pub mod job;
pub mod libvirt;
pub mod notify;
pub mod repo;
pub mod restorevm;
pub mod serve;
pub mod snapshot;
pub mod units;

pub use error_chain::chain;

//! NBD client for reading frozen images exported by QEMU.
//!
//! `unsafe` is allowed only in the io_uring engine module.
#![deny(unsafe_code)]
#![warn(missing_docs)]

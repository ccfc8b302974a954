//! Client for qemu-guest-agent (QGA).
//!
//! The guest is untrusted: every byte it sends is bounded and validated.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

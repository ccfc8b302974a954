//! Test-only support: real S3 servers on loopback and a fault-injecting
//! HTTP proxy in front of them, for shear's S3 tests (issue 14).
//!
//! - [`Garage`]: the S3 server of the tests, the kill campaign, the VM test
//!   and the bench. A single Garage node (`scripts/setup` builds it into
//!   /opt/shear-test/garage) in a temporary directory, with a bucket and a
//!   key made by the starter; it can be SIGKILLed and restarted on the same
//!   data (a server killed mid-backup).
//! - [`Moto`]: moto_server (PyPI, /opt/shear-test/moto), only for what
//!   Garage does not implement: S3 Object Lock (Garage has no versioning,
//!   retention or legal hold).
//! - [`start_proxy`] with [`Faults`]: 503 answers, a dead server, denied
//!   DELETEs, damaged PUT bodies, truncated GET bodies, added latency, a
//!   skewed server clock; it counts requests and listings.
//!
//! Why a crate of its own: `shear-tests` (the VM tests and the bench)
//! depends on `shear`, so shear's own integration tests (agent/tests) cannot
//! use `shear-tests`; before this crate both sides kept a copy of the
//! server starter. This crate depends on neither (only std and tempfile)
//! and is a dev-dependency of both. Never a dependency of the shipped
//! binary.
//!
//! These are test fixtures: a start that fails returns an error the caller
//! turns into a failed test; a missing binary is reported separately
//! ([`garage_binary`], [`moto_binary`]) so callers apply their skip policy.

mod garage;
mod http;
mod moto;
mod proxy;
mod time;

pub use garage::{garage_binary, Garage, GARAGE_VERSION};
pub use http::{free_port, header, http, raw};
pub use moto::{moto_binary, Moto};
pub use proxy::{start_proxy, Faults};

/// What a client needs to reach an S3 server: its credentials and region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// Access key id.
    pub key_id: String,
    /// Secret access key.
    pub secret: String,
    /// The region the server signs for.
    pub region: String,
}

impl Creds {
    /// The AWS environment of a client reaching the server through `port`
    /// on 127.0.0.1 (the server's own, or a proxy's).
    pub fn env(&self, port: u16) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

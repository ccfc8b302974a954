//! The S3 server of the VM tests and the bench: a single Garage node on
//! loopback (built by `scripts/setup` into /opt/shear-test/garage), and the
//! fault proxy (here: added latency per request, a long link for the
//! sync-stream figures). Both live in crate `shear-test-s3`, shared with
//! shear's own S3 tests; this module adds the harness's skip policy and the
//! environment of a `shear` child process.

use std::path::Path;

pub use shear_test_s3::{garage_binary, start_proxy, Creds, Faults, Garage, GARAGE_VERSION};

/// Starts Garage with the bucket `shear`; `None`: garage is missing and
/// skips are allowed ([`crate::prereq::skip`]). A start that fails panics
/// (a failed test).
pub fn start_garage() -> Option<Garage> {
    if garage_binary().is_none() {
        crate::prereq::skip("garage (scripts/setup installs it into /opt/shear-test/garage)");
        return None;
    }
    Some(Garage::start(&["shear"]).unwrap_or_else(|e| panic!("{e}")))
}

/// The environment a `shear` process needs to reach the server through
/// `port` (the server's own, or a proxy's), with its chunk cache in
/// `cache`.
pub fn env(creds: &Creds, port: u16, cache: &Path) -> Vec<(String, String)> {
    let mut env = creds.env(port);
    env.push(("SHEAR_CACHE_DIR".into(), cache.display().to_string()));
    env
}

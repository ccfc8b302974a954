//! The S3 servers of the repository tests (crate `shear-test-s3`: Garage,
//! and moto for Object Lock only) with this side's skip policy, and the
//! environment a test process (and the children it starts) uses to reach
//! them. Included with `#[path]` by the tests that use it (repo_s3.rs,
//! repo_killpoints.rs, repo_immut.rs).
// Test code: unwrap is the assertion.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;

#[allow(unused_imports)] // each test binary uses a part
pub use shear_test_s3::{header, raw, start_proxy, Creds, Faults, Garage, Moto};

/// Starts Garage with bucket `shear`; `None` = skipped (not installed and
/// skips allowed).
pub fn start_garage() -> Option<Garage> {
    start_garage_with_buckets(&["shear"])
}

/// Starts Garage with `buckets`; `None` = skipped.
pub fn start_garage_with_buckets(buckets: &[&str]) -> Option<Garage> {
    if shear_test_s3::garage_binary().is_none() {
        crate::common::skip("garage (scripts/setup installs it into /opt/shear-test/garage)");
        return None;
    }
    Some(Garage::start(buckets).unwrap_or_else(|e| panic!("{e}")))
}

/// Starts moto_server (for Object Lock, which Garage lacks) and makes each
/// `(bucket, extra headers)`; `None` = skipped.
pub fn start_moto_with_buckets(buckets: &[(&str, &str)]) -> Option<Moto> {
    if shear_test_s3::moto_binary().is_none() {
        crate::common::skip("moto_server (scripts/setup installs it into /opt/shear-test/moto)");
        return None;
    }
    Some(Moto::start(buckets).unwrap_or_else(|e| panic!("{e}")))
}

/// Points this process (and its children) at an S3 server through `port`
/// (the server's own or a proxy's), with short test timeouts and its own
/// chunk cache.
pub fn env_for(creds: &Creds, port: u16) {
    for (k, v) in creds.env(port) {
        std::env::set_var(k, v);
    }
    std::env::set_var("SHEAR_S3_GC_GRACE_SECS", "0");
    std::env::set_var("SHEAR_S3_TIMEOUT", "20");
    let cache = std::env::temp_dir().join(format!("shear-s3-cache-{}", std::process::id()));
    std::env::set_var("SHEAR_CACHE_DIR", cache);
}

/// Waits until every object written so far is older than a GC that starts
/// now. With the grace period at 0 s, GC deletes an unreferenced chunk only
/// if it is older than GC's start, which is the GC marker's Last-Modified
/// from a HEAD: an HTTP date, truncated to the second. A chunk written in
/// the same second looks younger and is (correctly) kept.
pub fn wait_past_gc_start_resolution() {
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

pub fn s3_repo(name: &str) -> PathBuf {
    PathBuf::from(format!("s3://shear/{name}"))
}

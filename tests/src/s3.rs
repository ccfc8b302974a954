//! A real S3 server on loopback for the VM tests and the bench: moto_server
//! (installed by `scripts/setup` into /opt/shear-test/moto; Garage, the
//! issue's first choice, is not built here: its `cargo install` takes 20+
//! minutes of both cores), and a proxy that adds latency to every request
//! (a long link, for the sync-stream figures).
//!
//! These are test fixtures: a failed step is a failed test, so they panic.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where moto_server is (`$SHEAR_MOTO_SERVER` first).
pub fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHEAR_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("/opt/shear-test/moto/bin/moto_server");
    p.exists().then_some(p)
}

/// A running moto_server with the bucket `shear`; killed on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl S3Server {
    /// Starts moto_server and makes the bucket `shear`; `None`: moto is
    /// missing and skips are allowed ([`crate::prereq::skip`]).
    pub fn start() -> Option<S3Server> {
        let Some(bin) = moto_binary() else {
            crate::prereq::skip(
                "moto_server (scripts/setup installs it into /opt/shear-test/moto)",
            );
            return None;
        };
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !http(port, "GET", "/").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start in 90 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let r = http(port, "PUT", "/shear").unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        Some(s)
    }

    /// The environment a `shear` process needs to reach this server
    /// through `port` (the server's own, or a proxy's), with its chunk
    /// cache in `cache`.
    pub fn env(port: u16, cache: &Path) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "shear-test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "shear-test-secret".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("SHEAR_CACHE_DIR", cache.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A proxy in front of an S3 server that holds every request `delay_ms`
/// before forwarding it (one request per connection): a long link on
/// loopback. Counts requests and the most in flight at once.
#[derive(Debug, Default)]
pub struct DelayProxy {
    /// Added latency per request, ms (may be changed while running).
    pub delay_ms: AtomicU64,
    /// Requests forwarded.
    pub requests: AtomicU64,
    inflight: AtomicU64,
    /// The most requests in flight at once.
    pub max_inflight: AtomicU64,
}

impl DelayProxy {
    /// Starts the proxy on a free port in front of `upstream`.
    pub fn start(upstream: u16, delay_ms: u64) -> (Arc<DelayProxy>, u16) {
        let p = Arc::new(DelayProxy {
            delay_ms: AtomicU64::new(delay_ms),
            ..DelayProxy::default()
        });
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = Arc::clone(&p);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let me = Arc::clone(&me);
                std::thread::spawn(move || {
                    let _ = me.serve(c, upstream);
                });
            }
        });
        (p, port)
    }

    fn serve(&self, c: TcpStream, upstream: u16) -> std::io::Result<()> {
        c.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut r = BufReader::new(c.try_clone()?);
        let mut head = Vec::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
            if !lower.starts_with("connection:") {
                head.extend_from_slice(line.as_bytes());
            }
        }
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let now = self.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_inflight.fetch_max(now, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        let delay = self.delay_ms.load(Ordering::Acquire);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let res = (|| {
            let mut u = TcpStream::connect(("127.0.0.1", upstream))?;
            u.write_all(&head)?;
            u.write_all(&body)?;
            let mut c = c;
            std::io::copy(&mut u, &mut c).map(|_| ())
        })();
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        res
    }
}

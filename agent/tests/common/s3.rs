//! A real S3 server for the repository tests (moto_server, installed by
//! `scripts/setup` into /opt/shear-test/moto) and a small fault-injecting
//! HTTP proxy in front of it: 503 answers, a dead server, denied DELETEs,
//! damaged PUT bodies, truncated GET bodies, added latency; it counts
//! requests and records DELETEs. Included with `#[path]` by the tests that
//! use it (repo_s3.rs, repo_killpoints.rs, repo_immut.rs).
// Test code: unwrap is the assertion.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHEAR_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("/opt/shear-test/moto/bin/moto_server");
    p.exists().then_some(p)
}

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn http(port: u16, method: &str, path: &str) -> Option<String> {
    request(port, method, path, "", Duration::from_secs(10))
}

/// One raw request with extra `headers` (each ending in CRLF; moto does
/// not check signatures): the whole answer.
pub fn raw(port: u16, method: &str, path: &str, headers: &str) -> Option<String> {
    request(port, method, path, headers, Duration::from_secs(20))
}

fn request(port: u16, method: &str, path: &str, headers: &str, wait: Duration) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A header of a raw answer.
pub fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Starts moto_server and makes bucket `shear`; `None` = skipped.
pub fn start_moto() -> Option<Moto> {
    start_moto_with_buckets(&[("shear", "")])
}

/// Starts moto_server and makes each `(bucket, extra headers)`; `None` =
/// skipped.
pub fn start_moto_with_buckets(buckets: &[(&str, &str)]) -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        crate::common::skip("moto_server (scripts/setup installs it into /opt/shear-test/moto)");
        return None;
    };
    let port = free_port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let m = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if http(port, "GET", "/").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start in 90 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (bucket, headers) in buckets {
        let r = raw(port, "PUT", &format!("/{bucket}"), headers).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    Some(m)
}

/// What the proxy does to each request.
#[derive(Default)]
pub struct Faults {
    /// Requests seen (by method).
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub others: AtomicU64,
    /// Answer 503 to every Nth request (0 = never), up to `inject_max`.
    pub every: AtomicU64,
    pub inject_max: AtomicU64,
    pub injected: AtomicU64,
    /// Answer 503 to everything.
    pub dead: AtomicBool,
    /// Answer 403 AccessDenied to every DELETE (credentials without
    /// s3:DeleteObject, F-40).
    pub deny_deletes: AtomicBool,
    /// Added latency per request (ms), as on a long link.
    pub delay_ms: AtomicU64,
    /// Flip a byte in the body of this many PUTs of chunks (F-40).
    pub corrupt_puts: AtomicU64,
    pub corrupted: AtomicU64,
    /// Requests being answered now, and the most seen at once (how many
    /// requests a client really keeps in flight).
    pub inflight: AtomicU64,
    pub max_inflight: AtomicU64,
    /// Keys of every DELETE (the request path: /BUCKET/KEY), in order.
    pub deletes: Mutex<Vec<String>>,
    /// Cut the body of this many GETs of chunks short (the connection is
    /// closed after half of it); `u64::MAX`: every one.
    pub truncate_gets: AtomicU64,
    pub truncated: AtomicU64,
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Faults);

impl<'a> InFlight<'a> {
    fn enter(f: &'a Faults) -> Self {
        let now = f.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        f.max_inflight.fetch_max(now, Ordering::AcqRel);
        InFlight(f)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A one-request-per-connection HTTP proxy in front of moto: reads the
/// request head, forwards it with `Connection: close` (so each request has
/// its own connection and can be failed on its own), or answers 503.
pub fn start_proxy(upstream: u16, faults: Arc<Faults>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let n = AtomicU64::new(0);
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let k = n.fetch_add(1, Ordering::AcqRel) + 1;
            let faults = Arc::clone(&faults);
            std::thread::spawn(move || {
                let _ = serve(c, upstream, &faults, k);
            });
        }
    });
    port
}

fn serve(c: TcpStream, upstream: u16, f: &Faults, k: u64) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut head = Vec::new();
    let mut len = 0u64;
    let mut method = String::new();
    let mut target = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if method.is_empty() {
            let mut words = line.split(' ');
            method = words.next().unwrap_or("").to_owned();
            target = words.next().unwrap_or("").to_owned();
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
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    if method == "PUT" {
        f.puts.fetch_add(1, Ordering::AcqRel);
        f.put_bytes.fetch_add(len, Ordering::AcqRel);
    } else {
        f.others.fetch_add(1, Ordering::AcqRel);
    }
    let every = f.every.load(Ordering::Acquire);
    let inject = f.dead.load(Ordering::Acquire)
        || (every > 0
            && k.is_multiple_of(every)
            && f.injected.load(Ordering::Acquire) < f.inject_max.load(Ordering::Acquire));
    let mut c = c;
    let _inflight = InFlight::enter(f);
    let delay = f.delay_ms.load(Ordering::Acquire);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    if method == "PUT"
        && head.windows(8).any(|w| w == b"/chunks/")
        && body.len() > 64
        && f.corrupted.load(Ordering::Acquire) < f.corrupt_puts.load(Ordering::Acquire)
    {
        f.corrupted.fetch_add(1, Ordering::AcqRel);
        body[40] ^= 0x5a;
    }
    if method == "DELETE" && f.deny_deletes.load(Ordering::Acquire) {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
        write!(
            c,
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    if inject {
        f.injected.fetch_add(1, Ordering::AcqRel);
        c.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let mut u = TcpStream::connect(("127.0.0.1", upstream))?;
    if method == "DELETE" {
        f.deletes.lock().unwrap().push(target.clone());
    }
    u.write_all(&head)?;
    u.write_all(&body)?;
    // Claims one of the cuts atomically (GETs run in parallel).
    let truncate = method == "GET"
        && target.contains("/chunks/")
        && f.truncated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < f.truncate_gets.load(Ordering::Acquire)).then_some(n + 1)
            })
            .is_ok();
    if truncate {
        // The whole answer, then its head and half of its body, and the
        // connection closed: the client sees a body cut short.
        let mut answer = Vec::new();
        u.read_to_end(&mut answer)?;
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let body_len = answer.len() - (end + 4);
            if answer.starts_with(b"HTTP/1.1 2") && body_len > 1 {
                c.write_all(&answer[..end + 4 + body_len / 2])?;
                c.flush()?;
                return Ok(());
            }
        }
        // Nothing to cut (an error answer): give the cut back.
        f.truncated.fetch_sub(1, Ordering::AcqRel);
        c.write_all(&answer)?;
        return Ok(());
    }
    std::io::copy(&mut u, &mut c)?;
    Ok(())
}

pub fn env_for(port: u16) {
    std::env::set_var("AWS_ACCESS_KEY_ID", "shear-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "shear-test-secret");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
    std::env::set_var("SHEAR_S3_GC_GRACE_SECS", "0");
    std::env::set_var("SHEAR_S3_TIMEOUT", "20");
    let cache = std::env::temp_dir().join(format!("shear-s3-cache-{}", std::process::id()));
    std::env::set_var("SHEAR_CACHE_DIR", cache);
}

pub fn s3_repo(name: &str) -> PathBuf {
    PathBuf::from(format!("s3://shear/{name}"))
}

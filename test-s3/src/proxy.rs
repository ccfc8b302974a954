//! A one-request-per-connection HTTP proxy in front of an S3 server that
//! injects faults. It never changes a request (the server checks SigV4
//! signatures over them), only answers in the server's place or changes the
//! server's answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::time::{shift_http_date, shift_iso};

/// What the proxy does to each request, and what it counted.
#[derive(Debug, Default)]
pub struct Faults {
    /// Requests seen (by method).
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub others: AtomicU64,
    /// Listing requests (ListObjectsV2: a GET with `list-type=2`), i.e.
    /// pages.
    pub lists: AtomicU64,
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
    /// The server's clock as the client sees it, off by this many seconds
    /// (F-37): every time the server reports (`Last-Modified`, `Date`,
    /// listings' `<LastModified>`) is shifted.
    pub skew_secs: AtomicI64,
}

impl Faults {
    /// Every request forwarded or answered.
    pub fn requests(&self) -> u64 {
        self.puts.load(Ordering::Acquire) + self.others.load(Ordering::Acquire)
    }
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

/// Starts the proxy on a free port of 127.0.0.1 in front of `upstream`:
/// reads each request, forwards it with `Connection: close` (so each
/// request has its own connection and can be failed on its own), or
/// answers in the server's place. Returns its port.
pub fn start_proxy(upstream: u16, faults: Arc<Faults>) -> u16 {
    let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
        return 0;
    };
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
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
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut head = Vec::new();
    let mut len = 0usize;
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
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if method == "PUT" {
        f.puts.fetch_add(1, Ordering::AcqRel);
        f.put_bytes.fetch_add(len as u64, Ordering::AcqRel);
    } else {
        f.others.fetch_add(1, Ordering::AcqRel);
    }
    if method == "GET" && target.contains("list-type=2") {
        f.lists.fetch_add(1, Ordering::AcqRel);
    }
    let every = f.every.load(Ordering::Acquire);
    let inject = f.dead.load(Ordering::Acquire)
        || (every > 0
            && k % every == 0
            && f.injected.load(Ordering::Acquire) < f.inject_max.load(Ordering::Acquire));
    let mut c = c;
    let _inflight = InFlight::enter(f);
    let delay = f.delay_ms.load(Ordering::Acquire);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    if method == "PUT"
        && target.contains("/chunks/")
        && body.len() > 64
        && f.corrupted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < f.corrupt_puts.load(Ordering::Acquire)).then_some(n + 1)
            })
            .is_ok()
    {
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
    u.set_read_timeout(Some(Duration::from_secs(120)))?;
    if method == "DELETE" {
        if let Ok(mut d) = f.deletes.lock() {
            d.push(target.clone());
        }
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
    let skew = f.skew_secs.load(Ordering::Acquire);
    if !truncate && skew == 0 {
        std::io::copy(&mut u, &mut c)?;
        return Ok(());
    }
    let mut answer = Vec::new();
    u.read_to_end(&mut answer)?;
    if skew != 0 {
        answer = shift_times(&answer, skew);
    }
    if truncate {
        // Its head and half of its body, and the connection closed: the
        // client sees a body cut short.
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
    }
    c.write_all(&answer)
}

/// The answer with every server time shifted by `secs` (same lengths, so
/// `Content-Length` and chunk sizes stay right).
fn shift_times(answer: &[u8], secs: i64) -> Vec<u8> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return answer.to_vec();
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let mut out = Vec::with_capacity(answer.len());
    for (i, line) in head.split("\r\n").enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let shifted = line.split_once(':').and_then(|(k, v)| {
            let k = k.to_ascii_lowercase();
            if k == "last-modified" || k == "date" {
                shift_http_date(v.trim(), secs).map(|v| format!("{}: {v}", &line[..k.len()]))
            } else {
                None
            }
        });
        out.extend_from_slice(shifted.as_deref().unwrap_or(line).as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    let mut body = answer[end + 4..].to_vec();
    const TAG: &[u8] = b"<LastModified>";
    let mut at = 0;
    while let Some(p) = body[at..].windows(TAG.len()).position(|w| w == TAG) {
        let start = at + p + TAG.len();
        at = start;
        if let Some(t) = body
            .get(start..start + 19)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| shift_iso(t, secs))
        {
            body[start..start + 19].copy_from_slice(t.as_bytes());
        }
    }
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shift_times_rewrites_headers_and_listing_times_only() {
        let a = b"HTTP/1.1 200 OK\r\nDate: Mon, 30 Nov 2026 20:06:40 GMT\r\nlast-modified: Mon, 30 Nov 2026 20:00:00 GMT\r\nContent-Length: 77\r\n\r\n<Contents><LastModified>2026-11-30T20:00:00.123Z</LastModified></Contents>";
        let s = shift_times(a, -86_400);
        let s = String::from_utf8(s).unwrap();
        assert_eq!(s.len(), a.len());
        assert!(s.contains("Date: Sun, 29 Nov 2026 20:06:40 GMT\r\n"), "{s}");
        assert!(
            s.contains("last-modified: Sun, 29 Nov 2026 20:00:00 GMT\r\n"),
            "{s}"
        );
        assert!(s.contains("<LastModified>2026-11-29T20:00:00.123Z<"), "{s}");
        assert!(s.contains("Content-Length: 77\r\n"), "{s}");
    }
}

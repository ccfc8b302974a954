//! Real receivers for notification tests: an SMTP sink (aiosmtpd, Debian's
//! python3-aiosmtpd, writing a Maildir) and a small HTTP/1.1 receiver on a
//! local TCP port.
//!
//! Test helpers: a failed step is a failed test, so they unwrap.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::prereq::skip;

/// The python with Debian's aiosmtpd (not a pyenv shim on PATH).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A TCP port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One HTTP request as received.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// `POST` …
    pub method: String,
    /// Request target.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 receiver answering every request with a fixed status (or
/// never, when hung), recording what it got.
#[derive(Debug)]
pub struct HttpReceiver {
    /// Its port on 127.0.0.1.
    pub port: u16,
    rx: mpsc::Receiver<HttpRequest>,
}

fn read_request(s: &mut TcpStream) -> Option<HttpRequest> {
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(HttpRequest {
        method,
        path,
        headers,
        body,
    })
}

impl HttpReceiver {
    /// Answers `status` with `body` to every request.
    pub fn start(status: u16, body: &'static str) -> HttpReceiver {
        Self::spawn(Some((status, body)))
    }

    /// Reads requests and never answers (holds the connections open).
    pub fn hung() -> HttpReceiver {
        Self::spawn(None)
    }

    fn spawn(answer: Option<(u16, &'static str)>) -> HttpReceiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let Some(req) = read_request(&mut s) else {
                    continue;
                };
                if tx.send(req).is_err() {
                    break;
                }
                match answer {
                    Some((status, body)) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    None => held.push(s),
                }
            }
        });
        HttpReceiver { port, rx }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The next request, if one comes within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<HttpRequest> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// A request already received, if any (no wait).
    pub fn try_recv(&self) -> Option<HttpRequest> {
        self.rx.try_recv().ok()
    }
}

/// An aiosmtpd SMTP server on 127.0.0.1 storing mail in a Maildir.
#[derive(Debug)]
pub struct SmtpSink {
    /// Its port.
    pub port: u16,
    child: Child,
    maildir: PathBuf,
}

impl SmtpSink {
    /// Start it (waits until it accepts connections); `None` when
    /// python3-aiosmtpd is missing and skips are allowed (else panics).
    pub fn start(dir: &Path) -> Option<SmtpSink> {
        let have = Command::new(SYSTEM_PYTHON)
            .args(["-c", "import aiosmtpd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            skip("python3-aiosmtpd (Debian package)");
            return None;
        }
        let maildir = dir.join("maildir");
        let port = free_port();
        let child = Command::new(SYSTEM_PYTHON)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let sink = SmtpSink {
            port,
            child,
            maildir,
        };
        crate::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "aiosmtpd listening",
            || TcpStream::connect(("127.0.0.1", port)).ok(),
        )
        .unwrap();
        Some(sink)
    }

    /// `127.0.0.1:PORT`.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every mail received so far, as raw text, oldest first.
    pub fn mails(&self) -> Vec<String> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = ["new", "cur"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.maildir.join(d)).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, e.path())
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// Wait until at least `n` mails arrived (at most `timeout`).
    pub fn wait_mails(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.mails();
            if m.len() >= n || Instant::now() >= deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Plain HTTP/1.1 requests on loopback (readiness probes, raw requests to
//! moto, which does not check signatures).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// One request without a body: the whole answer.
pub fn http(port: u16, method: &str, path: &str) -> Option<String> {
    request(port, method, path, "", Duration::from_secs(10))
}

/// One raw request with extra `headers` (each ending in CRLF): the whole
/// answer.
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
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A header of a raw answer.
pub fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

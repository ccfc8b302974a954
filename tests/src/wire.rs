//! The harness's own blocking QMP and QGA clients: minimal, bounded, with
//! deadlines. Deliberately independent of the crates under test.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{herr, Result};

/// Longest line the harness accepts from QEMU or qemu-ga.
const MAX_LINE: usize = 16 << 20;

/// A line-delimited JSON connection over a unix socket.
#[derive(Debug)]
pub struct LineConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl LineConn {
    /// Connect with a deadline.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let s = UnixStream::connect(path).map_err(|e| herr!("connect {}: {e}", path.display()))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(LineConn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Send raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes)?;
        Ok(())
    }

    /// Send one JSON value followed by a newline.
    pub fn send(&mut self, v: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(v).map_err(|e| herr!("encode: {e}"))?;
        line.push(b'\n');
        self.send_raw(&line)
    }

    /// Read one line (without the newline), before `deadline`.
    pub fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(herr!("read timed out"));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))?;
            let n = (&mut self.reader)
                .take((MAX_LINE - buf.len()) as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| herr!("read: {e}"))?;
            if n == 0 {
                return Err(crate::HarnessError(crate::PEER_CLOSED.to_owned()));
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
                return Ok(buf);
            }
            if buf.len() > MAX_LINE {
                return Err(herr!("line over {MAX_LINE} bytes"));
            }
        }
    }

    /// Read one JSON line, skipping a leading 0xFF sentinel.
    pub fn read_json(&mut self, deadline: Instant) -> Result<Value> {
        let line = self.read_line(deadline)?;
        let start = line.iter().position(|&b| b != 0xff).unwrap_or(line.len());
        serde_json::from_slice(&line[start..])
            .map_err(|e| herr!("bad JSON {:?}: {e}", String::from_utf8_lossy(&line)))
    }
}

/// The harness's QMP monitor.
#[derive(Debug)]
pub struct HarnessQmp {
    conn: LineConn,
    next_id: u64,
    /// Events seen while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl HarnessQmp {
    /// Connect, read the greeting and negotiate capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut conn = LineConn::connect(path, timeout)?;
        let greeting = conn.read_json(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(herr!("not a QMP greeting: {greeting}"));
        }
        let mut q = HarnessQmp {
            conn,
            next_id: 0,
            events: Vec::new(),
        };
        q.execute("qmp_capabilities", json!({}), timeout)?;
        Ok(q)
    }

    /// Run a command; `Ok(return)` or `Err` carrying QEMU's error.
    pub fn execute(&mut self, cmd: &str, args: Value, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        self.next_id += 1;
        let id = format!("h{}", self.next_id);
        let mut msg = json!({"execute": cmd, "id": id});
        if !args.is_null() && args != json!({}) {
            msg["arguments"] = args;
        }
        self.conn.send(&msg)?;
        loop {
            let v = self.conn.read_json(deadline)?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if v.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(herr!("QMP {cmd} failed: {}", v["error"]));
        }
    }

    /// Wait for an event named `name` (also checks those already seen).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.conn.read_json(deadline)?;
            if v["event"] == name {
                return Ok(v);
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// One qemu-ga exchange: connect, resync (0xFF + guest-sync-delimited with a
/// fresh id, discarding stale lines), send `cmd`, read its reply, close.
/// `expect_reply = false` for commands that never answer (guest-shutdown).
pub fn qga_call(
    path: &Path,
    cmd: &str,
    args: Value,
    timeout: Duration,
    expect_reply: bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut conn = LineConn::connect(path, timeout)?;
    // Below 2^52 so it survives a JSON double on any peer.
    let sync_id = random_u64() & ((1 << 52) - 1);
    conn.send_raw(&[0xff])?;
    conn.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}))?;
    loop {
        let line = conn.read_line(deadline)?;
        let start = line.iter().position(|&b| b != 0xff).unwrap_or(line.len());
        let Ok(v) = serde_json::from_slice::<Value>(&line[start..]) else {
            continue;
        };
        if v.get("return").and_then(Value::as_u64) == Some(sync_id) {
            break;
        }
    }
    let mut msg = json!({"execute": cmd});
    if !args.is_null() {
        msg["arguments"] = args;
    }
    conn.send(&msg)?;
    if !expect_reply {
        return Ok(Value::Null);
    }
    let v = conn.read_json(deadline)?;
    match (v.get("return"), v.get("error")) {
        (Some(r), _) => Ok(r.clone()),
        (None, Some(e)) => Err(herr!("QGA {cmd} failed: {e}")),
        _ => Err(herr!("QGA {cmd}: unexpected reply {v}")),
    }
}

fn random_u64() -> u64 {
    // Enough entropy for a sync id in tests: hash the clock and a counter.
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Decode standard base64 (qemu-ga's guest-exec output).
pub fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for quad in bytes.chunks(4) {
        let mut acc = 0u32;
        let mut n = 0;
        for &c in quad {
            if c == b'=' {
                break;
            }
            acc = (acc << 6) | val(c).ok_or_else(|| herr!("bad base64"))?;
            n += 1;
        }
        acc <<= 6 * (4 - n);
        let b = acc.to_be_bytes();
        out.extend_from_slice(&b[1..n.max(1)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_roundtrips_known_vectors() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64_decode("Zm9vYmFy\n").unwrap(), b"foobar");
        base64_decode("Zm9v!").unwrap_err();
    }
}

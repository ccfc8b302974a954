//! A scripted fake qemu-ga on a unix socket, for hostile-peer tests.
//!
//! It behaves like qemu-ga behind a QEMU chardev: one client at a time, the
//! `0xFF` sentinel before `guest-sync-delimited` replies, a freeze state
//! (with qemu-ga's frozen-mode allowlist), and output written while no
//! client is connected leaks to the next client. Faults are queued per
//! command and consumed in order, one per matching request.
//!
//! It runs on its own std thread, so it keeps serving while a test's async
//! runtime is blocked (e.g. in a guard's `Drop`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// Mountpoints the fake pretends to have; freezing all freezes these.
pub const FAKE_MOUNTPOINTS: [&str; 2] = ["/", "/data"];

/// Commands qemu-ga still accepts while frozen.
const FROZEN_ALLOWLIST: [&str; 6] = [
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// A misbehaviour for one request. In byte payloads, `@ID@` is replaced by
/// the request's `id` (as JSON) and `@SYNC@` by its `arguments.id`.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Apply the command, then stall the whole agent (no reads, no
    /// accepts) for this long, then reply (to whoever is connected by then;
    /// if the client left, the reply leaks to the next one). Like a freeze
    /// hook that hangs (F-02).
    Stall(Duration),
    /// Apply the command and never reply; keep serving the connection.
    NoReply,
    /// Apply the command, then close the connection (EOF mid-command, like
    /// qemu-ga being killed, F-03). State persists, as qemu-ga's frozen
    /// state does across a restart.
    CloseAfterApply,
    /// Do not apply; send these bytes instead of the reply.
    Reply(Vec<u8>),
    /// Apply, then send the reply one byte per interval.
    Trickle(Duration),
    /// Apply, send these bytes, then the reply.
    Before(Vec<u8>),
    /// Apply, resend the previous reply line, then the real reply.
    ReplayBefore,
    /// Do not apply; resend the previous reply line instead of replying.
    ReplayInstead,
    /// Apply, send `count` copies of `line` (each with `\n`), then reply.
    Flood {
        /// The line (without `\n`).
        line: Vec<u8>,
        /// How many.
        count: usize,
    },
    /// Do not apply; stream `total` copies of `byte` (no newline), then
    /// keep the connection open.
    Stream {
        /// The byte.
        byte: u8,
        /// How many.
        total: usize,
    },
}

#[derive(Debug, Default)]
struct State {
    frozen: bool,
    faults: VecDeque<(String, Fault)>,
    preludes: VecDeque<Vec<u8>>,
    leak: Vec<u8>,
    log: Vec<String>,
    connections: usize,
    last_reply: Option<Vec<u8>>,
    files: HashMap<String, Vec<u8>>,
    handles: HashMap<i64, (String, usize)>,
    next_handle: i64,
    execs: HashMap<i64, Vec<String>>,
    next_pid: i64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// The fake agent. Dropping it stops the thread and removes the socket.
#[derive(Debug)]
pub struct FakeQga {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FakeQga {
    /// Starts a fake agent listening on a fresh socket.
    pub fn start() -> io::Result<FakeQga> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_handle: 1000,
                next_pid: 4000,
                ..State::default()
            }),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fake-qga".into())
                .spawn(move || serve(&listener, &shared))?
        };
        Ok(FakeQga {
            _dir: dir,
            path,
            shared,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Queues a one-shot fault for the next request named `command`.
    pub fn push_fault(&self, command: &str, fault: Fault) {
        self.shared
            .lock()
            .faults
            .push_back((command.to_owned(), fault));
    }

    /// Bytes sent to the next client as soon as it connects (stale data).
    pub fn push_prelude(&self, bytes: impl Into<Vec<u8>>) {
        self.shared.lock().preludes.push_back(bytes.into());
    }

    /// Sets the freeze state (e.g. "someone else froze").
    pub fn set_frozen(&self, frozen: bool) {
        self.shared.lock().frozen = frozen;
    }

    /// The freeze state.
    pub fn is_frozen(&self) -> bool {
        self.shared.lock().frozen
    }

    /// Names of every request received, in order.
    pub fn log(&self) -> Vec<String> {
        self.shared.lock().log.clone()
    }

    /// How many requests named `command` were received.
    pub fn count(&self, command: &str) -> usize {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|c| *c == command)
            .count()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Polls until `cond` holds or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&FakeQga) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FakeQga {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sleep_unless_stopping(shared: &Shared, total: Duration) {
    let deadline = Instant::now() + total;
    while !shared.stopping() {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}

fn serve(listener: &UnixListener, shared: &Shared) {
    while !shared.stopping() {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_connection(stream, shared) {
                    tracing::debug!(error = %e, "fake qga: connection ended");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Writes, giving up when the fake stops or the client is gone. On failure
/// the unwritten rest is returned so it can leak to the next client.
fn write_out(stream: &mut UnixStream, shared: &Shared, mut bytes: &[u8]) -> Result<(), Vec<u8>> {
    while !bytes.is_empty() {
        if shared.stopping() {
            return Err(Vec::new());
        }
        match stream.write(bytes) {
            Ok(0) => return Err(bytes.to_vec()),
            Ok(n) => bytes = &bytes[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(bytes.to_vec()),
        }
    }
    Ok(())
}

enum Next {
    Continue,
    Close,
}

fn serve_connection(mut stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(20)))?;
    stream.set_write_timeout(Some(Duration::from_millis(20)))?;
    let prelude = {
        let mut st = shared.lock();
        st.connections += 1;
        let mut out = std::mem::take(&mut st.leak);
        if let Some(p) = st.preludes.pop_front() {
            out.extend_from_slice(&p);
        }
        out
    };
    if let Err(rest) = write_out(&mut stream, shared, &prelude) {
        shared.lock().leak = rest;
        return Ok(());
    }
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stopping() {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for &byte in &buf[..n] {
            match byte {
                0xFF => line.clear(),
                b'\n' => {
                    let request = std::mem::take(&mut line);
                    if let Next::Close = handle(&mut stream, shared, &request) {
                        return Ok(());
                    }
                }
                _ => line.push(byte),
            }
        }
    }
    Ok(())
}

fn substitute(template: &[u8], id: &Value, sync: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(template.len());
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(tail) = rest.strip_prefix(b"@ID@") {
            out.extend_from_slice(id.to_string().as_bytes());
            rest = tail;
        } else if let Some(tail) = rest.strip_prefix(b"@SYNC@") {
            out.extend_from_slice(sync.to_string().as_bytes());
            rest = tail;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fn handle(stream: &mut UnixStream, shared: &Shared, request: &[u8]) -> Next {
    if request.iter().all(u8::is_ascii_whitespace) {
        return Next::Continue;
    }
    let parsed: Value = match serde_json::from_slice(request) {
        Ok(v) => v,
        Err(_) => {
            let reply =
                br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#.to_vec();
            return deliver(stream, shared, reply, None);
        }
    };
    let command = parsed["execute"].as_str().unwrap_or_default().to_owned();
    let id = parsed.get("id").cloned().unwrap_or(Value::Null);
    let args = parsed.get("arguments").cloned().unwrap_or(json!({}));
    let fault = {
        let mut st = shared.lock();
        st.log.push(command.clone());
        let pos = st.faults.iter().position(|(c, _)| *c == command);
        pos.and_then(|p| st.faults.remove(p)).map(|(_, f)| f)
    };
    let sync = args.get("id").cloned().unwrap_or(Value::Null);
    match fault {
        Some(Fault::Reply(bytes)) => {
            let bytes = substitute(&bytes, &id, &sync);
            write_raw(stream, shared, &bytes)
        }
        Some(Fault::ReplayInstead) => {
            let mut last = shared.lock().last_reply.clone().unwrap_or_default();
            last.push(b'\n');
            write_raw(stream, shared, &last)
        }
        Some(Fault::Stream { byte, total }) => {
            let chunk = vec![byte; 64 << 10];
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                if write_out(stream, shared, &chunk[..n]).is_err() {
                    return Next::Close;
                }
                left -= n;
            }
            Next::Continue
        }
        other => {
            let reply = apply(shared, &command, &args, &id);
            match other {
                None => match reply {
                    Some(reply) => deliver(stream, shared, reply, None),
                    None => Next::Continue,
                },
                Some(Fault::Stall(d)) => {
                    sleep_unless_stopping(shared, d);
                    match reply {
                        Some(reply) => deliver(stream, shared, reply, None),
                        None => Next::Continue,
                    }
                }
                Some(Fault::NoReply) => Next::Continue,
                Some(Fault::CloseAfterApply) => Next::Close,
                Some(Fault::Trickle(interval)) => {
                    let mut reply = reply.unwrap_or_default();
                    reply.push(b'\n');
                    for byte in reply {
                        if write_out(stream, shared, &[byte]).is_err() {
                            return Next::Close;
                        }
                        sleep_unless_stopping(shared, interval);
                    }
                    Next::Continue
                }
                Some(Fault::Before(bytes)) => {
                    let before = substitute(&bytes, &id, &sync);
                    deliver(stream, shared, reply.unwrap_or_default(), Some(before))
                }
                Some(Fault::ReplayBefore) => {
                    let before = shared.lock().last_reply.clone().map(|mut line| {
                        line.push(b'\n');
                        line
                    });
                    deliver(stream, shared, reply.unwrap_or_default(), before)
                }
                Some(Fault::Flood { line, count }) => {
                    let mut before = Vec::with_capacity((line.len() + 1) * count);
                    for _ in 0..count {
                        before.extend_from_slice(&line);
                        before.push(b'\n');
                    }
                    deliver(stream, shared, reply.unwrap_or_default(), Some(before))
                }
                Some(Fault::Reply(_) | Fault::ReplayInstead | Fault::Stream { .. }) => {
                    Next::Continue
                }
            }
        }
    }
}

fn write_raw(stream: &mut UnixStream, shared: &Shared, bytes: &[u8]) -> Next {
    match write_out(stream, shared, bytes) {
        Ok(()) => Next::Continue,
        Err(_) => Next::Close,
    }
}

/// Writes `before` then the reply line; undelivered bytes leak to the next
/// client, like qemu-ga's output queued in the virtio-serial port.
fn deliver(
    stream: &mut UnixStream,
    shared: &Shared,
    reply: Vec<u8>,
    before: Option<Vec<u8>>,
) -> Next {
    let mut out = before.unwrap_or_default();
    let mut line = reply;
    // Remember the reply without the sentinel, for replays.
    let remembered = line.strip_prefix(&[0xFF]).unwrap_or(&line).to_vec();
    line.push(b'\n');
    out.extend_from_slice(&line);
    shared.lock().last_reply = Some(remembered);
    match write_out(stream, shared, &out) {
        Ok(()) => Next::Continue,
        Err(rest) => {
            shared.lock().leak.extend_from_slice(&rest);
            Next::Close
        }
    }
}

fn ok(id: &Value, ret: &Value) -> Vec<u8> {
    let mut reply = json!({ "return": ret });
    if !id.is_null() {
        reply["id"] = id.clone();
    }
    reply.to_string().into_bytes()
}

fn err(id: &Value, class: &str, desc: &str) -> Vec<u8> {
    let mut reply = json!({ "error": { "class": class, "desc": desc } });
    if !id.is_null() {
        reply["id"] = id.clone();
    }
    reply.to_string().into_bytes()
}

/// Executes a request against the fake state; `None` means no reply
/// (`guest-shutdown`).
fn apply(shared: &Shared, command: &str, args: &Value, id: &Value) -> Option<Vec<u8>> {
    let mut st = shared.lock();
    if st.frozen && !FROZEN_ALLOWLIST.contains(&command) {
        return Some(err(
            id,
            "GenericError",
            &format!("Command {command} has been disabled: the agent is in frozen state"),
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let reply = match command {
        "guest-sync-delimited" => {
            let mut r = vec![0xFF];
            r.extend_from_slice(&ok(id, &args["id"]));
            r
        }
        "guest-sync" => ok(id, &args["id"]),
        "guest-ping" => ok(id, &json!({})),
        "guest-info" => {
            let cmds: Vec<Value> = [
                "guest-ping",
                "guest-info",
                "guest-fsfreeze-freeze",
                "guest-fsfreeze-thaw",
                "guest-exec",
            ]
            .iter()
            .map(|c| json!({"name": c, "enabled": true, "success-response": true}))
            .collect();
            ok(
                id,
                &json!({"version": "fake-10.0", "supported_commands": cmds}),
            )
        }
        "guest-fsfreeze-status" => ok(id, &json!(if st.frozen { "frozen" } else { "thawed" })),
        "guest-fsfreeze-freeze" => {
            st.frozen = true;
            ok(id, &json!(FAKE_MOUNTPOINTS.len()))
        }
        "guest-fsfreeze-freeze-list" => {
            let n = args["mountpoints"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter(|p| FAKE_MOUNTPOINTS.contains(&p.as_str().unwrap_or_default()))
                        .count()
                })
                .unwrap_or(FAKE_MOUNTPOINTS.len());
            // Like qemu-ga: freezing nothing leaves the state thawed.
            st.frozen = n > 0;
            ok(id, &json!(n))
        }
        "guest-fsfreeze-thaw" => {
            let n = if st.frozen { FAKE_MOUNTPOINTS.len() } else { 0 };
            st.frozen = false;
            ok(id, &json!(n))
        }
        "guest-get-fsinfo" => {
            let list: Vec<Value> = FAKE_MOUNTPOINTS
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    json!({
                        "name": format!("vd{}", char::from(b'a' + u8::try_from(i).unwrap_or(0))),
                        "mountpoint": m, "type": "ext4",
                        "used-bytes": 4096, "total-bytes": 1 << 20,
                        "disk": [{"pci-controller": {"domain": 0, "bus": 0, "slot": 4 + i, "function": 0},
                                  "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0,
                                  "dev": format!("/dev/vd{}", char::from(b'a' + u8::try_from(i).unwrap_or(0)))}]
                    })
                })
                .collect();
            ok(id, &json!(list))
        }
        "guest-exec" => {
            let pid = st.next_pid;
            st.next_pid += 1;
            let argv: Vec<String> = args["arg"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            st.execs.insert(pid, argv);
            ok(id, &json!({"pid": pid}))
        }
        "guest-exec-status" => {
            let pid = args["pid"].as_i64().unwrap_or(-1);
            match st.execs.remove(&pid) {
                // The fake "runs" echo: stdout is the arguments joined.
                Some(argv) => ok(
                    id,
                    &json!({"exited": true, "exitcode": 0,
                           "out-data": b64.encode(format!("{}\n", argv.join(" "))),
                           "err-data": ""}),
                ),
                None => err(id, "GenericError", "Invalid parameter 'pid'"),
            }
        }
        "guest-file-open" => {
            let path = args["path"].as_str().unwrap_or_default().to_owned();
            let mode = args["mode"].as_str().unwrap_or("r");
            if mode.starts_with('w') {
                st.files.insert(path.clone(), Vec::new());
            } else if !st.files.contains_key(&path) {
                return Some(err(id, "GenericError", "No such file or directory"));
            }
            let handle = st.next_handle;
            st.next_handle += 1;
            st.handles.insert(handle, (path, 0));
            ok(id, &json!(handle))
        }
        "guest-file-write" => {
            let handle = args["handle"].as_i64().unwrap_or(-1);
            let data = b64
                .decode(args["buf-b64"].as_str().unwrap_or_default())
                .unwrap_or_default();
            let State { files, handles, .. } = &mut *st;
            match handles
                .get(&handle)
                .and_then(|(path, _)| files.get_mut(path))
            {
                Some(content) => {
                    content.extend_from_slice(&data);
                    ok(id, &json!({"count": data.len(), "eof": false}))
                }
                None => err(id, "GenericError", "handle not found"),
            }
        }
        "guest-file-read" => {
            let handle = args["handle"].as_i64().unwrap_or(-1);
            let count = usize::try_from(args["count"].as_u64().unwrap_or(4096)).unwrap_or(4096);
            let State { files, handles, .. } = &mut *st;
            match handles.get_mut(&handle) {
                Some((path, pos)) => {
                    let content = files
                        .get(path.as_str())
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    let start = (*pos).min(content.len());
                    let end = start.saturating_add(count).min(content.len());
                    let chunk = content[start..end].to_vec();
                    *pos = end;
                    ok(
                        id,
                        &json!({"count": chunk.len(), "buf-b64": b64.encode(&chunk), "eof": end == content.len()}),
                    )
                }
                None => err(id, "GenericError", "handle not found"),
            }
        }
        "guest-file-close" => {
            let handle = args["handle"].as_i64().unwrap_or(-1);
            match st.handles.remove(&handle) {
                Some(_) => ok(id, &json!({})),
                None => err(id, "GenericError", "handle not found"),
            }
        }
        "guest-shutdown" => return None,
        other => err(
            id,
            "CommandNotFound",
            &format!("The command {other} has not been found"),
        ),
    };
    Some(reply)
}

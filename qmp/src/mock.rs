//! A scripted QMP server on a unix socket, for tests (feature `test-utils`).
//!
//! The test drives the server side step by step (greet, read a command,
//! reply, inject raw bytes, close), so hostile inputs are easy to produce:
//! oversized lines, deep JSON, invalid UTF-8, wrong ids, floods, EOF.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use crate::codec::read_line_bounded;

/// Longest command line the mock accepts.
const MOCK_MAX_LINE: usize = 1024 * 1024;

/// A listening mock QMP socket.
#[derive(Debug)]
pub struct MockServer {
    listener: UnixListener,
    path: PathBuf,
}

impl MockServer {
    /// Listen on `path` (which must not exist).
    pub fn bind(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let listener = UnixListener::bind(&path)?;
        Ok(Self { listener, path })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept one client.
    pub async fn accept(&self) -> io::Result<MockConn> {
        let (stream, _) = self.listener.accept().await?;
        Ok(MockConn::new(stream))
    }
}

/// A command the mock received.
#[derive(Debug, Clone, PartialEq)]
pub struct MockCommand {
    /// `execute`.
    pub name: String,
    /// `arguments` (`Null` if absent).
    pub arguments: Value,
    /// `id` (`Null` if absent).
    pub id: Value,
}

/// The server side of one connection.
#[derive(Debug)]
pub struct MockConn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

/// A QEMU 10-like greeting.
pub fn greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
                               "package": "mock"},
                   "capabilities": ["oob"]}})
}

impl MockConn {
    fn new(stream: UnixStream) -> Self {
        let (r, w) = stream.into_split();
        Self {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Write bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// Write one JSON message ending in `\r\n`, as QEMU does.
    pub async fn send(&mut self, msg: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg)?;
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line).await
    }

    /// Send the greeting.
    pub async fn greet(&mut self) -> io::Result<()> {
        self.send(&greeting()).await
    }

    /// Greet, expect `qmp_capabilities`, acknowledge it.
    pub async fn handshake(&mut self) -> io::Result<()> {
        self.greet().await?;
        let cmd = self.expect("qmp_capabilities").await?;
        self.reply(&cmd, json!({})).await
    }

    /// Read the next command; `None` on EOF.
    pub async fn recv_command(&mut self) -> io::Result<Option<MockCommand>> {
        let mut line = Vec::new();
        loop {
            match read_line_bounded(&mut self.reader, &mut line, MOCK_MAX_LINE).await {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) => return Err(io::Error::other(e)),
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut v: Value = serde_json::from_slice(&line)?;
            let name = match v.get("execute").and_then(Value::as_str) {
                Some(name) => name.to_owned(),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not a command: {v}"),
                    ))
                }
            };
            return Ok(Some(MockCommand {
                name,
                arguments: v.get_mut("arguments").map(Value::take).unwrap_or_default(),
                id: v.get_mut("id").map(Value::take).unwrap_or_default(),
            }));
        }
    }

    /// Read the next command and check its name.
    pub async fn expect(&mut self, name: &str) -> io::Result<MockCommand> {
        match self.recv_command().await? {
            Some(cmd) if cmd.name == name => Ok(cmd),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected {name}, got {other:?}"),
            )),
        }
    }

    /// Reply `{"return": value, "id": <cmd's id>}`.
    pub async fn reply(&mut self, cmd: &MockCommand, value: Value) -> io::Result<()> {
        self.send(&json!({"return": value, "id": cmd.id})).await
    }

    /// Reply with a QMP error.
    pub async fn reply_error(
        &mut self,
        cmd: &MockCommand,
        class: &str,
        desc: &str,
    ) -> io::Result<()> {
        self.send(&json!({"error": {"class": class, "desc": desc}, "id": cmd.id}))
            .await
    }

    /// Send an event.
    pub async fn event(&mut self, name: &str, data: Value) -> io::Result<()> {
        self.send(&json!({"event": name, "data": data,
                          "timestamp": {"seconds": 1_700_000_000, "microseconds": 1}}))
            .await
    }
}

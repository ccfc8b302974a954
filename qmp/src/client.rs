//! The connection: reader task, writer task, pending-command table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::codec::{decode_line, read_line_bounded, Limits, Message};
use crate::error::{Error, Result};
use crate::events::{
    Events, QueueLimits, Subscribers, DEFAULT_EVENT_QUEUE_BYTES, DEFAULT_EVENT_QUEUE_EVENTS,
};
use crate::types::Greeting;

/// Default deadline for one command (send + reply).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for connect + greeting + `qmp_capabilities`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands queued for the writer task before senders wait (each sender
/// still bounded by its own deadline).
const WRITE_QUEUE: usize = 64;
/// A line buffer that grew past this is released after use, so one large
/// reply does not pin memory for the life of the connection.
const KEEP_LINE_CAPACITY: usize = 64 * 1024;

/// Connection options. [`Default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Deadline for connect, greeting and capabilities negotiation together.
    pub connect_timeout: Duration,
    /// Default per-command deadline (see [`Qmp::with_timeout`]).
    pub command_timeout: Duration,
    /// Line length and JSON depth limits.
    pub limits: Limits,
    /// Per-subscriber event queue: maximum events.
    pub event_queue_events: usize,
    /// Per-subscriber event queue: maximum bytes (sum of line lengths).
    pub event_queue_bytes: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            limits: Limits::default(),
            event_queue_events: DEFAULT_EVENT_QUEUE_EVENTS,
            event_queue_bytes: DEFAULT_EVENT_QUEUE_BYTES,
        }
    }
}

/// Counters for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands handed to the socket.
    pub commands_sent: u64,
    /// Replies matched to a waiting command.
    pub replies_matched: u64,
    /// Replies with an unknown, missing or late id (discarded).
    pub orphan_replies: u64,
    /// Events received.
    pub events: u64,
    /// JSON objects that were neither reply nor event (ignored).
    pub unknown_messages: u64,
}

#[derive(Debug, Default)]
struct Counters {
    commands_sent: AtomicU64,
    replies_matched: AtomicU64,
    orphan_replies: AtomicU64,
    events: AtomicU64,
    unknown_messages: AtomicU64,
}

/// What the reader hands a waiting command.
#[derive(Debug)]
enum Reply {
    Return(Value),
    Error { class: String, desc: String },
    Lost(Arc<Error>),
}

#[derive(Debug, Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    closed: Option<Arc<Error>>,
}

/// State shared by the handles and the two tasks.
#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    subscribers: Subscribers,
    queue_limits: QueueLimits,
    counters: Counters,
    /// Flips to true on close, so both tasks stop and the socket is really
    /// closed (the peer sees EOF even if it is blocked writing to us).
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Never held across a call that can panic; recover anyway.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fail every waiting command and end every event stream. The first
    /// cause wins; later calls are no-ops.
    fn close(&self, cause: Error) {
        let cause = {
            let mut pending = self.pending();
            if pending.closed.is_some() {
                return;
            }
            let cause = Arc::new(cause);
            pending.closed = Some(Arc::clone(&cause));
            for (_, waiter) in pending.waiters.drain() {
                let _ = waiter.send(Reply::Lost(Arc::clone(&cause)));
            }
            cause
        };
        self.closed_tx.send_replace(true);
        tracing::debug!(cause = %cause, "QMP connection closed");
        self.subscribers.close(&cause);
    }

    fn complete(&self, id: Option<&Value>, reply: Reply) {
        let waiter = id
            .and_then(Value::as_u64)
            .and_then(|id| self.pending().waiters.remove(&id));
        match waiter {
            Some(waiter) => {
                self.counters
                    .replies_matched
                    .fetch_add(1, Ordering::Relaxed);
                // The waiter may have just given up; nothing to do then.
                let _ = waiter.send(reply);
            }
            None => {
                self.counters.orphan_replies.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?id, "QMP reply with unknown or late id discarded");
            }
        }
    }

    fn is_waiting(&self, id: u64) -> bool {
        self.pending().waiters.contains_key(&id)
    }
}

/// Removes a command's waiter when the caller stops waiting (reply, timeout
/// or cancellation), so a late reply is counted as orphan and dropped.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending().waiters.remove(&self.id);
    }
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    write_tx: mpsc::Sender<(u64, Vec<u8>)>,
    next_id: AtomicU64,
    greeting: Greeting,
    path: PathBuf,
    peer_pid: Option<u32>,
    tasks: [AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone: stop both tasks, which drops the socket.
        for task in &self.tasks {
            task.abort();
        }
        self.shared.close(Error::ClientShutdown);
    }
}

/// A QMP connection. Cheap to clone (an `Arc`); every clone talks over the
/// same socket and commands from several tasks run concurrently, matched by
/// id. The connection closes when the last clone is dropped or on
/// [`Qmp::shutdown`].
#[derive(Debug, Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    timeout: Duration,
}

impl Qmp {
    /// Connect to the QMP unix socket at `path`, read the greeting and
    /// negotiate capabilities, all within `timeout`. Returns the handle and
    /// an event stream subscribed before negotiation (no event is missed).
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<(Self, Events)> {
        Self::connect_with(
            path,
            &ConnectOptions {
                connect_timeout: timeout,
                ..ConnectOptions::default()
            },
        )
        .await
    }

    /// [`Qmp::connect`] with explicit options.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        opts: &ConnectOptions,
    ) -> Result<(Self, Events)> {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + opts.connect_timeout;
        let timed_out = |step| Error::ConnectTimeout {
            path: path.clone(),
            timeout: opts.connect_timeout,
            step,
            holder_hint: None,
        };

        let stream = tokio::time::timeout_at(deadline, UnixStream::connect(&path))
            .await
            .map_err(|_| timed_out("connect"))?
            .map_err(|source| Error::Connect {
                path: path.clone(),
                source,
            })?;
        // SO_PEERCRED: the pid of the process serving the socket (QEMU
        // itself, whatever wrapper started it).
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let server_pid = peer_pid.and_then(|p| i32::try_from(p).ok());
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);

        let greeting =
            match tokio::time::timeout_at(deadline, read_greeting(&mut reader, &opts.limits)).await
            {
                Ok(g) => g?,
                Err(_) => {
                    return Err(Error::ConnectTimeout {
                        path: path.clone(),
                        timeout: opts.connect_timeout,
                        step: "greeting",
                        holder_hint: Some(busy_monitor_hint(server_pid)),
                    });
                }
            };

        let queue_limits = QueueLimits {
            max_events: opts.event_queue_events,
            max_bytes: opts.event_queue_bytes,
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            subscribers: Subscribers::default(),
            queue_limits,
            counters: Counters::default(),
            closed_tx: watch::channel(false).0,
        });
        let events = shared.subscribers.subscribe(queue_limits);
        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE);
        let reader_task = tokio::spawn(reader_loop(Arc::clone(&shared), reader, opts.limits));
        let writer_task = tokio::spawn(writer_loop(Arc::clone(&shared), write_half, write_rx));
        let qmp = Self {
            inner: Arc::new(Inner {
                shared,
                write_tx,
                next_id: AtomicU64::new(1),
                greeting,
                path: path.clone(),
                peer_pid,
                tasks: [reader_task.abort_handle(), writer_task.abort_handle()],
            }),
            timeout: opts.command_timeout,
        };

        let remaining = deadline.saturating_duration_since(Instant::now());
        match qmp
            .with_timeout(remaining)
            .execute_value("qmp_capabilities", Value::Null)
            .await
        {
            Ok(_) => Ok((qmp, events)),
            Err(Error::CommandTimeout { .. }) => Err(timed_out("qmp_capabilities")),
            Err(e) => Err(e),
        }
    }

    /// The server greeting (QEMU version and offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// The pid of the process at the other end of the socket (SO_PEERCRED),
    /// when the kernel reports one.
    pub fn peer_pid(&self) -> Option<u32> {
        self.inner.peer_pid
    }

    /// The socket path this client connected to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// This handle's per-command deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A handle on the same connection whose commands use `timeout` as
    /// their deadline.
    #[must_use]
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            timeout,
        }
    }

    /// A new, independent event stream (events from now on).
    pub fn subscribe(&self) -> Events {
        let shared = &self.inner.shared;
        shared.subscribers.subscribe(shared.queue_limits)
    }

    /// Whether the connection has ended (commands fail immediately).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.pending().closed.is_some()
    }

    /// Why the connection ended, once it has.
    pub fn close_cause(&self) -> Option<Arc<Error>> {
        self.inner.shared.pending().closed.clone()
    }

    /// Counters since connect.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.shared.counters;
        Stats {
            commands_sent: c.commands_sent.load(Ordering::Relaxed),
            replies_matched: c.replies_matched.load(Ordering::Relaxed),
            orphan_replies: c.orphan_replies.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            unknown_messages: c.unknown_messages.load(Ordering::Relaxed),
        }
    }

    /// Close the connection for every clone: pending commands fail with
    /// [`crate::ErrorKind::Closed`], event streams end.
    pub fn shutdown(&self) {
        self.inner.shared.close(Error::ClientShutdown);
        for task in &self.inner.tasks {
            task.abort();
        }
    }

    /// Run `command` with `arguments` (any value serializing to a JSON
    /// object, or `()`/`Value::Null` for none) and decode the reply.
    pub async fn execute<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: impl Serialize,
    ) -> Result<R> {
        let args = serde_json::to_value(arguments).map_err(|source| Error::EncodeArguments {
            command: command.to_owned(),
            source,
        })?;
        let value = self.execute_value(command, args).await?;
        serde_json::from_value(value).map_err(|source| Error::DecodeReply {
            command: command.to_owned(),
            source,
        })
    }

    /// Run a typed [`Command`].
    pub async fn run<C: Command>(&self, command: &C) -> Result<C::Reply> {
        self.execute(C::NAME, command).await
    }

    /// Run `command` with raw JSON arguments (`Null` for none; otherwise an
    /// object) and return the raw `return` value.
    pub async fn execute_value(&self, command: &str, arguments: Value) -> Result<Value> {
        let arguments = match arguments {
            Value::Null => None,
            Value::Object(map) => Some(map),
            _ => {
                return Err(Error::EncodeArguments {
                    command: command.to_owned(),
                    source: serde::ser::Error::custom("arguments must be a JSON object"),
                })
            }
        };
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let line =
            encode_command(command, arguments, id).map_err(|source| Error::EncodeArguments {
                command: command.to_owned(),
                source,
            })?;
        let lost = |cause: Arc<Error>| Error::ConnectionLost {
            command: command.to_owned(),
            cause,
        };

        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut pending = shared.pending();
            if let Some(cause) = &pending.closed {
                return Err(lost(Arc::clone(cause)));
            }
            pending.waiters.insert(id, reply_tx);
        }
        let _guard = WaiterGuard { shared, id };

        let deadline = Instant::now() + self.timeout;
        let exchange = async {
            if self.inner.write_tx.send((id, line)).await.is_err() {
                return Reply::Lost(self.cause_or_shutdown());
            }
            reply_rx
                .await
                .unwrap_or_else(|_| Reply::Lost(self.cause_or_shutdown()))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Err(_) => Err(Error::CommandTimeout {
                command: command.to_owned(),
                timeout: self.timeout,
            }),
            Ok(Reply::Return(value)) => Ok(value),
            Ok(Reply::Error { class, desc }) => Err(Error::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Ok(Reply::Lost(cause)) => Err(lost(cause)),
        }
    }

    fn cause_or_shutdown(&self) -> Arc<Error> {
        self.close_cause()
            .unwrap_or_else(|| Arc::new(Error::ClientShutdown))
    }
}

/// A typed QMP command: its name, its arguments (`Self`, serialized as the
/// `arguments` object) and its reply type.
pub trait Command: Serialize {
    /// The QMP command name.
    const NAME: &'static str;
    /// The decoded `return` value.
    type Reply: DeserializeOwned;
}

fn encode_command(
    command: &str,
    arguments: Option<Map<String, Value>>,
    id: u64,
) -> serde_json::Result<Vec<u8>> {
    let mut msg = Map::new();
    msg.insert("execute".into(), Value::String(command.to_owned()));
    if let Some(arguments) = arguments {
        msg.insert("arguments".into(), Value::Object(arguments));
    }
    msg.insert("id".into(), Value::from(id));
    let mut line = serde_json::to_vec(&msg)?;
    line.push(b'\n');
    Ok(line)
}

/// Why a server accepts a connection and never greets: QEMU serves one
/// client per QMP socket at a time, and queues the others. Names the
/// server process (from the socket's peer credentials) when known.
fn busy_monitor_hint(server_pid: Option<i32>) -> String {
    let server = match server_pid {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_else(|_| "the server".into());
            format!("{comm} (pid {pid})")
        }
        None => "the server".into(),
    };
    format!(
        "{server} accepted the connection but sent no greeting: another client probably holds \
         this monitor (QEMU serves one QMP client per socket at a time; look for another backup \
         tool, a management daemon or an open socat/qmp-shell session on it)"
    )
}

async fn read_greeting(reader: &mut BufReader<OwnedReadHalf>, limits: &Limits) -> Result<Greeting> {
    let mut line = Vec::new();
    loop {
        if !read_line_bounded(reader, &mut line, limits.max_line_bytes).await? {
            return Err(Error::GreetingEof);
        }
        match decode_line(&line, limits)? {
            Message::Blank => {}
            Message::Greeting(value) => {
                return serde_json::from_value(value).map_err(|e| Error::Greeting {
                    detail: e.to_string(),
                })
            }
            other => {
                return Err(Error::Greeting {
                    detail: format!("expected {{\"QMP\": ...}}, got {other:?}")
                        .chars()
                        .take(200)
                        .collect(),
                })
            }
        }
    }
}

/// Owns the read half: decodes lines, completes commands, publishes events.
/// Never waits for anyone but the socket.
async fn reader_loop(shared: Arc<Shared>, mut reader: BufReader<OwnedReadHalf>, limits: Limits) {
    let mut line = Vec::new();
    let mut closed = shared.closed_tx.subscribe();
    let cause = loop {
        let read = tokio::select! {
            read = read_line_bounded(&mut reader, &mut line, limits.max_line_bytes) => read,
            _ = closed.wait_for(|c| *c) => return,
        };
        match read {
            Ok(true) => {}
            Ok(false) => break Error::Eof,
            Err(e) => break e,
        }
        match decode_line(&line, &limits) {
            Ok(Message::Return { id, value }) => shared.complete(id.as_ref(), Reply::Return(value)),
            Ok(Message::Error { id, class, desc }) => {
                shared.complete(id.as_ref(), Reply::Error { class, desc });
            }
            Ok(Message::Event(event)) => {
                shared.counters.events.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(event = %event.name, "QMP event");
                shared.subscribers.publish(&event, line.len());
            }
            Ok(Message::Greeting(_) | Message::Unknown(_)) => {
                shared
                    .counters
                    .unknown_messages
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("unexpected QMP message ignored");
            }
            Ok(Message::Blank) => {}
            Err(e) => break e,
        }
        if line.capacity() > KEEP_LINE_CAPACITY {
            line = Vec::new();
        }
    };
    shared.close(cause);
}

/// Owns the write half. Writes whole lines only, so a caller that gives up
/// mid-write cannot leave half a command on the wire; skips lines whose
/// caller already gave up before they were written.
async fn writer_loop(
    shared: Arc<Shared>,
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<(u64, Vec<u8>)>,
) {
    let mut closed = shared.closed_tx.subscribe();
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            _ = closed.wait_for(|c| *c) => None,
        };
        let Some((id, line)) = next else { return };
        if !shared.is_waiting(id) {
            continue;
        }
        let written = tokio::select! {
            written = writer.write_all(&line) => written,
            _ = closed.wait_for(|c| *c) => return,
        };
        if let Err(source) = written {
            shared.close(Error::Write { source });
            return;
        }
        shared
            .counters
            .commands_sent
            .fetch_add(1, Ordering::Relaxed);
    }
}

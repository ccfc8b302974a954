//! The async client.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};

use crate::commands::{
    self, AgentInfo, Command, ExecStatusWire, FilesystemInfo, FsFreezeStatus, GuestExec,
    ShutdownMode,
};
use crate::config::Config;
use crate::error::{sanitize_guest_text, Error, Result};
use crate::wire::{FrameError, Session, SYNC_COMMAND};

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 << 10;

/// How long `guest-shutdown` waits for an error reply before assuming the
/// command was accepted (it sends nothing on success).
const SHUTDOWN_ERROR_WAIT: Duration = Duration::from_millis(500);

/// Why reading a line stopped.
#[derive(Debug)]
pub(crate) enum ReadFail {
    Io(io::Error),
    Eof,
    Frame(FrameError),
}

impl ReadFail {
    pub(crate) fn into_error(self, command: &'static str) -> Error {
        match self {
            ReadFail::Io(source) => Error::Receive { command, source },
            ReadFail::Eof => Error::Eof { command },
            ReadFail::Frame(f) => f.into_error(command),
        }
    }
}

/// One connection: the socket plus its protocol state.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    session: Session,
    chunk: Box<[u8]>,
    /// Set before every exchange and cleared only when it completes, so an
    /// exchange abandoned mid-way (deadline, error, or the future dropped
    /// by task cancellation) forces a resync before the next one.
    needs_resync: bool,
}

impl Conn {
    fn new(stream: UnixStream, config: &Config) -> Self {
        Conn {
            stream,
            session: Session::new(config),
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            needs_resync: true,
        }
    }

    async fn read_line(&mut self) -> Result<Vec<u8>, ReadFail> {
        loop {
            if let Some(frame) = self.session.framer.next_frame() {
                return frame.map_err(ReadFail::Frame);
            }
            let n = self
                .stream
                .read(&mut self.chunk)
                .await
                .map_err(ReadFail::Io)?;
            if n == 0 {
                return Err(ReadFail::Eof);
            }
            self.session.framer.push(&self.chunk[..n]);
        }
    }

    /// `0xFF` + `guest-sync-delimited`, then drop everything until our id
    /// comes back. No deadline here: callers wrap it.
    async fn sync(&mut self) -> Result<()> {
        self.needs_resync = true;
        let (request, pending) = self.session.start_sync();
        self.stream
            .write_all(&request)
            .await
            .map_err(|source| Error::Send {
                command: SYNC_COMMAND,
                source,
            })?;
        loop {
            let line = self
                .read_line()
                .await
                .map_err(|e| e.into_error(SYNC_COMMAND))?;
            if self.session.on_sync_line(&pending, &line)? {
                self.needs_resync = false;
                tracing::debug!(discarded = self.session.framer.junk(), "qga: synced");
                return Ok(());
            }
        }
    }

    /// Sends one command and waits for its reply. No deadline here.
    async fn roundtrip(
        &mut self,
        command: &'static str,
        arguments: &Value,
    ) -> Result<Box<RawValue>> {
        self.needs_resync = true;
        let (request, mut pending) = self.session.start_command(command, arguments)?;
        self.stream
            .write_all(&request)
            .await
            .map_err(|source| Error::Send { command, source })?;
        loop {
            let line = self.read_line().await.map_err(|e| e.into_error(command))?;
            if let Some(value) = self.session.on_reply_line(&mut pending, &line)? {
                self.needs_resync = false;
                return Ok(value);
            }
        }
    }
}

/// A connection to qemu-ga over the unix socket of a virtio-serial
/// chardev.
///
/// QEMU serves one client per chardev socket at a time, and the agent's
/// replies to an earlier client leak to the next one. So: every connection
/// starts with a `guest-sync-delimited` round-trip, every exchange has a
/// deadline, and this value should be dropped as soon as it is not needed
/// (dropping closes the socket at once and frees it for the next client).
///
/// All methods take `&mut self`: one command at a time. A command whose
/// future is dropped (cancellation) or fails mid-exchange leaves the
/// connection marked for resync; the next command resyncs (or reconnects)
/// first.
#[derive(Debug)]
pub struct GuestAgent {
    path: PathBuf,
    config: Config,
    conn: Option<Conn>,
}

/// A file handle from `guest-file-open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileHandle(i64);

impl FileHandle {
    /// The agent's handle number.
    pub fn raw(self) -> i64 {
        self.0
    }
}

/// Data from `guest-file-read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    /// The bytes read.
    pub data: Vec<u8>,
    /// End of file reached.
    pub eof: bool,
}

/// A guest process's status, output decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStatus {
    /// Whether the process ended.
    pub exited: bool,
    /// Exit code, when it exited normally.
    pub exit_code: Option<i64>,
    /// Signal, when it was killed.
    pub signal: Option<i64>,
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// The agent cut stdout at its own limit.
    pub stdout_truncated: bool,
    /// The agent cut stderr at its own limit.
    pub stderr_truncated: bool,
}

impl ExecStatus {
    /// True for a normal exit with code 0.
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == Some(0)
    }
}

pub(crate) fn decode<C: Command>(raw: &RawValue) -> Result<C::Ok> {
    let reply: C::Ok = serde_json::from_str(raw.get()).map_err(|e| Error::UnexpectedReturn {
        command: C::NAME,
        detail: sanitize_guest_text(&e.to_string()),
    })?;
    C::check(&reply).map_err(|detail| Error::UnexpectedReturn {
        command: C::NAME,
        detail: sanitize_guest_text(&detail),
    })?;
    Ok(reply)
}

fn decode_b64(command: &'static str, field: &'static str, data: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|source| Error::InvalidBase64 {
            command,
            field,
            source,
        })
}

impl GuestAgent {
    /// Connects and syncs, all within [`Config::connect_timeout`].
    pub async fn connect(path: impl AsRef<Path>, config: Config) -> Result<Self> {
        let budget = config.connect_timeout;
        Self::connect_until(path.as_ref(), config, Instant::now() + budget, budget).await
    }

    /// Connects and syncs before `deadline`; `budget` is for messages.
    pub(crate) async fn connect_until(
        path: &Path,
        config: Config,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Self> {
        let mut agent = GuestAgent {
            path: path.to_path_buf(),
            config,
            conn: None,
        };
        agent.reconnect(deadline, budget).await?;
        Ok(agent)
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The deadlines and limits in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Largest `guest-file-read`/`guest-file-write` payload that fits the
    /// reply cap after base64.
    pub fn max_file_chunk(&self) -> usize {
        (self.config.reply_cap() - 256) / 4 * 3
    }

    /// Drops the connection (if any), connects anew and syncs.
    async fn reconnect(&mut self, deadline: Instant, budget: Duration) -> Result<()> {
        // Release the old socket first: QEMU serves one client at a time.
        self.conn = None;
        let stream = match timeout_at(deadline, UnixStream::connect(&self.path)).await {
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    path: self.path.clone(),
                    timeout: budget,
                })
            }
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    path: self.path.clone(),
                    source,
                })
            }
            Ok(Ok(stream)) => stream,
        };
        let mut conn = Conn::new(stream, &self.config);
        match timeout_at(deadline, conn.sync()).await {
            Err(_) => Err(Error::SyncTimeout {
                path: self.path.clone(),
                timeout: budget,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => {
                self.conn = Some(conn);
                Ok(())
            }
        }
    }

    /// Makes the connection usable: reconnects if it is gone, resyncs if an
    /// earlier exchange was abandoned.
    async fn ready(&mut self, deadline: Instant, budget: Duration) -> Result<&mut Conn> {
        let resync = match &mut self.conn {
            None => None,
            Some(conn) if !conn.needs_resync => None,
            Some(conn) => Some(timeout_at(deadline, conn.sync()).await),
        };
        match resync {
            Some(Ok(Ok(()))) => {}
            Some(Err(_)) => {
                self.conn = None;
                return Err(Error::SyncTimeout {
                    path: self.path.clone(),
                    timeout: budget,
                });
            }
            Some(Ok(Err(e @ (Error::Eof { .. } | Error::Send { .. } | Error::Receive { .. })))) => {
                tracing::debug!(error = %e, "qga: resync failed on a dead connection; reconnecting");
                self.reconnect(deadline, budget).await?;
            }
            Some(Ok(Err(e))) => {
                self.conn = None;
                return Err(e);
            }
            None if self.conn.is_none() => self.reconnect(deadline, budget).await?,
            None => {}
        }
        self.conn.as_mut().ok_or(Error::Eof {
            command: SYNC_COMMAND,
        })
    }

    /// Forces a new `guest-sync-delimited` round-trip (reconnecting if the
    /// connection is gone).
    pub async fn resync(&mut self) -> Result<()> {
        let budget = self.config.connect_timeout;
        let deadline = Instant::now() + budget;
        if let Some(conn) = &mut self.conn {
            conn.needs_resync = true;
        }
        self.ready(deadline, budget).await.map(|_| ())
    }

    /// Runs one exchange until `deadline`; `budget` is only for messages.
    async fn raw_until(
        &mut self,
        command: &'static str,
        arguments: &Value,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Box<RawValue>> {
        let conn = self.ready(deadline, budget).await?;
        let result = match timeout_at(deadline, conn.roundtrip(command, arguments)).await {
            Err(_) => Err(Error::Timeout {
                command,
                timeout: budget,
            }),
            Ok(result) => result,
        };
        if let Err(e) = &result {
            if matches!(
                e,
                Error::Eof { .. } | Error::Send { .. } | Error::Receive { .. }
            ) {
                self.conn = None;
            }
            tracing::debug!(command, error = %e, "qga command failed");
        }
        result
    }

    /// Runs a typed command with an explicit deadline.
    pub(crate) async fn execute_until<C: Command>(
        &mut self,
        command: &C,
        deadline: Instant,
        budget: Duration,
    ) -> Result<C::Ok> {
        let arguments = serde_json::to_value(command).map_err(|e| Error::InvalidArgument {
            command: C::NAME,
            detail: e.to_string(),
        })?;
        let raw = self
            .raw_until(C::NAME, &arguments, deadline, budget)
            .await?;
        decode::<C>(&raw)
    }

    /// Runs a typed command within `timeout`.
    pub async fn execute_with_timeout<C: Command>(
        &mut self,
        command: &C,
        timeout: Duration,
    ) -> Result<C::Ok> {
        self.execute_until(command, Instant::now() + timeout, timeout)
            .await
    }

    /// Runs a typed command within [`Config::command_timeout`].
    pub async fn execute<C: Command>(&mut self, command: &C) -> Result<C::Ok> {
        let timeout = self.config.command_timeout;
        self.execute_with_timeout(command, timeout).await
    }

    /// `guest-ping`.
    pub async fn ping(&mut self) -> Result<()> {
        self.execute(&commands::GuestPing {}).await.map(|_| ())
    }

    /// `guest-info`.
    pub async fn info(&mut self) -> Result<AgentInfo> {
        self.execute(&commands::GuestInfo {}).await
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&mut self) -> Result<FsFreezeStatus> {
        self.execute(&commands::FsFreezeStatusCmd {}).await
    }

    /// `guest-fsfreeze-freeze` within [`Config::freeze_timeout`]; returns
    /// the number of filesystems frozen. This does NOT thaw on failure:
    /// use [`crate::FreezeGuard`] unless you handle that yourself.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u32> {
        let timeout = self.config.freeze_timeout;
        self.execute_with_timeout(&commands::FsFreezeFreeze {}, timeout)
            .await
    }

    /// `guest-fsfreeze-freeze-list` within [`Config::freeze_timeout`]. Same
    /// caveat as [`GuestAgent::fsfreeze_freeze`].
    pub async fn fsfreeze_freeze_list(&mut self, mountpoints: &[String]) -> Result<u32> {
        let timeout = self.config.freeze_timeout;
        let command = commands::FsFreezeFreezeList {
            mountpoints: mountpoints.to_vec(),
        };
        self.execute_with_timeout(&command, timeout).await
    }

    /// `guest-fsfreeze-thaw`; returns the number of filesystems thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u32> {
        self.execute(&commands::FsFreezeThaw {}).await
    }

    /// `guest-get-fsinfo`.
    pub async fn get_fsinfo(&mut self) -> Result<Vec<FilesystemInfo>> {
        self.execute(&commands::GetFsInfo {}).await
    }

    /// `guest-exec`; returns the guest pid.
    pub async fn exec(&mut self, request: &GuestExec) -> Result<i64> {
        self.execute(request).await.map(|started| started.pid)
    }

    /// `guest-exec-status`, output decoded. Reaps the process once it has
    /// exited (a second call for the same pid is an agent error).
    pub async fn exec_status(&mut self, pid: i64) -> Result<ExecStatus> {
        let wire = self.execute(&commands::GuestExecStatus { pid }).await?;
        exec_status_from_wire(&wire)
    }

    /// Starts `request` and polls `guest-exec-status` until it exits or
    /// `timeout` passes ([`Error::ExecTimeout`]; the process keeps running
    /// in the guest).
    pub async fn exec_wait(
        &mut self,
        request: &GuestExec,
        timeout: Duration,
    ) -> Result<ExecStatus> {
        let deadline = Instant::now() + timeout;
        let pid = self.execute_until(request, deadline, timeout).await?;
        let pid = pid.pid;
        let mut interval = Duration::from_millis(10);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::ExecTimeout { pid, timeout });
            }
            let step = (deadline - now).min(self.config.command_timeout);
            let wire = match self
                .execute_until(&commands::GuestExecStatus { pid }, now + step, step)
                .await
            {
                Err(Error::Timeout { .. } | Error::SyncTimeout { .. })
                    if Instant::now() >= deadline =>
                {
                    return Err(Error::ExecTimeout { pid, timeout })
                }
                other => other?,
            };
            let status = exec_status_from_wire(&wire)?;
            if status.exited {
                return Ok(status);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(interval.min(remaining)).await;
            interval = (interval * 2).min(Duration::from_millis(200));
        }
    }

    /// `guest-file-open`.
    pub async fn file_open(&mut self, path: &str, mode: &str) -> Result<FileHandle> {
        let command = commands::GuestFileOpen {
            path: path.to_owned(),
            mode: mode.to_owned(),
        };
        self.execute(&command).await.map(FileHandle)
    }

    /// `guest-file-read` of at most `min(max, max_file_chunk())` bytes.
    pub async fn file_read(&mut self, handle: FileHandle, max: usize) -> Result<FileChunk> {
        const NAME: &str = commands::GuestFileRead::NAME;
        let count = max.min(self.max_file_chunk());
        let command = commands::GuestFileRead {
            handle: handle.0,
            count: u64::try_from(count).unwrap_or(u64::MAX),
        };
        let wire = self.execute(&command).await?;
        let data = decode_b64(NAME, "buf-b64", &wire.buf_b64)?;
        if u64::try_from(data.len()).ok() != Some(wire.count) || data.len() > count {
            return Err(Error::UnexpectedReturn {
                command: NAME,
                detail: format!(
                    "count {} with {} bytes of data for a read of {count}",
                    wire.count,
                    data.len()
                ),
            });
        }
        Ok(FileChunk {
            data,
            eof: wire.eof,
        })
    }

    /// `guest-file-write`; returns bytes written. At most
    /// [`GuestAgent::max_file_chunk`] bytes per call.
    pub async fn file_write(&mut self, handle: FileHandle, data: &[u8]) -> Result<usize> {
        const NAME: &str = commands::GuestFileWrite::NAME;
        if data.len() > self.max_file_chunk() {
            return Err(Error::InvalidArgument {
                command: NAME,
                detail: format!(
                    "{} bytes exceed the {} byte chunk limit",
                    data.len(),
                    self.max_file_chunk()
                ),
            });
        }
        let command = commands::GuestFileWrite {
            handle: handle.0,
            buf_b64: base64::engine::general_purpose::STANDARD.encode(data),
        };
        let wire = self.execute(&command).await?;
        match usize::try_from(wire.count) {
            Ok(written) if written <= data.len() => Ok(written),
            _ => Err(Error::UnexpectedReturn {
                command: NAME,
                detail: format!("wrote {} of {} bytes", wire.count, data.len()),
            }),
        }
    }

    /// `guest-file-close`.
    pub async fn file_close(&mut self, handle: FileHandle) -> Result<()> {
        self.execute(&commands::GuestFileClose { handle: handle.0 })
            .await
            .map(|_| ())
    }

    /// `guest-shutdown`. qemu-ga sends no reply on success, so this waits
    /// briefly for an error reply only; confirm the shutdown through QMP.
    /// The connection is dropped afterwards.
    pub async fn shutdown(&mut self, mode: ShutdownMode) -> Result<()> {
        const NAME: &str = commands::GUEST_SHUTDOWN;
        let budget = self.config.command_timeout;
        let deadline = Instant::now() + budget;
        let arguments = serde_json::to_value(commands::GuestShutdown { mode }).map_err(|e| {
            Error::InvalidArgument {
                command: NAME,
                detail: e.to_string(),
            }
        })?;
        let wait = SHUTDOWN_ERROR_WAIT.min(budget);
        let conn = self.ready(deadline, budget).await?;
        let result = match tokio::time::timeout(wait, conn.roundtrip(NAME, &arguments)).await {
            // No reply: accepted.
            Err(_) => Ok(()),
            // The guest went away as asked.
            Ok(Err(Error::Eof { .. } | Error::Receive { .. })) => Ok(()),
            Ok(Err(e)) => Err(e),
            // Not expected, but not a failure.
            Ok(Ok(_)) => Ok(()),
        };
        self.conn = None;
        result
    }
}

fn exec_status_from_wire(wire: &ExecStatusWire) -> Result<ExecStatus> {
    const NAME: &str = commands::GuestExecStatus::NAME;
    let stdout = match &wire.out_data {
        Some(data) => decode_b64(NAME, "out-data", data)?,
        None => Vec::new(),
    };
    let stderr = match &wire.err_data {
        Some(data) => decode_b64(NAME, "err-data", data)?,
        None => Vec::new(),
    };
    Ok(ExecStatus {
        exited: wire.exited,
        exit_code: wire.exitcode,
        signal: wire.signal,
        stdout,
        stderr,
        stdout_truncated: wire.out_truncated,
        stderr_truncated: wire.err_truncated,
    })
}

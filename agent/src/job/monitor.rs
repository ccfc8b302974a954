//! QEMU's monitor, held only while shear changes or inspects the block
//! graph.
//!
//! QEMU serves one client per QMP monitor at a time; on a Proxmox host the
//! socket is the hypervisor's own (`qm`, its status daemon). So a backup
//! connects for setup (through the hold and the exports), lets go for the
//! whole read phase, and reconnects for teardown — other clients wait
//! milliseconds, not the length of the backup. On reconnect it checks
//! what changed while away: QEMU gone (nothing left to undo in the graph)
//! or QEMU replaced by another process (its graph is not ours to touch).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::JobError;

/// How long connecting to QMP may take (greeting and negotiation). A
/// monitor another client holds for longer fails here, naming the socket.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a reconnect found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconnect {
    /// The same QEMU process answers.
    Same,
    /// QEMU is gone (socket missing or refusing): its nodes, exports and
    /// filters died with it.
    Gone(String),
    /// Another QEMU process answers on the socket now.
    Replaced {
        /// Peer pid before.
        was: u32,
        /// Peer pid now.
        now: u32,
    },
}

/// A QMP monitor that may be connected or let go.
#[derive(Debug)]
pub struct Monitor {
    path: PathBuf,
    conn: Option<qmp::Qmp>,
    pid: Option<u32>,
}

impl Monitor {
    /// Connect to the monitor at `path`.
    pub async fn connect(path: &Path) -> Result<Monitor, JobError> {
        let (conn, _events) = qmp::Qmp::connect(path, QMP_CONNECT_TIMEOUT)
            .await
            .map_err(|e| held_elsewhere(path, e))?;
        Ok(Monitor {
            path: path.to_path_buf(),
            pid: conn.peer_pid(),
            conn: Some(conn),
        })
    }

    /// The connection, or `QmpNotConnected` while let go.
    pub fn get(&self) -> Result<&qmp::Qmp, JobError> {
        self.conn.as_ref().ok_or(JobError::QmpNotConnected {
            what: "talk to QEMU (the monitor was let go)",
        })
    }

    /// The connection if connected.
    pub fn conn(&self) -> Option<&qmp::Qmp> {
        self.conn.as_ref()
    }

    /// Let the monitor go (other clients can use it).
    pub fn release(&mut self) {
        self.conn = None;
    }

    /// Whether a connection is held.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Connect again (if let go) and say what changed. Only on `Same` is
    /// the monitor connected afterwards.
    pub async fn reconnect(&mut self) -> Result<Reconnect, JobError> {
        if self.conn.is_some() {
            return Ok(Reconnect::Same);
        }
        let conn = match qmp::Qmp::connect(&self.path, QMP_CONNECT_TIMEOUT).await {
            Ok((c, _events)) => c,
            Err(e) if e.kind() == qmp::ErrorKind::Connect && !greeting_timeout(&e) => {
                return Ok(Reconnect::Gone(crate::chain(&e)));
            }
            Err(e) => return Err(held_elsewhere(&self.path, e)),
        };
        match (self.pid, conn.peer_pid()) {
            (Some(was), Some(now)) if was != now => Ok(Reconnect::Replaced { was, now }),
            _ => {
                self.conn = Some(conn);
                Ok(Reconnect::Same)
            }
        }
    }
}

/// A connect failure, naming the socket (the qmp crate's error says when
/// the greeting never came: another client holds the monitor).
fn held_elsewhere(path: &Path, e: qmp::Error) -> JobError {
    JobError::Qmp {
        step: format!("connect to {}", path.display()),
        source: e,
    }
}

fn greeting_timeout(e: &qmp::Error) -> bool {
    matches!(
        e,
        qmp::Error::ConnectTimeout {
            step: "greeting" | "qmp_capabilities",
            ..
        }
    )
}

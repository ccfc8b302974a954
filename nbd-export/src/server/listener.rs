//! Accept loops for unix and TCP listeners, with a stop handle.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Server, Stream};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// Stops an accept loop (connections being served end on their own).
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// A new handle.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the loop to stop (within ~50 ms).
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// Whether stop was asked.
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Listener {
    fn accept(&self) -> io::Result<Box<dyn Stream>> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Box::new(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// Accepts and serves connections (one thread each) until `stop`.
    /// Connections above the server's cap are closed at once.
    pub fn run(&self, server: &Arc<Server>, stop: &StopHandle) -> io::Result<()> {
        self.set_nonblocking()?;
        while !stop.stopped() {
            match self.accept() {
                Ok(stream) => {
                    let Some(slot) = server.enter() else {
                        tracing::warn!(
                            max = server.config.max_connections,
                            "NBD connection refused: connection limit reached"
                        );
                        let _ = stream.shutdown();
                        continue;
                    };
                    let srv = Arc::clone(server);
                    let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(
                        move || {
                            let _slot = slot;
                            if let Err(e) = srv.serve_inner(stream) {
                                tracing::debug!(error = %e, "NBD connection ended with an error");
                            }
                        },
                    );
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start an NBD connection thread");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    tracing::warn!(error = %e, "NBD accept failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

//! TLS for the server half: `NBD_OPT_STARTTLS` with rustls (ring
//! provider), credentials in QEMU's `tls-creds-x509` directory layout.
//!
//! A server with TLS configured requires it: before `NBD_OPT_STARTTLS`
//! every option but `NBD_OPT_ABORT` is refused with `NBD_REP_ERR_TLS_REQD`
//! (`NBD_OPT_EXPORT_NAME`, which cannot be answered, ends the connection),
//! as qemu-nbd does. After the TLS handshake the negotiation starts over
//! inside TLS, and the transmission phase runs over it.
//!
//! The connection has one reader thread and several writers (the reply
//! workers), so the TLS state is shared: a reader reads the socket without
//! holding the state and feeds what it got; a writer encrypts under the
//! state lock and sends while holding the write side, so records leave in
//! the order they were sealed. Lock order: read side → write side → state.
//!
//! TLS-PSK (QEMU's `tls-creds-psk`) is not supported: rustls has no PSK
//! cipher suites. A credentials directory holding only `keys.psk` is
//! refused with a message saying so.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};

use super::Stream;
use crate::Error;

/// QEMU's file names in a `tls-creds-x509` directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (chain) in a `tls-creds-x509` directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key in a `tls-creds-x509` directory.
pub const SERVER_KEY: &str = "server-key.pem";
/// QEMU's `tls-creds-psk` key file (not supported).
pub const PSK_FILE: &str = "keys.psk";

/// Bytes of ciphertext read from the socket at once.
const READ_BUF: usize = 64 << 10;
/// rustls' buffer limit for outgoing data (drained after every write).
const SEND_LIMIT: usize = 256 << 10;

/// TLS credentials for a [`super::Server`]: the server certificate and
/// key, and optionally client-certificate verification against a CA.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    verify_peer: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

fn creds_err(dir: &Path, detail: impl Into<String>) -> Error {
    Error::TlsCredentials {
        dir: dir.to_path_buf(),
        detail: detail.into(),
    }
}

fn read_file(dir: &Path, name: &str) -> crate::Result<Vec<u8>> {
    let p = dir.join(name);
    std::fs::read(&p).map_err(|e| creds_err(dir, format!("cannot read {name}: {e}")))
}

impl ServerTls {
    /// Loads credentials from a directory laid out as QEMU's
    /// `tls-creds-x509` (`server-cert.pem`, `server-key.pem`, and
    /// `ca-cert.pem` when `verify_peer`: clients must then present a
    /// certificate signed by that CA).
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> crate::Result<ServerTls> {
        if !dir.is_dir() {
            return Err(creds_err(dir, "not a directory"));
        }
        if dir.join(PSK_FILE).exists() && !dir.join(SERVER_CERT).exists() {
            return Err(creds_err(
                dir,
                format!(
                    "holds {PSK_FILE} (QEMU tls-creds-psk): TLS-PSK is not supported \
                     (rustls has no PSK cipher suites); use x509 credentials \
                     ({CA_CERT}, {SERVER_CERT}, {SERVER_KEY})"
                ),
            ));
        }
        let cert = read_file(dir, SERVER_CERT)?;
        let key = read_file(dir, SERVER_KEY)?;
        let ca = if verify_peer {
            Some(read_file(dir, CA_CERT)?)
        } else {
            None
        };
        Self::from_pem(&cert, &key, ca.as_deref()).map_err(|e| match e {
            Error::TlsCredentials { detail, .. } => creds_err(dir, detail),
            other => other,
        })
    }

    /// Credentials from PEM data: the certificate chain, its key, and the
    /// CA that client certificates must chain to (None: no client
    /// certificates asked for).
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> crate::Result<Self> {
        let here = Path::new("(PEM data)");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| creds_err(here, format!("{SERVER_CERT}: {e}")))?;
        if certs.is_empty() {
            return Err(creds_err(
                here,
                format!("{SERVER_CERT}: no PEM certificate in it"),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| creds_err(here, format!("{SERVER_KEY}: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| creds_err(here, e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let mut n = 0;
                for c in CertificateDer::pem_slice_iter(ca) {
                    let c = c.map_err(|e| creds_err(here, format!("{CA_CERT}: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| creds_err(here, format!("{CA_CERT}: {e}")))?;
                    n += 1;
                }
                if n == 0 {
                    return Err(creds_err(
                        here,
                        format!("{CA_CERT}: no PEM certificate in it"),
                    ));
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| creds_err(here, format!("{CA_CERT}: {e}")))?;
                builder.with_client_cert_verifier(v)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| creds_err(here, format!("{SERVER_CERT}/{SERVER_KEY}: {e}")))?;
        // No resumption: every connection does a full handshake, and the
        // handshake ends with the client's Finished (nothing left to send).
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(ServerTls {
            config: Arc::new(config),
            verify_peer: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "TLS read deadline")
}

struct ReadSide {
    sock: Box<dyn Stream>,
    /// Ciphertext read but not yet taken by rustls.
    pending: Vec<u8>,
    buf: Vec<u8>,
    /// The socket's receive timeout as last set (None: not set yet).
    applied: Option<Option<Duration>>,
}

struct Shared {
    rd: Mutex<ReadSide>,
    wr: Mutex<Box<dyn Stream>>,
    conn: Mutex<ServerConnection>,
    /// For timeouts and shutdown without taking either side.
    ctl: Mutex<Box<dyn Stream>>,
    read_timeout: Mutex<Option<Duration>>,
}

impl Shared {
    /// Sends everything rustls has queued; the caller holds the write side.
    fn flush_locked(&self, wr: &mut Box<dyn Stream>) -> io::Result<()> {
        loop {
            let mut out = Vec::new();
            {
                let mut c = lock(&self.conn);
                while c.wants_write() {
                    c.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                return Ok(());
            }
            wr.write_all(&out)?;
        }
    }

    fn flush(&self) -> io::Result<()> {
        let mut wr = lock(&self.wr);
        self.flush_locked(&mut wr)
    }

    /// Reads ciphertext once (unless some is pending) and feeds it to
    /// rustls. `Ok(true)`: the peer closed the socket.
    fn fill(&self, rd: &mut ReadSide, deadline: Option<Instant>) -> io::Result<bool> {
        if rd.pending.is_empty() {
            let t = match deadline {
                None => None,
                Some(d) => Some(
                    d.checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())
                        .ok_or_else(timed_out)?,
                ),
            };
            if rd.applied != Some(t) {
                rd.sock.set_read_timeout(t)?;
                rd.applied = Some(t);
            }
            let ReadSide { sock, buf, .. } = rd;
            let n = loop {
                match sock.read(buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(timed_out()),
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                let mut c = lock(&self.conn);
                c.read_tls(&mut io::empty())?;
                c.process_new_packets().map_err(io::Error::other)?;
                return Ok(true);
            }
            rd.pending.extend_from_slice(&rd.buf[..n]);
        }
        let mut failed = None;
        let want_write = {
            let mut c = lock(&self.conn);
            let mut fed = false;
            while !rd.pending.is_empty() {
                let mut sl: &[u8] = &rd.pending;
                match c.read_tls(&mut sl) {
                    // A close_notify was received: nothing more is read.
                    Ok(0) => {
                        rd.pending.clear();
                        break;
                    }
                    Ok(n) => {
                        rd.pending.drain(..n);
                        fed = true;
                    }
                    // Plaintext buffer full: keep the rest for later.
                    Err(_) if fed => break,
                    Err(e) => return Err(e),
                }
                if let Err(e) = c.process_new_packets() {
                    failed = Some(e);
                    break;
                }
            }
            c.wants_write()
        };
        if let Some(e) = failed {
            // rustls queued an alert for the peer: best effort.
            let _ = self.flush();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS: {e}"),
            ));
        }
        if want_write {
            self.flush()?;
        }
        Ok(false)
    }
}

/// A server-side TLS connection; clones share it (one reader, any number
/// of writers).
pub(super) struct TlsStream(Arc<Shared>);

/// Runs the TLS handshake on `stream` (after `NBD_OPT_STARTTLS` was
/// acknowledged), within `deadline`.
pub(super) fn accept(
    stream: &dyn Stream,
    tls: &ServerTls,
    deadline: Instant,
) -> io::Result<TlsStream> {
    let mut conn = ServerConnection::new(Arc::clone(&tls.config)).map_err(io::Error::other)?;
    conn.set_buffer_limit(Some(SEND_LIMIT));
    let shared = Arc::new(Shared {
        rd: Mutex::new(ReadSide {
            sock: stream.try_clone_box()?,
            pending: Vec::new(),
            buf: vec![0u8; READ_BUF],
            applied: None,
        }),
        wr: Mutex::new(stream.try_clone_box()?),
        conn: Mutex::new(conn),
        ctl: Mutex::new(stream.try_clone_box()?),
        read_timeout: Mutex::new(None),
    });
    {
        let mut rd = lock(&shared.rd);
        loop {
            shared.flush()?;
            if !lock(&shared.conn).is_handshaking() {
                break;
            }
            if shared.fill(&mut rd, Some(deadline))? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection during the TLS handshake",
                ));
            }
        }
    }
    Ok(TlsStream(shared))
}

impl Read for TlsStream {
    /// Plaintext; the read timeout bounds the whole call (a client sending
    /// a byte at a time cannot stretch it).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = lock(&self.0.read_timeout).map(|t| Instant::now() + t);
        let mut rd = lock(&self.0.rd);
        loop {
            match lock(&self.0.conn).reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.0.fill(&mut rd, deadline)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut wr = lock(&self.0.wr);
        let n = lock(&self.0.conn).writer().write(buf)?;
        self.0.flush_locked(&mut wr)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Stream for TlsStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(TlsStream(Arc::clone(&self.0))))
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        *lock(&self.0.read_timeout) = t;
        Ok(())
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        lock(&self.0.ctl).set_write_timeout(t)
    }

    fn close(&self) -> io::Result<()> {
        let mut wr = lock(&self.0.wr);
        lock(&self.0.conn).send_close_notify();
        self.0.flush_locked(&mut wr)
    }

    /// Shuts the socket down (no close_notify: a writer may be stuck on a
    /// peer that stopped reading, and this must not wait for it).
    fn shutdown(&self) -> io::Result<()> {
        lock(&self.0.ctl).shutdown()
    }
}

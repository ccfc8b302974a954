//! `shear serve BACKUP`: the backup's disks as NBD exports until
//! SIGINT/SIGTERM.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use nbd_export::server::{
    BlockSource, Export, Listener, Server, ServerConfig, ServerTls, StopHandle,
};

use super::repo_cmds::{open, resolve_backup};
use super::Cli;
use crate::out;
use crate::serve::overlay::Overlay;
use crate::serve::BackupSource;

/// `shear serve …`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Backup id (or vm/<vmid> for the newest).
    pub backup: String,
    /// Disk(s) to export (default: all), each under its name.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Unix socket to listen on (mode 0600; must not exist). Default: a
    /// new private directory (0700) under $XDG_RUNTIME_DIR or the temp dir.
    #[arg(long, conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP (HOST:PORT): needs --tls-creds, or --insecure.
    #[arg(long)]
    pub listen: Option<String>,
    /// Require TLS with the x509 credentials in DIR, laid out as QEMU's
    /// `tls-creds-x509` (server-cert.pem, server-key.pem; ca-cert.pem for
    /// --tls-verify-peer). Clients: QEMU/qemu-img with
    /// `--object tls-creds-x509,…,endpoint=client` and `tls-creds=`,
    /// libnbd with `nbds://…?tls-certificates=DIR`. TLS-PSK
    /// (tls-creds-psk) is not supported.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// With --tls-creds: clients must present a certificate signed by the
    /// directory's ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    pub tls_verify_peer: bool,
    /// Serve TCP without TLS (anyone who can connect reads the disks).
    #[arg(long, requires = "listen", conflicts_with = "tls_creds")]
    pub insecure: bool,
    /// Make the disks writable into overlay files in DIR
    /// (`<disk>.overlay` + `.overlay.map`); the backup is never written.
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// Decoded-chunk cache per disk, MiB.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: u64,
    /// Connections served at once.
    #[arg(long, default_value_t = 128)]
    pub max_connections: usize,
    /// Serve one disk (--disk, or the backup's only one) as a
    /// vhost-user-blk backend on this unix socket instead of NBD, for
    /// QEMU's `vhost-user-blk-pci` (the guest's RAM must be a shared
    /// memfd). Read-only unless --overlay.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["socket", "listen"])]
    pub vhost_user: Option<PathBuf>,
}

/// Removes what serve created at exit.
struct Cleanup {
    socket: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn default_socket() -> anyhow::Result<(PathBuf, PathBuf)> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "shear-serve-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating socket directory {}", dir.display()))?;
    Ok((dir.join("nbd.sock"), dir))
}

fn bind_unix(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        bail!(
            "{} exists: remove it or name another --socket",
            path.display()
        );
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// Runs `shear serve`.
pub fn run(cli: &Cli, a: &ServeArgs) -> anyhow::Result<()> {
    if a.listen.is_some() && a.tls_creds.is_none() && !a.insecure {
        bail!("TCP serving needs TLS: add --tls-creds DIR (x509 credentials as QEMU's tls-creds-x509: server-cert.pem, server-key.pem), use a unix socket (the default), or add --insecure to serve TCP in the clear");
    }
    let tls = match &a.tls_creds {
        Some(dir) => Some(
            ServerTls::from_x509_dir(dir, a.tls_verify_peer)
                .context("loading the TLS credentials")?,
        ),
        None => None,
    };
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let repo = open(cli)?;
    let id = resolve_backup(&repo, &a.backup)?;
    let backup = Arc::new(repo.open_backup(&id)?);
    let names: Vec<String> = backup
        .manifest()
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    super::repo_cmds::check_disk_names(&id, &a.disks, &names)?;
    let disks = if a.disks.is_empty() {
        names
    } else {
        a.disks.clone()
    };
    if a.vhost_user.is_some() && disks.len() != 1 {
        bail!(
            "--vhost-user serves one disk: name it with --disk ({id} has {})",
            disks.join(", ")
        );
    }
    if let Some(dir) = &a.overlay {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating overlay directory {}", dir.display()))?;
    }
    let mut exports = Vec::new();
    let mut overlays: Vec<Arc<Overlay>> = Vec::new();
    for d in &disks {
        let shared = backup
            .shared_disk(d, a.cache_mib.max(1) << 20)
            .with_context(|| format!("opening disk {d} of {id}"))?;
        let base = BackupSource(Arc::new(shared));
        let source: Arc<dyn BlockSource> = match &a.overlay {
            None => Arc::new(base),
            Some(dir) => {
                let o = Overlay::open(dir, d, &format!("{id}/{d}"), base).with_context(|| {
                    format!("opening the overlay of disk {d} in {}", dir.display())
                })?;
                overlays.push(Arc::clone(&o));
                o
            }
        };
        exports.push(Export {
            name: d.clone(),
            description: format!("{id} disk {d}"),
            source,
        });
    }
    if let Some(path) = &a.vhost_user {
        return run_vhost_user(path, &id.to_string(), exports, &overlays);
    }
    let server = Server::new(
        exports,
        ServerConfig {
            max_connections: a.max_connections,
            tls,
            ..ServerConfig::default()
        },
    )?;
    let mut cleanup = Cleanup {
        socket: None,
        dir: None,
    };
    let (listener, uris) = match &a.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            let local = l.local_addr()?;
            let uris: Vec<String> = disks
                .iter()
                .map(|d| format!("{scheme}://{local}/{d}"))
                .collect();
            (Listener::Tcp(l), uris)
        }
        None => {
            let path = match &a.socket {
                Some(p) => p.clone(),
                None => {
                    let (p, dir) = default_socket()?;
                    cleanup.dir = Some(dir);
                    p
                }
            };
            let l = bind_unix(&path)?;
            cleanup.socket = Some(path.clone());
            let uris = disks
                .iter()
                .map(|d| format!("{scheme}+unix:///{d}?socket={}", path.display()))
                .collect();
            (Listener::Unix(l), uris)
        }
    };
    let mut mode = match &a.overlay {
        Some(d) => format!("writable into overlays in {}", d.display()),
        None => "read-only".to_owned(),
    };
    if let Some(d) = &a.tls_creds {
        mode.push_str(&format!(
            ", TLS required (credentials in {}{})",
            d.display(),
            if a.tls_verify_peer {
                ", client certificates verified"
            } else {
                ""
            }
        ));
    }
    out!(
        "serving {} disk(s) of {id}, {mode}; stop with SIGINT or SIGTERM",
        disks.len()
    );
    for u in &uris {
        out!("{u}");
    }
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let stop = StopHandle::new();
    let (srv, st) = (Arc::clone(&server), stop.clone());
    let accept = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || listener.run(&srv, &st))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let why = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        anyhow::Ok(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        })
    })?;
    stop.stop();
    let accepted = accept
        .join()
        .map_err(|_| anyhow::anyhow!("the accept thread panicked"))?;
    for o in &overlays {
        o.flush()
            .with_context(|| format!("saving overlay {}", o.path().display()))?;
    }
    drop(cleanup);
    tracing::info!(signal = why, "serve stopped");
    eprintln!("serve: stopped ({why})");
    accepted.context("accepting NBD connections")?;
    Ok(())
}

/// `shear serve --vhost-user PATH`: the one disk in `exports` as a
/// vhost-user-blk backend until SIGINT/SIGTERM (then the overlay is saved).
fn run_vhost_user(
    path: &Path,
    id: &str,
    exports: Vec<Export>,
    overlays: &[Arc<Overlay>],
) -> anyhow::Result<()> {
    use crate::serve::vhost_user::{serve, BlkDevice};
    let Some(export) = exports.into_iter().next() else {
        bail!("no disk to serve");
    };
    let listener = bind_unix(path)?;
    let cleanup = Cleanup {
        socket: Some(path.to_owned()),
        dir: None,
    };
    let mode = if export.source.writable() {
        "writable into its overlay"
    } else {
        "read-only"
    };
    out!(
        "serving disk {} of {id} over vhost-user-blk, {mode}; stop with SIGINT or SIGTERM",
        export.name
    );
    out!(
        "-chardev socket,id=vu0,path={} -device vhost-user-blk-pci,chardev=vu0 (guest RAM: -object memory-backend-memfd,id=mem,size=RAM,share=on -machine memory-backend=mem)",
        path.display()
    );
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let dev = BlkDevice::new(export.source, &export.name);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let _ = tx.send(serve(listener, dev));
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ended = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        anyhow::Ok(tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
            r = rx => Err(match r {
                Ok(Err(e)) => anyhow::Error::new(e),
                _ => anyhow::anyhow!("the vhost-user server thread ended"),
            }),
        })
    })?;
    for o in overlays {
        o.flush()
            .with_context(|| format!("saving overlay {}", o.path().display()))?;
    }
    drop(cleanup);
    let why = ended?;
    tracing::info!(signal = why, "serve stopped");
    eprintln!("serve: stopped ({why})");
    Ok(())
}

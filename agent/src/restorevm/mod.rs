//! An isolated, throw-away QEMU that boots with a backup's disks attached
//! through an in-process NBD server (the same serving core as
//! `shear serve`): used by `shear verify --boot` (restore tests) and
//! `shear files` (file-level restore through qemu-ga).
//!
//! Isolation: no network device (`-nic none`, `-nodefaults`), no user
//! config, memory and CPUs capped, the disks read-only or writable only
//! into overlay files in a private directory that is removed at the end;
//! the backup is never written. Everything (QEMU, the server, the
//! directory) is torn down on every path by [`RestoreVm`]'s `Drop`.
//! If shear is SIGKILLed, QEMU gets SIGKILL too: it is started through
//! util-linux `setpriv --pdeathsig KILL` from a thread that lives as long
//! as QEMU does (the parent-death signal follows the thread that forked,
//! not the process), so no restore VM outlives its shear. Only the private
//! directory is then left behind.

pub mod accel;
pub mod extract;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use guest_agent::GuestAgent;
use nbd_export::server::{BlockSource, Export, Listener, Server, ServerConfig, StopHandle};

use crate::repo::BackupReader;
use crate::serve::overlay::Overlay;
use crate::serve::BackupSource;

/// How the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initramfs, if any.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        append: String,
    },
    /// Firmware (SeaBIOS) boots the first disk.
    Disk,
}

impl Boot {
    /// `kernel` or `disk` (for the record).
    pub fn kind(&self) -> &'static str {
        match self {
            Boot::Kernel { .. } => "kernel",
            Boot::Disk => "disk",
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// `qemu-system-x86_64` to run.
    pub qemu: PathBuf,
    /// `-accel` values tried in order (`kvm`, `tcg`).
    pub accel: Vec<String>,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Boot source.
    pub boot: Boot,
    /// Disks of the backup to attach, in order (vda, vdb, …).
    pub disks: Vec<String>,
    /// Writable into throw-away overlays (else read-only).
    pub writable: bool,
    /// Decoded-chunk cache per disk, bytes.
    pub cache_bytes: u64,
}

/// The boot options recorded in a backup's VM definition: `-kernel`,
/// `-initrd`, `-append` from the captured QEMU command line. Only these
/// are taken (never devices, network or paths of the old process).
pub fn recorded_kernel_boot(vm_config: &serde_json::Value) -> Option<Boot> {
    let argv: Vec<&str> = vm_config["cmdline"]
        .as_array()?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let value = |name: &str| {
        argv.windows(2)
            .find(|w| w[0] == name || w[0] == format!("-{name}"))
            .map(|w| w[1].to_owned())
    };
    let kernel = value("-kernel")?;
    Some(Boot::Kernel {
        kernel: PathBuf::from(kernel),
        initrd: value("-initrd").map(PathBuf::from),
        append: value("-append").unwrap_or_default(),
    })
}

/// A running restore VM. Dropping it kills QEMU (by its pid), stops the
/// NBD server and removes the private directory.
pub struct RestoreVm {
    dir: PathBuf,
    child: Option<Launched>,
    stop: StopHandle,
    accept: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// When QEMU was started.
    pub started: Instant,
}

impl std::fmt::Debug for RestoreVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreVm")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn private_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "shear-restorevm-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A path QEMU gets inside an option value: commas would split it.
fn qemu_path(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains(',') {
        bail!("{s}: a comma in a path QEMU gets as an option value is not supported");
    }
    Ok(s.to_owned())
}

impl RestoreVm {
    /// Serves the disks and starts QEMU (does not wait for the guest).
    pub fn start(backup: &Arc<BackupReader>, spec: &VmSpec) -> anyhow::Result<RestoreVm> {
        let dir = private_dir()?;
        let mut vm = RestoreVm {
            dir: dir.clone(),
            child: None,
            stop: StopHandle::new(),
            accept: None,
            started: Instant::now(),
        };
        let mut exports = Vec::new();
        for d in &spec.disks {
            if !d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                bail!("disk name {d:?} cannot be passed to QEMU");
            }
            let shared = backup
                .shared_disk(d, spec.cache_bytes.max(1 << 20))
                .with_context(|| format!("opening disk {d}"))?;
            let base = BackupSource(Arc::new(shared));
            let source: Arc<dyn BlockSource> = if spec.writable {
                Overlay::open(&dir, d, &format!("restore-test/{d}"), base)
                    .with_context(|| format!("creating the throw-away overlay of {d}"))?
            } else {
                Arc::new(base)
            };
            exports.push(Export {
                name: d.clone(),
                description: format!("disk {d}"),
                source,
            });
        }
        let server = Server::new(exports, ServerConfig::default())?;
        let sock = dir.join("nbd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .with_context(|| format!("listening on {}", sock.display()))?;
        let (srv, st) = (Arc::clone(&server), vm.stop.clone());
        let l = Listener::Unix(listener);
        vm.accept = Some(
            std::thread::Builder::new()
                .name("restorevm-nbd".into())
                .spawn(move || l.run(&srv, &st))?,
        );

        let mut args: Vec<String> = Vec::new();
        for a in &spec.accel {
            args.extend(["-accel".into(), a.clone()]);
        }
        args.extend(
            [
                "-machine",
                "q35",
                "-nodefaults",
                "-no-user-config",
                "-nic",
                "none",
                "-display",
                "none",
                "-no-reboot",
                "-m",
            ]
            .map(String::from),
        );
        args.push(spec.memory_mib.to_string());
        args.extend(["-smp".into(), spec.cpus.to_string()]);
        args.extend([
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                qemu_path(&dir.join("qmp.sock"))?
            ),
            "-serial".into(),
            format!("file:{}", qemu_path(&dir.join("console.log"))?),
            "-chardev".into(),
            format!(
                "socket,id=qga0,path={},server=on,wait=off",
                qemu_path(&dir.join("qga.sock"))?
            ),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-device".into(),
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
        ]);
        if let Boot::Kernel {
            kernel,
            initrd,
            append,
        } = &spec.boot
        {
            args.extend(["-kernel".into(), kernel.display().to_string()]);
            if let Some(i) = initrd {
                args.extend(["-initrd".into(), i.display().to_string()]);
            }
            args.extend(["-append".into(), append.clone()]);
        } else {
            // No other boot device; when the disk does not boot, SeaBIOS
            // reboots after 1 s and -no-reboot ends QEMU: a fast, clear
            // failure instead of a hang until the deadline.
            args.extend(["-boot".into(), "strict=on,reboot-timeout=1000".into()]);
        }
        let sockq = qemu_path(&sock)?;
        for (i, d) in spec.disks.iter().enumerate() {
            args.extend([
                "-blockdev".into(),
                format!(
                    "driver=nbd,node-name=disk{i},server.type=unix,server.path={sockq},export={d},read-only={}",
                    if spec.writable { "off" } else { "on" }
                ),
                "-device".into(),
                format!(
                    "virtio-blk-pci,drive=disk{i},serial={d}{}",
                    if spec.boot == Boot::Disk && i == 0 {
                        ",bootindex=0"
                    } else {
                        ""
                    }
                ),
            ]);
        }
        let mut cmd = if pdeathsig_supported() {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(&spec.qemu);
            c
        } else {
            tracing::warn!(
                "setpriv --pdeathsig is not available (util-linux): a SIGKILLed shear would \
                 leave this restore VM running"
            );
            Command::new(&spec.qemu)
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.err"))?);
        let child =
            Launched::spawn(cmd).with_context(|| format!("starting {}", spec.qemu.display()))?;
        vm.started = Instant::now();
        vm.child = Some(child);
        Ok(vm)
    }

    /// The accelerator QEMU actually uses (`kvm` or `tcg`), asked through
    /// QMP `query-kvm`; `None` if QMP did not answer.
    pub async fn accelerator(&self) -> Option<&'static str> {
        let (qmp, _events) = qmp::Qmp::connect(self.dir.join("qmp.sock"), Duration::from_secs(5))
            .await
            .ok()?;
        let v = qmp
            .execute_value("query-kvm", serde_json::Value::Null)
            .await
            .ok()?;
        Some(if v["enabled"] == true { "kvm" } else { "tcg" })
    }

    /// Whether QEMU has exited.
    fn exited(&self) -> bool {
        self.child.as_ref().is_some_and(|c| c.exited().is_some())
    }

    /// The guest agent's socket.
    pub fn qga_socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    /// The last `max` bytes of the serial console, control characters
    /// replaced (guest output is hostile).
    pub fn console_tail(&self, max: usize) -> String {
        tail_text(&self.dir.join("console.log"), max)
    }

    /// QEMU's own stderr, tail.
    pub fn qemu_stderr(&self, max: usize) -> String {
        tail_text(&self.dir.join("qemu.err"), max)
    }

    /// Waits until qemu-ga answers `guest-ping`; fails at once when QEMU
    /// exits or the console shows a kernel panic, and at `deadline`.
    pub async fn wait_agent(&mut self, deadline: Instant) -> anyhow::Result<GuestAgent> {
        let mut config = guest_agent::Config::default();
        config.max_reply_bytes = guest_agent::MAX_REPLY_BYTES_CEILING;
        config.connect_timeout = Duration::from_secs(2);
        loop {
            if let Some(child) = &self.child {
                if let Some(status) = child.exited() {
                    bail!(
                        "QEMU exited ({status}) before the guest agent answered; {}",
                        self.why()
                    );
                }
            }
            if let Some(line) = panic_line(&self.console_tail(64 << 10)) {
                bail!("the guest kernel panicked: {line}");
            }
            if Instant::now() >= deadline {
                bail!(
                    "the guest agent did not answer within the deadline; {}",
                    self.why()
                );
            }
            if self.qga_socket().exists() {
                if let Ok(mut ga) = GuestAgent::connect(self.qga_socket(), config.clone()).await {
                    if ga.ping().await.is_ok() {
                        return Ok(ga);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn why(&self) -> String {
        let err = self.qemu_stderr(2048);
        let con = self.console_tail(1024);
        let mut s = String::new();
        if !err.trim().is_empty() {
            s.push_str(&format!("QEMU said: {} ", err.trim()));
        }
        if con.trim().is_empty() {
            s.push_str("(the console is empty)");
        } else {
            s.push_str(&format!("console tail: {}", con.trim()));
        }
        s
    }
}

/// Whether util-linux `setpriv` knows `--pdeathsig` (2.33 and later).
fn pdeathsig_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        Command::new("setpriv")
            .arg("--help")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig"))
    })
}

/// A child process forked by, and reaped on, a thread of its own that lives
/// until the child exits: `PR_SET_PDEATHSIG` fires when the thread that
/// forked ends, so the child must not come from a pool thread that may end
/// first. Reaping happens under the lock, so a kill never hits a reused pid.
struct Launched {
    state: Arc<(Mutex<LaunchState>, Condvar)>,
    waiter: Option<std::thread::JoinHandle<()>>,
}

struct LaunchState {
    child: Option<Child>,
    exited: Option<ExitStatus>,
    /// Set by `Drop`: the waiter returns.
    done: bool,
}

impl Launched {
    fn spawn(mut cmd: Command) -> std::io::Result<Launched> {
        let state = Arc::new((
            Mutex::new(LaunchState {
                child: None,
                exited: None,
                done: false,
            }),
            Condvar::new(),
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let st = Arc::clone(&state);
        let waiter = std::thread::Builder::new()
            .name("restorevm-qemu".into())
            .spawn(move || {
                let child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let (lock, cvar) = &*st;
                if let Ok(mut g) = lock.lock() {
                    g.child = Some(child);
                }
                let _ = tx.send(Ok(()));
                // Poll, not wait(): reaping under the lock keeps Drop's
                // kill from ever reaching a reused pid.
                let Ok(mut g) = lock.lock() else { return };
                loop {
                    if g.done || g.exited.is_some() {
                        return;
                    }
                    match g.child.as_mut().map(Child::try_wait) {
                        Some(Ok(Some(s))) => {
                            g.exited = Some(s);
                            g.child = None;
                            return;
                        }
                        Some(Ok(None)) => {}
                        // Cannot be asked: Drop still kills it.
                        Some(Err(_)) | None => return,
                    }
                    g = match cvar.wait_timeout(g, Duration::from_millis(100)) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(Launched {
                state,
                waiter: Some(waiter),
            }),
            Ok(Err(e)) => {
                let _ = waiter.join();
                Err(e)
            }
            Err(_) => {
                let _ = waiter.join();
                Err(std::io::Error::other("the launcher thread ended"))
            }
        }
    }

    /// The exit status once the child has exited.
    fn exited(&self) -> Option<ExitStatus> {
        self.state.0.lock().ok().and_then(|g| g.exited)
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.state;
        if let Ok(mut g) = lock.lock() {
            if let Some(mut c) = g.child.take() {
                let _ = c.kill();
                g.exited = c.wait().ok();
            }
            g.done = true;
        }
        cvar.notify_all();
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
    }
}

impl Drop for RestoreVm {
    fn drop(&mut self) {
        // QEMU first (killed and reaped), then the server it read from.
        drop(self.child.take());
        self.stop.stop();
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The kernel panic line, if the console shows one.
fn panic_line(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| l.contains("Kernel panic"))
        .map(|l| l.trim().to_owned())
}

/// Replaces control characters (but newlines) so guest text cannot drive
/// a terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\n' || !c.is_control() { c } else { '?' })
        .collect()
}

fn tail_text(path: &Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity(max.min(1 << 20));
    let _ = f.take(max as u64).read_to_end(&mut buf);
    printable(&String::from_utf8_lossy(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_boot_takes_only_kernel_initrd_append() {
        let cfg = serde_json::json!({"cmdline": [
            "qemu-system-x86_64", "-netdev", "user,id=n0", "-kernel", "/k", "-initrd", "/i",
            "-append", "console=ttyS0 quiet", "-drive", "file=/x"
        ]});
        assert_eq!(
            recorded_kernel_boot(&cfg),
            Some(Boot::Kernel {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                append: "console=ttyS0 quiet".into()
            })
        );
        assert_eq!(
            recorded_kernel_boot(&serde_json::json!({"cmdline": ["q"]})),
            None
        );
        assert_eq!(recorded_kernel_boot(&serde_json::Value::Null), None);
    }

    #[test]
    fn panic_and_printable() {
        assert_eq!(
            panic_line("a\n[ 1.0] Kernel panic - not syncing: No init\nb").as_deref(),
            Some("[ 1.0] Kernel panic - not syncing: No init")
        );
        assert_eq!(panic_line("fine"), None);
        assert_eq!(printable("a\x1b[2Jb\n"), "a?[2Jb\n");
    }
}

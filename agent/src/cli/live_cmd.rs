//! `shear restore BACKUP --live --target DIR --qmp SOCKET`: the VM starts
//! at once on target images backed by the served backup; QEMU copies the
//! rest (`block-stream`) while it runs. The design and its safety table are
//! in [`crate::serve::live`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::repo_cmds::{open, resolve_backup};
use super::{Cli, FormatArg, RestoreArgs};
use crate::config::Config;
use crate::out;
use crate::serve::live::{
    after_cont, backing_spec, decide, device_on, job_seen, nodes_of, record_path,
    references_socket, seen_in, socket_path, Action, JobSeen, LiveDisk, LiveRecord, Phase,
    RECORD_VERSION,
};

/// `--live` and its options (flattened into `shear restore`).
#[derive(Debug, Args)]
pub struct LiveArgs {
    /// Live restore: serve the backup (read-only, a private unix socket),
    /// create `<disk>.qcow2` in --target backed by it, and once the VM
    /// started on those images answers on --qmp, copy the data into them
    /// while it runs (QEMU block-stream); then stop serving. With
    /// `--format raw`, or a block device as --target (one disk; it must be
    /// free and at least the disk's size, and is never created or
    /// truncated), the VM starts on a qcow2 overlay that QEMU mirrors into
    /// the raw target, then runs on it. `--target-device DISK=DEV` (one
    /// device per disk) instead of --target: the same for each disk; the
    /// record is keyed by the first device (`--resume --target DEV`).
    #[arg(long)]
    pub live: bool,
    /// Finish an interrupted live restore of --target: restart the server
    /// if it is gone, resume or start the copy, wait for the end.
    #[arg(long, requires = "live")]
    pub resume: bool,
    /// QMP socket of the VM started on the target images (waited for up
    /// to --vm-timeout). Without it shear only serves and prepares.
    #[arg(long, requires = "live")]
    pub qmp: Option<PathBuf>,
    /// State directory for the live-restore record and socket (default:
    /// the config's state_dir, /var/lib/shear).
    #[arg(long, env = "SHEAR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Copy speed limit in KiB/s (0: as fast as it goes).
    #[arg(long, default_value_t = 0, requires = "live")]
    pub bwlimit: u64,
    /// Seconds QEMU's NBD client holds reads of uncopied data while the
    /// server is lost, waiting for it to come back (written into the
    /// images' backing). Long on purpose: during a block-stream, QEMU
    /// 10.0's copy-on-read filter was seen to hand the guest zeros instead
    /// of an error for such a read once this delay has passed.
    #[arg(long, default_value_t = 600, requires = "live")]
    pub reconnect_delay: u64,
    /// Seconds to wait for the VM's QMP socket and its disks.
    #[arg(long, default_value_t = 600, requires = "live")]
    pub vm_timeout: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs `shear restore … --live`.
pub(super) fn run(cli: &Cli, a: &RestoreArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let l = &a.live;
    if a.json {
        bail!("--json is not available with --live yet: its state is the record in the state directory (docs/formats.md §9c)");
    }
    if a.force {
        bail!("--live never replaces a file: --force does not apply (move the old images away)");
    }
    let cfg = Config::load()?;
    let state_dir = l
        .state_dir
        .clone()
        .or_else(|| cfg.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(crate::daemon::config::DEFAULT_STATE_DIR));
    // One device per disk (`--target-device`): the record is keyed by the
    // first device (`--resume --target FIRST_DEVICE` finds it too).
    let map: Vec<(String, PathBuf)> = super::repo_cmds::device_map(&a.target_devices)?
        .into_iter()
        .map(|(d, p)| {
            std::path::absolute(&p)
                .map(|p| (d, p))
                .with_context(|| format!("resolving {}", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let Some(target) = a
        .target
        .as_deref()
        .or(map.first().map(|(_, p)| p.as_path()))
    else {
        bail!("--live needs --target or --target-device");
    };
    let target =
        std::path::absolute(target).with_context(|| format!("resolving {}", target.display()))?;
    let rec_path = record_path(&state_dir, &target);
    let _lock = lock(&rec_path)?;
    let existing = LiveRecord::load(&rec_path)?;
    let mut server: Option<Child> = None;
    let mut rec = if l.resume {
        let Some(mut rec) = existing else {
            bail!(
                "no live restore of {} is recorded in {}",
                target.display(),
                state_dir.display()
            );
        };
        let asked = a.backup.trim_end_matches("/latest");
        if !rec.backup.starts_with(asked) {
            bail!(
                "the live restore of {} is of backup {}, not {}",
                target.display(),
                rec.backup,
                a.backup
            );
        }
        if !map.is_empty() {
            let recorded: Vec<(String, PathBuf)> = rec
                .disks
                .iter()
                .filter_map(|d| d.raw_target.clone().map(|t| (d.name.clone(), t)))
                .collect();
            let mut given = map.clone();
            given.sort();
            let mut want = recorded.clone();
            want.sort();
            if given != want || recorded.len() != rec.disks.len() {
                bail!(
                    "the live restore recorded for {} maps {}: give the same --target-device list (or --target {})",
                    target.display(),
                    recorded
                        .iter()
                        .map(|(d, t)| format!("{d}={}", t.display()))
                        .collect::<Vec<_>>()
                        .join(" "),
                    target.display()
                );
            }
        }
        if rec.phase == Phase::Complete {
            out!(
                "live restore of {} into {} is already complete",
                rec.backup,
                target.display()
            );
            return Ok(());
        }
        if l.qmp.is_some() {
            rec.qmp.clone_from(&l.qmp);
        }
        rec.detail = "resumed".into();
        rec.save(&rec_path)?;
        out!(
            "live-restore: resuming {} into {} (phase {:?})",
            rec.backup,
            target.display(),
            rec.phase
        );
        rec
    } else {
        if let Some(r) = existing {
            if r.phase != Phase::Complete {
                bail!(
                    "a live restore of {} into {} is not finished ({}): finish it with `shear restore {} --live --resume --target {}`",
                    r.backup,
                    target.display(),
                    rec_path.display(),
                    r.backup,
                    target.display()
                );
            }
        }
        let (rec, child) = prepare(cli, a, &state_dir, &target, &map, &rec_path)?;
        server = Some(child);
        rec
    };
    if rec.qmp.is_none() {
        out!(
            "live-restore: serving on {}; start the VM, then `shear restore {} --live --resume --target {} --qmp SOCKET` copies the data",
            rec.socket.display(),
            rec.backup,
            target.display()
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut sup = Supervisor {
        rec: &mut rec,
        path: &rec_path,
        server: server.take(),
        vm_timeout: Duration::from_secs(l.vm_timeout),
        started,
        restarted: false,
        refused: None,
        sent_cont: false,
    };
    rt.block_on(sup.run())
}

/// Takes `<key>.lock` beside the record (flock, held until the command
/// ends): one shear supervises a live restore at a time.
fn lock(rec_path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = rec_path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let path = rec_path.with_extension("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        anyhow::anyhow!(
            "another shear supervises this live restore ({} is locked: {e})",
            path.display()
        )
    })?;
    Ok(f)
}

/// Makes the images, starts the server, records it all; prints how to
/// start the VM. On error, what it made is taken back.
fn prepare(
    cli: &Cli,
    a: &RestoreArgs,
    state_dir: &Path,
    target: &Path,
    map: &[(String, PathBuf)],
    rec_path: &Path,
) -> anyhow::Result<(LiveRecord, Child)> {
    // Raw: the VM starts on a qcow2 overlay per disk (the backup as its
    // backing file) and QEMU mirrors it into `<disk>.raw`, then switches
    // the device over to it.
    use std::os::unix::fs::FileTypeExt;
    // A block device as --target (as for a plain restore: one disk): it is
    // the raw target itself, never created, truncated or preallocated; the
    // overlay the VM starts on lives in the state directory.
    // With `--target-device`, every disk restored goes onto its own device.
    let mapped = !map.is_empty();
    let device_target =
        !mapped && std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let device = device_target || mapped;
    if device && matches!(a.format, Some(FormatArg::Qcow2)) {
        bail!(
            "{} is a block device: it receives the disk as raw data (leave out --format qcow2)",
            target.display()
        );
    }
    let raw = device || matches!(a.format, Some(FormatArg::Raw));
    if cli.keyfile.is_some()
        && cli.passphrase_file.is_none()
        && std::env::var_os("SHEAR_KEY_PASSPHRASE").is_none()
    {
        bail!("a live restore of an encrypted repository needs --passphrase-file or SHEAR_KEY_PASSPHRASE: the serving process cannot ask on a terminal");
    }
    let l = &a.live;
    let repo = open(cli)?;
    let id = resolve_backup(&repo, &a.backup)?;
    let reader = repo.open_backup(&id)?;
    let all: Vec<(String, u64)> = reader
        .manifest()
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.virtual_size))
        .collect();
    let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    super::repo_cmds::check_disk_names(&id, &a.disks, &names)?;
    let wanted: Vec<String> = if mapped {
        map.iter().map(|(d, _)| d.clone()).collect()
    } else {
        a.disks.clone()
    };
    if mapped {
        super::repo_cmds::check_disk_names(&id, &wanted, &names)?;
        crate::repo::target::check_device_map(map)?;
    }
    let disks: Vec<LiveDisk> = all
        .into_iter()
        .filter(|(n, _)| wanted.is_empty() || wanted.contains(n))
        .map(|(name, size)| LiveDisk {
            image: if device {
                crate::serve::live::device_overlay_path(state_dir, target, &name)
            } else if raw {
                target.join(format!("{name}.live.qcow2"))
            } else {
                target.join(format!("{name}.qcow2"))
            },
            raw_target: if mapped {
                map.iter().find(|(d, _)| *d == name).map(|(_, p)| p.clone())
            } else if device {
                Some(target.to_owned())
            } else {
                raw.then(|| target.join(format!("{name}.raw")))
            },
            mirror_ready: false,
            name,
            size,
            done: false,
        })
        .collect();
    if mapped {
        // Before anything is written: every device free and large enough.
        for d in &disks {
            if let Some(t) = &d.raw_target {
                crate::repo::target::open_block_device(t, d.size)
                    .with_context(|| format!("live restore of {} onto {}", d.name, t.display()))?;
            }
        }
    } else if device {
        let [d] = disks.as_slice() else {
            bail!(
                "{} is a block device: live-restore one disk onto it (--disk NAME; the backup has {})",
                target.display(),
                names.join(", ")
            );
        };
        // Before anything is written: the device must be free (not open,
        // mounted or claimed: O_EXCL) and hold the whole disk.
        crate::repo::target::open_block_device(target, d.size)
            .with_context(|| format!("live restore of {} onto {}", d.name, target.display()))?;
    } else {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating restore target {}", target.display()))?;
    }
    for p in disks
        .iter()
        .flat_map(|d| std::iter::once(&d.image).chain(d.raw_target.as_ref().filter(|_| !device)))
    {
        if std::fs::symlink_metadata(p).is_ok() {
            bail!(
                "{} exists: a live restore never replaces a file (move it away or pick another --target)",
                p.display()
            );
        }
    }
    let mut rec = LiveRecord {
        version: RECORD_VERSION,
        backup: id.to_string(),
        repo: cli.repo.clone(),
        keyfile: cli.keyfile.clone(),
        passphrase_file: cli.passphrase_file.clone(),
        target: target.to_owned(),
        socket: socket_path(state_dir, target),
        qmp: l.qmp.clone(),
        reconnect_delay_secs: l.reconnect_delay,
        speed: l.bwlimit.saturating_mul(1024),
        disks,
        phase: Phase::Serving,
        server_pid: None,
        server_restarts: 0,
        started_ms: now_ms(),
        vm_attached_ms: None,
        complete_ms: None,
        detail: "preparing".into(),
    };
    rec.save(rec_path)?;
    let mut made: Vec<PathBuf> = Vec::new();
    let mut child: Option<Child> = None;
    let res = (|| -> anyhow::Result<()> {
        for d in &rec.disks {
            create_image(d, &rec)?;
            made.push(d.image.clone());
            if let Some(t) = d.raw_target.as_ref().filter(|_| !device) {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(t)
                    .and_then(|f| f.set_len(d.size))
                    .with_context(|| format!("creating {}", t.display()))?;
                made.push(t.clone());
            }
        }
        let c = spawn_server(&rec)?;
        rec.server_pid = Some(c.id());
        child = Some(c);
        rec.detail = "serving".into();
        rec.save(rec_path)?;
        if let Some(c) = child.as_mut() {
            wait_ready(&rec.socket, c)?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &made {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&rec.socket);
        let _ = std::fs::remove_file(rec_path);
        return Err(e);
    }
    let child = child.context("the server was not started")?;
    let vm_config = &reader.manifest().vm_config;
    let restored: Vec<super::boot_cmdline::RestoredDisk<'_>> = rec
        .disks
        .iter()
        .map(|d| super::boot_cmdline::RestoredDisk {
            name: &d.name,
            path: &d.image,
            format: "qcow2",
        })
        .collect();
    let boot = live_argv(
        super::boot_cmdline::qemu_argv(vm_config, &restored),
        rec.qmp.as_deref(),
    )
    .iter()
    .map(|w| super::boot_cmdline::sh_quote(w))
    .collect::<Vec<_>>()
    .join(" ");
    // The definition is for later boots: the final images. A block device
    // has no "beside" (`show --config` prints it).
    let written = if device {
        Vec::new()
    } else {
        super::vm_definition::write_beside(
            vm_config,
            target,
            &rec.disks
                .iter()
                .map(|d| match &d.raw_target {
                    Some(t) => (d.name.clone(), t.clone(), "raw"),
                    None => (d.name.clone(), d.image.clone(), "qcow2"),
                })
                .collect::<Vec<_>>(),
        )?
    };
    for d in &rec.disks {
        out!(
            "live-restore: {} → {} (backed by nbd+unix:///{}?socket={})",
            d.name,
            d.image.display(),
            d.name,
            rec.socket.display()
        );
        if let Some(t) = &d.raw_target {
            out!(
                "live-restore: {} is mirrored into {} while the VM runs, which then runs on it (boot it from there afterwards)",
                d.name,
                t.display()
            );
        }
    }
    for f in &written {
        out!("wrote {}", f.display());
    }
    out!("boot the restored disks with:\n  {boot}");
    out!(
        "live-restore: ready after {} ms; start the VM on the images now (record {})",
        now_ms().saturating_sub(rec.started_ms),
        rec_path.display()
    );
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    Ok((rec, child))
}

/// The restore's QEMU command line made fit for a live restore: each disk
/// device pauses the guest on an I/O error (`rerror=stop,werror=stop`: a
/// lost server stops the VM with a clear status instead of failing guest
/// reads; shear continues it once the server is back), and the QMP socket
/// shear waits for.
fn live_argv(mut argv: Vec<String>, qmp: Option<&Path>) -> Vec<String> {
    let mut after_device = false;
    for a in &mut argv {
        if after_device
            && ["virtio-blk-pci,", "scsi-hd,", "ide-hd,"]
                .iter()
                .any(|d| a.starts_with(d))
        {
            a.push_str(",rerror=stop,werror=stop");
        }
        after_device = a == "-device";
    }
    if let Some(q) = qmp {
        argv.push("-qmp".into());
        argv.push(format!("unix:{},server=on,wait=off", q.display()));
    }
    argv
}

fn create_image(d: &LiveDisk, rec: &LiveRecord) -> anyhow::Result<()> {
    let backing = backing_spec(&rec.socket, &d.name, rec.reconnect_delay_secs);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(&backing)
        .arg(&d.image)
        .arg(d.size.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img (package qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img create {} failed ({}): {}",
            d.image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `shear serve` for the record's disks in its own process group
/// (a Ctrl-C or the end of this command leaves it running), logging to
/// `<socket>.log`.
fn spawn_server(rec: &LiveRecord) -> anyhow::Result<Child> {
    if std::fs::symlink_metadata(&rec.socket).is_ok() {
        if std::os::unix::net::UnixStream::connect(&rec.socket).is_ok() {
            bail!(
                "something already serves on {}: is another shear serving this restore?",
                rec.socket.display()
            );
        }
        // Our own socket, left by a killed server: nobody listens.
        std::fs::remove_file(&rec.socket)
            .with_context(|| format!("removing the stale socket {}", rec.socket.display()))?;
    }
    let mut c = super::detached_shear(
        &rec.repo,
        rec.keyfile.as_deref(),
        rec.passphrase_file.as_deref(),
        &rec.socket.with_extension("log"),
    )?;
    c.arg("serve")
        .arg(&rec.backup)
        .arg("--socket")
        .arg(&rec.socket)
        .args(["--cache-mib", "64"]);
    for d in &rec.disks {
        c.arg("--disk").arg(&d.name);
    }
    c.spawn().context("starting shear serve")
}

/// Waits until the socket accepts (60 s), or fails with the server's log.
fn wait_ready(socket: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(socket.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "shear serve exited ({st}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            );
        }
        if Instant::now() > deadline {
            bail!(
                "shear serve did not listen on {} within 60 s",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a live `shear serve` on `socket` (not a reused pid,
/// not a zombie).
fn is_our_server(pid: u32, socket: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    if matches!(state, None | Some("Z" | "X")) {
        return false;
    }
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    let sock = socket.as_os_str().as_encoded_bytes();
    args.contains(&b"serve".as_slice()) && args.contains(&sock)
}

/// Test-only (honoured only when [`crate::job::options::TEST_HOOKS`]):
/// with `SHEAR_TEST_LIVE_EXIT_AFTER=<step>` the supervising shear exits
/// (status 75, as if killed) right after `step`: `in-sync` (a mirror's
/// READY recorded, before the switch), so a death at that exact point can
/// be tested.
fn exit_if_failpoint(step: &str) {
    if crate::job::options::TEST_HOOKS
        && std::env::var("SHEAR_TEST_LIVE_EXIT_AFTER").is_ok_and(|v| v == step)
    {
        eprintln!("live-restore: exiting after step {step} (test failpoint)");
        std::process::exit(75);
    }
}

/// Watches the VM until every disk is copied, keeping the server up.
struct Supervisor<'a> {
    rec: &'a mut LiveRecord,
    path: &'a Path,
    /// The server when this process started it (to reap it).
    server: Option<Child>,
    vm_timeout: Duration,
    started: Instant,
    /// This process found the server gone and started it again: a guest
    /// paused on an I/O error meanwhile was paused by that loss.
    restarted: bool,
    /// A state shear must not go on from (said, and the command fails).
    refused: Option<String>,
    /// This process continued the VM (`cont`), which also clears the
    /// io-status of every paused block job: see [`after_cont`].
    sent_cont: bool,
}

/// How long QEMU may be unreachable, once seen, before shear gives up
/// supervising (the server keeps serving).
const QEMU_GONE_AFTER: Duration = Duration::from_secs(30);
/// How long every look at a reachable VM may fail (a command QEMU
/// refuses, such as opening a raw target that no longer fits) before shear
/// gives up supervising with that error, instead of retrying it forever
/// (the server keeps serving: the VM still needs it).
const POLL_FAILING_MAX: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(300);
/// Between two `block-job-resume`s of one job (QEMU's NBD client
/// reconnects in the background with a growing backoff).
const RESUME_EVERY: Duration = Duration::from_secs(2);
/// Between two offline looks at the images while no VM answers.
const OFFLINE_EVERY: Duration = Duration::from_secs(5);

/// Whether `image`'s header names no backing file (`qemu-img info -U`);
/// `None` when it cannot be read.
fn image_has_backing(image: &Path) -> Option<bool> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v.get("backing-filename").is_some())
}

/// Whether no process holds `image`'s lock (`qemu-img info` without
/// `-U` opens it).
fn image_unlocked(image: &Path) -> bool {
    Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What QEMU shows of a disk mirrored into a raw target.
struct MirrorSeen<'a> {
    seen: &'a crate::serve::live::Seen,
    job: JobSeen,
    /// The mirror job is READY (source and target in sync).
    ready: bool,
    /// A device runs on the raw target's node (switched over).
    on_raw: bool,
    /// The server is up.
    up: bool,
}

impl Supervisor<'_> {
    fn save(&mut self, detail: &str) -> anyhow::Result<()> {
        detail.clone_into(&mut self.rec.detail);
        self.rec.save(self.path)?;
        Ok(())
    }

    fn server_up(&mut self) -> bool {
        if let Some(c) = self.server.as_mut() {
            if matches!(c.try_wait(), Ok(Some(_))) {
                self.server = None;
                return false;
            }
        }
        self.rec
            .server_pid
            .is_some_and(|p| is_our_server(p, &self.rec.socket))
    }

    /// Restarts the server (it died): the NBD clients in QEMU reconnect.
    fn restart_server(&mut self) -> anyhow::Result<()> {
        let mut c = spawn_server(self.rec)?;
        self.rec.server_pid = Some(c.id());
        self.rec.server_restarts += 1;
        self.restarted = true;
        self.save("the server was gone: restarted")?;
        wait_ready(&self.rec.socket, &mut c)?;
        eprintln!(
            "live-restore: the server was gone; restarted (pid {})",
            c.id()
        );
        self.server = Some(c);
        Ok(())
    }

    fn stop_server(&mut self) {
        let Some(pid) = self.rec.server_pid else {
            return;
        };
        // SIGTERM, then SIGKILL if it is still there after 10 s.
        for (sig, wait) in [
            (rustix::process::Signal::TERM, Duration::from_secs(10)),
            (rustix::process::Signal::KILL, Duration::from_secs(5)),
        ] {
            if !is_our_server(pid, &self.rec.socket) {
                break;
            }
            if let Some(p) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
                let _ = rustix::process::kill_process(p, sig);
            }
            let deadline = Instant::now() + wait;
            while is_our_server(pid, &self.rec.socket) && Instant::now() < deadline {
                if let Some(c) = self.server.as_mut() {
                    let _ = c.try_wait();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut c) = self.server.take() {
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.rec.socket);
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let qmp_path = self.rec.qmp.clone().context("no QMP socket")?;
        let mut last_seen: Option<Instant> = None;
        let mut last_resume: Option<Instant> = None;
        let mut last_cont: Option<Instant> = None;
        let mut last_offline: Option<Instant> = None;
        let waiting_since = Instant::now();
        let mut failing_since: Option<Instant> = None;
        loop {
            let all_done = self.rec.disks.iter().all(|d| d.done);
            if !all_done && !self.server_up() {
                if let Err(e) = self.restart_server() {
                    eprintln!("live-restore: restarting the server failed: {e:#}");
                    let _ = self.save(&format!("restarting the server failed: {e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let conn = qmp::Qmp::connect(&qmp_path, Duration::from_secs(5)).await;
            let q = match conn {
                Ok((q, _events)) => q,
                Err(e) => {
                    // No VM: an image whose header lost its backing file
                    // was copied to the end before QEMU went away.
                    if last_offline.is_none_or(|t| t.elapsed() > OFFLINE_EVERY) {
                        last_offline = Some(Instant::now());
                        if self.copied_offline() {
                            return self.finish();
                        }
                    }
                    let gone = match last_seen {
                        Some(t) => t.elapsed() > QEMU_GONE_AFTER,
                        None => waiting_since.elapsed() > self.vm_timeout,
                    };
                    if gone {
                        let why = if last_seen.is_some() {
                            "QEMU went away (or its monitor is unreachable)"
                        } else {
                            "no VM answered on the QMP socket"
                        };
                        self.save(&format!("{why}: {e}"))?;
                        bail!(
                            "{why} ({}); the images keep every write and still name the backup as their backing file; the server keeps serving on {}. Run `shear restore {} --live --resume --target {} --qmp SOCKET` (it serves again if needed), then start the VM on the images",
                            qmp_path.display(),
                            self.rec.socket.display(),
                            self.rec.backup,
                            self.rec.target.display()
                        );
                    }
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            last_seen = Some(Instant::now());
            let step = self.poll(&q, &mut last_resume, &mut last_cont).await;
            q.shutdown();
            if let Some(why) = self.refused.take() {
                self.save(&why)?;
                bail!("{why}");
            }
            match step {
                Ok(true) => return self.finish(),
                Ok(false) => failing_since = None,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "live-restore poll");
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > POLL_FAILING_MAX {
                        let why = format!(
                            "the live restore cannot go on: {e:#} (failing for {} s)",
                            since.elapsed().as_secs()
                        );
                        self.save(&why)?;
                        bail!(
                            "{why}; the VM keeps running on the images, the server keeps serving on {}: fix the cause, then `shear restore {} --live --resume --target {}`",
                            self.rec.socket.display(),
                            self.rec.backup,
                            self.rec.target.display()
                        );
                    }
                }
            }
            if self.rec.vm_attached_ms.is_none() && waiting_since.elapsed() > self.vm_timeout {
                self.save("the VM does not use the images")?;
                bail!(
                    "the VM on {} has not opened the images ({}) within {} s",
                    qmp_path.display(),
                    self.rec
                        .disks
                        .iter()
                        .map(|d| d.image.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.vm_timeout.as_secs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// With no VM to ask: marks done each image whose header has no
    /// backing file any more; true when all are.
    fn copied_offline(&mut self) -> bool {
        let mut changed = false;
        for d in self.rec.disks.iter_mut().filter(|d| !d.done) {
            let copied = if d.raw_target.is_some() {
                // In sync when the VM stopped, and no QEMU holds the
                // overlay any more (its lock is free).
                d.mirror_ready && image_unlocked(&d.image)
            } else {
                image_has_backing(&d.image) == Some(false)
            };
            if copied {
                d.done = true;
                changed = true;
            }
        }
        if changed {
            let _ = self.save("copied (seen in the image headers; the VM is gone)");
        }
        self.rec.disks.iter().all(|d| d.done)
    }

    /// One look at the VM; `Ok(true)` once every disk is copied.
    async fn poll(
        &mut self,
        q: &qmp::Qmp,
        last_resume: &mut Option<Instant>,
        last_cont: &mut Option<Instant>,
    ) -> anyhow::Result<bool> {
        let nodes: Value = q
            .execute_value("query-named-block-nodes", json!({"flat": true}))
            .await?;
        let jobs: Value = q.execute_value("query-block-jobs", json!({})).await?;
        let blocks: Value = q.execute_value("query-block", json!({})).await?;
        let up = self.server_up();
        let mut changed = false;
        let mut attached = true;
        for i in 0..self.rec.disks.len() {
            if self.rec.disks[i].done {
                continue;
            }
            let job_id = format!("shear-live-{}", self.rec.disks[i].name);
            let seen = seen_in(&nodes, &self.rec.disks[i].image);
            let job_v = jobs
                .as_array()
                .into_iter()
                .flatten()
                .find(|j| j["device"] == job_id.as_str());
            let job = after_cont(job_v.map_or(JobSeen::None, job_seen), self.sent_cont);
            if self.rec.disks[i].raw_target.is_some() {
                let on_raw = device_on(&blocks, &self.rec.disks[i].raw_node());
                if seen == crate::serve::live::Seen::Absent && !on_raw {
                    attached = false;
                }
                let mirror = MirrorSeen {
                    seen: &seen,
                    job,
                    ready: job_v.is_some_and(|j| j["status"] == "ready"),
                    on_raw,
                    up,
                };
                changed |= self
                    .poll_mirror(q, i, &nodes, &mirror, &job_id, last_resume)
                    .await?;
                continue;
            }
            if seen == crate::serve::live::Seen::Absent {
                attached = false;
            }
            match decide(&seen, job, up) {
                Action::Wait => {}
                Action::Done => {
                    self.rec.disks[i].done = true;
                    eprintln!(
                        "live-restore: {} copied; it no longer depends on the backup",
                        self.rec.disks[i].name
                    );
                    changed = true;
                }
                Action::Start(node) => {
                    let mut args = json!({"job-id": job_id, "device": node, "on-error": "stop"});
                    if self.rec.speed > 0 {
                        args["speed"] = json!(self.rec.speed);
                    }
                    q.execute_value("block-stream", args)
                        .await
                        .with_context(|| format!("block-stream on {node}"))?;
                    eprintln!(
                        "live-restore: copying {} (block-stream {job_id})",
                        self.rec.disks[i].name
                    );
                    self.rec.phase = Phase::Streaming;
                    changed = true;
                }
                Action::Resume => {
                    if last_resume.is_none_or(|t| t.elapsed() > RESUME_EVERY) {
                        *last_resume = Some(Instant::now());
                        q.execute_value("block-job-resume", json!({"device": job_id}))
                            .await
                            .with_context(|| format!("block-job-resume {job_id}"))?;
                        eprintln!("live-restore: resumed {job_id} after a read error");
                    }
                }
            }
        }
        if attached && self.rec.vm_attached_ms.is_none() {
            self.rec.vm_attached_ms = Some(now_ms());
            eprintln!(
                "live-restore: the VM runs on the images ({} ms after the start of this command)",
                self.started.elapsed().as_millis()
            );
            changed = true;
        }
        // A guest paused on a read error (rerror=stop) while the server
        // was gone goes on once it is back; any other pause is left alone.
        if up && self.restarted {
            let status: Value = q.execute_value("query-status", json!({})).await?;
            if status["status"] == "io-error"
                && last_cont.is_none_or(|t| t.elapsed() > RESUME_EVERY)
            {
                *last_cont = Some(Instant::now());
                self.sent_cont = true;
                q.execute_value("cont", json!({})).await?;
                eprintln!("live-restore: the VM had paused on an I/O error; continued");
            }
        }
        let done = self.rec.disks.iter().all(|d| d.done);
        if done && references_socket(&nodes, &self.rec.socket) {
            // The images are copied but a node still reads the server (the
            // VM was started with its own NBD node): not independent yet.
            self.save("copied, but a node of the VM still uses the server")?;
            return Ok(false);
        }
        if changed {
            let detail = if done { "copied" } else { "copying" };
            self.save(detail)?;
        }
        Ok(done)
    }

    /// One look at a disk mirrored into a raw target; `Ok(true)` if the
    /// record changed.
    async fn poll_mirror(
        &mut self,
        q: &qmp::Qmp,
        i: usize,
        nodes: &Value,
        m: &MirrorSeen<'_>,
        job_id: &str,
        last_resume: &mut Option<Instant>,
    ) -> anyhow::Result<bool> {
        let d = self.rec.disks[i].clone();
        let Some(raw) = d.raw_target.as_ref() else {
            return Ok(false);
        };
        let raw_node = d.raw_node();
        if m.on_raw {
            // Switched over: drop the overlay's nodes (and with them the
            // NBD node of its backing). A node QEMU made itself (`-drive`)
            // went with the switch.
            for node in nodes_of(nodes, &d.image) {
                if let Err(e) = q
                    .execute_value("blockdev-del", json!({"node-name": node}))
                    .await
                {
                    tracing::warn!(node, error = %e, "blockdev-del of the live-restore overlay");
                }
            }
            self.rec.disks[i].done = true;
            self.rec.disks[i].mirror_ready = true;
            eprintln!(
                "live-restore: {} runs on {}; it no longer depends on the backup",
                d.name,
                raw.display()
            );
            return Ok(true);
        }
        if m.ready {
            if !d.mirror_ready {
                // Recorded before the switch: from here the raw target is
                // the disk's data if anything dies.
                self.rec.disks[i].mirror_ready = true;
                self.save(&format!("mirror of {} in sync", d.name))?;
                exit_if_failpoint("in-sync");
            }
            q.execute_value("block-job-complete", json!({"device": job_id}))
                .await
                .with_context(|| format!("block-job-complete {job_id}"))?;
            eprintln!(
                "live-restore: {} copied; switching the VM over to {}",
                d.name,
                raw.display()
            );
            return Ok(false);
        }
        match (m.seen, m.job) {
            (crate::serve::live::Seen::Backed(node), JobSeen::None) if m.up => {
                if d.mirror_ready {
                    self.refused = Some(format!(
                        "the VM runs on {} again, but {} is newer (its mirror was in sync when the VM stopped): stop the VM and start it on {}",
                        d.image.display(),
                        raw.display(),
                        raw.display()
                    ));
                    return Ok(false);
                }
                if nodes_of(nodes, raw).is_empty() {
                    let is_device = std::fs::metadata(raw).is_ok_and(|m| {
                        std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())
                    });
                    if is_device {
                        // Again now: the device may have been taken (opened,
                        // mounted, shrunk) since the restore was prepared.
                        if let Err(e) = crate::repo::target::open_block_device(raw, d.size) {
                            self.refused = Some(format!(
                                "not mirroring {} into {}: {}",
                                d.name,
                                raw.display(),
                                crate::chain(&e)
                            ));
                            return Ok(false);
                        }
                    }
                    let driver = if is_device { "host_device" } else { "file" };
                    // `size`: a device larger than the disk is used up to
                    // the disk's size (a mirror needs equal sizes).
                    q.execute_value(
                        "blockdev-add",
                        json!({"driver": "raw", "node-name": raw_node, "discard": "unmap",
                               "size": d.size,
                               "file": {"driver": driver, "filename": raw}}),
                    )
                    .await
                    .with_context(|| format!("opening {} in the VM", raw.display()))?;
                }
                let mut args = json!({"job-id": job_id, "device": node, "target": raw_node,
                    "sync": "full", "copy-mode": "write-blocking",
                    "on-source-error": "stop", "on-target-error": "stop"});
                if self.rec.speed > 0 {
                    args["speed"] = json!(self.rec.speed);
                }
                q.execute_value("blockdev-mirror", args)
                    .await
                    .with_context(|| format!("blockdev-mirror {node} → {}", raw.display()))?;
                eprintln!(
                    "live-restore: copying {} into {} (blockdev-mirror {job_id})",
                    d.name,
                    raw.display()
                );
                self.rec.phase = Phase::Streaming;
                Ok(true)
            }
            (crate::serve::live::Seen::Backed(_), JobSeen::PausedOnError) if m.up => {
                if last_resume.is_none_or(|t| t.elapsed() > RESUME_EVERY) {
                    *last_resume = Some(Instant::now());
                    q.execute_value("block-job-resume", json!({"device": job_id}))
                        .await
                        .with_context(|| format!("block-job-resume {job_id}"))?;
                    eprintln!("live-restore: resumed {job_id} after a read error");
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.stop_server();
        // The overlays of raw targets: their data is in the targets.
        for d in &self.rec.disks {
            if d.raw_target.is_some() {
                let _ = std::fs::remove_file(&d.image);
            }
        }
        self.rec.phase = Phase::Complete;
        self.rec.server_pid = None;
        self.rec.complete_ms = Some(now_ms());
        self.save("complete: the VM no longer depends on the backup")?;
        let total = self
            .rec
            .complete_ms
            .unwrap_or(0)
            .saturating_sub(self.rec.started_ms);
        let attached = self
            .rec
            .vm_attached_ms
            .map(|t| t.saturating_sub(self.rec.started_ms));
        out!(
            "live-restore: complete: {} independent of the backup {} ms after the restore started (VM on the images after {}; {} server restart(s))",
            self.rec.target.display(),
            total,
            attached.map_or("?".to_string(), |t| format!("{t} ms")),
            self.rec.server_restarts
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_command_line_stops_on_io_errors_and_has_the_qmp_socket() {
        let argv: Vec<String> = [
            "qemu-system-x86_64",
            "-device",
            "virtio-scsi-pci,id=restored-scsi",
            "-device",
            "scsi-hd,id=scsi0,drive=drive-scsi0,bus=restored-scsi.0",
            "-device",
            "virtio-blk-pci,id=virtio1,drive=drive-virtio1",
            "-device",
            "nvme,id=n,drive=drive-n,serial=n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = live_argv(argv, Some(Path::new("/run/r.qmp")));
        assert_eq!(out[2], "virtio-scsi-pci,id=restored-scsi");
        assert!(out[4].ends_with(",rerror=stop,werror=stop"), "{}", out[4]);
        assert!(out[6].ends_with(",rerror=stop,werror=stop"), "{}", out[6]);
        // nvme has no rerror/werror properties.
        assert_eq!(out[8], "nvme,id=n,drive=drive-n,serial=n");
        assert_eq!(out[9..], ["-qmp", "unix:/run/r.qmp,server=on,wait=off"]);
        assert_eq!(live_argv(vec!["q".into()], None), ["q"]);
    }
}

//! `shear verify --boot` (restore tests that boot the backup) and
//! `shear files` (file-level restore through a restore VM and qemu-ga).
//! The VM itself is [`crate::restorevm`].

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use guest_agent::{GuestAgent, GuestExec};

use super::repo_cmds::{open, resolve_backup};
use super::Cli;
use crate::out;
use crate::repo::restore_test::{
    bounded_text, ProbeResult, RestoreTest, SeenFilesystem, MAX_PROBE_OUTPUT, RESTORE_TEST_VERSION,
};
use crate::restorevm::extract::{components, join, ExtractRoot};
use crate::restorevm::{printable, recorded_kernel_boot, Boot, RestoreVm, VmSpec};

/// VM options shared by `verify --boot` and `files`.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Accelerator: `auto` (kvm, else tcg; a KVM guest that shows no
    /// progress within --kvm-stall seconds is restarted under tcg), `kvm`
    /// (fails if KVM cannot run the guest) or `tcg`.
    #[arg(long, global = true, env = "SHEAR_ACCEL", default_value = "auto")]
    pub accel: String,
    /// With `--accel auto`: seconds a KVM guest may show no sign of booting
    /// (no serial console output, its virtio-serial device not started, no
    /// disk reads in the last 10 s) before it is killed and restarted
    /// under TCG; 0 never falls back.
    #[arg(long, global = true, default_value_t = 30)]
    pub kvm_stall: u64,
    /// Guest memory, MiB.
    #[arg(long, global = true, default_value_t = 512)]
    pub memory: u32,
    /// vCPUs.
    #[arg(long, global = true, default_value_t = 1)]
    pub cpus: u32,
    /// Seconds until the guest agent must answer.
    #[arg(long, global = true, default_value_t = 120)]
    pub timeout: u64,
    /// The QEMU binary.
    #[arg(
        long,
        global = true,
        env = "SHEAR_QEMU",
        default_value = "qemu-system-x86_64"
    )]
    pub qemu: PathBuf,
}

impl VmArgs {
    fn accel(&self) -> anyhow::Result<Vec<String>> {
        Ok(match self.accel.as_str() {
            "auto" => vec!["kvm".into(), "tcg".into()],
            "kvm" | "tcg" => vec![self.accel.clone()],
            other => bail!("--accel {other}: use auto, kvm or tcg"),
        })
    }

    /// The KVM progress deadline of `--accel auto`.
    fn kvm_stall(&self) -> Option<Duration> {
        (self.kvm_stall > 0).then(|| Duration::from_secs(self.kvm_stall))
    }
}

/// `verify --boot` options (flattened into `verify`).
#[derive(Debug, Clone, Args)]
pub struct BootArgs {
    /// Boot the backup in an isolated VM and record a restore test.
    #[arg(long)]
    pub boot: bool,
    /// Command run in the guest (`/bin/sh -c`) once it is up; a non-zero
    /// exit fails the test.
    #[arg(long, requires = "boot")]
    pub probe: Option<String>,
    /// Seconds the probe may run.
    #[arg(long, default_value_t = 60, requires = "boot")]
    pub probe_timeout: u64,
    /// Kernel to boot (default: the `-kernel` of the backup's recorded
    /// QEMU command line; without either, firmware boots the first disk).
    #[arg(long, requires = "boot")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (default: the recorded `-initrd`).
    #[arg(long, requires = "boot")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: the recorded `-append`).
    #[arg(long, requires = "boot")]
    pub append: Option<String>,
    /// Boot the first disk through the firmware even if a kernel was
    /// recorded.
    #[arg(long, requires = "boot", conflicts_with = "kernel")]
    pub boot_disk: bool,
    #[command(flatten)]
    pub vm: VmArgs,
}

fn boot_of(a: &BootArgs, vm_config: &serde_json::Value) -> anyhow::Result<Boot> {
    if a.boot_disk {
        return Ok(Boot::Disk);
    }
    let recorded = recorded_kernel_boot(vm_config);
    let boot = match (&a.kernel, recorded) {
        (Some(k), _) => Boot::Kernel {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
            append: a.append.clone().unwrap_or_default(),
        },
        (
            None,
            Some(Boot::Kernel {
                kernel,
                initrd,
                append,
            }),
        ) => Boot::Kernel {
            kernel,
            initrd: a.initrd.clone().or(initrd),
            append: a.append.clone().unwrap_or(append),
        },
        (None, _) => {
            if a.initrd.is_some() || a.append.is_some() {
                bail!("--initrd/--append need a kernel: give --kernel (the backup recorded none)");
            }
            Boot::Disk
        }
    };
    if let Boot::Kernel { kernel, initrd, .. } = &boot {
        for p in std::iter::once(kernel).chain(initrd) {
            if !p.is_file() {
                bail!(
                    "{} does not exist: the backup's recorded boot files are gone; give --kernel/--initrd (or --boot-disk)",
                    p.display()
                );
            }
        }
    }
    Ok(boot)
}

/// The run was stopped by a signal (not a result of the backup).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}; the restore VM was torn down")]
struct Interrupted(&'static str);

/// Runs `fut` until it ends or SIGINT/SIGTERM/SIGHUP arrives; then the
/// future is dropped and the caller's [`RestoreVm`] is torn down by its
/// `Drop` (a SIGKILL of shear cannot be caught: QEMU then stays).
async fn until_signal<T>(
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::select! {
        r = fut => r,
        _ = term.recv() => Err(Interrupted("SIGTERM").into()),
        _ = int.recv() => Err(Interrupted("SIGINT").into()),
        _ = hup.recv() => Err(Interrupted("SIGHUP").into()),
    }
}

fn now_str() -> String {
    crate::repo::names::format_time(time::OffsetDateTime::now_utc())
}

/// What one boot found.
#[derive(Default)]
struct Outcome {
    accel: Option<&'static str>,
    accel_fallback: Option<String>,
    ping_ms: Option<u64>,
    filesystems: Vec<SeenFilesystem>,
    probe: Option<ProbeResult>,
}

async fn boot_test(vm: &mut RestoreVm, a: &BootArgs, o: &mut Outcome) -> anyhow::Result<()> {
    let deadline = vm.started + Duration::from_secs(a.vm.timeout);
    let mut ga = vm.wait_agent(deadline).await?;
    o.ping_ms = Some(u64::try_from(vm.started.elapsed().as_millis()).unwrap_or(u64::MAX));
    o.accel = vm.accelerator().await;
    let fs = ga.get_fsinfo().await.context("guest-get-fsinfo failed")?;
    o.filesystems = fs
        .iter()
        .take(256)
        .map(|f| SeenFilesystem {
            name: printable(&f.name),
            mountpoint: printable(&f.mountpoint),
            fs_type: printable(&f.fs_type),
        })
        .collect();
    if let Some(cmd) = &a.probe {
        let st = ga
            .exec_wait(
                &GuestExec::new("/bin/sh", ["-c", cmd.as_str()]),
                Duration::from_secs(a.probe_timeout),
            )
            .await;
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                o.probe = Some(ProbeResult {
                    command: cmd.clone(),
                    exit_code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    output_bytes: 0,
                    truncated: false,
                });
                bail!("the probe did not complete: {}", crate::chain(&e));
            }
        };
        let (stdout, cut_o) = bounded_text(&st.stdout, MAX_PROBE_OUTPUT);
        let (stderr, cut_e) = bounded_text(&st.stderr, MAX_PROBE_OUTPUT);
        o.probe = Some(ProbeResult {
            command: cmd.clone(),
            exit_code: st.exit_code,
            stdout,
            stderr,
            output_bytes: (st.stdout.len() + st.stderr.len()) as u64,
            truncated: cut_o || cut_e || st.stdout_truncated || st.stderr_truncated,
        });
        if !st.success() {
            bail!(
                "the probe failed ({})",
                match (st.exit_code, st.signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => "no exit status".into(),
                }
            );
        }
    }
    // Filesystems on the backup's disks (vda, vdb, …: the only disks the
    // restore VM has). Booting into an empty or unreadable disk is no
    // restore.
    if !o.filesystems.iter().any(|f| f.name.starts_with("vd")) {
        bail!("the guest booted but mounted no filesystem from the backup's disks");
    }
    Ok(())
}

/// `shear verify --boot BACKUP`.
pub fn verify_boot(cli: &Cli, backup: &str, a: &BootArgs, json: bool) -> anyhow::Result<ExitCode> {
    let repo = open(cli)?;
    let id = resolve_backup(&repo, backup)?;
    let reader = Arc::new(repo.open_backup(&id)?);
    let m = reader.manifest().clone();
    let boot = boot_of(a, &m.vm_config)?;
    let spec = VmSpec {
        qemu: a.vm.qemu.clone(),
        accel: a.vm.accel()?,
        memory_mib: a.vm.memory.clamp(64, 16 << 10),
        cpus: a.vm.cpus.clamp(1, 16),
        boot: boot.clone(),
        disks: m.disks.iter().map(|d| d.name.clone()).collect(),
        writable: true,
        cache_bytes: 64 << 20,
    };
    let time = now_str();
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut o = Outcome::default();
    // The outer error (QEMU could not start, a signal) is not a result of
    // the backup: nothing is recorded.
    let result = rt.block_on(until_signal(async {
        let (mut vm, fallback) =
            crate::restorevm::accel::start(&reader, &spec, a.vm.kvm_stall()).await?;
        o.accel_fallback = fallback;
        let r = boot_test(&mut vm, a, &mut o).await;
        drop(vm);
        Ok(r)
    }))?;
    let record = RestoreTest {
        format: "shear-restore-test".into(),
        version: RESTORE_TEST_VERSION,
        state: if result.is_ok() { "ok" } else { "failed" }.into(),
        reason: match &result {
            Ok(()) => String::new(),
            Err(e) => {
                let (t, _) = bounded_text(format!("{e:#}").as_bytes(), 8 << 10);
                printable(&t)
            }
        },
        time,
        ping_ms: o.ping_ms,
        total_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        accel: o.accel.map_or_else(|| spec.accel.join(":"), str::to_owned),
        accel_fallback: o.accel_fallback,
        boot: boot.kind().into(),
        filesystems: o.filesystems,
        probe: o.probe,
        tool_version: crate::repo::tool_version(),
    };
    drop(reader);
    repo.put_restore_test(&id, &record)
        .context("recording the restore test")?;
    if json {
        out!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        out!("{}", restore_test_line(&id.to_string(), &record));
        for f in &record.filesystems {
            out!(
                "  filesystem {} on {} ({})",
                f.mountpoint,
                f.name,
                f.fs_type
            );
        }
        if let Some(p) = &record.probe {
            out!(
                "  probe {:?}: exit {}",
                p.command,
                p.exit_code.map_or("-".into(), |c| c.to_string())
            );
            for l in p.stdout.lines().take(20) {
                out!("    {}", printable(l));
            }
        }
    }
    Ok(if record.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_DAMAGE)
    })
}

/// One line summarising a restore test (for `verify --boot` and `show`).
pub fn restore_test_line(id: &str, r: &RestoreTest) -> String {
    let mut s = format!(
        "restore test of {id}: {} at {} (boot {}, {}{}, ",
        r.state,
        r.time,
        r.boot,
        r.accel,
        if r.accel_fallback.is_some() {
            " after KVM made no progress"
        } else {
            ""
        }
    );
    match r.ping_ms {
        Some(p) => s.push_str(&format!("guest agent answered after {p} ms")),
        None => s.push_str("guest agent never answered"),
    }
    s.push_str(&format!(", {} filesystem(s))", r.filesystems.len()));
    if !r.ok() {
        s.push_str(&format!(": {}", r.reason));
    }
    s
}

// ---------------------------------------------------------------- files

/// `shear files …`
#[derive(Debug, Args)]
pub struct FilesArgs {
    /// Backup id (or vm/<vmid> for the newest).
    pub backup: String,
    /// Disk of the backup.
    pub disk: String,
    /// What to do.
    #[command(subcommand)]
    pub op: FilesOp,
    /// Partition number (default: the whole disk, or its first partition
    /// when it has a partition table).
    #[arg(long, global = true)]
    pub partition: Option<u32>,
    /// Directory holding the restore VM (`vmlinuz`, `initrd.gz`, as
    /// vm-images/build-guest makes them).
    #[arg(
        long,
        global = true,
        env = "SHEAR_RESTORE_VM",
        default_value = "/usr/share/shear/restore-vm"
    )]
    pub restore_vm: PathBuf,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// `files` operations.
#[derive(Debug, Subcommand)]
pub enum FilesOp {
    /// List a directory.
    Ls {
        /// Path in the backed-up filesystem.
        #[arg(default_value = "/")]
        path: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a file's content to stdout.
    Cat {
        /// Path in the backed-up filesystem.
        path: String,
    },
    /// Copy a file or directory tree out into DIR.
    Extract {
        /// Path in the backed-up filesystem.
        path: String,
        /// Destination directory (created if missing).
        #[arg(long)]
        to: PathBuf,
    },
}

const MOUNT: &str = "/run/shear-files";

/// Mounts the disk (or partition) read-only at [`MOUNT`], `nodev` (a
/// device node in the backup cannot reach the restore VM's devices),
/// `nosuid`, `noexec`; a journal that needs recovery (crash-consistent
/// backup) is not replayed (`noload`).
const MOUNT_SCRIPT: &str = r#"
i=0; while [ ! -e /sys/block/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/block/vda ] || { echo "no disk in the restore VM" >&2; exit 3; }
dev=/dev/vda
if [ -n "$1" ]; then dev=/dev/vda$1; [ -e "$dev" ] || { echo "the disk has no partition $1" >&2; exit 3; }
elif [ -e /sys/block/vda/vda1 ]; then dev=/dev/vda1; fi
mkdir -p /run/shear-files
o=ro,nodev,nosuid,noexec
mount -o $o "$dev" /run/shear-files 2>/tmp/mount.err || mount -o $o,noload "$dev" /run/shear-files 2>>/tmp/mount.err || { cat /tmp/mount.err >&2; exit 4; }
"#;

/// One NUL-separated record per entry: `type|mode|size|mtime`, name,
/// symlink target.
const LS_SCRIPT: &str = r#"
cd -- "$1" || exit 3
for f in * .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  printf '%s\0%s\0' "$(stat -c '%F|%a|%s|%Y' -- "$f")" "$f"
  if [ -L "$f" ]; then printf '%s\0' "$(readlink -- "$f")"; else printf '\0'; fi
done
"#;

const WALK_SCRIPT: &str = r#"
cd -- "$1" || exit 3
find . -mindepth 1 -exec sh -c 'for f; do if [ -L "$f" ]; then printf "l\0%s\0%s\0" "$f" "$(readlink -- "$f")"; elif [ -d "$f" ]; then printf "d\0%s\0\0" "$f"; elif [ -f "$f" ]; then printf "f\0%s\0\0" "$f"; else printf "o\0%s\0\0" "$f"; fi; done' sh {} +
"#;

/// Kind of the path (`d`, `f`, `l`, `o`), its canonical path, and the
/// kind of what that names (`d`, `f`, `o`).
const KIND_SCRIPT: &str = r#"
p=$1
if [ -L "$p" ]; then printf 'l\0'; elif [ -d "$p" ]; then printf 'd\0'; elif [ -f "$p" ]; then printf 'f\0'; elif [ -e "$p" ]; then printf 'o\0'; else echo "no such file" >&2; exit 3; fi
r=$(readlink -f -- "$p")
printf '%s\0' "$r"
if [ -d "$r" ]; then printf 'd\0'; elif [ -f "$r" ]; then printf 'f\0'; else printf 'o\0'; fi
"#;

const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

async fn sh(ga: &mut GuestAgent, script: &str, args: &[&[u8]]) -> anyhow::Result<Vec<u8>> {
    let mut argv: Vec<String> = vec!["-c".into(), script.into(), "sh".into()];
    for a in args {
        argv.push(
            std::str::from_utf8(a)
                .map_err(|_| {
                    anyhow::anyhow!("a path that is not UTF-8 cannot be passed to the guest agent")
                })?
                .to_owned(),
        );
    }
    let st = ga
        .exec_wait(&GuestExec::new("/bin/sh", argv), EXEC_TIMEOUT)
        .await?;
    if st.stdout_truncated {
        bail!("the guest's output was cut by the guest agent (too many entries)");
    }
    if !st.success() {
        let (err, _) = bounded_text(&st.stderr, 4096);
        bail!(
            "{} (exit {})",
            printable(err.trim()),
            st.exit_code.map_or("-".into(), |c| c.to_string())
        );
    }
    Ok(st.stdout)
}

fn fields(out: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = out.split(|b| *b == 0).collect();
    if v.last().is_some_and(|l| l.is_empty()) {
        v.pop();
    }
    v
}

/// Shows a hostile name on one line: `\n`, control characters and `\`
/// escaped.
pub fn escape_name(name: &[u8]) -> String {
    let mut s = String::new();
    for c in String::from_utf8_lossy(name).chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if c.is_control() => s.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => s.push(c),
        }
    }
    s
}

fn guest_path(comps: &[OsString]) -> Vec<u8> {
    let mut p = MOUNT.as_bytes().to_vec();
    if !comps.is_empty() {
        p.push(b'/');
        p.extend_from_slice(&join(comps));
    }
    p
}

async fn read_file(ga: &mut GuestAgent, path: &[u8], sink: &mut dyn Write) -> anyhow::Result<u64> {
    let p = std::str::from_utf8(path).map_err(|_| anyhow::anyhow!("path is not UTF-8"))?;
    let h = ga.file_open(p, "r").await?;
    let mut total = 0u64;
    let r = async {
        loop {
            let chunk = ga.file_read(h, 1 << 20).await?;
            sink.write_all(&chunk.data)?;
            total += chunk.data.len() as u64;
            if chunk.eof || chunk.data.is_empty() {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    let _ = ga.file_close(h).await;
    r.map(|()| total)
}

async fn files_op(ga: &mut GuestAgent, a: &FilesArgs) -> anyhow::Result<()> {
    let part = a.partition.map(|p| p.to_string()).unwrap_or_default();
    sh(ga, MOUNT_SCRIPT, &[part.as_bytes()])
        .await
        .context("mounting the backed-up filesystem in the restore VM")?;
    match &a.op {
        FilesOp::Ls { path, json } => {
            let comps = components(path.as_bytes())?;
            let out = sh(ga, LS_SCRIPT, &[&guest_path(&comps)]).await?;
            let f = fields(&out);
            let mut entries = Vec::new();
            for rec in f.chunks(3) {
                let [meta, name, target] = rec else {
                    bail!("malformed listing from the guest");
                };
                let meta = String::from_utf8_lossy(meta);
                let m: Vec<&str> = meta.split('|').collect();
                let [kind, mode, size, mtime] = m[..] else {
                    bail!("malformed listing from the guest");
                };
                entries.push(serde_json::json!({
                    "name": String::from_utf8_lossy(name),
                    "name_hex": hex::encode(name),
                    "type": kind,
                    "mode": mode,
                    "size": size.parse::<u64>().ok(),
                    "mtime": mtime.parse::<i64>().ok(),
                    "target": (!target.is_empty()).then(|| String::from_utf8_lossy(target)),
                }));
                if !json {
                    let t = match kind {
                        "directory" => 'd',
                        "symbolic link" => 'l',
                        "regular file" | "regular empty file" => '-',
                        _ => '?',
                    };
                    let mut line = format!(
                        "{t} {:>4} {:>12} {}",
                        printable(mode),
                        printable(size),
                        escape_name(name)
                    );
                    if !target.is_empty() {
                        line.push_str(&format!(" -> {}", escape_name(target)));
                    }
                    out!("{line}");
                }
            }
            if *json {
                out!("{}", serde_json::to_string_pretty(&entries)?);
            }
        }
        FilesOp::Cat { path } => {
            let comps = components(path.as_bytes())?;
            let p = guest_path(&comps);
            let kind = sh(ga, KIND_SCRIPT, &[&p]).await?;
            let f = fields(&kind);
            let (Some(k), Some(real), Some(target_kind)) = (f.first(), f.get(1), f.get(2)) else {
                bail!("malformed reply from the guest");
            };
            // Symlinks are resolved inside the backed-up filesystem only:
            // one leading out of it (an absolute link would name the
            // restore VM's own files) is refused, as is anything but a
            // regular file (a FIFO or device would block or never end).
            let inside = real.starts_with(format!("{MOUNT}/").as_bytes());
            if !inside || !matches!(*k, b"f" | b"l") || *target_kind != b"f" {
                bail!(
                    "{}: not a regular file inside the backed-up filesystem",
                    escape_name(path.as_bytes())
                );
            }
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            read_file(ga, real, &mut lock).await?;
            lock.flush()?;
        }
        FilesOp::Extract { path, to } => {
            let comps = components(path.as_bytes())?;
            let p = guest_path(&comps);
            let kind = sh(ga, KIND_SCRIPT, &[&p]).await?;
            let f = fields(&kind);
            let root =
                ExtractRoot::open(to).with_context(|| format!("opening {}", to.display()))?;
            let (mut files, mut links, mut skipped) = (0u64, 0u64, Vec::new());
            let mut bytes = 0u64;
            match f.first().copied() {
                Some(b"f") => {
                    let name = comps.last().cloned().context("give a file path")?;
                    let mut file = root.create_file(&[name])?;
                    bytes += read_file(ga, &p, &mut file).await?;
                    files += 1;
                }
                Some(b"d") => {
                    let out = sh(ga, WALK_SCRIPT, &[&p]).await?;
                    let f = fields(&out);
                    for rec in f.chunks(3) {
                        let [kind, rel, target] = rec else {
                            bail!("malformed listing from the guest");
                        };
                        let rc = match components(rel) {
                            Ok(c) if !c.is_empty() => c,
                            _ => {
                                skipped.push(escape_name(rel));
                                continue;
                            }
                        };
                        match *kind {
                            b"d" => {
                                root.dir(&rc)?;
                            }
                            b"f" => {
                                let mut gp = p.clone();
                                gp.push(b'/');
                                gp.extend_from_slice(&join(&rc));
                                let mut file = root.create_file(&rc).with_context(|| {
                                    format!("creating {}", escape_name(&join(&rc)))
                                })?;
                                bytes += read_file(ga, &gp, &mut file).await?;
                                files += 1;
                            }
                            b"l" => {
                                if root.symlink(&rc, target)? {
                                    links += 1;
                                } else {
                                    skipped.push(format!(
                                        "{} -> {} (leads outside)",
                                        escape_name(rel),
                                        escape_name(target)
                                    ));
                                }
                            }
                            _ => skipped.push(format!("{} (special file)", escape_name(rel))),
                        }
                    }
                }
                _ => bail!(
                    "{}: not a file or directory (symlinks are extracted only inside a directory)",
                    escape_name(path.as_bytes())
                ),
            }
            for s in &skipped {
                eprintln!("skipped: {s}");
            }
            out!(
                "extracted {files} file(s) ({bytes} bytes), {links} symlink(s) into {}; {} skipped",
                to.display(),
                skipped.len()
            );
        }
    }
    Ok(())
}

/// `shear files BACKUP DISK …`
pub fn files(cli: &Cli, a: &FilesArgs) -> anyhow::Result<ExitCode> {
    let repo = open(cli)?;
    let id = resolve_backup(&repo, &a.backup)?;
    let reader = Arc::new(repo.open_backup(&id)?);
    if !reader.manifest().disks.iter().any(|d| d.name == a.disk) {
        bail!("backup {id} has no disk {}", a.disk);
    }
    let kernel = a.restore_vm.join("vmlinuz");
    let initrd = a.restore_vm.join("initrd.gz");
    if !kernel.is_file() || !initrd.is_file() {
        bail!(
            "no restore VM in {} (vmlinuz and initrd.gz, made by vm-images/build-guest): give --restore-vm",
            a.restore_vm.display()
        );
    }
    let spec = VmSpec {
        qemu: a.vm.qemu.clone(),
        accel: a.vm.accel()?,
        memory_mib: a.vm.memory.clamp(64, 16 << 10),
        cpus: a.vm.cpus.clamp(1, 16),
        boot: Boot::Kernel {
            kernel,
            initrd: Some(initrd),
            append: "console=ttyS0 panic=-1 quiet".into(),
        },
        disks: vec![a.disk.clone()],
        writable: false,
        cache_bytes: 64 << 20,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(until_signal(async {
        let (mut vm, _) = crate::restorevm::accel::start(&reader, &spec, a.vm.kvm_stall()).await?;
        let deadline = vm.started + Duration::from_secs(a.vm.timeout);
        let mut ga = vm
            .wait_agent(deadline)
            .await
            .context("the restore VM did not start")?;
        let r = files_op(&mut ga, a).await;
        drop(vm);
        r
    }));
    r.map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shown_on_one_line() {
        assert_eq!(escape_name(b"a\nb"), "a\\nb");
        assert_eq!(escape_name(b"a\\n"), "a\\\\n");
        assert_eq!(escape_name(b"\x1b[2J"), "\\x1b[2J");
    }

    #[test]
    fn guest_paths_stay_under_the_mount() {
        assert_eq!(guest_path(&components(b"/").unwrap()), b"/run/shear-files");
        assert_eq!(
            guest_path(&components(b"/etc//x").unwrap()),
            b"/run/shear-files/etc/x"
        );
        components(b"/../../etc").unwrap_err();
    }

    #[test]
    fn nul_fields_split() {
        assert_eq!(fields(b"a\0\0b\0"), vec![&b"a"[..], b"", b"b"]);
    }
}

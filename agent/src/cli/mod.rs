//! Command-line definitions and dispatch for the `shear` binary.
//!
//! Exit status: 0 success, 1 error, 2 `verify` found damage, 64 usage
//! error (a bad option or argument; sysexits' `EX_USAGE`).
//!
//! Output goes through [`out!`]: when stdout is closed (`shear list --json |
//! head -1`), the rest of the output is dropped quietly and the command
//! finishes its work and exits with its own status.

mod backup_cmd;
mod backup_job;
mod boot_cmd;
pub mod boot_cmdline;
mod daemon_cmd;
mod generate;
mod hook_cmd;
pub mod json_errors;
mod libvirt_cmd;
mod live_cmd;
mod nbd_cmd;
mod passphrase;
mod progress;
mod repo_cmds;
mod serve_cmd;
mod snapshot_cmd;
mod vm_definition;

pub use backup_cmd::{BackupArgs, CleanupArgs, WatchdogArgs};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit status of a usage error (bad option or argument).
pub const EXIT_USAGE: u8 = 64;
/// Exit status of `verify` when it found damage.
pub const EXIT_DAMAGE: u8 = 2;

static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one line to stdout. A closed stdout (EPIPE) drops this and all
/// later output quietly; other write errors are returned.
pub fn emit(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}

/// `println!` through [`emit`]; evaluates to `io::Result<()>`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::emit(format_args!($($arg)*))?
    };
}

/// Live backup of QEMU/KVM virtual machines.
///
/// Exit status: 0 success, 1 error, 2 `verify` found damage, 64 usage error
/// (bad option or argument).
#[derive(Debug, Parser)]
#[command(
    name = "shear",
    version,
    about,
    after_help = "Exit status: 0 success, 1 error, 2 damage found by `verify`, 64 usage error (bad option or argument).\nBackup ids: vm/<vmid>/<time>, or vm/<vmid> (or vm/<vmid>/latest) for the newest backup of a VM."
)]
pub struct Cli {
    /// Repository directory.
    #[arg(long, global = true, env = "SHEAR_REPO", default_value = crate::repo::DEFAULT_REPO_PATH)]
    pub repo: PathBuf,
    /// Key file of an encrypted repository.
    #[arg(long, global = true, env = "SHEAR_KEYFILE")]
    pub keyfile: Option<PathBuf>,
    /// File holding the key passphrase (else env SHEAR_KEY_PASSPHRASE,
    /// else it is asked on the terminal).
    #[arg(long, global = true, env = "SHEAR_KEY_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Admin token of an append-only repository (prune, forget, gc,
    /// unprotect; `init --append-only` writes a new one here).
    #[arg(long, global = true, env = "SHEAR_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once per process: the size of the backup variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Back up running VMs (live, point-in-time, deduplicated).
    Backup(BackupArgs),
    /// Take back now what a killed backup run left in a VM (filters,
    /// exports, fleecing images, a freeze or pause), like `qm unlock`.
    /// Refused while a shear backup of that VM runs.
    Cleanup(CleanupArgs),
    /// Internal: the thaw watchdog a backup starts (see job::watchdog).
    #[command(name = "__watchdog", hide = true)]
    Watchdog(WatchdogArgs),
    /// Create a repository (encrypted when --keyfile is given).
    ///
    /// A disk's index holds at most 16 Mi (16 777 216) chunks, so the chunk
    /// size bounds the largest disk: 64 KiB chunks hold 1 TiB, 1 MiB chunks
    /// 16 TiB, 4 MiB chunks (the default) 64 TiB. init refuses a chunk size
    /// too small for --max-disk-size-gib.
    Init {
        /// zstd level for new chunks (1..=19; 0 stores them uncompressed).
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Chunk size in bytes (power of two, 64 KiB ..= 16 MiB).
        #[arg(long, default_value_t = 4 << 20)]
        chunk_size: u32,
        /// Largest disk (GiB) the repository must hold; checked against
        /// the chunk size (16 Mi chunks per disk at most).
        #[arg(long, default_value_t = 16384)]
        max_disk_size_gib: u64,
        /// Seal the repository key to this master public key (`key
        /// create-master`) into the repository, so the master key's
        /// holder can recover the key if its passphrase is lost. Without
        /// it, a key file created with --master-pubkey puts its seal there.
        #[arg(long)]
        master_pubkey: Option<PathBuf>,
        /// Append-only: deletions and overwrites need an admin token
        /// (written to --admin-token-file, else printed once).
        #[arg(long)]
        append_only: bool,
        /// S3 Object Lock: keep chunks, indexes and manifests retained for
        /// this many days (the bucket must have Object Lock enabled).
        #[arg(long)]
        object_lock_days: Option<u32>,
        /// Object Lock mode: compliance (nobody can shorten it) or
        /// governance.
        #[arg(long, default_value = "compliance", value_parser = ["compliance", "governance"])]
        object_lock_mode: String,
    },
    /// Key management.
    Key {
        /// Key subcommand.
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// List backups.
    List {
        /// Only this VM.
        vmid: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a backup's manifest.
    Show {
        /// Backup id (vm/<vmid>/<time>).
        backup: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print the VM definition captured in the backup (QEMU's view,
        /// its command line, the Proxmox config, the libvirt XML).
        #[arg(long)]
        config: bool,
    },
    /// Re-read and check every chunk of one or all backups.
    Verify {
        /// Backup id; omit with --all.
        backup: Option<String>,
        /// Verify every backup.
        #[arg(long, conflicts_with = "backup")]
        all: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// `--boot`: a restore test that boots the backup.
        #[command(flatten)]
        boot: boot_cmd::BootArgs,
    },
    /// Remove old backups of a VM by retention rules (Proxmox semantics).
    Prune(PruneArgs),
    /// Protect a backup from prune.
    Protect {
        /// Backup id.
        backup: String,
    },
    /// Remove the protection of a backup.
    Unprotect {
        /// Backup id.
        backup: String,
    },
    /// Remove one backup (its chunks are freed by gc).
    Forget {
        /// Backup id.
        backup: String,
    },
    /// Delete chunks no backup references (safe while backups run).
    Gc {
        /// Seconds to wait for running backups before the sweep.
        #[arg(long, default_value_t = 3600)]
        wait: u64,
        /// Only report.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Restore disk images of a backup into a directory.
    Restore(RestoreArgs),
    /// Serve a backup's disks over NBD (read-only, or writable into local
    /// overlay files with --overlay) until SIGINT/SIGTERM.
    Serve(serve_cmd::ServeArgs),
    /// List, read or extract files of a backed-up disk through a restore
    /// VM (the filesystem is never mounted on the host).
    Files(boot_cmd::FilesArgs),
    /// Copy backups between repositories (local or s3://BUCKET/PREFIX):
    /// missing chunks, then indexes, then the manifest last; resumable.
    Sync {
        /// Source repository.
        #[arg(long)]
        from: PathBuf,
        /// Target repository (initialised, same chunk size and key).
        #[arg(long)]
        to: PathBuf,
        /// Only this VM's backups.
        #[arg(long)]
        vmid: Option<String>,
        /// Only the newest N backups of each VM.
        #[arg(long)]
        last: Option<usize>,
        /// Decode every copied chunk and check its digest.
        #[arg(long)]
        verify: bool,
        /// Forget backups in the target that the source no longer has
        /// (protected, locked or append-only ones are left and reported).
        #[arg(long)]
        remove_vanished: bool,
        /// Chunks copied in parallel (a single stream collapses on a
        /// high-latency link).
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Internal (packaging): write man pages or shell completions
    /// generated from this CLI into DIR.
    #[command(name = "generate", hide = true)]
    Generate {
        /// man or completions.
        #[arg(value_enum)]
        what: generate::GenerateWhat,
        /// Output directory (created if missing).
        dir: PathBuf,
    },
    /// Run the host daemon in the foreground: scheduled backup, verify
    /// and gc jobs, the HTTP API and metrics (docs/daemon.md).
    Daemon(daemon_cmd::DaemonArgs),
    /// The running daemon's jobs: list, run now, status.
    Job(daemon_cmd::JobArgs),
    /// The running daemon's tasks (job runs): list, status, log.
    Task(daemon_cmd::TaskArgs),
    /// API tokens for the daemon's TCP listeners.
    Token(daemon_cmd::TokenArgs),
    /// Per VM: newest good backup, its age against the RPO policy, last
    /// verify, last restore test. Exit 1 when an RPO is breached.
    Report(daemon_cmd::ReportArgs),
    /// Lifecycle hooks: libvirt's /etc/libvirt/hooks/qemu, a Proxmox VE
    /// hookscript ([hooks] in shear.toml; see docs/hooks.md).
    Hook {
        /// Which hypervisor calls.
        #[command(subcommand)]
        command: hook_cmd::HookCommand,
    },
    /// VM snapshots (qcow2 internal, with or without memory): create,
    /// list, rename, describe, rollback, delete, prune.
    Snapshot(snapshot_cmd::SnapshotArgs),
}

/// `shear key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new key file (mode 0600; passphrase from --passphrase-file
    /// or SHEAR_KEY_PASSPHRASE, else asked twice on the terminal). A
    /// passphrase shorter than 8 characters is refused; one shorter than 12
    /// is accepted with a warning.
    Create {
        /// Where to write the key file (must not exist).
        path: PathBuf,
        /// Also seal the key to this master public key inside the key file
        /// (see `key create-master`, docs/keys.md).
        #[arg(long)]
        master_pubkey: Option<PathBuf>,
        /// Argon2id memory in KiB.
        #[arg(long, default_value_t = 65536)]
        kdf_memory_kib: u32,
        /// Argon2id passes.
        #[arg(long, default_value_t = 3)]
        kdf_passes: u32,
    },
    /// Print the fingerprint of a key file (the global --keyfile, or PATH).
    Show {
        /// Key file (default: --keyfile).
        path: Option<PathBuf>,
    },
    /// Print a key file for paper backup: the file itself (the key stays
    /// wrapped under its passphrase) between markers, with its
    /// fingerprint. To recover, type the JSON between the markers back
    /// into a file (mode 0600) and use it as --keyfile with the passphrase.
    Paperkey {
        /// Key file (default: --keyfile).
        path: Option<PathBuf>,
    },
    /// Create a master key pair for recovery (docs/keys.md): PRIVATE
    /// (mode 0600, wrapped under its own passphrase from
    /// --master-passphrase-file or SHEAR_MASTER_PASSPHRASE, else asked
    /// twice; keep it offline) and PUBLIC (give it to `init` or `key
    /// create` as --master-pubkey).
    CreateMaster {
        /// Private key file to write (must not exist).
        private: PathBuf,
        /// Public key file to write (must not exist).
        public: PathBuf,
        /// File holding the master key's passphrase.
        #[arg(long, env = "SHEAR_MASTER_PASSPHRASE_FILE")]
        master_passphrase_file: Option<PathBuf>,
        /// Argon2id memory in KiB.
        #[arg(long, default_value_t = 65536)]
        kdf_memory_kib: u32,
        /// Argon2id passes.
        #[arg(long, default_value_t = 3)]
        kdf_passes: u32,
    },
    /// Seal an existing encrypted repository's key to a master public key
    /// (a repository made before it had one): writes the repository's
    /// master-key-seal.json (needs --keyfile and its passphrase).
    Seal {
        /// The master public key file.
        #[arg(long)]
        master_pubkey: PathBuf,
    },
    /// Recover a repository key with the master private key when its
    /// passphrase (or its key file) is lost: writes a new key file NEW
    /// with a new passphrase (--passphrase-file, SHEAR_KEY_PASSPHRASE, else
    /// asked twice). The sealed key is taken from the old key file
    /// (--keyfile) when it carries a seal, else from the repository
    /// (--repo).
    Recover {
        /// New key file to write (must not exist).
        new: PathBuf,
        /// The master private key file.
        #[arg(long)]
        master_key: PathBuf,
        /// File holding the master key's passphrase (else
        /// SHEAR_MASTER_PASSPHRASE, else it is asked).
        #[arg(long, env = "SHEAR_MASTER_PASSPHRASE_FILE")]
        master_passphrase_file: Option<PathBuf>,
        /// Argon2id memory in KiB for the new key file.
        #[arg(long, default_value_t = 65536)]
        kdf_memory_kib: u32,
        /// Argon2id passes for the new key file.
        #[arg(long, default_value_t = 3)]
        kdf_passes: u32,
    },
}

/// `shear prune …`
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// VM id.
    pub vmid: String,
    /// Keep the last N backups.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep the newest backup of each of the last N hours.
    #[arg(long)]
    pub keep_hourly: Option<usize>,
    /// … days.
    #[arg(long)]
    pub keep_daily: Option<usize>,
    /// … ISO weeks.
    #[arg(long)]
    pub keep_weekly: Option<usize>,
    /// … months.
    #[arg(long)]
    pub keep_monthly: Option<usize>,
    /// … years.
    #[arg(long)]
    pub keep_yearly: Option<usize>,
    /// List what would be kept and removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Output format of `restore`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Sparse raw image.
    Raw,
    /// qcow2 v3.
    Qcow2,
}

/// `shear restore …`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Backup id.
    pub backup: String,
    /// Disk(s) to restore (default: all).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Directory to write `<disk>.<format>` into (or a block device for a
    /// one-disk restore).
    #[arg(long, required_unless_present = "target_devices")]
    pub target: Option<PathBuf>,
    /// Restore disk DISK onto block device DEV (raw; a plain restore
    /// needs --force); repeat for each disk (LVM volumes, zvols). Every
    /// device is checked (not in use, large enough) before any is
    /// written. With --live the record is keyed by the first device.
    #[arg(long = "target-device", value_name = "DISK=DEV", conflicts_with_all = ["target", "disks", "libvirt"])]
    pub target_devices: Vec<String>,
    /// Image format (default raw; with --live qcow2, or raw: mirrored
    /// from a qcow2 overlay while the VM runs).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Replace existing regular files.
    #[arg(long)]
    pub force: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Live restore options (`--live`).
    #[command(flatten)]
    pub live: live_cmd::LiveArgs,
    /// Also write the backup's libvirt domain XML adapted to the restored
    /// disks (`<name>.xml` in the target): a new name and UUID unless
    /// --replace.
    #[arg(long)]
    pub libvirt: bool,
    /// With --libvirt: define the domain (`virsh define`).
    #[arg(long, requires = "libvirt")]
    pub define: bool,
    /// With --libvirt: the restored domain's name (default: the original's
    /// with `-restored`).
    #[arg(long, requires = "libvirt", conflicts_with = "replace")]
    pub name: Option<String>,
    /// With --libvirt: keep the original name, UUID and MAC addresses
    /// (the restored domain replaces the original's definition).
    #[arg(long, requires = "libvirt")]
    pub replace: bool,
    /// With --libvirt: connection URI for --define.
    #[arg(long, value_name = "URI", default_value = crate::libvirt::DEFAULT_URI)]
    pub connect: String,
}

/// Runs the parsed command line.
/// A `shear` child that outlives this command (its own process group, so
/// a Ctrl-C here does not reach it): the same binary, the same repository
/// credentials, no stdin, stdout and stderr appended to `log`. The caller
/// adds the subcommand and spawns it.
pub(crate) fn detached_shear(
    repo: &std::path::Path,
    keyfile: Option<&std::path::Path>,
    passphrase_file: Option<&std::path::Path>,
    log: &std::path::Path,
) -> anyhow::Result<std::process::Command> {
    use anyhow::Context as _;
    use std::os::unix::process::CommandExt as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the shear binary")?;
    let mut c = std::process::Command::new(exe);
    c.arg("--repo").arg(repo);
    if let Some(k) = keyfile {
        c.arg("--keyfile").arg(k);
    }
    if let Some(p) = passphrase_file {
        c.arg("--passphrase-file").arg(p);
    }
    c.process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().context("log file")?)
        .stderr(file);
    Ok(c)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // `[s3]` of the config file, for any command that opens s3://
    // (an unreadable config is reported by the commands that need it).
    if let Ok(cfg) = crate::config::Config::load() {
        crate::repo::s3_settings::install(cfg.s3);
    }
    match &cli.command {
        Command::Backup(args) => backup_cmd::run(&cli, args),
        Command::Watchdog(args) => Ok(backup_cmd::watchdog(args)),
        Command::Cleanup(args) => backup_cmd::cleanup(args),
        Command::Hook { command } => hook_cmd::run(&cli, command),
        Command::Generate { what, dir } => generate::run(*what, dir),
        Command::Daemon(a) => daemon_cmd::daemon(a),
        Command::Job(a) => daemon_cmd::job(a),
        Command::Task(a) => daemon_cmd::task(a),
        Command::Token(a) => daemon_cmd::token(a),
        Command::Report(a) => daemon_cmd::report(a),
        Command::Snapshot(a) => snapshot_cmd::run(a),
        Command::Serve(a) => serve_cmd::run(&cli, a).map(|()| ExitCode::SUCCESS),
        Command::Files(a) => boot_cmd::files(&cli, a),
        Command::Verify {
            backup: Some(b),
            json,
            boot,
            ..
        } if boot.boot => boot_cmd::verify_boot(&cli, b, boot, *json),
        Command::Verify { boot, .. } if boot.boot => {
            anyhow::bail!("verify --boot needs one backup id (not --all)")
        }
        _ => repo_cmds::run(cli),
    }
}

/// Prints an error and its causes ([`crate::chain`]) on stderr; with
/// `json`, also an error object `{"error", "kind"}` on stdout (docs/json.md).
pub fn print_error(err: &anyhow::Error, json: bool) {
    let e: &dyn std::error::Error = err.as_ref();
    let msg = crate::chain(e);
    {
        use std::io::Write;
        // Never panics: stderr may be gone (a closed terminal).
        let _ = writeln!(std::io::stderr().lock(), "error: {msg}");
    }
    if json {
        let obj = serde_json::json!({"error": msg, "kind": json_errors::error_kind(err)});
        let _ = emit(format_args!("{obj}"));
    }
}

impl Cli {
    /// Whether the command asked for `--json` output.
    pub fn wants_json(&self) -> bool {
        match &self.command {
            Command::Backup(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Prune(a) => a.json,
            Command::List { json, .. }
            | Command::Show { json, .. }
            | Command::Verify { json, .. }
            | Command::Gc { json, .. }
            | Command::Sync { json, .. } => *json,
            Command::Report(a) => a.json,
            Command::Snapshot(a) => a.json,
            Command::Job(a) => a.conn.json,
            Command::Task(a) => a.conn.json,
            _ => false,
        }
    }
}

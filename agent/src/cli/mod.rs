//! Command-line definitions and dispatch for the `shear` binary.
//!
//! Exit status: 0 success, 1 error, 2 `verify` found problems.

mod backup_cmd;
pub mod boot_cmdline;
mod hook_cmd;
mod nbd_cmd;
mod progress;
mod repo_cmds;

pub use backup_cmd::{BackupArgs, CleanupArgs, WatchdogArgs};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Live backup of QEMU/KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "shear", version, about)]
pub struct Cli {
    /// Repository directory.
    #[arg(long, global = true, env = "SHEAR_REPO", default_value = crate::repo::DEFAULT_REPO_PATH)]
    pub repo: PathBuf,
    /// Key file of an encrypted repository.
    #[arg(long, global = true, env = "SHEAR_KEYFILE")]
    pub keyfile: Option<PathBuf>,
    /// File holding the key passphrase (else env SHEAR_KEY_PASSPHRASE).
    #[arg(long, global = true, env = "SHEAR_KEY_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
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
    Init {
        /// zstd level for new chunks (1..=19; 0 stores them uncompressed).
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Chunk size in bytes (power of two, 64 KiB ..= 16 MiB).
        #[arg(long, default_value_t = 4 << 20)]
        chunk_size: u32,
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
    /// Lifecycle hooks: libvirt's /etc/libvirt/hooks/qemu, a Proxmox VE
    /// hookscript ([hooks] in shear.toml; see docs/hooks.md).
    Hook {
        /// Which hypervisor calls.
        #[command(subcommand)]
        command: hook_cmd::HookCommand,
    },
}

/// `shear key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new key file (mode 0600; passphrase from SHEAR_KEY_PASSPHRASE
    /// or --passphrase-file).
    Create {
        /// Where to write the key file (must not exist).
        path: PathBuf,
        /// Argon2id memory in KiB.
        #[arg(long, default_value_t = 65536)]
        kdf_memory_kib: u32,
        /// Argon2id passes.
        #[arg(long, default_value_t = 3)]
        kdf_passes: u32,
    },
    /// Print the fingerprint of a key file.
    Show {
        /// Key file.
        path: PathBuf,
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
    /// Directory to write `<disk>.<format>` into.
    #[arg(long)]
    pub target: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
    pub format: FormatArg,
    /// Replace existing regular files.
    #[arg(long)]
    pub force: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Backup(args) => backup_cmd::run(repo_cmds::open(&cli)?, args),
        Command::Watchdog(args) => Ok(backup_cmd::watchdog(args)),
        Command::Cleanup(args) => backup_cmd::cleanup(args),
        Command::Hook { command } => hook_cmd::run(&cli, command),
        _ => repo_cmds::run(cli),
    }
}

/// Prints an error and its causes on one line ([`crate::chain`]).
/// Never panics (stderr may be gone: a closed terminal).
pub fn print_error(err: &anyhow::Error) {
    use std::io::Write;
    let e: &dyn std::error::Error = err.as_ref();
    let _ = writeln!(std::io::stderr().lock(), "error: {}", crate::chain(e));
}

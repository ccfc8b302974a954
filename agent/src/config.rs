//! Agent configuration: `/etc/shear/shear.toml` (or `$SHEAR_CONFIG`).
//!
//! Every key is optional; the defaults follow Proxmox VE's layout so shear
//! works on a PVE host without a config file.
//!
//! ```toml
//! run_dir = "/run/shear"
//! qmp_socket = "/var/run/qemu-server/{vmid}.qmp"
//! qga_socket = "/var/run/qemu-server/{vmid}.qga"
//! fleecing_dir = "/var/lib/shear/fleece"     # on disk, never in RAM
//! fleecing_allow_tmpfs = false               # refuse tmpfs/ramfs targets
//! fleecing_min_free = "10%"                  # or bytes: "20G", "0"
//! # node = "pve1"                            # default: the host name
//! nice = 19                                  # data path's CPU nice, 0..=19
//! ionice = 7                                 # vzdump's: 0..=7 best-effort, 8 idle
//! snapshot_max_age = "48h"                   # `shear snapshot list` marks older ones
//!
//! [hooks]                                    # `shear hook libvirt|pve …`
//! backup_on = ["post-stop", "release"]       # phases/operations that back up
//! refuse_start_if_backup_older_than = "48h"  # pre-start/prepare refuses
//! pve_config_dir = "/etc/pve/qemu-server"
//! ```
//!
//! Fleecing images hold the old data of every block the guest overwrites
//! before shear has read it; on a busy guest they can grow up to the size
//! of its disks. They go to `/var/lib/shear/fleece` (the host's disk, like
//! `/var/lib/vz`) by default, not to the run directory: `/run` is a tmpfs,
//! and a long backup of a busy guest would fill the host's RAM. A tmpfs or
//! ramfs fleecing directory is refused unless `fleecing_allow_tmpfs = true`
//! (`--fleecing-allow-tmpfs`). Before the guest is touched, the fleecing
//! filesystem must have `fleecing_min_free` free: a size (`"20G"`) or a
//! percentage of the backed-up disks' allocated size (default `"10%"`);
//! otherwise the backup fails saying how much is needed and how much is
//! free.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config file is looked for unless `$SHEAR_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shear/shear.toml";

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Private run directory: run records, locks, NBD sockets.
    pub run_dir: PathBuf,
    /// QMP socket template; `{vmid}` is replaced.
    pub qmp_socket: String,
    /// qemu-guest-agent socket template; `{vmid}` is replaced.
    pub qga_socket: String,
    /// Where fleecing images go (default `/var/lib/shear/fleece`).
    pub fleecing_dir: Option<PathBuf>,
    /// Accept a RAM-backed (tmpfs, ramfs) fleecing directory.
    pub fleecing_allow_tmpfs: bool,
    /// Free space the fleecing directory needs before a backup: `"10%"`
    /// (of the disks' allocated size, the default), `"20G"`, `"0"`.
    pub fleecing_min_free: Option<String>,
    /// This host's name for notes templates (default: the host name).
    pub node: Option<String>,
    /// Nice value of the data-path threads, 0..=19 (default 19, with
    /// `SCHED_BATCH`; 0 leaves CPU priority and policy alone).
    pub nice: Option<u8>,
    /// I/O priority of the data-path threads, vzdump's `ionice`: 0..=7
    /// best-effort level, 8 the idle class (default 7).
    pub ionice: Option<u8>,
    /// Proxmox VM config template captured into each backup when it
    /// exists; `{vmid}` is replaced.
    pub pve_config: String,
    /// Lifecycle hooks (`shear hook libvirt|pve …`).
    pub hooks: HooksConfig,
    /// Notification targets (`[[notify_target]]`; see [`crate::notify::config`]).
    pub notify_target: Vec<crate::notify::TargetConfig>,
    /// Notification matchers (`[[notify_matcher]]`).
    pub notify_matcher: Vec<crate::notify::MatcherConfig>,
    /// vzdump hook script run for every backup (`script` in vzdump.conf;
    /// `shear backup --script` overrides; see [`crate::hookscript`]).
    pub script: Option<PathBuf>,
    /// Deadline of one hook script run, seconds (default 300).
    pub script_timeout: Option<u64>,
    /// Daemon (docs/daemon.md): state directory (default /var/lib/shear).
    pub state_dir: Option<PathBuf>,
    /// Daemon: how long a running backup may go on after SIGTERM.
    pub shutdown_grace: Option<String>,
    /// Daemon: how long finished tasks are kept (default 30d).
    pub task_retention: Option<String>,
    /// Daemon: free space (%) below which a repository is "space low".
    pub space_low_percent: Option<u8>,
    /// Daemon: `[[job]]` backup jobs.
    #[serde(rename = "job")]
    pub jobs: Vec<crate::daemon::config::JobToml>,
    /// Daemon: `[[verify]]` jobs.
    pub verify: Vec<crate::daemon::config::VerifyToml>,
    /// Daemon: `[[gc]]` jobs.
    pub gc: Vec<crate::daemon::config::GcToml>,
    /// Daemon: `[[sync]]` jobs.
    pub sync: Vec<crate::daemon::config::SyncToml>,
    /// Daemon: `[[policy]]` RPO policies.
    pub policy: Vec<crate::daemon::config::PolicyToml>,
    /// Daemon: `[api]`.
    pub api: crate::daemon::config::ApiToml,
    /// Daemon: `[[repo_key]]` keys of encrypted repositories.
    pub repo_key: Vec<crate::daemon::config::RepoKeyToml>,
    /// `shear snapshot`: age past which a snapshot is flagged (`"48h"`).
    pub snapshot_max_age: Option<String>,
    /// `[s3]`: settings of `s3://` repositories (repo/s3_settings.rs).
    pub s3: crate::repo::s3_settings::S3Settings,
}

/// `[hooks]`: what `shear hook` does at each lifecycle event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// Operations (libvirt: `release`, `stopped`…) and phases (PVE:
    /// `post-stop`…) after which an offline backup is taken in the
    /// background.
    pub backup_on: Vec<String>,
    /// Refuse to start a VM (libvirt `prepare`, PVE `pre-start`) whose
    /// newest good backup is older than this (`"48h"`, `"7d"`) or absent.
    pub refuse_start_if_backup_older_than: Option<String>,
    /// Where PVE VM configs are (default `/etc/pve/qemu-server`).
    pub pve_config_dir: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            run_dir: PathBuf::from("/run/shear"),
            qmp_socket: "/var/run/qemu-server/{vmid}.qmp".into(),
            qga_socket: "/var/run/qemu-server/{vmid}.qga".into(),
            fleecing_dir: None,
            fleecing_allow_tmpfs: false,
            fleecing_min_free: None,
            node: None,
            nice: None,
            ionice: None,
            pve_config: "/etc/pve/qemu-server/{vmid}.conf".into(),
            hooks: HooksConfig::default(),
            notify_target: Vec::new(),
            notify_matcher: Vec::new(),
            script: None,
            script_timeout: None,
            state_dir: None,
            shutdown_grace: None,
            task_retention: None,
            space_low_percent: None,
            jobs: Vec::new(),
            verify: Vec::new(),
            gc: Vec::new(),
            sync: Vec::new(),
            policy: Vec::new(),
            api: crate::daemon::config::ApiToml::default(),
            repo_key: Vec::new(),
            snapshot_max_age: None,
            s3: crate::repo::s3_settings::S3Settings::default(),
        }
    }
}

/// Config loading failures.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// The file parses but says something inconsistent.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Longest config file accepted (it is tiny; anything bigger is a mistake).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl Config {
    /// Load `$SHEAR_CONFIG`, else [`DEFAULT_CONFIG_PATH`]; a missing file
    /// means all defaults.
    pub fn load() -> Result<Config, ConfigError> {
        let path = std::env::var_os("SHEAR_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        Self::load_from(&path)
    }

    /// Load one file; a missing file means all defaults.
    pub fn load_from(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        crate::notify::config::validate(&cfg.notify_target, &cfg.notify_matcher).map_err(
            |message| ConfigError::Invalid {
                path: path.into(),
                message,
            },
        )?;
        Ok(cfg)
    }

    /// The QMP socket of `vmid`.
    pub fn qmp_socket_for(&self, vmid: &str) -> PathBuf {
        PathBuf::from(self.qmp_socket.replace("{vmid}", vmid))
    }

    /// The Proxmox VM config file of `vmid`.
    pub fn pve_config_for(&self, vmid: &str) -> PathBuf {
        PathBuf::from(self.pve_config.replace("{vmid}", vmid))
    }

    /// The qemu-ga socket of `vmid`.
    pub fn qga_socket_for(&self, vmid: &str) -> PathBuf {
        PathBuf::from(self.qga_socket.replace("{vmid}", vmid))
    }

    /// Where fleecing images go.
    pub fn fleecing_dir(&self) -> PathBuf {
        self.fleecing_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::job::fleece::DEFAULT_FLEECING_DIR))
    }

    /// The data path's priority: the config's, `nice`/`ionice` (the
    /// command line's) overriding.
    pub fn data_priority(
        &self,
        nice: Option<u8>,
        ionice: Option<u8>,
    ) -> Result<crate::job::priority::DataPriority, String> {
        let d = crate::job::priority::DataPriority::default();
        let nice = nice.or(self.nice).unwrap_or(d.nice);
        crate::job::priority::DataPriority {
            nice,
            ionice: ionice.or(self.ionice).unwrap_or(d.ionice),
            batch: nice > 0,
        }
        .validate()
    }

    /// The configured fleecing minimum free space.
    pub fn fleecing_min_free(&self) -> Result<crate::job::fleece::MinFree, String> {
        self.fleecing_min_free
            .as_deref()
            .map_or(Ok(crate::job::fleece::MinFree::default()), |s| {
                crate::job::fleece::MinFree::parse(s)
            })
    }

    /// This host's name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node {
            return n.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_proxmox_layout() {
        let c = Config::default();
        assert_eq!(
            c.qmp_socket_for("100"),
            Path::new("/var/run/qemu-server/100.qmp")
        );
        assert_eq!(
            c.qga_socket_for("100"),
            Path::new("/var/run/qemu-server/100.qga")
        );
        // Fleecing on disk, not in /run (a tmpfs): a busy guest would fill RAM.
        assert_eq!(c.fleecing_dir(), Path::new("/var/lib/shear/fleece"));
        assert!(!c.fleecing_allow_tmpfs);
        assert_eq!(
            c.fleecing_min_free().unwrap(),
            crate::job::fleece::MinFree::Percent(10)
        );
    }

    #[test]
    fn file_overrides_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shear.toml");
        std::fs::write(
            &p,
            "qmp_socket = \"/run/vm/{vmid}/mon.sock\"\nnode = \"pve7\"\n",
        )
        .unwrap();
        let c = Config::load_from(&p).unwrap();
        assert_eq!(c.qmp_socket_for("42"), Path::new("/run/vm/42/mon.sock"));
        assert_eq!(c.node_name(), "pve7");
        std::fs::write(&p, "qmp_sokcet = \"x\"\n").unwrap();
        let err = Config::load_from(&p).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        Config::load_from(&dir.path().join("absent.toml")).unwrap();
    }
}

//! `shear daemon`, and the commands that talk to it or its state:
//! `shear job …`, `shear task …`, `shear token …`, `shear report`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::daemon::client;
use crate::out;

/// Where the config is: `--config`, else `$SHEAR_CONFIG`, else the default.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// Config file (default: $SHEAR_CONFIG, else /etc/shear/shear.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| std::env::var_os("SHEAR_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

/// `shear daemon`
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Config.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only load and check the config, then exit (0: valid).
    #[arg(long)]
    pub check: bool,
}

/// How to reach the daemon.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Config.
    #[command(flatten)]
    pub config: ConfigArg,
    /// API socket (default: the config's [api] socket).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Machine-readable output (the API's JSON).
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    fn socket(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        Config::load_from(&self.config.path())
            .ok()
            .and_then(|c| c.api.socket)
            .unwrap_or_else(|| PathBuf::from(crate::daemon::config::DEFAULT_API_SOCKET))
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let r = client::request(&self.socket(), method, path, body, Duration::from_secs(60))?;
        if !(200..300).contains(&r.status) {
            bail!("daemon: {} (HTTP {})", r.error_message(), r.status);
        }
        r.json().context("the daemon's answer is not JSON")
    }
}

/// `shear job …`
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Subcommand.
    #[command(subcommand)]
    pub command: JobCommand,
}

/// Job subcommands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// The daemon's jobs, their next and last runs.
    List,
    /// Run a job now; prints its task id.
    Run {
        /// Job id.
        id: String,
        /// Only these VMs of the job (repeatable).
        #[arg(long = "vm")]
        vms: Vec<String>,
        /// Wait for the task to end; exit 1 unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// One job (or all) with its running task and last result.
    Status {
        /// Job id.
        id: Option<String>,
    },
}

/// `shear task …`
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Subcommand.
    #[command(subcommand)]
    pub command: TaskCommand,
}

/// Task subcommands.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Tasks, newest first.
    List,
    /// One task's status and per-VM results.
    Status {
        /// Task id.
        id: String,
    },
    /// One task's log.
    Log {
        /// Task id.
        id: String,
    },
}

/// `shear token …`
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Config (for state_dir).
    #[command(flatten)]
    pub config: ConfigArg,
    /// Subcommand.
    #[command(subcommand)]
    pub command: TokenCommand,
}

/// Token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for the TCP listeners; prints NAME:SECRET once
    /// (only a hash is kept).
    Create {
        /// Token name.
        name: String,
        /// Only GET requests (status, lists, metrics; no runs).
        #[arg(long)]
        read_only: bool,
        /// Only this VM (repeatable): other VMs' backups, jobs and tasks
        /// look as if they did not exist, host-wide views are refused.
        #[arg(long = "vmid", value_name = "VMID")]
        vmids: Vec<String>,
        /// Rejected after this long (e.g. 30d, 12h).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// Token names, creation times and limits.
    List,
    /// Delete a token.
    Delete {
        /// Token name.
        name: String,
    },
    /// Reject a token until it is enabled again.
    Disable {
        /// Token name.
        name: String,
    },
    /// Accept a disabled token again.
    Enable {
        /// Token name.
        name: String,
    },
}

/// `shear report`
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Config.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `shear daemon`.
pub fn daemon(args: &DaemonArgs) -> anyhow::Result<ExitCode> {
    let path = args.config.path();
    if args.check {
        let c = crate::daemon::load_config(&path)?;
        out!("{}: valid ({} job(s))", path.display(), c.jobs.len());
        return Ok(ExitCode::SUCCESS);
    }
    crate::daemon::run(&path)?;
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `shear job …`.
pub fn job(args: &JobArgs) -> anyhow::Result<ExitCode> {
    let c = &args.conn;
    match &args.command {
        JobCommand::List => {
            let v = c.call("GET", "/api/v1/jobs", None)?;
            if c.json {
                out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            out!(
                "{:<16} {:<7} {:<22} {:<27} {:<10} RUNNING",
                "ID",
                "KIND",
                "SCHEDULE",
                "NEXT RUN",
                "LAST"
            );
            for j in v.as_array().into_iter().flatten() {
                out!(
                    "{:<16} {:<7} {:<22} {:<27} {:<10} {}",
                    s(&j["id"]),
                    s(&j["kind"]),
                    s(&j["schedule"]),
                    s(&j["next_run"]).get(..25).unwrap_or(&s(&j["next_run"])),
                    s(&j["last"]["last_status"]),
                    s(&j["running_task"])
                );
            }
        }
        JobCommand::Status { id } => {
            let v = match id {
                Some(id) => c.call("GET", &format!("/api/v1/jobs/{}", enc(id)), None)?,
                None => c.call("GET", "/api/v1/jobs", None)?,
            };
            out!("{}", serde_json::to_string_pretty(&v)?);
        }
        JobCommand::Run { id, vms, wait } => {
            let body = if vms.is_empty() {
                None
            } else {
                Some(serde_json::json!({ "vmids": vms }))
            };
            let t = c.call(
                "POST",
                &format!("/api/v1/jobs/{}/run", enc(id)),
                body.as_ref(),
            )?;
            let task = s(&t["id"]);
            if !*wait {
                if c.json {
                    out!("{}", serde_json::to_string_pretty(&t)?);
                } else {
                    out!("started task {task}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let deadline = Instant::now() + Duration::from_secs(24 * 3600);
            let done = loop {
                let t = c.call("GET", &format!("/api/v1/tasks/{}", enc(&task)), None)?;
                if t["status"] != "running" {
                    break t;
                }
                if Instant::now() > deadline {
                    bail!("task {task} still running after 24 h");
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            if c.json {
                out!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                out!(
                    "task {task}: {} — {}",
                    s(&done["status"]),
                    s(&done["summary"])
                );
            }
            if done["status"] != "ok" {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encode a path segment (ids are plain, but never trust them).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `shear task …`.
pub fn task(args: &TaskArgs) -> anyhow::Result<ExitCode> {
    let c = &args.conn;
    match &args.command {
        TaskCommand::List => {
            let v = c.call("GET", "/api/v1/tasks", None)?;
            if c.json {
                out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            for t in v.as_array().into_iter().flatten() {
                out!(
                    "{:<44} {:<9} {:<9} {}",
                    s(&t["id"]),
                    s(&t["status"]),
                    s(&t["trigger"]),
                    s(&t["summary"])
                );
            }
        }
        TaskCommand::Status { id } => {
            let v = c.call("GET", &format!("/api/v1/tasks/{}", enc(id)), None)?;
            out!("{}", serde_json::to_string_pretty(&v)?);
        }
        TaskCommand::Log { id } => {
            let r = client::request(
                &c.socket(),
                "GET",
                &format!("/api/v1/tasks/{}/log", enc(id)),
                None,
                Duration::from_secs(60),
            )?;
            if r.status != 200 {
                bail!("daemon: {} (HTTP {})", r.error_message(), r.status);
            }
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            match o.write_all(&r.body) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state_dir(cfg: &ConfigArg) -> anyhow::Result<PathBuf> {
    let c = Config::load_from(&cfg.path())?;
    Ok(c.state_dir
        .unwrap_or_else(|| PathBuf::from(crate::daemon::config::DEFAULT_STATE_DIR)))
}

/// `shear token …`.
pub fn token(args: &TokenArgs) -> anyhow::Result<ExitCode> {
    use crate::daemon::tokens;
    let dir = state_dir(&args.config)?;
    match &args.command {
        TokenCommand::Create {
            name,
            read_only,
            vmids,
            expires_in,
        } => {
            let expires = match expires_in {
                Some(d) => {
                    let d = crate::units::parse_duration(d).map_err(anyhow::Error::msg)?;
                    Some(jiff::Timestamp::now() + jiff::SignedDuration::try_from(d)?)
                }
                None => None,
            };
            let limits = tokens::TokenLimits {
                read_only: *read_only,
                vmids: (!vmids.is_empty()).then(|| vmids.iter().cloned().collect()),
                expires,
            };
            let t = tokens::create(&dir, name, &limits)?;
            out!("{t}");
            eprintln!("shear: keep this token now: only its hash is stored");
        }
        TokenCommand::List => {
            for t in tokens::load(&dir)? {
                let mut limits = Vec::new();
                if t.read_only {
                    limits.push("read-only".to_string());
                }
                if let Some(v) = &t.vmids {
                    let v: Vec<&str> = v.iter().map(String::as_str).collect();
                    limits.push(format!("vms {}", v.join(",")));
                }
                if let Some(e) = &t.expires {
                    limits.push(format!("expires {e}"));
                }
                if t.disabled {
                    limits.push("DISABLED".to_string());
                }
                out!("{:<24} created {} {}", t.name, t.created, limits.join(" "));
            }
        }
        TokenCommand::Delete { name } => {
            if !tokens::delete(&dir, name)? {
                bail!("no token named {name:?}");
            }
            out!("token {name} deleted");
        }
        TokenCommand::Disable { name } | TokenCommand::Enable { name } => {
            let disable = matches!(args.command, TokenCommand::Disable { .. });
            if !tokens::set_disabled(&dir, name, disable)? {
                bail!("no token named {name:?}");
            }
            out!(
                "token {name} {}",
                if disable { "disabled" } else { "enabled" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `shear report`.
pub fn report(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::daemon::load_config(&args.config.path())?;
    let rows = crate::daemon::report::build(&cfg);
    if args.json {
        out!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for l in crate::daemon::report::table(&rows) {
            out!("{l}");
        }
    }
    let breached = rows.iter().any(|r| r.rpo_status == "breached");
    Ok(if breached {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

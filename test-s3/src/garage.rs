//! A single Garage node on loopback: the S3 server of the tests.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{free_port, http};
use crate::Creds;

/// The version `scripts/setup` installs.
pub const GARAGE_VERSION: &str = "2.5.0";

/// How long a start may take on a loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Where the garage binary is (`$SHEAR_GARAGE` first); `None`: not
/// installed.
pub fn garage_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHEAR_GARAGE") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("/opt/shear-test/garage/bin/garage");
    p.exists().then_some(p)
}

/// A running single-node Garage with its buckets and one key allowed on
/// all of them (read, write, owner); killed and its directory removed on
/// drop.
#[derive(Debug)]
pub struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its S3 API port on 127.0.0.1.
    pub port: u16,
    creds: Creds,
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

/// 32 random bytes as hex (the RPC secret).
fn random_hex() -> String {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Garage {
    /// Starts a node in a new temporary directory, lays it out (one zone,
    /// 1G), makes `buckets` and a key allowed on them. Its blocks are not
    /// compressed (shear's chunks already are: no CPU spent twice).
    pub fn start(buckets: &[&str]) -> Result<Garage, String> {
        let bin = garage_binary().ok_or("garage is not installed")?;
        let dir = tempfile::Builder::new()
            .prefix("shear-garage-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let port = free_port();
        let (rpc, admin) = (free_port(), free_port());
        let d = dir.path().display();
        let config = format!(
            "metadata_dir = \"{d}/meta\"\n\
             data_dir = \"{d}/data\"\n\
             db_engine = \"lmdb\"\n\
             replication_factor = 1\n\
             compression_level = \"none\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"garage\"\n\
             api_bind_addr = \"127.0.0.1:{port}\"\n\
             \n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n\
             admin_token = \"{}\"\n",
            random_hex(),
            random_hex(),
        );
        std::fs::write(dir.path().join("garage.toml"), config)
            .map_err(|e| format!("garage.toml: {e}"))?;
        let mut g = Garage {
            bin,
            dir,
            child: None,
            port,
            creds: Creds {
                key_id: String::new(),
                secret: String::new(),
                region: "garage".into(),
            },
        };
        let deadline = Instant::now() + START_DEADLINE;
        g.spawn()?;
        g.wait_ready(deadline)?;
        let id = g.cli(&["node", "id", "-q"], deadline)?;
        let id = id.trim().split('@').next().unwrap_or_default().to_owned();
        if id.len() < 16 {
            return Err(format!("garage node id: {id:?}"));
        }
        g.cli(
            &["layout", "assign", "-z", "dc1", "-c", "1G", &id],
            deadline,
        )?;
        g.cli(&["layout", "apply", "--version", "1"], deadline)?;
        let key = g.cli(&["key", "create", "shear-test"], deadline)?;
        let field = |name: &str| {
            key.lines()
                .find(|l| l.trim_start().starts_with(name))
                .and_then(|l| l.split_whitespace().last())
                .map(str::to_owned)
        };
        g.creds.key_id = field("Key ID").ok_or_else(|| format!("no key id in {key:?}"))?;
        g.creds.secret = field("Secret key").ok_or_else(|| format!("no secret in {key:?}"))?;
        for b in buckets {
            g.cli(&["bucket", "create", b], deadline)?;
            g.cli(
                &[
                    "bucket",
                    "allow",
                    "--read",
                    "--write",
                    "--owner",
                    b,
                    "--key",
                    "shear-test",
                ],
                deadline,
            )?;
        }
        Ok(g)
    }

    /// The key allowed on the buckets, and the server's region.
    pub fn creds(&self) -> Creds {
        self.creds.clone()
    }

    /// Its configuration file.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// The server's log (stdout and stderr of every run).
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("garage.log")
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(|e| format!("garage.log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("garage.log: {e}"))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config())
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the S3 port answers HTTP (any status: it refuses
    /// anonymous requests) and the node answers its CLI.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("garage exited ({st}):\n{}", self.log_tail()));
                }
            }
            if http(self.port, "GET", "/").is_some_and(|r| r.starts_with("HTTP/1.1 ")) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "garage did not answer on port {} in {START_DEADLINE:?}:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.cli(&["status"], deadline).map(|_| ())
    }

    /// Runs `garage -c CFG ARGS` (retried until `deadline`: right after a
    /// start, the node may not accept RPC yet): its stdout.
    pub fn cli(&self, args: &[&str], deadline: Instant) -> Result<String, String> {
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(self.config())
                .args(args)
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("{}: {e}", self.bin.display()))?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "garage {}: {}\n{}{}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the server (a crash: no shutdown of any kind).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data, ports and key, and waits
    /// until it answers.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()?;
        self.wait_ready(Instant::now() + START_DEADLINE)
    }

    /// Its directory (metadata, data, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

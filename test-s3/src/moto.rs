//! moto_server, kept for S3 Object Lock only (Garage has none).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{free_port, http, raw};
use crate::Creds;

/// Where moto_server is (`$SHEAR_MOTO_SERVER` first); `None`: not installed.
pub fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHEAR_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from("/opt/shear-test/moto/bin/moto_server");
    p.exists().then_some(p)
}

/// A running moto_server; killed on drop.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts moto_server and makes each `(bucket, extra headers)` (e.g.
    /// `x-amz-bucket-object-lock-enabled: true\r\n`).
    pub fn start(buckets: &[(&str, &str)]) -> Result<Moto, String> {
        let bin = moto_binary().ok_or("moto_server is not installed")?;
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !http(port, "GET", "/").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            if Instant::now() > deadline {
                return Err("moto_server did not start in 90 s".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for (bucket, headers) in buckets {
            let r = raw(port, "PUT", &format!("/{bucket}"), headers).unwrap_or_default();
            if !r.starts_with("HTTP/1.1 200") {
                return Err(format!("moto: creating bucket {bucket}: {r}"));
            }
        }
        Ok(m)
    }

    /// moto accepts any credentials.
    pub fn creds(&self) -> Creds {
        Creds {
            key_id: "shear-test".into(),
            secret: "shear-test-secret".into(),
            region: "us-east-1".into(),
        }
    }
}

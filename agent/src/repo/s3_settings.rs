//! `[s3]` in `shear.toml`: endpoint, region, addressing style, a
//! credentials file, and limits (bandwidth, request rate, parallel
//! requests) for every `s3://` repository this process opens.
//!
//! ```toml
//! [s3]
//! endpoint = "https://s3.example.net"   # else AWS_ENDPOINT_URL, else AWS
//! region = "eu-central-1"               # else AWS_REGION / AWS_DEFAULT_REGION
//! addressing_style = "path"             # or "virtual" (default: path with a custom endpoint)
//! credentials_file = "/etc/shear/s3.credentials"  # AWS ini: aws_access_key_id, aws_secret_access_key[, aws_session_token]
//! bwlimit = "20M"                       # bytes per second, up and down together
//! max_requests_per_second = 100         # for providers that throttle
//! max_requests = 16                     # parallel requests
//! ```
//!
//! The environment wins over the file: `SHEAR_S3_ENDPOINT`,
//! `SHEAR_S3_REGION`, `SHEAR_S3_VIRTUAL_HOSTED`, `AWS_*`,
//! `SHEAR_S3_BWLIMIT`, `SHEAR_S3_MAX_RPS`, `SHEAR_S3_MAX_REQUESTS`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[s3]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// Endpoint URL (`http://` allowed when it says so).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// `path` or `virtual`.
    pub addressing_style: Option<String>,
    /// AWS-style credentials file (ini; `[default]` or no section).
    pub credentials_file: Option<PathBuf>,
    /// Bandwidth limit, bytes per second (`"20M"`, `"512k"`).
    pub bwlimit: Option<String>,
    /// Request-rate limit, requests per second.
    pub max_requests_per_second: Option<u32>,
    /// Parallel requests (default 16).
    pub max_requests: Option<usize>,
}

static CURRENT: RwLock<Option<S3Settings>> = RwLock::new(None);

/// Makes `s` the settings of S3 repositories opened from now on.
pub fn install(s: S3Settings) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(s);
}

/// The installed settings (defaults if none).
pub fn current() -> S3Settings {
    CURRENT
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Static credentials read from a file.
#[derive(Clone, PartialEq, Eq)]
pub struct FileCredentials {
    /// Access key id.
    pub key_id: String,
    /// Secret.
    pub secret: String,
    /// Session token, if any.
    pub token: Option<String>,
}

impl std::fmt::Debug for FileCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileCredentials({})", self.key_id)
    }
}

/// Parses an AWS-style credentials file: `key = value` lines in the
/// `[default]` section or before any section; `#`/`;` comments.
pub fn parse_credentials(text: &str) -> Result<FileCredentials, String> {
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_default = true;
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(sec) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            in_default = sec.trim() == "default";
            continue;
        }
        if !in_default {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            return Err(format!("line {l:?}: expected key = value"));
        };
        let v = v.trim().to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" | "access_key_id" => id = Some(v),
            "aws_secret_access_key" | "secret_access_key" => secret = Some(v),
            "aws_session_token" | "session_token" => token = Some(v),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => {
            Ok(FileCredentials {
                key_id,
                secret,
                token,
            })
        }
        _ => Err("needs aws_access_key_id and aws_secret_access_key".into()),
    }
}

/// Reads a credentials file; refuses one others can read.
pub fn load_credentials(path: &Path) -> Result<FileCredentials, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "credentials file {} is readable by others: chmod 600 it",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    parse_credentials(&text).map_err(|e| format!("credentials file {}: {e}", path.display()))
}

/// Parses a byte rate: `"20M"`, `"512k"`, `"1G"`, `"1000"` (powers of 1024).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(format!("{s:?}: use a number with k, M or G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: use a number with k, M or G"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{s:?}: must be > 0")),
        Some(v) => Ok(v),
    }
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
/// Reservations may drive it negative; the caller waits the deficit.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        let burst = burst.max(1.0);
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` tokens at `now`; returns how long to wait before using
    /// them (zero if they were there).
    pub fn reserve_at(&self, now: Instant, n: f64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = s.1.max(now);
        s.0 -= n;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }

    /// [`Self::reserve_at`] now.
    pub fn reserve(&self, n: f64) -> Duration {
        self.reserve_at(Instant::now(), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_limits_rate_after_its_burst() {
        let b = TokenBucket::new(10.0, 10.0);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.reserve_at(t0, 1.0), Duration::ZERO);
        }
        // The 11th waits 1/10 s, the 12th 2/10 s.
        let w = b.reserve_at(t0, 1.0);
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-6, "{w:?}");
        let w = b.reserve_at(t0, 1.0);
        assert!((w.as_secs_f64() - 0.2).abs() < 1e-6, "{w:?}");
        // One second later the deficit (2) is paid and 8 are back.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..8 {
            assert_eq!(b.reserve_at(t1, 1.0), Duration::ZERO);
        }
        assert!(b.reserve_at(t1, 1.0) > Duration::ZERO);
        // Never more than the burst, however long it was idle.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(b.reserve_at(t2, 10.0), Duration::ZERO);
        assert!(b.reserve_at(t2, 1.0) > Duration::ZERO);
    }

    #[test]
    fn bandwidth_bucket_waits_bytes_over_rate() {
        // 1 MiB/s, 1 MiB burst: 3 MiB at once wait 2 s.
        let b = TokenBucket::new(1048576.0, 1048576.0);
        let t0 = Instant::now();
        let w = b.reserve_at(t0, 3.0 * 1048576.0);
        assert!((w.as_secs_f64() - 2.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn rates_and_credentials_parse() {
        assert_eq!(parse_rate("20M").unwrap(), 20 << 20);
        assert_eq!(parse_rate("512k").unwrap(), 512 << 10);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert!(parse_rate("0").unwrap_err().contains("> 0"));
        assert!(parse_rate("fast").unwrap_err().contains("k, M or G"));
        let c = parse_credentials(
            "# comment\n[other]\naws_access_key_id = no\n[default]\naws_access_key_id = AK\naws_secret_access_key = S=x\n",
        )
        .unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str()), ("AK", "S=x"));
        assert_eq!(c.token, None);
        assert!(parse_credentials("[default]\naws_access_key_id = AK\n")
            .unwrap_err()
            .contains("aws_secret_access_key"));
        let toml_cfg: S3Settings = toml::from_str(
            "endpoint = \"http://127.0.0.1:9000\"\naddressing_style = \"path\"\nbwlimit = \"1M\"\nmax_requests_per_second = 50\n",
        )
        .unwrap();
        assert_eq!(toml_cfg.max_requests_per_second, Some(50));
        assert!(toml::from_str::<S3Settings>("bogus = 1\n")
            .unwrap_err()
            .to_string()
            .contains("bogus"));
    }
}

//! `[[notify_target]]` and `[[notify_matcher]]` in shear.toml, and which
//! targets a notification goes to (Proxmox's matcher semantics).
//!
//! ```toml
//! [[notify_target]]
//! name = "ops"
//! type = "webhook"                 # HTTP POST, JSON body (docs/json.md)
//! url = "http://127.0.0.1:9000/shear"
//! headers = { Authorization = "Bearer abc" }
//! secret = "s3cret"                # X-Shear-Signature: sha256=HMAC(body)
//! match_severity = ["warning", "error"]   # optional per-target filter
//!
//! [[notify_target]]
//! name = "mail"
//! type = "smtp"
//! server = "mail.example.org:587"  # host[:port], default port 25 (465 with mode = "tls")
//! mode = "starttls"                # starttls | tls | insecure | opportunistic
//! username = "shear"               # optional AUTH
//! password_file = "/etc/shear/smtp.pass"
//! from = "shear@host.example.org"
//! to = ["ops@example.org"]
//!
//! [[notify_target]]
//! name = "local"
//! type = "sendmail"
//! command = "/usr/sbin/sendmail"   # default
//! from = "root@localhost"
//! to = ["root@localhost"]       # full addresses
//!
//! [[notify_matcher]]               # route: which targets get what
//! name = "errors-to-mail"
//! match_severity = ["error"]
//! match_job = ["nightly"]
//! match_vmid = ["100", "101"]
//! mode = "all"                     # all (default) | any of the match_* keys
//! invert_match = false
//! target = ["mail"]
//! ```
//!
//! Routing: a notification goes to each of the targets a job names
//! (`notify = [...]`, `shear backup --notify`) that
//! 1. passes the target's own `match_*` filters (all of those given), and
//! 2. if any `[[notify_matcher]]` names the target: at least one of those
//!    matchers matches; a target no matcher names gets everything that
//!    passes its own filters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Notification, Severity};

/// Default deadline of one send, seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 30;

/// One `[[notify_target]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawTarget")]
pub struct TargetConfig {
    /// Name jobs and matchers refer to.
    pub name: String,
    /// What kind of target, and its settings.
    pub kind: TargetKind,
    /// Only notifications of these severities (any, when empty).
    pub match_severity: Vec<Severity>,
    /// Only notifications of these jobs (any, when empty).
    pub match_job: Vec<String>,
    /// Only notifications naming one of these VMs (any, when empty).
    pub match_vmid: Vec<String>,
    /// Deadline of one send, seconds (default 30).
    pub timeout: u64,
}

/// A `[[notify_target]]` table as written: every key of every type
/// (serde's `flatten` cannot be combined with `deny_unknown_fields`);
/// [`TargetConfig`]'s `TryFrom` checks which keys the type takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    url: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    secret: Option<String>,
    server: Option<String>,
    mode: Option<SmtpMode>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    command: Option<PathBuf>,
    from: Option<String>,
    to: Option<Vec<String>>,
    #[serde(default)]
    match_severity: Vec<Severity>,
    #[serde(default)]
    match_job: Vec<String>,
    #[serde(default)]
    match_vmid: Vec<String>,
    timeout: Option<u64>,
}

impl TryFrom<RawTarget> for TargetConfig {
    type Error = String;

    fn try_from(r: RawTarget) -> Result<Self, String> {
        let name = r.name;
        let ty = r.kind.as_str();
        // Keys given that this type does not take.
        let given: [(&str, bool); 11] = [
            ("url", r.url.is_some()),
            ("headers", r.headers.is_some()),
            ("secret", r.secret.is_some()),
            ("server", r.server.is_some()),
            ("mode", r.mode.is_some()),
            ("username", r.username.is_some()),
            ("password", r.password.is_some()),
            ("password_file", r.password_file.is_some()),
            ("command", r.command.is_some()),
            ("from", r.from.is_some()),
            ("to", r.to.is_some()),
        ];
        let takes: &[&str] = match ty {
            "webhook" => &["url", "headers", "secret"],
            "smtp" => &[
                "server",
                "mode",
                "username",
                "password",
                "password_file",
                "from",
                "to",
            ],
            "sendmail" => &["command", "from", "to"],
            other => {
                return Err(format!(
                    "[[notify_target]] {name:?}: unknown type {other:?} (webhook, smtp, sendmail)"
                ))
            }
        };
        if let Some((k, _)) = given.iter().find(|(k, g)| *g && !takes.contains(k)) {
            return Err(format!(
                "[[notify_target]] {name:?}: key {k:?} does not apply to type {ty:?}"
            ));
        }
        let need = |v: Option<String>, key: &str| {
            v.ok_or_else(|| format!("[[notify_target]] {name:?}: type {ty:?} needs {key:?}"))
        };
        let kind = match ty {
            "webhook" => TargetKind::Webhook {
                url: need(r.url, "url")?,
                headers: r.headers.unwrap_or_default(),
                secret: r.secret,
            },
            "smtp" => TargetKind::Smtp {
                server: need(r.server, "server")?,
                mode: r.mode,
                username: r.username,
                password: r.password,
                password_file: r.password_file,
                from: need(r.from, "from")?,
                to: r.to.unwrap_or_default(),
            },
            _ => TargetKind::Sendmail {
                command: r.command,
                from: need(r.from, "from")?,
                to: r.to.unwrap_or_default(),
            },
        };
        Ok(TargetConfig {
            name,
            kind,
            match_severity: r.match_severity,
            match_job: r.match_job,
            match_vmid: r.match_vmid,
            timeout: r.timeout.unwrap_or(DEFAULT_TIMEOUT_S),
        })
    }
}

/// The kinds of target.
#[derive(Debug, Clone)]
pub enum TargetKind {
    /// HTTP(S) POST of the JSON rendering.
    Webhook {
        /// `http://` or `https://` URL.
        url: String,
        /// Extra request headers.
        headers: BTreeMap<String, String>,
        /// When set, `X-Shear-Signature: sha256=<hex HMAC-SHA256 of the body>`.
        secret: Option<String>,
    },
    /// Mail through an SMTP server.
    Smtp {
        /// `host[:port]`.
        server: String,
        /// Transport security (default: `starttls` when a username is
        /// set, else `opportunistic`).
        mode: Option<SmtpMode>,
        /// AUTH user.
        username: Option<String>,
        /// AUTH password.
        password: Option<String>,
        /// File holding the AUTH password (first line).
        password_file: Option<PathBuf>,
        /// Sender address.
        from: String,
        /// Recipients.
        to: Vec<String>,
    },
    /// Mail through the local sendmail binary.
    Sendmail {
        /// The sendmail program (default `/usr/sbin/sendmail`).
        command: Option<PathBuf>,
        /// Sender address.
        from: String,
        /// Recipients.
        to: Vec<String>,
    },
}

impl TargetKind {
    /// `webhook`, `smtp`, `sendmail`.
    pub fn type_name(&self) -> &'static str {
        match self {
            TargetKind::Webhook { .. } => "webhook",
            TargetKind::Smtp { .. } => "smtp",
            TargetKind::Sendmail { .. } => "sendmail",
        }
    }
}

/// SMTP transport security.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpMode {
    /// Plain connection, STARTTLS required.
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
    /// Plain text only (a trusted local relay).
    Insecure,
    /// STARTTLS when the server offers it, else plain text.
    Opportunistic,
}

/// One `[[notify_matcher]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatcherConfig {
    /// Name (for messages).
    pub name: String,
    /// Severities that match (any, when empty).
    #[serde(default)]
    pub match_severity: Vec<Severity>,
    /// Jobs that match (any, when empty).
    #[serde(default)]
    pub match_job: Vec<String>,
    /// VMs that match (any, when empty).
    #[serde(default)]
    pub match_vmid: Vec<String>,
    /// `all` (default): every given match_* key must match; `any`: one.
    #[serde(default)]
    pub mode: MatchMode,
    /// Negate the result.
    #[serde(default)]
    pub invert_match: bool,
    /// Targets notified when this matcher matches.
    pub target: Vec<String>,
}

/// How a matcher combines its match_* keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchMode {
    /// Every given key matches.
    #[default]
    All,
    /// At least one given key matches.
    Any,
}

/// The results of the given match_* keys (an empty key is not given).
fn key_results(
    n: &Notification,
    severity: &[Severity],
    job: &[String],
    vmid: &[String],
) -> Vec<bool> {
    let mut r = Vec::new();
    if !severity.is_empty() {
        r.push(severity.contains(&n.severity));
    }
    if !job.is_empty() {
        r.push(job.contains(&n.job));
    }
    if !vmid.is_empty() {
        r.push(n.vms.iter().any(|v| vmid.contains(&v.vmid)));
    }
    r
}

impl MatcherConfig {
    /// Whether this matcher matches `n`. A matcher without keys matches
    /// everything (before `invert_match`).
    pub fn matches(&self, n: &Notification) -> bool {
        let r = key_results(n, &self.match_severity, &self.match_job, &self.match_vmid);
        let m = match self.mode {
            MatchMode::All => r.iter().all(|b| *b),
            MatchMode::Any => r.is_empty() || r.iter().any(|b| *b),
        };
        m != self.invert_match
    }
}

impl TargetConfig {
    /// Whether the target's own filters let `n` through.
    pub fn filters_pass(&self, n: &Notification) -> bool {
        key_results(n, &self.match_severity, &self.match_job, &self.match_vmid)
            .iter()
            .all(|b| *b)
    }
}

/// Whether `target` gets `n` (see the module docs).
pub fn routed(target: &TargetConfig, matchers: &[MatcherConfig], n: &Notification) -> bool {
    if !target.filters_pass(n) {
        return false;
    }
    let mut naming = matchers
        .iter()
        .filter(|m| m.target.contains(&target.name))
        .peekable();
    if naming.peek().is_none() {
        return true;
    }
    naming.any(|m| m.matches(n))
}

/// Check a configuration's targets and matchers: unique names, known
/// target names in matchers, well-formed URLs and addresses.
pub fn validate(targets: &[TargetConfig], matchers: &[MatcherConfig]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for t in targets {
        if t.name.is_empty() {
            return Err("a [[notify_target]] has an empty name".into());
        }
        if !seen.insert(t.name.as_str()) {
            return Err(format!("[[notify_target]] {:?} is defined twice", t.name));
        }
        if t.timeout == 0 {
            return Err(format!(
                "[[notify_target]] {:?}: timeout must be at least 1 second",
                t.name
            ));
        }
        match &t.kind {
            TargetKind::Webhook { url, .. } => {
                let u = reqwest::Url::parse(url)
                    .map_err(|e| format!("[[notify_target]] {:?}: bad url {url:?}: {e}", t.name))?;
                if u.scheme() != "http" && u.scheme() != "https" {
                    return Err(format!(
                        "[[notify_target]] {:?}: url must be http:// or https://, not {url:?}",
                        t.name
                    ));
                }
            }
            TargetKind::Smtp {
                from,
                to,
                password,
                password_file,
                ..
            } => {
                check_addresses(&t.name, from, to)?;
                if password.is_some() && password_file.is_some() {
                    return Err(format!(
                        "[[notify_target]] {:?}: give password or password_file, not both",
                        t.name
                    ));
                }
            }
            TargetKind::Sendmail { from, to, .. } => check_addresses(&t.name, from, to)?,
        }
    }
    for m in matchers {
        for name in &m.target {
            if !seen.contains(name.as_str()) {
                return Err(format!(
                    "[[notify_matcher]] {:?} names target {name:?}, which is not a [[notify_target]]",
                    m.name
                ));
            }
        }
    }
    Ok(())
}

fn check_addresses(target: &str, from: &str, to: &[String]) -> Result<(), String> {
    use lettre::message::Mailbox;
    from.parse::<Mailbox>()
        .map_err(|e| format!("[[notify_target]] {target:?}: bad from address {from:?}: {e}"))?;
    if to.is_empty() {
        return Err(format!("[[notify_target]] {target:?}: to is empty"));
    }
    for a in to {
        a.parse::<Mailbox>()
            .map_err(|e| format!("[[notify_target]] {target:?}: bad to address {a:?}: {e}"))?;
    }
    Ok(())
}

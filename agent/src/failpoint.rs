//! Test-only failpoints in the durable write path (F-31, F-32, F-34).
//!
//! Every step of a durable write ([`crate::fsutil::write_atomic`], the
//! repository backend's deletes, renames and directory changes) passes a
//! named point first. A point's name is `<kind>:<step>`:
//!
//! - kind, from the path: `chunk`, `index`, `manifest`, `record` (the run
//!   record), `snapshot` (a backup directory), `file` (anything else);
//! - step: `create` (before the temp file is created), `write` (before the
//!   data is written), `fsync` (before the temp file is fsynced), `rename`
//!   (before it is moved to its name), `dir-fsync` (before the directory is
//!   fsynced), `done` (everything durable, before returning), `delete`,
//!   `mkdir`, `remove-tree`; on an S3 repository (`repo/s3.rs`, keys taken
//!   as paths): `put` (before a PUT), `put-done` (after it), `delete`
//!   (before a DELETE).
//!
//! Honoured only when [`TEST_HOOKS`] (debug builds, or the `test-hooks`
//! feature): release builds compile every call down to nothing, so no
//! environment variable can make a production shear kill itself.
//!
//! - `SHEAR_TEST_KILL_AT=<pattern>:<n>`: SIGKILL this process at the n-th
//!   (1-based) hit of a point matching `pattern`;
//! - `SHEAR_TEST_FAIL_AT=<pattern>:<n>`: that hit fails with EIO (or the
//!   errno in `SHEAR_TEST_FAIL_ERRNO`) instead of doing the step, e.g.
//!   `chunk:fsync:3` is the third chunk's fsync returning EIO;
//! - `SHEAR_TEST_FAILPOINT_LOG=<file>`: append every hit's name to `file`,
//!   one a line (a campaign learns the sequence of points from an unkilled
//!   run).
//!
//! A pattern is a point name, `*`, `<kind>:*` or `*:<step>`.
//!
//! In-process tests use [`configure`] instead of the environment, and
//! [`record_start`]/[`record_take`] to log every durable file-system
//! operation with its data (a crash-state replayer, F-32).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::job::backup::TEST_HOOKS;

/// What a failpoint does at its chosen hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL the process.
    Kill,
    /// Fail the step with this errno.
    Fail(i32),
}

/// One armed failpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Point name or pattern (see the module docs).
    pub pattern: String,
    /// Which matching hit (1-based).
    pub nth: u64,
    /// What happens then.
    pub action: Action,
}

impl Rule {
    /// Parses `<pattern>:<n>`.
    pub fn parse(spec: &str, action: Action) -> Option<Rule> {
        let (pattern, n) = spec.rsplit_once(':')?;
        let nth = n.trim().parse().ok().filter(|n| *n > 0)?;
        Some(Rule {
            pattern: pattern.to_string(),
            nth,
            action,
        })
    }

    fn matches(&self, name: &str) -> bool {
        if self.pattern == "*" || self.pattern == name {
            return true;
        }
        let (kind, step) = name.split_once(':').unwrap_or((name, ""));
        match self.pattern.split_once(':') {
            Some((k, "*")) => k == kind,
            Some(("*", s)) => s == step,
            _ => false,
        }
    }
}

struct Armed {
    rules: Vec<(Rule, AtomicU64)>,
    log: Option<PathBuf>,
}

fn from_env() -> Armed {
    let errno = std::env::var("SHEAR_TEST_FAIL_ERRNO")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(libc::EIO);
    let mut rules = Vec::new();
    if let Some(r) = std::env::var("SHEAR_TEST_KILL_AT")
        .ok()
        .and_then(|s| Rule::parse(&s, Action::Kill))
    {
        rules.push((r, AtomicU64::new(0)));
    }
    if let Some(r) = std::env::var("SHEAR_TEST_FAIL_AT")
        .ok()
        .and_then(|s| Rule::parse(&s, Action::Fail(errno)))
    {
        rules.push((r, AtomicU64::new(0)));
    }
    Armed {
        rules,
        log: std::env::var_os("SHEAR_TEST_FAILPOINT_LOG").map(PathBuf::from),
    }
}

static ENV: OnceLock<Armed> = OnceLock::new();
static LOCAL: Mutex<Option<Armed>> = Mutex::new(None);

/// Arms `rules` for this process (in-process tests), replacing the ones set
/// before; an empty list disarms. The environment's rules still apply.
pub fn configure(rules: Vec<Rule>) {
    let armed = Armed {
        rules: rules.into_iter().map(|r| (r, AtomicU64::new(0))).collect(),
        log: None,
    };
    *LOCAL.lock().unwrap_or_else(PoisonError::into_inner) = Some(armed);
}

fn apply(armed: &Armed, name: &str) -> io::Result<()> {
    if let Some(log) = &armed.log {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{name}");
        }
    }
    for (rule, count) in &armed.rules {
        if !rule.matches(name) {
            continue;
        }
        if count.fetch_add(1, Ordering::SeqCst) + 1 != rule.nth {
            continue;
        }
        match rule.action {
            Action::Kill => {
                let _ = io::stderr().flush();
                let _ = rustix::process::kill_process(
                    rustix::process::getpid(),
                    rustix::process::Signal::KILL,
                );
                // SIGKILL cannot be caught; never reached.
                std::process::abort();
            }
            Action::Fail(errno) => {
                return Err(io::Error::new(
                    io::Error::from_raw_os_error(errno).kind(),
                    FailpointError {
                        name: name.into(),
                        errno,
                    },
                ))
            }
        }
    }
    Ok(())
}

/// The error an injected failure carries (its `raw_os_error` is lost by
/// wrapping, so the errno is kept and shown here).
#[derive(Debug, thiserror::Error)]
#[error("{} (injected at failpoint {name})", io::Error::from_raw_os_error(*errno))]
pub struct FailpointError {
    /// The point.
    pub name: String,
    /// The errno injected.
    pub errno: i32,
}

/// The kind of object `path` is (see the module docs).
pub fn kind_of(path: &Path) -> &'static str {
    let s = path.to_string_lossy();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    if s.contains("/chunks/") {
        "chunk"
    } else if name.ends_with(".fidx") {
        "index"
    } else if name == "manifest.blob" {
        "manifest"
    } else if name.starts_with("backup-") && name.ends_with(".json") {
        "record"
    } else if s.contains("/backups/vm/") {
        "snapshot"
    } else {
        "file"
    }
}

/// Passes the point `<kind>:<step>`: may kill the process or fail the
/// step (see the module docs). A no-op unless [`TEST_HOOKS`].
#[inline]
pub fn hit(kind: &str, step: &str) -> io::Result<()> {
    if !TEST_HOOKS {
        return Ok(());
    }
    hit_slow(kind, step)
}

#[cold]
fn hit_slow(kind: &str, step: &str) -> io::Result<()> {
    let env = ENV.get_or_init(from_env);
    let local = LOCAL.lock().unwrap_or_else(PoisonError::into_inner);
    if env.rules.is_empty() && env.log.is_none() && local.is_none() {
        return Ok(());
    }
    let name = format!("{kind}:{step}");
    apply(env, &name)?;
    match &*local {
        Some(armed) => apply(armed, &name),
        None => Ok(()),
    }
}

/// One durable file-system operation, as logged for crash replay (F-32).
/// Paths are absolute, as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    /// A new empty file.
    Create(PathBuf),
    /// The file's whole contents written (not yet durable).
    Write(PathBuf, Vec<u8>),
    /// `fsync` of a file: its contents are durable.
    Fsync(PathBuf),
    /// `rename(from, to)`.
    Rename(PathBuf, PathBuf),
    /// `link(from, to)`.
    Link(PathBuf, PathBuf),
    /// `unlink`.
    Unlink(PathBuf),
    /// `mkdir`.
    Mkdir(PathBuf),
    /// `rmdir` (of an empty directory).
    Rmdir(PathBuf),
    /// `fsync` of a directory: the names in it are durable.
    FsyncDir(PathBuf),
    /// A marker the test adds (e.g. "backup X reported committed").
    Mark(String),
}

static RECORDING: Mutex<Option<Vec<FsOp>>> = Mutex::new(None);

/// Starts logging every durable operation of this process (in-process
/// tests; a no-op unless [`TEST_HOOKS`]).
pub fn record_start() {
    if TEST_HOOKS {
        *RECORDING.lock().unwrap_or_else(PoisonError::into_inner) = Some(Vec::new());
    }
}

/// Stops logging and returns the log.
pub fn record_take() -> Vec<FsOp> {
    RECORDING
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .unwrap_or_default()
}

/// Logs `op` if recording (done right after the operation succeeded).
#[inline]
pub fn record(op: impl FnOnce() -> FsOp) {
    if !TEST_HOOKS {
        return;
    }
    let mut log = RECORDING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(log) = log.as_mut() {
        log.push(op());
    }
}

/// Whether operations are being logged.
pub fn recording() -> bool {
    TEST_HOOKS
        && RECORDING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_kinds() {
        let r = Rule::parse("chunk:fsync:3", Action::Kill).unwrap();
        assert_eq!((r.pattern.as_str(), r.nth), ("chunk:fsync", 3));
        assert!(r.matches("chunk:fsync") && !r.matches("index:fsync"));
        let any_step = Rule::parse("*:rename:1", Action::Kill).unwrap();
        assert!(any_step.matches("manifest:rename") && !any_step.matches("manifest:fsync"));
        let any_kind = Rule::parse("index:*:2", Action::Kill).unwrap();
        assert!(any_kind.matches("index:done") && !any_kind.matches("chunk:done"));
        assert!(Rule::parse("*:1", Action::Kill).unwrap().matches("x:y"));
        assert!(Rule::parse("chunk:fsync:0", Action::Kill).is_none());
        assert!(Rule::parse("chunk", Action::Kill).is_none());
        assert_eq!(kind_of(Path::new("/r/chunks/ab/abcd")), "chunk");
        assert_eq!(kind_of(Path::new("/r/backups/vm/1/t/d0.fidx")), "index");
        assert_eq!(
            kind_of(Path::new("/r/backups/vm/1/t/manifest.blob")),
            "manifest"
        );
        assert_eq!(kind_of(Path::new("/run/shear/backup-100.json")), "record");
        assert_eq!(kind_of(Path::new("/r/backups/vm/1/t")), "snapshot");
        assert_eq!(kind_of(Path::new("/r/shear-repo.json")), "file");
    }
}

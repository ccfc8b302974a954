//! API tokens for the TCP listeners: `shear token create NAME` prints
//! `NAME:SECRET` once; `state_dir/tokens.json` keeps only a keyed BLAKE3
//! hash of the secret (mode 0600). A request carries
//! `Authorization: Bearer NAME:SECRET`; the hash is compared in constant
//! time ([`blake3::Hash`]'s equality).
//!
//! A token may be narrowed (F-48): read-only (GET only), limited to some
//! VMs (a tenant: other VMs' backups, tasks and jobs look exactly as if
//! they did not exist), given an expiry, or disabled. Changes to the file
//! take `tokens.lock` (flock), so concurrent `token` commands lose no
//! writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{write_atomic, Existing};

/// One stored token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    /// Name.
    pub name: String,
    /// Hex BLAKE3 of the secret (keyed by the name, so two tokens with the
    /// same secret hash differently).
    pub hash: String,
    /// When it was created (RFC 3339).
    pub created: String,
    /// Only GET requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Only these VMs (absent: every VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmids: Option<BTreeSet<String>>,
    /// Rejected from this instant on (RFC 3339; unreadable = expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Rejected while set (`shear token disable`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// How a new token is narrowed.
#[derive(Debug, Clone, Default)]
pub struct TokenLimits {
    /// Only GET requests.
    pub read_only: bool,
    /// Only these VMs.
    pub vmids: Option<BTreeSet<String>>,
    /// Expiry.
    pub expires: Option<jiff::Timestamp>,
}

/// What an authenticated request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The token's name (`None` on the unix socket).
    pub token: Option<String>,
    /// Only GET requests.
    pub read_only: bool,
    /// Only these VMs (`None`: all).
    pub vmids: Option<BTreeSet<String>>,
}

impl Scope {
    /// The unix socket's scope: everything.
    pub fn full() -> Scope {
        Scope {
            token: None,
            read_only: false,
            vmids: None,
        }
    }

    /// Whether this scope may see VM `vmid`.
    pub fn sees_vm(&self, vmid: &str) -> bool {
        self.vmids.as_ref().is_none_or(|v| v.contains(vmid))
    }

    /// Whether this scope covers every VM (host-wide views need it).
    pub fn is_host_wide(&self) -> bool {
        self.vmids.is_none()
    }
}

/// Where tokens are kept.
pub fn tokens_path(state_dir: &Path) -> PathBuf {
    state_dir.join("tokens.json")
}

fn hash_secret(name: &str, secret: &str) -> blake3::Hash {
    let mut h = blake3::Hasher::new_derive_key("shear api token v1");
    h.update(&u64::try_from(name.len()).unwrap_or(u64::MAX).to_le_bytes());
    h.update(name.as_bytes());
    h.update(secret.as_bytes());
    h.finalize()
}

/// Hold `tokens.lock` exclusively while `f` reads, changes and saves the
/// tokens (two concurrent `token create`s must both land).
fn locked<T>(state_dir: &Path, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    super::private_dir(state_dir)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join("tokens.lock"))?;
    lock.lock()?;
    let r = f();
    drop(lock);
    r
}

/// Load the tokens (none when the file does not exist).
pub fn load(state_dir: &Path) -> anyhow::Result<Vec<StoredToken>> {
    match std::fs::read(tokens_path(state_dir)) {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn save(state_dir: &Path, t: &[StoredToken]) -> anyhow::Result<()> {
    super::private_dir(state_dir)?;
    write_atomic(
        &tokens_path(state_dir),
        &serde_json::to_vec_pretty(t)?,
        Existing::Replace,
    )?;
    Ok(())
}

/// Create a token; returns the `NAME:SECRET` string to hand out.
pub fn create(state_dir: &Path, name: &str, limits: &TokenLimits) -> anyhow::Result<String> {
    use rand::RngCore;
    crate::repo::names::validate_name("token name", name)?;
    if let Some(v) = &limits.vmids {
        anyhow::ensure!(!v.is_empty(), "a token limited to no VM could do nothing");
        for id in v {
            crate::repo::VmId::new(id)?;
        }
    }
    locked(state_dir, || {
        let mut all = load(state_dir)?;
        if all.iter().any(|t| t.name == name) {
            anyhow::bail!("a token named {name:?} exists already (delete it first)");
        }
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        let secret = hex::encode(b);
        all.push(StoredToken {
            name: name.to_owned(),
            hash: hash_secret(name, &secret).to_hex().to_string(),
            created: jiff::Timestamp::now().to_string(),
            read_only: limits.read_only,
            vmids: limits.vmids.clone(),
            expires: limits.expires.map(|e| e.to_string()),
            disabled: false,
        });
        save(state_dir, &all)?;
        Ok(format!("{name}:{secret}"))
    })
}

/// Delete a token; false when there was none of that name.
pub fn delete(state_dir: &Path, name: &str) -> anyhow::Result<bool> {
    locked(state_dir, || {
        let mut all = load(state_dir)?;
        let n = all.len();
        all.retain(|t| t.name != name);
        if all.len() == n {
            return Ok(false);
        }
        save(state_dir, &all)?;
        Ok(true)
    })
}

/// Disable (or enable again) a token; false when there is none of that
/// name.
pub fn set_disabled(state_dir: &Path, name: &str, disabled: bool) -> anyhow::Result<bool> {
    locked(state_dir, || {
        let mut all = load(state_dir)?;
        let Some(t) = all.iter_mut().find(|t| t.name == name) else {
            return Ok(false);
        };
        t.disabled = disabled;
        save(state_dir, &all)?;
        Ok(true)
    })
}

/// The scope of `presented` (`NAME:SECRET`) at `now`, or `None` when it is
/// unknown, wrong, disabled or expired (all alike to the caller).
pub fn authenticate(
    tokens: &[StoredToken],
    presented: &str,
    now: jiff::Timestamp,
) -> Option<Scope> {
    let t = matching(tokens, presented)?;
    let expired = t
        .expires
        .as_deref()
        .is_some_and(|e| e.parse::<jiff::Timestamp>().map_or(true, |e| now >= e));
    if t.disabled || expired {
        return None;
    }
    Some(Scope {
        token: Some(t.name.clone()),
        read_only: t.read_only,
        vmids: t.vmids.clone(),
    })
}

/// The token `presented` (`NAME:SECRET`) names, if its secret is right.
fn matching<'a>(tokens: &'a [StoredToken], presented: &str) -> Option<&'a StoredToken> {
    let (name, secret) = presented.split_once(':')?;
    let t = tokens.iter().find(|t| t.name == name)?;
    let want = blake3::Hash::from_hex(&t.hash).ok()?;
    // blake3::Hash's == is constant-time.
    (hash_secret(name, secret) == want).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_check_delete() {
        let d = tempfile::tempdir().unwrap();
        let none = TokenLimits::default();
        let tok = create(d.path(), "ci", &none).unwrap();
        create(d.path(), "ci", &none).unwrap_err();
        create(d.path(), "../x", &none).unwrap_err();
        let all = load(d.path()).unwrap();
        assert!(!std::fs::read_to_string(tokens_path(d.path()))
            .unwrap()
            .contains(tok.split_once(':').unwrap().1));
        let now = jiff::Timestamp::now();
        let valid = |all: &[StoredToken], p: &str| authenticate(all, p, now).is_some();
        assert!(valid(&all, &tok));
        assert!(!valid(&all, "ci:00"));
        assert!(!valid(&all, &tok.replace("ci:", "other:")));
        assert!(!valid(&all, "garbage"));
        assert!(delete(d.path(), "ci").unwrap());
        assert!(!delete(d.path(), "ci").unwrap());
        assert!(!valid(&load(d.path()).unwrap(), &tok));
    }

    #[test]
    fn limits_disable_and_expiry_f48() {
        let d = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now();
        let ro = create(
            d.path(),
            "ro",
            &TokenLimits {
                read_only: true,
                vmids: Some(["100".to_string()].into()),
                expires: Some(now + jiff::SignedDuration::from_secs(60)),
            },
        )
        .unwrap();
        let all = load(d.path()).unwrap();
        let s = authenticate(&all, &ro, now).unwrap();
        assert!(s.read_only && s.sees_vm("100") && !s.sees_vm("101") && !s.is_host_wide());
        assert_eq!(s.token.as_deref(), Some("ro"));
        // Expired: rejected like a wrong secret.
        let later = now + jiff::SignedDuration::from_secs(61);
        assert_eq!(authenticate(&all, &ro, later), None);
        assert!(set_disabled(d.path(), "ro", true).unwrap());
        assert_eq!(authenticate(&load(d.path()).unwrap(), &ro, now), None);
        assert!(set_disabled(d.path(), "ro", false).unwrap());
        assert!(authenticate(&load(d.path()).unwrap(), &ro, now).is_some());
        assert!(!set_disabled(d.path(), "nope", true).unwrap());
        create(
            d.path(),
            "empty",
            &TokenLimits {
                vmids: Some(BTreeSet::new()),
                ..TokenLimits::default()
            },
        )
        .unwrap_err();
        // A token file of the previous format (no limits) still loads.
        std::fs::write(
            tokens_path(d.path()),
            r#"[{"name":"old","hash":"00","created":"2026-01-01T00:00:00Z"}]"#,
        )
        .unwrap();
        assert!(!load(d.path()).unwrap()[0].read_only);
    }

    #[test]
    fn concurrent_creates_and_deletes_lose_no_write_f48() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        create(&dir, "keep", &TokenLimits::default()).unwrap();
        for i in 0..8 {
            create(&dir, &format!("gone{i}"), &TokenLimits::default()).unwrap();
        }
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        create(&dir, &format!("t{i}"), &TokenLimits::default()).map(|_| ())
                    } else {
                        delete(&dir, &format!("gone{}", i / 2)).map(|_| ())
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let names: BTreeSet<String> = load(&dir).unwrap().into_iter().map(|t| t.name).collect();
        let want: BTreeSet<String> = std::iter::once("keep".to_string())
            .chain((0..16).step_by(2).map(|i| format!("t{i}")))
            .collect();
        assert_eq!(names, want);
    }
}

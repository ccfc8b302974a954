//! API tokens for the TCP listeners: `shear token create NAME` prints
//! `NAME:SECRET` once; `state_dir/tokens.json` keeps only a BLAKE3 hash
//! of the secret (mode 0600). A request carries
//! `Authorization: Bearer NAME:SECRET`; the hash is compared in constant
//! time ([`blake3::Hash`]'s equality).

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
pub fn create(state_dir: &Path, name: &str) -> anyhow::Result<String> {
    use rand::RngCore;
    crate::repo::names::validate_name("token name", name)?;
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
    });
    save(state_dir, &all)?;
    Ok(format!("{name}:{secret}"))
}

/// Delete a token; false when there was none of that name.
pub fn delete(state_dir: &Path, name: &str) -> anyhow::Result<bool> {
    let mut all = load(state_dir)?;
    let n = all.len();
    all.retain(|t| t.name != name);
    if all.len() == n {
        return Ok(false);
    }
    save(state_dir, &all)?;
    Ok(true)
}

/// Whether `presented` (`NAME:SECRET`) is a valid token among `tokens`.
pub fn check(tokens: &[StoredToken], presented: &str) -> bool {
    let Some((name, secret)) = presented.split_once(':') else {
        return false;
    };
    let Some(t) = tokens.iter().find(|t| t.name == name) else {
        return false;
    };
    let Ok(want) = blake3::Hash::from_hex(&t.hash) else {
        return false;
    };
    // blake3::Hash's == is constant-time.
    hash_secret(name, secret) == want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_check_delete() {
        let d = tempfile::tempdir().unwrap();
        let tok = create(d.path(), "ci").unwrap();
        create(d.path(), "ci").unwrap_err();
        create(d.path(), "../x").unwrap_err();
        let all = load(d.path()).unwrap();
        assert!(!std::fs::read_to_string(tokens_path(d.path()))
            .unwrap()
            .contains(tok.split_once(':').unwrap().1));
        assert!(check(&all, &tok));
        assert!(!check(&all, "ci:00"));
        assert!(!check(&all, &tok.replace("ci:", "other:")));
        assert!(!check(&all, "garbage"));
        assert!(delete(d.path(), "ci").unwrap());
        assert!(!delete(d.path(), "ci").unwrap());
        assert!(!check(&load(d.path()).unwrap(), &tok));
    }
}

//! Keys and authenticated encryption (F-43, F-47).
//!
//! A key file holds a random 32-byte master secret, wrapped with AES-256-GCM
//! under a key-encryption key derived from a passphrase with Argon2id. From
//! the master secret, BLAKE3 `derive_key` makes:
//! - the AES-256-GCM data key (chunks, indexes, manifests),
//! - the chunk-digest key: chunk addresses are keyed BLAKE3 of the plaintext,
//!   so dedup is scoped to one key and digests reveal nothing (F-43),
//! - the fingerprint (16 bytes) recorded in the repository config and in
//!   every manifest, so a wrong key is named before anything is written.
//!
//! Nonces are 96-bit random; at 4 MiB per chunk the 2^32 messages-per-key
//! bound is 16 PiB of unique data. All secret bytes live in `Zeroizing`
//! buffers or zeroize-on-drop cipher states (aes `zeroize` feature).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::error::{RepoError, Result};
use super::format::{Digest, NONCE_LEN, TAG_LEN};
use super::master::MasterSeal;
use crate::fsutil::{self, Existing};

const KEYFILE_FORMAT: &str = "shear-key";
const KEYFILE_VERSION: u32 = 1;
/// A key file that also carries the key sealed to a master key.
const KEYFILE_VERSION_SEALED: u32 = 2;
/// Largest key file read (it is a few hundred bytes).
const MAX_KEYFILE_LEN: u64 = 64 << 10;
const WRAP_AAD: &[u8] = b"shear key file v1";

// DO NOT MODIFY: derivation contexts (changing one changes every key's use).
const CTX_DATA_KEY: &str = "shear 2026 aes-256-gcm data key v1";
const CTX_DIGEST_KEY: &str = "shear 2026 chunk digest key v1";
const CTX_FINGERPRINT: &str = "shear 2026 key fingerprint v1";

/// Argon2id cost parameters stored in the key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: ~0.2 s here, fine for an interactive unlock.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests only (never for real keys).
    pub fn insecure_fast_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileJson {
    format: String,
    version: u32,
    kdf: KdfJson,
    wrapped_key: WrapJson,
    fingerprint: String,
    created: String,
    /// The key sealed to a master key (version 2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    master_seal: Option<MasterSeal>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KdfJson {
    alg: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WrapJson {
    alg: String,
    nonce: String,
    ciphertext: String,
}

/// A key fingerprint: 16 bytes, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 16]);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = RepoError;
    fn from_str(s: &str) -> Result<Self> {
        let mut fp = [0u8; 16];
        hex::decode_to_slice(s, &mut fp)
            .map_err(|e| RepoError::invalid("key fingerprint", format!("{s:?}: {e}")))?;
        Ok(Fingerprint(fp))
    }
}

/// An unlocked repository key. Secret bytes are zeroised on drop.
pub struct Key {
    master: Zeroizing<[u8; 32]>,
    cipher: Aes256Gcm,
    digest_key: Zeroizing<[u8; 32]>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Key")
            .field("fingerprint", &self.fingerprint.to_string())
            .finish_non_exhaustive()
    }
}

impl Key {
    fn from_master(master: Zeroizing<[u8; 32]>) -> Self {
        let data_key = Zeroizing::new(blake3::derive_key(CTX_DATA_KEY, &master[..]));
        let digest_key = Zeroizing::new(blake3::derive_key(CTX_DIGEST_KEY, &master[..]));
        let fp_full = blake3::derive_key(CTX_FINGERPRINT, &master[..]);
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&fp_full[..16]);
        let cipher = Aes256Gcm::new((&*data_key).into());
        Key {
            master,
            cipher,
            digest_key,
            fingerprint: Fingerprint(fp),
        }
    }

    /// Generates a new random key (not yet saved).
    pub fn generate() -> Self {
        let mut master = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut master[..]);
        Key::from_master(master)
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Keyed chunk digest of `data`.
    pub fn digest(&self, data: &[u8]) -> Digest {
        *blake3::keyed_hash(&self.digest_key, data).as_bytes()
    }

    /// A hasher that gives [`Key::digest`] of what it is fed.
    pub(crate) fn digest_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.digest_key)
    }

    /// Encrypts `buf` in place and appends the tag; returns the nonce.
    pub(crate) fn seal(&self, aad: &[u8], buf: &mut Vec<u8>) -> Result<[u8; NONCE_LEN]> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, buf)
            .map_err(|_| RepoError::corrupt("object", "AES-GCM encryption failed"))?;
        buf.extend_from_slice(&tag);
        Ok(nonce)
    }

    /// Decrypts `ct || tag` into `buf` (cleared; its allocation is reused);
    /// any tampering or a wrong key fails here.
    pub(crate) fn open_into(
        &self,
        what: &str,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ct_and_tag: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let Some(split) = ct_and_tag.len().checked_sub(TAG_LEN) else {
            return Err(RepoError::corrupt(
                what,
                "encrypted payload shorter than its tag",
            ));
        };
        let (ct, tag) = ct_and_tag.split_at(split);
        buf.clear();
        buf.extend_from_slice(ct);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, tag.into())
            .map_err(|_| {
                buf.clear();
                RepoError::corrupt(
                    what,
                    "authentication failed (damaged, tampered, or encrypted with another key)",
                )
            })
    }

    /// Creates a new key file at `path` (never overwrites; mode 0600) and
    /// returns the key.
    pub fn create_file(path: &Path, passphrase: &[u8], kdf: KdfParams) -> Result<Key> {
        let key = Key::generate();
        key.save_file(path, passphrase, kdf, None)?;
        Ok(key)
    }

    /// Writes this key to a new key file at `path` (never overwrites; mode
    /// 0600), wrapped under `passphrase`. With `seal`, the file also
    /// carries the key sealed to a master key (version 2), so the
    /// master key's holder can recover it without the passphrase.
    pub fn save_file(
        &self,
        path: &Path,
        passphrase: &[u8],
        kdf: KdfParams,
        seal: Option<&MasterSeal>,
    ) -> Result<()> {
        if let Some(s) = seal {
            if s.key_fingerprint != self.fingerprint.to_string() {
                return Err(RepoError::invalid(
                    "master seal",
                    "it seals another key than the one being saved",
                ));
            }
        }
        let (kdf, wrapped_key) = wrap_secret(passphrase, kdf, WRAP_AAD, &self.master)?;
        let json = KeyFileJson {
            format: KEYFILE_FORMAT.into(),
            version: if seal.is_some() {
                KEYFILE_VERSION_SEALED
            } else {
                KEYFILE_VERSION
            },
            kdf,
            wrapped_key,
            fingerprint: self.fingerprint.to_string(),
            created: super::names::format_time(time::OffsetDateTime::now_utc()),
            master_seal: seal.cloned(),
        };
        let mut text = serde_json::to_vec_pretty(&json)
            .map_err(|e| RepoError::invalid("key file", e.to_string()))?;
        text.push(b'\n');
        write_new_private_file(path, &text)
    }

    /// Reads the fingerprint stored in a key file (no passphrase needed).
    pub fn file_fingerprint(path: &Path) -> Result<Fingerprint> {
        let json: KeyFileJson = read_private_json(path, "key file")?;
        json.fingerprint.parse()
    }

    /// The master seal a key file carries, if any (no passphrase needed).
    pub fn file_master_seal(path: &Path) -> Result<Option<MasterSeal>> {
        let json: KeyFileJson = read_private_json(path, "key file")?;
        Ok(json.master_seal)
    }

    /// Unlocks a key file. Refuses files readable by group or others (F-47).
    pub fn load_file(path: &Path, passphrase: &[u8]) -> Result<Key> {
        let json: KeyFileJson = read_private_json(path, "key file")?;
        if json.format != KEYFILE_FORMAT
            || !(KEYFILE_VERSION..=KEYFILE_VERSION_SEALED).contains(&json.version)
        {
            return Err(RepoError::corrupt(
                format!("key file {}", path.display()),
                format!("unsupported format {} v{}", json.format, json.version),
            ));
        }
        let master = unwrap_secret(path, passphrase, &json.kdf, &json.wrapped_key, WRAP_AAD)?;
        let key = Key::from_master(master);
        let stored: Fingerprint = json.fingerprint.parse()?;
        if stored != key.fingerprint {
            return Err(RepoError::corrupt(
                format!("key file {}", path.display()),
                "stored fingerprint does not match the unwrapped key",
            ));
        }
        Ok(key)
    }

    /// The key rebuilt from its 32-byte secret (a master-key recovery).
    pub(crate) fn from_secret(secret: Zeroizing<[u8; 32]>) -> Key {
        Key::from_master(secret)
    }

    /// The 32-byte secret every sub-key derives from (to seal it).
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.master
    }
}

/// Wraps a 32-byte secret under a passphrase: Argon2id (fresh salt) →
/// AES-256-GCM (fresh nonce) with `aad`.
pub(crate) fn wrap_secret(
    passphrase: &[u8],
    kdf: KdfParams,
    aad: &[u8],
    secret: &[u8; 32],
) -> Result<(KdfJson, WrapJson)> {
    if passphrase.is_empty() {
        return Err(RepoError::invalid("passphrase", "must not be empty"));
    }
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let kek = derive_kek(passphrase, &salt, kdf)?;
    let wrap = Aes256Gcm::new((&*kek).into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let mut buf = Zeroizing::new(secret.to_vec());
    let tag = wrap
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf)
        .map_err(|_| RepoError::invalid("key", "wrapping failed"))?;
    let mut ct = buf.to_vec();
    ct.extend_from_slice(&tag);
    Ok((
        KdfJson {
            alg: "argon2id".into(),
            params: kdf,
            salt: hex::encode(salt),
        },
        WrapJson {
            alg: "aes-256-gcm".into(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ct),
        },
    ))
}

/// Unwraps what [`wrap_secret`] made; a wrong passphrase is
/// [`RepoError::WrongPassphrase`] naming `path`.
pub(crate) fn unwrap_secret(
    path: &Path,
    passphrase: &[u8],
    kdf: &KdfJson,
    wrapped: &WrapJson,
    aad: &[u8],
) -> Result<Zeroizing<[u8; 32]>> {
    let what = format!("key file {}", path.display());
    if kdf.alg != "argon2id" || wrapped.alg != "aes-256-gcm" {
        return Err(RepoError::corrupt(&what, "unsupported algorithms"));
    }
    let salt = hex::decode(&kdf.salt).map_err(|e| RepoError::corrupt(&what, e.to_string()))?;
    let mut nonce = [0u8; NONCE_LEN];
    hex::decode_to_slice(&wrapped.nonce, &mut nonce)
        .map_err(|e| RepoError::corrupt(&what, e.to_string()))?;
    let ct = Zeroizing::new(
        hex::decode(&wrapped.ciphertext).map_err(|e| RepoError::corrupt(&what, e.to_string()))?,
    );
    if ct.len() != 32 + TAG_LEN {
        return Err(RepoError::corrupt(
            &what,
            "wrapped key has the wrong length",
        ));
    }
    let kek = derive_kek(passphrase, &salt, kdf.params)?;
    let wrap = Aes256Gcm::new((&*kek).into());
    let (body, tag) = ct.split_at(32);
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(body);
    wrap.decrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut secret[..], tag.into())
        .map_err(|_| RepoError::WrongPassphrase {
            path: path.to_owned(),
        })?;
    Ok(secret)
}

fn derive_kek(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    // Bound the cost a (possibly tampered) key file can demand: 4 GiB, 64 passes.
    if p.m_cost_kib > 4 * 1024 * 1024 || p.t_cost > 64 || p.p_cost > 64 {
        return Err(RepoError::invalid(
            "key file",
            "KDF parameters out of range",
        ));
    }
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| RepoError::invalid("KDF parameters", e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|e| RepoError::invalid("KDF input", e.to_string()))?;
    Ok(out)
}

/// Reads a small JSON file that holds a secret: a regular file (no
/// symlink), mode 0600 or stricter, owned by us or root, at most 64 KiB.
pub(crate) fn read_private_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<T> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| RepoError::io("open key file", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| RepoError::io("stat key file", path, e))?;
    if !meta.is_file() {
        return Err(RepoError::invalid(
            what,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RepoError::KeyFileInsecure {
            path: path.to_owned(),
            mode,
        });
    }
    // SAFETY-free check that the file belongs to us or root (a file planted by
    // another user must not be trusted).
    let me = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if meta.uid() != me && meta.uid() != 0 {
        return Err(RepoError::invalid(
            what,
            format!("{} is owned by uid {}", path.display(), meta.uid()),
        ));
    }
    let mut text = Zeroizing::new(Vec::new());
    file.take(MAX_KEYFILE_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| RepoError::io("read key file", path, e))?;
    if text.len() as u64 > MAX_KEYFILE_LEN {
        return Err(RepoError::invalid(what, "larger than 64 KiB"));
    }
    serde_json::from_slice(&text)
        .map_err(|e| RepoError::corrupt(format!("{what} {}", path.display()), e.to_string()))
}

/// Writes a new file with mode 0600 durably; fails if `path` exists.
pub(crate) fn write_new_private_file(path: &Path, data: &[u8]) -> Result<()> {
    fsutil::write_atomic(path, data, Existing::Keep).map_err(|e| {
        if e.source.kind() == std::io::ErrorKind::AlreadyExists && e.path == path {
            RepoError::AlreadyExists {
                what: format!("key file {}", path.display()),
            }
        } else {
            e.into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f47_key_file_round_trip_wrong_passphrase_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.json");
        let k = Key::create_file(&p, b"pw", KdfParams::insecure_fast_for_tests()).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = Key::load_file(&p, b"pw").unwrap();
        assert_eq!(k.fingerprint(), k2.fingerprint());
        assert_eq!(k.digest(b"x"), k2.digest(b"x"));
        assert_eq!(Key::file_fingerprint(&p).unwrap(), k.fingerprint());
        assert!(matches!(
            Key::load_file(&p, b"nope"),
            Err(RepoError::WrongPassphrase { .. })
        ));
        // Never overwrite.
        assert!(matches!(
            Key::create_file(&p, b"pw", KdfParams::insecure_fast_for_tests()),
            Err(RepoError::AlreadyExists { .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Key::load_file(&p, b"pw"),
            Err(RepoError::KeyFileInsecure { mode: 0o644, .. })
        ));
        // Debug output never shows key bytes.
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&hex::encode(&k.master[..])));
    }

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let k = Key::generate();
        let mut buf = b"hello".to_vec();
        let nonce = k.seal(b"aad", &mut buf).unwrap();
        let mut out = Vec::new();
        k.open_into("t", &nonce, b"aad", &buf, &mut out).unwrap();
        assert_eq!(out, b"hello");
        k.open_into("t", &nonce, b"other", &buf, &mut out)
            .unwrap_err();
        let other = Key::generate();
        other
            .open_into("t", &nonce, b"aad", &buf, &mut out)
            .unwrap_err();
        assert_ne!(k.digest(b"x"), other.digest(b"x"));
    }
}

//! Master keys: recovery of a repository key without its passphrase, as
//! Proxmox Backup's master key does (docs/keys.md has the threat model,
//! docs/formats.md the files).
//!
//! A master key is an X25519 key pair. The private half lives in a file
//! wrapped under its own passphrase (Argon2id + AES-256-GCM, like a key
//! file) and is meant to be kept offline; the public half may sit on every
//! host. Sealing a repository key to it is an ephemeral-static ECDH "sealed
//! box":
//!
//! ```text
//! e, E = fresh X25519 key pair          (per seal)
//! s    = X25519(e, M)                   (M: master public key; refuse s = 0)
//! k    = HKDF-SHA256(salt = E || M, ikm = s, info = "shear 2026 master seal v1")
//! c    = AES-256-GCM(k, random nonce, aad = "shear master seal v1" || key fp || master fp,
//!                    the key's 32-byte secret)
//! ```
//!
//! Only the holder of the master private key `m` can compute
//! `s = X25519(m, E)` and open `c`. The AAD binds the seal to the key's and
//! the master's fingerprints, so a seal cannot be passed off as another
//! key's. All secrets live in zeroize-on-drop buffers.

use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::crypto::{
    read_private_json, unwrap_secret, wrap_secret, write_new_private_file, KdfJson, KdfParams,
    WrapJson,
};
use super::error::{RepoError, Result};
use super::format::{NONCE_LEN, TAG_LEN};
use super::{Fingerprint, Key};

const PUBLIC_FORMAT: &str = "shear-master-public";
const PRIVATE_FORMAT: &str = "shear-master-key";
const SEAL_FORMAT: &str = "shear-master-seal";
const VERSION: u32 = 1;
const SEAL_ALG: &str = "x25519-hkdf-sha256-aes-256-gcm";
/// Largest public key or seal file read.
const MAX_PUBLIC_LEN: u64 = 64 << 10;

// DO NOT MODIFY: domain separation of the master-key constructions.
const CTX_MASTER_FINGERPRINT: &str = "shear 2026 master key fingerprint v1";
const HKDF_INFO: &[u8] = b"shear 2026 master seal v1";
const SEAL_AAD: &[u8] = b"shear master seal v1";
const PRIVATE_WRAP_AAD: &[u8] = b"shear master key file v1";

/// Name of the seal file in a repository's root (written by `init`).
pub const REPO_SEAL_NAME: &str = "master-key-seal.json";

/// A master public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterPublicKey {
    key: [u8; 32],
}

impl MasterPublicKey {
    /// Its fingerprint (16 bytes of a BLAKE3 derivation of the key).
    pub fn fingerprint(&self) -> Fingerprint {
        let full = blake3::derive_key(CTX_MASTER_FINGERPRINT, &self.key);
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&full[..16]);
        Fingerprint(fp)
    }

    /// Reads a public key file (`key create-master` wrote it).
    pub fn load_file(path: &Path) -> Result<MasterPublicKey> {
        let json: PublicJson = read_public_json(path, "master public key file")?;
        let what = format!("master public key file {}", path.display());
        if json.format != PUBLIC_FORMAT || json.version != VERSION || json.alg != "x25519" {
            return Err(RepoError::corrupt(
                &what,
                format!(
                    "unsupported format {} v{} ({})",
                    json.format, json.version, json.alg
                ),
            ));
        }
        let pk = MasterPublicKey {
            key: decode32(&what, &json.public_key)?,
        };
        let stored: Fingerprint = json.fingerprint.parse()?;
        if stored != pk.fingerprint() {
            return Err(RepoError::corrupt(
                &what,
                "stored fingerprint does not match the public key",
            ));
        }
        Ok(pk)
    }

    /// Seals `key` to this master key.
    pub fn seal(&self, key: &Key) -> Result<MasterSeal> {
        let mut eph_bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut eph_bytes[..]);
        let eph = StaticSecret::from(*eph_bytes);
        let eph_pub = PublicKey::from(&eph);
        let shared = eph.diffie_hellman(&PublicKey::from(self.key));
        if !shared.was_contributory() {
            return Err(RepoError::invalid(
                "master public key",
                "a low-order point (not a usable X25519 key)",
            ));
        }
        let k = seal_key(shared.as_bytes(), eph_pub.as_bytes(), &self.key)?;
        let kfp = key.fingerprint();
        let mfp = self.fingerprint();
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut buf = Zeroizing::new(key.secret().to_vec());
        let tag = Aes256Gcm::new((&*k).into())
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad(&kfp, &mfp), &mut buf)
            .map_err(|_| RepoError::invalid("key", "sealing failed"))?;
        let mut ct = buf.to_vec();
        ct.extend_from_slice(&tag);
        Ok(MasterSeal {
            format: SEAL_FORMAT.into(),
            version: VERSION,
            alg: SEAL_ALG.into(),
            key_fingerprint: kfp.to_string(),
            master_fingerprint: mfp.to_string(),
            ephemeral_public: hex::encode(eph_pub.as_bytes()),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ct),
        })
    }
}

/// An unlocked master private key. Secret bytes are zeroised on drop.
pub struct MasterPrivateKey {
    secret: StaticSecret,
    public: MasterPublicKey,
}

impl std::fmt::Debug for MasterPrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterPrivateKey")
            .field("fingerprint", &self.public.fingerprint().to_string())
            .finish_non_exhaustive()
    }
}

impl MasterPrivateKey {
    /// Makes a new master key pair: the private file (wrapped under
    /// `passphrase`, mode 0600) and the public file (mode 0644). Neither
    /// may exist.
    pub fn create_files(
        private: &Path,
        public: &Path,
        passphrase: &[u8],
        kdf: KdfParams,
    ) -> Result<MasterPublicKey> {
        for p in [private, public] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(RepoError::AlreadyExists {
                    what: format!("file {}", p.display()),
                });
            }
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut bytes[..]);
        let secret = StaticSecret::from(*bytes);
        let pk = MasterPublicKey {
            key: PublicKey::from(&secret).to_bytes(),
        };
        let (kdf, wrapped_key) = wrap_secret(passphrase, kdf, PRIVATE_WRAP_AAD, &bytes)?;
        let created = super::names::format_time(time::OffsetDateTime::now_utc());
        let priv_json = PrivateJson {
            format: PRIVATE_FORMAT.into(),
            version: VERSION,
            alg: "x25519".into(),
            kdf,
            wrapped_key,
            public_key: hex::encode(pk.key),
            fingerprint: pk.fingerprint().to_string(),
            created: created.clone(),
        };
        let pub_json = PublicJson {
            format: PUBLIC_FORMAT.into(),
            version: VERSION,
            alg: "x25519".into(),
            public_key: hex::encode(pk.key),
            fingerprint: pk.fingerprint().to_string(),
            created,
        };
        write_new_private_file(private, &to_json(&priv_json)?)?;
        // The public half is not secret: readable by all.
        crate::fsutil::write_atomic(public, &to_json(&pub_json)?, crate::fsutil::Existing::Keep)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(public, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| RepoError::io("chmod master public key", public, e))?;
        }
        Ok(pk)
    }

    /// Unlocks a master private key file.
    pub fn load_file(path: &Path, passphrase: &[u8]) -> Result<MasterPrivateKey> {
        let json: PrivateJson = read_private_json(path, "master key file")?;
        let what = format!("master key file {}", path.display());
        if json.format != PRIVATE_FORMAT || json.version != VERSION || json.alg != "x25519" {
            return Err(RepoError::corrupt(
                &what,
                format!(
                    "unsupported format {} v{} ({})",
                    json.format, json.version, json.alg
                ),
            ));
        }
        let bytes = unwrap_secret(
            path,
            passphrase,
            &json.kdf,
            &json.wrapped_key,
            PRIVATE_WRAP_AAD,
        )?;
        let secret = StaticSecret::from(*bytes);
        let public = MasterPublicKey {
            key: PublicKey::from(&secret).to_bytes(),
        };
        if hex::encode(public.key) != json.public_key
            || json.fingerprint != public.fingerprint().to_string()
        {
            return Err(RepoError::corrupt(
                &what,
                "stored public key does not match the private key",
            ));
        }
        Ok(MasterPrivateKey { secret, public })
    }

    /// The public half.
    pub fn public(&self) -> MasterPublicKey {
        self.public
    }

    /// Opens a seal made to this master key: the repository key it holds.
    pub fn unseal(&self, seal: &MasterSeal) -> Result<Key> {
        let what = "master seal";
        if seal.format != SEAL_FORMAT || seal.version != VERSION || seal.alg != SEAL_ALG {
            return Err(RepoError::corrupt(
                what,
                format!(
                    "unsupported format {} v{} ({})",
                    seal.format, seal.version, seal.alg
                ),
            ));
        }
        let mfp = self.public.fingerprint();
        if seal.master_fingerprint != mfp.to_string() {
            return Err(RepoError::WrongKey {
                given: format!("master {mfp}"),
                expected: format!("master {}", seal.master_fingerprint),
            });
        }
        let kfp: Fingerprint = seal.key_fingerprint.parse()?;
        let eph = decode32(what, &seal.ephemeral_public)?;
        let mut nonce = [0u8; NONCE_LEN];
        hex::decode_to_slice(&seal.nonce, &mut nonce)
            .map_err(|e| RepoError::corrupt(what, e.to_string()))?;
        let ct = Zeroizing::new(
            hex::decode(&seal.ciphertext).map_err(|e| RepoError::corrupt(what, e.to_string()))?,
        );
        if ct.len() != 32 + TAG_LEN {
            return Err(RepoError::corrupt(what, "sealed key has the wrong length"));
        }
        let shared = self.secret.diffie_hellman(&PublicKey::from(eph));
        if !shared.was_contributory() {
            return Err(RepoError::corrupt(
                what,
                "ephemeral key is a low-order point",
            ));
        }
        let k = seal_key(shared.as_bytes(), &eph, &self.public.key)?;
        let (body, tag) = ct.split_at(32);
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(body);
        Aes256Gcm::new((&*k).into())
            .decrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                &aad(&kfp, &mfp),
                &mut secret[..],
                tag.into(),
            )
            .map_err(|_| RepoError::corrupt(what, "authentication failed (damaged or tampered)"))?;
        let key = Key::from_secret(secret);
        if key.fingerprint() != kfp {
            return Err(RepoError::corrupt(
                what,
                "the unsealed key does not have the fingerprint the seal names",
            ));
        }
        Ok(key)
    }
}

/// A repository key sealed to a master public key (a key file's
/// `master_seal`, or a repository's `master-key-seal.json`). Holds no
/// secret that anyone but the master key's holder can open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterSeal {
    /// Always "shear-master-seal".
    pub format: String,
    /// 1.
    pub version: u32,
    /// "x25519-hkdf-sha256-aes-256-gcm".
    pub alg: String,
    /// Fingerprint of the sealed repository key.
    pub key_fingerprint: String,
    /// Fingerprint of the master key it is sealed to.
    pub master_fingerprint: String,
    /// The ephemeral X25519 public key (hex).
    pub ephemeral_public: String,
    /// AES-GCM nonce (hex).
    pub nonce: String,
    /// Sealed 32-byte key secret and tag (hex).
    pub ciphertext: String,
}

impl MasterSeal {
    /// Reads a seal file (a repository's `master-key-seal.json`).
    pub fn load_file(path: &Path) -> Result<MasterSeal> {
        read_public_json(path, "master seal file")
    }

    /// Writes this seal to a new file (never overwrites; mode 0600: it is
    /// not secret without the master key, but it is key material).
    pub fn write_new(&self, path: &Path) -> Result<()> {
        write_new_private_file(path, &to_json(self)?)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicJson {
    format: String,
    version: u32,
    alg: String,
    public_key: String,
    fingerprint: String,
    created: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivateJson {
    format: String,
    version: u32,
    alg: String,
    kdf: KdfJson,
    wrapped_key: WrapJson,
    public_key: String,
    fingerprint: String,
    created: String,
}

fn aad(key_fp: &Fingerprint, master_fp: &Fingerprint) -> Vec<u8> {
    let mut a = SEAL_AAD.to_vec();
    a.extend_from_slice(&key_fp.0);
    a.extend_from_slice(&master_fp.0);
    a
}

fn seal_key(shared: &[u8; 32], eph: &[u8; 32], master: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(master);
    let mut k = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), shared)
        .expand(HKDF_INFO, &mut k[..])
        .map_err(|_| RepoError::invalid("key", "HKDF output length"))?;
    Ok(k)
}

fn decode32(what: &str, s: &str) -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s, &mut b).map_err(|e| RepoError::corrupt(what, e.to_string()))?;
    Ok(b)
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut text =
        serde_json::to_vec_pretty(v).map_err(|e| RepoError::invalid("key file", e.to_string()))?;
    text.push(b'\n');
    Ok(text)
}

/// Reads a small JSON file that holds nothing secret (bounded size).
fn read_public_json<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| RepoError::io("open", path, e))?;
    let mut text = Vec::new();
    file.take(MAX_PUBLIC_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| RepoError::io("read", path, e))?;
    if text.len() as u64 > MAX_PUBLIC_LEN {
        return Err(RepoError::invalid(what, "larger than 64 KiB"));
    }
    serde_json::from_slice(&text)
        .map_err(|e| RepoError::corrupt(format!("{what} {}", path.display()), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path) -> (MasterPublicKey, MasterPrivateKey) {
        let (sk, pk) = (dir.join("m.key"), dir.join("m.pub"));
        let public = MasterPrivateKey::create_files(
            &sk,
            &pk,
            b"master pass",
            KdfParams::insecure_fast_for_tests(),
        )
        .unwrap();
        assert_eq!(MasterPublicKey::load_file(&pk).unwrap(), public);
        let private = MasterPrivateKey::load_file(&sk, b"master pass").unwrap();
        assert_eq!(private.public(), public);
        (public, private)
    }

    #[test]
    fn seal_unseal_round_trip_and_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = pair(dir.path());
        let key = Key::generate();
        let seal = public.seal(&key).unwrap();
        let back = private.unseal(&seal).unwrap();
        assert_eq!(back.fingerprint(), key.fingerprint());
        assert_eq!(back.digest(b"x"), key.digest(b"x"));
        // Two seals of one key differ (fresh ephemeral key and nonce).
        assert_ne!(public.seal(&key).unwrap().ciphertext, seal.ciphertext);
        // A flipped ciphertext bit fails authentication.
        let mut bad = seal.clone();
        let mut ct = hex::decode(&bad.ciphertext).unwrap();
        ct[0] ^= 1;
        bad.ciphertext = hex::encode(ct);
        assert!(matches!(
            private.unseal(&bad),
            Err(RepoError::Corrupt { .. })
        ));
        // A seal relabelled as another key's fails (fingerprint in the AAD).
        let mut relabelled = seal.clone();
        relabelled.key_fingerprint = Key::generate().fingerprint().to_string();
        assert!(matches!(
            private.unseal(&relabelled),
            Err(RepoError::Corrupt { .. })
        ));
        // Another master key cannot open it, and says why.
        let other = tempfile::tempdir().unwrap();
        let (_, other_private) = pair(other.path());
        assert!(matches!(
            other_private.unseal(&seal),
            Err(RepoError::WrongKey { .. })
        ));
        // A low-order ephemeral point is refused.
        let mut low = seal.clone();
        low.ephemeral_public = hex::encode([0u8; 32]);
        assert!(matches!(
            private.unseal(&low),
            Err(RepoError::Corrupt { .. })
        ));
    }

    #[test]
    fn master_files_wrong_passphrase_mode_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (public, _) = pair(dir.path());
        let (sk, pk) = (dir.path().join("m.key"), dir.path().join("m.pub"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            MasterPrivateKey::load_file(&sk, b"nope"),
            Err(RepoError::WrongPassphrase { .. })
        ));
        assert!(matches!(
            MasterPrivateKey::create_files(
                &sk,
                &dir.path().join("new.pub"),
                b"x",
                KdfParams::insecure_fast_for_tests()
            ),
            Err(RepoError::AlreadyExists { .. })
        ));
        // A tampered public key file is refused by its fingerprint.
        let text = std::fs::read_to_string(&pk).unwrap();
        let hexkey = hex::encode(public.key);
        let mut flipped = public.key;
        flipped[0] ^= 1;
        std::fs::write(&pk, text.replace(&hexkey, &hex::encode(flipped))).unwrap();
        assert!(matches!(
            MasterPublicKey::load_file(&pk),
            Err(RepoError::Corrupt { .. })
        ));
    }

    #[test]
    fn key_file_carries_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = pair(dir.path());
        let key = Key::generate();
        let seal = public.seal(&key).unwrap();
        let p = dir.path().join("k.json");
        key.save_file(&p, b"pw", KdfParams::insecure_fast_for_tests(), Some(&seal))
            .unwrap();
        assert_eq!(Key::file_master_seal(&p).unwrap(), Some(seal.clone()));
        assert_eq!(
            Key::load_file(&p, b"pw").unwrap().fingerprint(),
            key.fingerprint()
        );
        let recovered = private
            .unseal(&Key::file_master_seal(&p).unwrap().unwrap())
            .unwrap();
        assert_eq!(recovered.fingerprint(), key.fingerprint());
        // A seal of another key is refused when saving.
        let other = public.seal(&Key::generate()).unwrap();
        assert!(key
            .save_file(
                &dir.path().join("k2.json"),
                b"pw",
                KdfParams::insecure_fast_for_tests(),
                Some(&other)
            )
            .is_err());
    }
}

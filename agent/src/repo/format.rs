//! On-disk encodings: the blob container, the fixed index, the image digest.
//!
//! Every integer is little-endian. docs/formats.md describes each field; keep
//! both in step. Every decoder checks sizes against fixed limits *before* it
//! allocates (F-44).

use super::error::{RepoError, Result};

// ---------------------------------------------------------------------------
// Magic numbers.
// DO NOT MODIFY: each is the first 8 bytes of BLAKE3 of the string in the
// comment; changing one makes every existing repository unreadable. A new
// format gets a new string and a new constant (see `magic_values_match`).
// ---------------------------------------------------------------------------

/// BLAKE3("shear blob container v1 - DO NOT MODIFY")[0..8]
pub const BLOB_MAGIC: [u8; 8] = [0x2f, 0x39, 0x75, 0x69, 0x15, 0x5e, 0x65, 0xa4];
/// BLAKE3("shear fixed index v1 - DO NOT MODIFY")[0..8]
pub const INDEX_MAGIC: [u8; 8] = [0x1d, 0xa0, 0x35, 0xf3, 0x99, 0xa4, 0x9d, 0xff];

/// Blob container format version written and accepted.
pub const BLOB_VERSION: u16 = 1;
/// Index format version written and accepted.
pub const INDEX_VERSION: u32 = 1;

/// Blob header length in bytes.
pub const BLOB_HEADER_LEN: usize = 48;
/// Index header length in bytes (inside the blob payload).
pub const INDEX_HEADER_LEN: usize = 64;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;

/// Largest chunk the store accepts or decodes.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Smallest configurable chunk size (one qcow2 cluster).
pub const MIN_CHUNK_SIZE: usize = 64 << 10;
/// Default chunk size (as stored in headers).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Largest index (entries) decoded: 2^24 entries = 64 TiB at 4 MiB chunks.
pub const MAX_INDEX_ENTRIES: u64 = 1 << 24;
/// Largest manifest payload decoded.
pub const MAX_MANIFEST_SIZE: usize = 16 << 20;

/// Index entry value that marks an all-zero chunk (never stored).
pub const ZERO_ENTRY: [u8; 32] = [0; 32];

/// A 32-byte chunk digest.
pub type Digest = [u8; 32];

/// What a blob holds; authenticated with the payload (F-42).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectType {
    /// A chunk of disk data.
    Chunk = 1,
    /// A fixed index of one disk.
    Index = 2,
    /// A backup manifest.
    Manifest = 3,
}

impl ObjectType {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ObjectType::Chunk),
            2 => Some(ObjectType::Index),
            3 => Some(ObjectType::Manifest),
            _ => None,
        }
    }
}

/// Payload compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    /// Stored as is.
    None = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// Payload encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encryption {
    /// Plaintext.
    None = 0,
    /// AES-256-GCM, 96-bit random nonce, 128-bit tag appended to the payload.
    Aes256Gcm = 1,
}

/// The parsed, validated fixed header of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    /// Object type.
    pub object_type: ObjectType,
    /// Compression of the plaintext.
    pub compression: Compression,
    /// Encryption of the compressed bytes.
    pub encryption: Encryption,
    /// Plaintext length.
    pub raw_size: u32,
    /// Payload length (after the header).
    pub stored_size: u32,
    /// CRC-32 (IEEE) of the payload.
    pub crc32: u32,
    /// AES-GCM nonce (zero when unencrypted).
    pub nonce: [u8; NONCE_LEN],
}

impl BlobHeader {
    /// Serialises the header.
    pub fn encode(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut h = [0u8; BLOB_HEADER_LEN];
        h[0..8].copy_from_slice(&BLOB_MAGIC);
        h[8..10].copy_from_slice(&BLOB_VERSION.to_le_bytes());
        h[10] = self.object_type as u8;
        h[11] = self.compression as u8;
        h[12] = self.encryption as u8;
        h[16..20].copy_from_slice(&self.raw_size.to_le_bytes());
        h[20..24].copy_from_slice(&self.stored_size.to_le_bytes());
        h[24..28].copy_from_slice(&self.crc32.to_le_bytes());
        h[32..44].copy_from_slice(&self.nonce);
        h
    }

    /// The bytes authenticated as AEAD associated data: everything before
    /// the CRC (magic, version, type, compression, encryption, sizes).
    pub fn aad_prefix(encoded: &[u8; BLOB_HEADER_LEN]) -> &[u8] {
        &encoded[0..24]
    }

    /// Parses and validates a header. `what` names the object in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let Some(h) = bytes.get(..BLOB_HEADER_LEN) else {
            return Err(RepoError::corrupt(
                what,
                format!("{} bytes, shorter than the blob header", bytes.len()),
            ));
        };
        if h[0..8] != BLOB_MAGIC {
            return Err(RepoError::corrupt(what, "bad magic (not a shear blob)"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != BLOB_VERSION {
            return Err(RepoError::corrupt(
                what,
                format!("unsupported blob version {version}"),
            ));
        }
        let object_type = ObjectType::from_u8(h[10])
            .ok_or_else(|| RepoError::corrupt(what, format!("unknown object type {}", h[10])))?;
        let compression = match h[11] {
            0 => Compression::None,
            1 => Compression::Zstd,
            v => return Err(RepoError::corrupt(what, format!("unknown compression {v}"))),
        };
        let encryption = match h[12] {
            0 => Encryption::None,
            1 => Encryption::Aes256Gcm,
            v => return Err(RepoError::corrupt(what, format!("unknown encryption {v}"))),
        };
        if h[13..16] != [0; 3] || h[28..32] != [0; 4] || h[44..48] != [0; 4] {
            return Err(RepoError::corrupt(
                what,
                "reserved header bytes are not zero",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&h[32..44]);
        if encryption == Encryption::None && nonce != [0; NONCE_LEN] {
            return Err(RepoError::corrupt(
                what,
                "nonce set on an unencrypted object",
            ));
        }
        Ok(BlobHeader {
            object_type,
            compression,
            encryption,
            raw_size: u32_at(16),
            stored_size: u32_at(20),
            crc32: u32_at(24),
            nonce,
        })
    }
}

/// A decoded fixed index: one digest (or the zero marker) per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Virtual size of the disk in bytes.
    pub virtual_size: u64,
    /// Entries in disk order; [`ZERO_ENTRY`] marks an all-zero chunk.
    pub entries: Vec<Digest>,
}

/// Number of chunks that cover `virtual_size`.
pub fn chunk_count(virtual_size: u64, chunk_size: u32) -> u64 {
    virtual_size.div_ceil(u64::from(chunk_size))
}

/// Length of chunk `index` (the last one may be short).
pub fn chunk_len(virtual_size: u64, chunk_size: u32, index: u64) -> usize {
    let start = index.saturating_mul(u64::from(chunk_size));
    let len = virtual_size
        .saturating_sub(start)
        .min(u64::from(chunk_size));
    // Bounded by chunk_size, a u32.
    usize::try_from(len).unwrap_or(0)
}

/// Checks a (chunk size, virtual size) pair against the limits.
pub fn check_geometry(chunk_size: u32, virtual_size: u64) -> Result<()> {
    let cs = usize::try_from(chunk_size).unwrap_or(usize::MAX);
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) || !chunk_size.is_power_of_two() {
        return Err(RepoError::invalid(
            "chunk size",
            format!("{chunk_size}: must be a power of two between 64 KiB and 16 MiB"),
        ));
    }
    if virtual_size == 0 {
        return Err(RepoError::invalid(
            "virtual size",
            "0: a disk must not be empty",
        ));
    }
    if chunk_count(virtual_size, chunk_size) > MAX_INDEX_ENTRIES {
        return Err(RepoError::invalid(
            "virtual size",
            format!(
                "{virtual_size} bytes needs more than {MAX_INDEX_ENTRIES} chunks of {chunk_size}"
            ),
        ));
    }
    Ok(())
}

impl FixedIndex {
    /// Serialises the index payload (header + entries).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * 32);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out.resize(INDEX_HEADER_LEN, 0);
        for e in &self.entries {
            out.extend_from_slice(e);
        }
        out
    }

    /// Parses and validates an index payload.
    pub fn decode(payload: &[u8], what: &str) -> Result<Self> {
        let Some(h) = payload.get(..INDEX_HEADER_LEN) else {
            return Err(RepoError::corrupt(what, "shorter than the index header"));
        };
        if h[0..8] != INDEX_MAGIC {
            return Err(RepoError::corrupt(what, "bad index magic"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != INDEX_VERSION {
            return Err(RepoError::corrupt(
                what,
                format!("unsupported index version {version}"),
            ));
        }
        let chunk_size = u32_at(12);
        let virtual_size = u64_at(16);
        let count = u64_at(24);
        if h[32..64] != [0; 32] {
            return Err(RepoError::corrupt(
                what,
                "reserved index header bytes not zero",
            ));
        }
        check_geometry(chunk_size, virtual_size)
            .map_err(|e| RepoError::corrupt(what, e.to_string()))?;
        if count != chunk_count(virtual_size, chunk_size) {
            return Err(RepoError::corrupt(
                what,
                format!("{count} entries for a {virtual_size}-byte disk"),
            ));
        }
        // count <= MAX_INDEX_ENTRIES, so this cannot overflow.
        let body_len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(32))
            .ok_or_else(|| RepoError::corrupt(what, "entry count too large"))?;
        let body = &payload[INDEX_HEADER_LEN..];
        if body.len() != body_len {
            return Err(RepoError::corrupt(
                what,
                format!("{} entry bytes, expected {body_len}", body.len()),
            ));
        }
        let entries = body
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(FixedIndex {
            chunk_size,
            virtual_size,
            entries,
        })
    }
}

/// Domain-separation prefix of the image digest.
pub const IMAGE_DIGEST_DOMAIN: &[u8] = b"shear image digest v1\0";

/// Computes the whole-image digest from per-chunk digests (see
/// docs/formats.md, "Image digest"): BLAKE3 over the domain string, the
/// virtual size (u64 LE), the chunk size (u32 LE) and then, in disk order,
/// each chunk's digest; an all-zero chunk contributes the digest of that many
/// zero bytes (`zero_digest(len)`), so holes cost nothing to hash.
pub fn image_digest(
    virtual_size: u64,
    chunk_size: u32,
    entries: &[Digest],
    mut zero_digest: impl FnMut(usize) -> Digest,
) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(IMAGE_DIGEST_DOMAIN);
    h.update(&virtual_size.to_le_bytes());
    h.update(&chunk_size.to_le_bytes());
    let full = zero_digest(chunk_size as usize);
    for (i, e) in entries.iter().enumerate() {
        if *e == ZERO_ENTRY {
            let len = chunk_len(virtual_size, chunk_size, i as u64);
            if len == chunk_size as usize {
                h.update(&full);
            } else {
                h.update(&zero_digest(len));
            }
        } else {
            h.update(e);
        }
    }
    *h.finalize().as_bytes()
}

/// Converts a count or offset already bounded by the format limits to
/// `usize` (lossless on the 64-bit hosts we support; saturates elsewhere, so
/// a later bounds check fails instead of wrapping).
pub fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// True when every byte of `buf` is zero (vectorises well).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc |= u64::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn magic(s: &str) -> [u8; 8] {
        let mut m = [0u8; 8];
        m.copy_from_slice(&blake3::hash(s.as_bytes()).as_bytes()[..8]);
        m
    }

    #[test]
    fn magic_values_match() {
        assert_eq!(BLOB_MAGIC, magic("shear blob container v1 - DO NOT MODIFY"));
        assert_eq!(INDEX_MAGIC, magic("shear fixed index v1 - DO NOT MODIFY"));
    }

    #[test]
    fn blob_header_round_trip() {
        let h = BlobHeader {
            object_type: ObjectType::Index,
            compression: Compression::Zstd,
            encryption: Encryption::Aes256Gcm,
            raw_size: 123,
            stored_size: 77,
            crc32: 0xdead_beef,
            nonce: [7; 12],
        };
        assert_eq!(BlobHeader::decode(&h.encode(), "t").unwrap(), h);
        let mut bad = h.encode();
        bad[10] = 9;
        BlobHeader::decode(&bad, "t").unwrap_err();
        let mut bad = h.encode();
        bad[13] = 1;
        BlobHeader::decode(&bad, "t").unwrap_err();
        BlobHeader::decode(&h.encode()[..47], "t").unwrap_err();
    }

    #[test]
    fn index_round_trip_and_f44_limits() {
        let idx = FixedIndex {
            chunk_size: 1 << 16,
            virtual_size: (3 << 16) + 5,
            entries: vec![[1; 32], ZERO_ENTRY, [2; 32], [3; 32]],
        };
        let enc = idx.encode();
        assert_eq!(FixedIndex::decode(&enc, "t").unwrap(), idx);
        // Count of 2^40 entries: rejected before allocating.
        let mut huge = enc.clone();
        huge[16..24].copy_from_slice(&(1u64 << 56).to_le_bytes());
        huge[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        FixedIndex::decode(&huge, "t").unwrap_err();
        // Truncated body.
        FixedIndex::decode(&enc[..enc.len() - 1], "t").unwrap_err();
        // Entry count that does not match the size.
        let mut wrong = enc.clone();
        wrong[24..32].copy_from_slice(&5u64.to_le_bytes());
        FixedIndex::decode(&wrong, "t").unwrap_err();
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(chunk_count(10, 4), 3);
        assert_eq!(chunk_len(10, 4, 2), 2);
        assert_eq!(chunk_len(10, 4, 3), 0);
        check_geometry(4 << 20, 1).unwrap();
        check_geometry(3 << 20, 1).unwrap_err();
        check_geometry(4 << 20, 0).unwrap_err();
        check_geometry(4 << 20, (4 << 20) * (MAX_INDEX_ENTRIES + 1)).unwrap_err();
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[5] = 1;
        assert!(!is_zero(&v));
    }
}

//! Entry points for the fuzz targets (`agent/fuzz`, run by `scripts/fuzz`):
//! the repository's decoders of stored bytes (chunks, fixed indexes,
//! manifests) and the run record. Each takes arbitrary bytes two ways: as
//! a stored object as is, and as edits (from the input) applied to a valid
//! object built from the input, so the fuzzer gets past the header and the
//! authentication. A decoder that accepts damaged bytes and returns other
//! data than was stored, or that panics, is a crash (F-44, F-35).

use std::sync::OnceLock;

use super::blob;
use super::crypto::Key;
use super::format::{FixedIndex, ObjectType, BLOB_HEADER_LEN, MAX_MANIFEST_SIZE, TAG_LEN};
use super::manifest::Manifest;
use super::names::{BackupId, VmId};

fn key() -> &'static Key {
    static KEY: OnceLock<Key> = OnceLock::new();
    KEY.get_or_init(Key::generate)
}

/// Input byte 0: bit 0 = use the key, bit 1 = edit a valid object (else
/// decode the rest as is); the rest: the content, then (for edits) the
/// last bytes pick positions and values to change.
fn split(data: &[u8]) -> (bool, bool, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (m & 1 == 1, m & 2 == 2, rest),
        None => (false, false, &[]),
    }
}

/// Applies up to 4 edits taken from the end of `input` to `obj`: each edit
/// is (position, xor value, truncate flag).
fn corrupt(obj: &mut Vec<u8>, input: &[u8]) {
    for e in input.rchunks(3).take(4) {
        if obj.is_empty() {
            return;
        }
        let pos = usize::from(e[0]) * 131 % obj.len();
        match e {
            [_, x, t] if t & 0x80 != 0 => {
                obj.truncate(pos);
                let _ = x;
            }
            [_, x, ..] => obj[pos] ^= x | 1,
            _ => obj[pos] ^= 0x55,
        }
    }
}

/// A stored chunk: [`blob::decode_chunk`].
pub fn chunk(data: &[u8]) {
    let (keyed, edit, rest) = split(data);
    let key = keyed.then(key);
    if !edit {
        let digest = blob::chunk_digest(key, rest);
        let _ = blob::decode_chunk(rest, &digest, key, rest.len());
        return;
    }
    let content = &rest[..rest.len() / 2];
    let hash = blob::chunk_hash(key, content);
    let digest = hash.digest;
    let Ok(mut obj) = blob::encode_chunk_verified(content, &hash, key, 1) else {
        return;
    };
    let clean = obj.clone();
    corrupt(&mut obj, &rest[rest.len() / 2..]);
    if let Ok(got) = blob::decode_chunk(&obj, &digest, key, content.len()) {
        assert_eq!(got, content, "a damaged chunk decoded to other data");
    }
    let back = blob::decode_chunk(&clean, &digest, key, content.len());
    assert_eq!(back.ok().as_deref(), Some(content), "round trip");
}

/// A stored fixed index: [`blob::decode`] then [`FixedIndex::decode`].
pub fn index(data: &[u8]) {
    let (keyed, edit, rest) = split(data);
    let key = keyed.then(key);
    let max = 1 << 20;
    let obj = if edit {
        // A valid index from the input: entries are 32-byte slices.
        let entries: Vec<[u8; 32]> = rest
            .chunks_exact(32)
            .take(64)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let count = entries.len() as u64;
        if count == 0 {
            return;
        }
        let idx = FixedIndex {
            chunk_size: 1 << 16,
            virtual_size: count << 16,
            entries,
        };
        let Ok(mut obj) = blob::encode(ObjectType::Index, &idx.encode(), Some(1), key, b"") else {
            return;
        };
        let clean = blob::decode(&obj, ObjectType::Index, key, b"", max, None, "index")
            .ok()
            .and_then(|p| FixedIndex::decode(&p, "index").ok());
        assert_eq!(clean.as_ref().map(|i| &i.entries), Some(&idx.entries));
        corrupt(&mut obj, rest);
        obj
    } else {
        rest.to_vec()
    };
    if let Ok(payload) = blob::decode(&obj, ObjectType::Index, key, b"", max, None, "index") {
        if let Ok(idx) = FixedIndex::decode(&payload, "index") {
            assert!(idx.entries.len() as u64 * u64::from(idx.chunk_size) >= idx.virtual_size);
        }
    }
    // The payload parser alone, on raw bytes.
    let _ = FixedIndex::decode(rest, "index");
}

/// A stored manifest: [`blob::decode`] then [`Manifest::from_json`].
pub fn manifest(data: &[u8]) {
    let (keyed, edit, rest) = split(data);
    let key = keyed.then(key);
    let Ok(vm) = VmId::new("100") else { return };
    let id = BackupId::new(vm, time::OffsetDateTime::UNIX_EPOCH);
    let max = MAX_MANIFEST_SIZE;
    let obj = if edit {
        let Ok(mut obj) = blob::encode(ObjectType::Manifest, rest, Some(1), key, b"") else {
            return;
        };
        corrupt(&mut obj, rest);
        obj
    } else {
        rest.to_vec()
    };
    if obj.len() <= max + BLOB_HEADER_LEN + TAG_LEN {
        if let Ok(json) = blob::decode(&obj, ObjectType::Manifest, key, b"", max, None, "m") {
            let _ = Manifest::from_json(&json, &id);
        }
    }
    // The JSON parser alone, on raw bytes.
    if let Ok(m) = Manifest::from_json(rest, &id) {
        let again = m
            .to_json()
            .ok()
            .and_then(|j| Manifest::from_json(&j, &id).ok());
        assert!(again.is_some(), "an accepted manifest does not round-trip");
    }
}

/// The run record a killed run leaves: [`crate::job::record::RunRecord::decode`].
pub fn record(data: &[u8]) {
    if let Ok(r) = crate::job::record::RunRecord::decode(data) {
        let back = serde_json::to_vec(&r)
            .ok()
            .and_then(|b| crate::job::record::RunRecord::decode(&b).ok());
        assert_eq!(back.as_ref(), Some(&r), "record round trip");
    }
}

#[cfg(test)]
mod tests {
    // The fuzz bodies run in the unit tests too, on a few inputs each.
    #[test]
    fn fuzz_bodies_accept_short_and_structured_inputs() {
        let inputs: [&[u8]; 5] = [b"", b"\x00", b"\x02abcdefgh", b"\x03{}", &[0xff; 200]];
        for d in inputs {
            super::chunk(d);
            super::index(d);
            super::manifest(d);
            super::record(d);
        }
        super::record(br#"{"version":1,"vmid":"1","pid":1,"qmp":"/q","qga":null,"steps":[{"step":"freeze"}],"undone":false}"#);
    }
}

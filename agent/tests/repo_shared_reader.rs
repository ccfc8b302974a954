//! The owned disk reader `shear serve` uses: random reads across chunk
//! boundaries equal the image, zero chunks report as holes, the decoded
//! chunk cache stays within its byte bound, a damaged chunk fails the read
//! of its range only (F-33 style: never zeroes), encrypted repositories work.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

mod common;

use std::sync::Arc;

use common::*;
use shear::repo::{DiskExtent, KdfParams, Key, Repository};

fn open_shared(
    repo: &Repository,
    id: &shear::repo::BackupId,
    cache: u64,
) -> shear::repo::SharedDisk {
    Arc::new(repo.open_backup(id).unwrap())
        .shared_disk("scsi0", cache)
        .unwrap()
}

#[test]
fn random_reads_match_the_image_and_cache_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), None);
    // 40 chunks and a short tail.
    let img = image(7, 40 * CHUNK as usize + 1234);
    let id = backup(&repo, "100", 1, &[("scsi0", &img)]);
    let cache = 3 * u64::from(CHUNK);
    let d = open_shared(&repo, &id, cache);
    assert_eq!(d.size(), img.len() as u64);
    let mut rng = 12345u64;
    for _ in 0..300 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (rng >> 20) % img.len() as u64;
        let len = ((rng >> 8) % (3 * u64::from(CHUNK))).min(img.len() as u64 - off);
        let mut buf = vec![0xAAu8; len as usize];
        d.read_at(off, &mut buf).unwrap();
        assert_eq!(
            buf,
            img[off as usize..(off + len) as usize],
            "at {off}+{len}"
        );
        let s = d.cache_stats();
        assert!(s.bytes <= cache, "cache holds {} > {cache}", s.bytes);
        assert!(s.chunks <= 3);
    }
    // The whole disk in one read.
    let mut all = vec![0u8; img.len()];
    d.read_at(0, &mut all).unwrap();
    assert_eq!(all, img);
    // Evicted chunks' buffers were decoded into again (and every read
    // above still matched the image, the short tail chunk included).
    let s = d.cache_stats();
    assert!(
        s.reused_buffers > 0 && s.reused_buffers < s.decodes,
        "{s:?}"
    );
    // Reading one chunk again and again decodes it once.
    let before = d.cache_stats().decodes;
    for _ in 0..10 {
        let mut b = [0u8; 100];
        d.read_at(u64::from(CHUNK) * 2 + 5, &mut b).unwrap();
    }
    assert!(d.cache_stats().decodes <= before + 1);
    // Out of range and overflowing reads are errors, not panics.
    let mut b = [0u8; 10];
    d.read_at(img.len() as u64 - 5, &mut b).unwrap_err();
    d.read_at(u64::MAX - 2, &mut b).unwrap_err();
    d.extents(u64::MAX - 2, 10).unwrap_err();
}

/// What the server's reader thread answers by itself: only chunks already
/// decoded and held, never a read, a decode, a zero chunk, a range across
/// chunks or out of bounds; the bytes equal the image's.
#[test]
fn cached_slice_only_hands_over_decoded_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), None);
    let c = CHUNK as usize;
    // Data everywhere (no byte is zero) but in chunk 2, a hole.
    let mut img: Vec<u8> = (0..4 * c + 100).map(|i| (i % 251) as u8 + 1).collect();
    img[2 * c..3 * c].fill(0);
    let id = backup(&repo, "100", 1, &[("scsi0", &img)]);
    let d = open_shared(&repo, &id, 2 * u64::from(CHUNK));
    assert!(d.cached_slice(10, 100).is_none(), "nothing decoded yet");
    assert_eq!(d.cache_stats().decodes, 0, "cached_slice never decodes");
    let mut b = vec![0u8; 100];
    d.read_at(10, &mut b).unwrap();
    let (chunk, start) = d.cached_slice(10, 100).unwrap();
    assert_eq!(&chunk[start..start + 100], &img[10..110]);
    assert!(d.cached_slice(c as u64 - 10, 20).is_none(), "across chunks");
    assert!(d.cached_slice(0, 0).is_none());
    assert!(d.cached_slice(u64::MAX - 5, 10).is_none());
    // A hole is never cached; the short tail chunk once decoded is.
    d.read_at(2 * c as u64, &mut b).unwrap();
    assert!(d.cached_slice(2 * c as u64, 100).is_none());
    d.read_at(4 * c as u64, &mut b).unwrap();
    let (tail, start) = d.cached_slice(4 * c as u64 + 50, 50).unwrap();
    assert_eq!(&tail[start..start + 50], &img[4 * c + 50..4 * c + 100]);
    assert!(
        d.cached_slice(4 * c as u64 + 50, 51).is_none(),
        "past the end"
    );
    // Evicted (the cache holds two chunks): gone from the fast path too.
    d.read_at(c as u64, &mut b).unwrap();
    d.read_at(3 * c as u64, &mut b).unwrap();
    assert!(d.cached_slice(10, 100).is_none());
    assert_eq!(d.cache_stats().decodes, 4);
}

#[test]
fn zero_chunks_are_holes_and_extents_cover_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(&dir.path().join("repo"), None);
    let c = CHUNK as usize;
    let mut img = vec![0u8; 8 * c];
    img[c..2 * c].fill(1); // chunk 1 data
    img[5 * c + 7] = 9; // chunk 5 data
    let id = backup(&repo, "100", 1, &[("scsi0", &img)]);
    let d = open_shared(&repo, &id, 1 << 20);
    let ext = d.extents(0, img.len() as u64).unwrap();
    let c = c as u64;
    assert_eq!(
        ext,
        vec![
            DiskExtent {
                offset: 0,
                len: c,
                zero: true
            },
            DiskExtent {
                offset: c,
                len: c,
                zero: false
            },
            DiskExtent {
                offset: 2 * c,
                len: 3 * c,
                zero: true
            },
            DiskExtent {
                offset: 5 * c,
                len: c,
                zero: false
            },
            DiskExtent {
                offset: 6 * c,
                len: 2 * c,
                zero: true
            },
        ]
    );
    // Clipped to an unaligned range.
    let ext = d.extents(c - 10, 20).unwrap();
    assert_eq!(ext.len(), 2);
    assert_eq!(
        ext[0],
        DiskExtent {
            offset: c - 10,
            len: 10,
            zero: true
        }
    );
    // Reading holes decodes nothing.
    let mut b = vec![1u8; 3 * c as usize];
    d.read_at(2 * c, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));
    assert_eq!(d.cache_stats().decodes, 0);
}

#[test]
fn damaged_chunk_fails_its_range_only_and_encrypted_repo_reads() {
    let dir = tempfile::tempdir().unwrap();
    let kpath = dir.path().join("key");
    let key = Key::create_file(&kpath, b"pw", KdfParams::insecure_fast_for_tests()).unwrap();
    let root = dir.path().join("repo");
    let repo = init_repo(&root, Some(key));
    let img = image(3, 6 * CHUNK as usize);
    let id = backup(&repo, "100", 1, &[("scsi0", &img)]);
    let d = open_shared(&repo, &id, 1 << 20);
    let mut all = vec![0u8; img.len()];
    d.read_at(0, &mut all).unwrap();
    assert_eq!(all, img);
    drop(d);
    // Damage every stored chunk's last byte: reads of data fail, holes read.
    for f in chunk_files(&root) {
        let mut b = std::fs::read(&f).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
        std::fs::write(&f, b).unwrap();
    }
    let d = open_shared(&repo, &id, 1 << 20);
    let ext = d.extents(0, img.len() as u64).unwrap();
    let data = ext.iter().find(|e| !e.zero).unwrap();
    let mut b = vec![0u8; 16];
    let e = d.read_at(data.offset, &mut b).unwrap_err();
    assert!(
        matches!(e, shear::repo::RepoError::Corrupt { .. }),
        "expected a corrupt chunk error, got {e}"
    );
    if let Some(h) = ext.iter().find(|e| e.zero) {
        d.read_at(h.offset, &mut b).unwrap();
    }
}

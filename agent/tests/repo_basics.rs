//! Store, dedup, zero chunks, incremental reuse, restore (raw + qcow2),
//! concurrency of writers.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use common::*;
use shear::repo::writer::ChunkOutcome;
use shear::repo::{
    BackupMeta, BackupMode, ChunkPipeline, CommitInfo, Consistency, DiskSpec, ErrorKind,
    ImageFormat, Repository, RestoreOptions,
};

#[test]
fn dedup_across_backups_and_vms_counts_stored_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(1, 40 * CHUNK as usize);
    let id1 = backup(&repo, "100", 0, &[("d0", &img)]);
    let after_first = chunk_bytes(dir.path());
    let m1 = repo.load_manifest(&id1).unwrap();
    let d1 = &m1.disks[0];
    assert!(d1.new_chunks > 0);
    assert_eq!(
        d1.stored_bytes, after_first,
        "stored bytes = chunk files written"
    );
    assert_eq!(d1.data_bytes + d1.zero_bytes, img.len() as u64);

    // Same image again, same VM: nothing new stored.
    let id2 = backup(&repo, "100", 60, &[("d0", &img)]);
    let d2 = repo.load_manifest(&id2).unwrap().disks[0].clone();
    assert_eq!(d2.new_chunks, 0);
    assert_eq!(d2.stored_bytes, 0);
    assert_eq!(d2.dedup_bytes, d1.data_bytes);
    assert_eq!(chunk_bytes(dir.path()), after_first);

    // Another VM with the image plus one changed chunk: one new chunk.
    let mut img2 = img.clone();
    img2[5 * CHUNK as usize + 17] ^= 0x5a;
    let id3 = backup(&repo, "101", 0, &[("d0", &img2)]);
    let d3 = repo.load_manifest(&id3).unwrap().disks[0].clone();
    assert_eq!(d3.new_chunks, 1, "only the changed chunk is new");
    assert_eq!(d3.dedup_bytes + u64::from(CHUNK), d3.data_bytes);
    assert_eq!(
        chunk_bytes(dir.path()),
        after_first + d3.stored_bytes,
        "the store grew by exactly the reported stored bytes"
    );
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id2, "d0", out.path()), img);
    assert_eq!(restore_raw(&repo, &id3, "d0", out.path()), img2);
}

#[test]
fn zero_chunks_are_never_stored_and_restore_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let size = 64 * CHUNK as usize + 12345; // odd tail chunk
    let mut img = vec![0u8; size];
    img[3 * CHUNK as usize..3 * CHUNK as usize + 10].copy_from_slice(b"0123456789");
    img[size - 5..].copy_from_slice(b"tail!");
    let id = backup(&repo, "100", 0, &[("d0", &img)]);
    let m = repo.load_manifest(&id).unwrap();
    let d = &m.disks[0];
    assert_eq!(d.chunks, 65);
    assert_eq!(d.zero_chunks, 63);
    assert_eq!(chunk_files(dir.path()).len(), 2, "only the two data chunks");
    let out = tempfile::tempdir().unwrap();
    let r = repo
        .restore_disk(&id, "d0", out.path(), &RestoreOptions::default())
        .unwrap();
    let restored = std::fs::read(&r.path).unwrap();
    assert_eq!(restored, img);
    let meta = std::fs::metadata(&r.path).unwrap();
    assert_eq!(meta.len(), size as u64);
    // Holes stay holes: at most the two data 4 KiB blocks (plus fs slack).
    assert!(
        meta.blocks() * 512 <= 64 << 10,
        "restored file allocates {} bytes",
        meta.blocks() * 512
    );
    assert_eq!(r.zero_chunks, 63);
}

#[test]
fn incremental_reuses_digests_without_data() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(2, 16 * CHUNK as usize);
    let base = backup(&repo, "100", 0, &[("d0", &img)]);
    let base_reader = repo.open_backup(&base).unwrap();
    let base_entries = base_reader.open_disk("d0").unwrap().entries().to_vec();
    drop(base_reader);

    let mut img2 = img.clone();
    img2[7 * CHUNK as usize] ^= 1; // one dirty chunk
    let mut meta = BackupMeta::new("100", "vm");
    meta.time = Some(t(3600));
    meta.base = Some(base.clone());
    let s = repo.begin_backup(&meta).unwrap();
    let d = s.add_disk(&DiskSpec::new("d0", img2.len() as u64)).unwrap();
    for i in 0..d.chunk_count() {
        if i == 7 {
            let c = &img2[7 * CHUNK as usize..8 * CHUNK as usize];
            d.put_chunk(7, c).unwrap();
        } else {
            d.reuse(i, base_entries[i as usize]).unwrap();
        }
    }
    // A digest that is not in the store is refused: the caller must read it.
    assert_eq!(d.reuse(0, [9; 32]).unwrap_err().kind(), ErrorKind::NotFound);
    let st = d.finish().unwrap();
    let nonzero_clean = base_entries
        .iter()
        .enumerate()
        .filter(|(i, e)| *i != 7 && **e != [0u8; 32])
        .count() as u64;
    assert!(nonzero_clean > 0);
    assert_eq!(st.reused_chunks, nonzero_clean);
    // The base is share-locked by the session: prune/forget must not remove it (F-39).
    assert_eq!(repo.forget(&base).unwrap_err().kind(), ErrorKind::Busy);
    let info = CommitInfo {
        mode: BackupMode::Incremental,
        consistency: Consistency::Application,
        vm_mode: "snapshot".into(),
        vm_config: serde_json::json!({"memory": 128}),
        notes: "incremental".into(),
        freeze_window_ms: Some(42),
    };
    let id = s.commit(&info).unwrap();
    let m = repo.load_manifest(&id).unwrap();
    assert_eq!(m.base.as_ref(), Some(&base));
    assert_eq!(m.timings.freeze_window_ms, Some(42));
    assert_eq!(m.vm_mode, "snapshot");
    assert_eq!(m.vm_config["memory"], 128);
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id, "d0", out.path()), img2);
}

#[test]
fn uncommitted_session_is_invisible_and_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(3, 8 * CHUNK as usize);
    let mut meta = BackupMeta::new("100", "vm");
    meta.time = Some(t(0));
    {
        let s = repo.begin_backup(&meta).unwrap();
        let d = s.add_disk(&DiskSpec::new("d0", img.len() as u64)).unwrap();
        d.put_chunk(0, &img[..CHUNK as usize]).unwrap();
        d.finish().unwrap_err(); // chunks missing
        assert!(repo.list_backups(None).unwrap().is_empty());
        // Dropped without commit.
    }
    assert!(repo.list_backups(None).unwrap().is_empty());
    assert!(!dir
        .path()
        .join("backups/vm/100")
        .join("2023-11-14T22:13:20Z")
        .exists());
    // The same id can now be used.
    let id = backup(&repo, "100", 0, &[("d0", &img)]);
    assert_eq!(repo.list_backups(None).unwrap()[0].id, id);
    // Duplicate id refused.
    assert_eq!(
        repo.begin_backup(&meta).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
}

#[test]
fn concurrent_backups_of_two_vms_with_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let shared = image(4, 24 * CHUNK as usize);
    let imgs: Vec<Vec<u8>> = (0..2)
        .map(|n| {
            let mut v = shared.clone();
            v.extend(image(10 + n, 8 * CHUNK as usize));
            v
        })
        .collect();
    let ids: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = imgs
            .iter()
            .enumerate()
            .map(|(n, img)| {
                let repo = repo.clone();
                s.spawn(move || {
                    let mut meta = BackupMeta::new(&format!("{}", 200 + n), "vm");
                    meta.time = Some(t(0));
                    let sess = repo.begin_backup(&meta).unwrap();
                    let d = sess
                        .add_disk(&DiskSpec::new("d0", img.len() as u64))
                        .unwrap();
                    let p = ChunkPipeline::new(2, 2);
                    for (i, c) in img.chunks(CHUNK as usize).enumerate() {
                        p.submit(&d, i as u64, c.to_vec()).unwrap();
                    }
                    p.finish().unwrap();
                    d.finish().unwrap();
                    sess.commit(&CommitInfo::default()).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let out = tempfile::tempdir().unwrap();
    for (id, img) in ids.iter().zip(&imgs) {
        assert_eq!(&restore_raw(&repo, id, "d0", out.path()), img);
    }
    let report = repo.verify(&shear::repo::VerifyTarget::All, 2).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn put_chunk_outcomes_and_input_checks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let mut meta = BackupMeta::new("100", "vm");
    meta.time = Some(t(0));
    let s = repo.begin_backup(&meta).unwrap();
    let d = s
        .add_disk(&DiskSpec::new("d0", 3 * u64::from(CHUNK)))
        .unwrap();
    let data = image(5, CHUNK as usize);
    let data = if data.iter().all(|b| *b == 0) {
        vec![7u8; CHUNK as usize]
    } else {
        data
    };
    assert!(matches!(
        d.put_chunk(0, &data).unwrap(),
        ChunkOutcome::Stored(_)
    ));
    assert_eq!(d.put_chunk(1, &data).unwrap(), ChunkOutcome::Deduplicated);
    assert_eq!(
        d.put_chunk(2, &vec![0; CHUNK as usize]).unwrap(),
        ChunkOutcome::Zero
    );
    assert_eq!(
        d.put_chunk(3, &data).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        d.put_chunk(0, &data[1..]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    // F-46: hostile disk and VM names.
    s.add_disk(&DiskSpec::new("../../etc/shadow", 10))
        .unwrap_err();
    assert_eq!(
        repo.begin_backup(&BackupMeta::new("a/../../b", "x"))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        s.add_disk(&DiskSpec::new("d0", 10)).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
}

#[test]
fn restore_refuses_overwrite_and_symlinks_f46() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(6, 4 * CHUNK as usize);
    let id = backup(&repo, "100", 0, &[("d0", &img)]);
    let out = tempfile::tempdir().unwrap();
    let opts = RestoreOptions::default();
    repo.restore_disk(&id, "d0", out.path(), &opts).unwrap();
    // Existing file: refused without --force.
    let e = repo.restore_disk(&id, "d0", out.path(), &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    // A symlink planted at the target is refused even with --force, and the
    // file it points at is untouched.
    let victim = out.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out2 = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&victim, out2.path().join("d0.raw")).unwrap();
    let force = RestoreOptions {
        force: true,
        ..RestoreOptions::default()
    };
    repo.restore_disk(&id, "d0", out2.path(), &force)
        .unwrap_err();
    repo.restore_disk(&id, "d0", out2.path(), &opts)
        .unwrap_err();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // --force replaces a regular file.
    std::fs::write(out.path().join("d0.raw"), b"old").unwrap();
    repo.restore_disk(&id, "d0", out.path(), &force).unwrap();
    assert_eq!(std::fs::read(out.path().join("d0.raw")).unwrap(), img);
    // No partial files left behind.
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
    // Hostile disk name.
    repo.restore_disk(&id, "../x", out.path(), &opts)
        .unwrap_err();
}

/// The backup's fleece images are empty qcow2 files made in process (no
/// `qemu-img create`): QEMU must accept them at any size and write into
/// them, and `qemu-img check` must find them clean afterwards.
#[test]
fn empty_qcow2_images_are_writable_by_qemu_at_any_size() {
    if !has_qemu_img() {
        skip("qemu-img");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for size in [512u64, (1 << 30) + 3 * 512, 1 << 40, 64 << 40] {
        let path = dir.path().join(format!("{size}.qcow2"));
        let f = std::fs::File::create_new(&path).unwrap();
        shear::repo::qcow2::Qcow2Writer::new(f, size)
            .finish_unsynced()
            .unwrap();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], size, "{size}");
        assert_eq!(v["format"], "qcow2");
        // A write at the end of the image (QEMU allocates clusters, L2
        // tables and refcounts in the image we made) reads back.
        let at = size - 512;
        let io = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg("-c")
            .arg(format!("write -P 0xab {at} 512"))
            .arg("-c")
            .arg(format!("read -P 0xab {at} 512"))
            .arg(&path)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&io.stdout);
        assert!(
            io.status.success() && out.contains("read 512/512") && !out.contains("failed"),
            "{size}: qemu-io: {out}{}",
            String::from_utf8_lossy(&io.stderr)
        );
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{size}: qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn restore_qcow2_is_valid_per_qemu_img() {
    if !has_qemu_img() {
        skip("qemu-img");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    // Sparse image with a short last chunk (QEMU sizes are 512-aligned),
    // data at the start, middle, and tail.
    let size = 300 * CHUNK as usize + 3 * 4096 + 512;
    let mut img = vec![0u8; size];
    let noise = image(7, 20 * CHUNK as usize);
    img[..noise.len()].copy_from_slice(&noise);
    img[150 * CHUNK as usize + 100..150 * CHUNK as usize + 200].fill(0xab);
    img[size - 3..].copy_from_slice(b"end");
    let id = backup(&repo, "100", 0, &[("d0", &img)]);
    let out = tempfile::tempdir().unwrap();
    let q = repo
        .restore_disk(
            &id,
            "d0",
            out.path(),
            &RestoreOptions {
                format: ImageFormat::Qcow2,
                ..RestoreOptions::default()
            },
        )
        .unwrap();
    let raw = out.path().join("ref.raw");
    std::fs::write(&raw, &img).unwrap();
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&q.path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&q.path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&q.path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], size as u64);
    assert_eq!(v["format"], "qcow2");
    // Sparse: far smaller than the virtual size.
    assert!(std::fs::metadata(&q.path).unwrap().len() < size as u64 / 4);
}

#[test]
fn reader_api_reads_chunks_and_image_digest_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(8, 10 * CHUNK as usize);
    let id = backup(&repo, "100", 0, &[("d0", &img), ("d1", &img)]);
    let r = repo.open_backup(&id).unwrap();
    let d = r.open_disk("d0").unwrap();
    let mut all = Vec::new();
    for i in 0..d.chunk_count() {
        all.extend(d.read_chunk(i).unwrap());
    }
    assert_eq!(all, img);
    let m = r.manifest();
    assert_eq!(m.disks[0].image_digest, m.disks[1].image_digest);
    // The digest is a pure function of the image (documented in formats.md):
    // recompute it independently from the raw bytes.
    let mut h = blake3::Hasher::new();
    h.update(b"shear image digest v1\0");
    h.update(&(img.len() as u64).to_le_bytes());
    h.update(&CHUNK.to_le_bytes());
    for c in img.chunks(CHUNK as usize) {
        h.update(blake3::hash(c).as_bytes());
    }
    assert_eq!(m.disks[0].image_digest, h.finalize().to_hex().to_string());
    drop(r);
    let _ = Arc::new(Repository::open(dir.path(), None).unwrap());
}

/// Issue 17: a pipeline with a stage meter charges each stage's CPU to it
/// with bytes that add up: every chunk hashed, each new chunk compressed
/// and verified once, encrypted only in an encrypted repository, and
/// exactly the stored bytes written.
#[test]
fn pipeline_stage_meter_counts_every_stage_plain_and_encrypted() {
    use shear::repo::format::{BLOB_HEADER_LEN, TAG_LEN};
    use shear::repo::stages::{StageFigure, StageMeter};
    let c = CHUNK as usize;
    // Distinct chunks: 6 text-like (each its own pattern), 2 random, 2 zero.
    let mut img = Vec::new();
    for n in 0..6u8 {
        img.extend((0..c).map(|i| n.wrapping_mul(31).wrapping_add((i % 89) as u8)));
    }
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    img.extend((0..2 * c).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 32) as u8
    }));
    img.extend(vec![0u8; 2 * c]);
    let data_chunks = 8u64;
    for encrypted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let key = encrypted.then(shear::repo::Key::generate);
        let repo = init_repo(dir.path(), key);
        let mut meta = BackupMeta::new("100", "vm");
        meta.time = Some(t(0));
        let sess = repo.begin_backup(&meta).unwrap();
        let d = sess
            .add_disk(&DiskSpec::new("d0", img.len() as u64))
            .unwrap();
        let meter = StageMeter::new();
        let p = ChunkPipeline::with_meter(
            2,
            2,
            &(Arc::new(drop) as shear::repo::BufferRecycler),
            None,
            Some(&meter),
        );
        for (i, ch) in img.chunks(c).enumerate() {
            p.submit(&d, i as u64, ch.to_vec()).unwrap();
        }
        p.finish().unwrap();
        let entry = d.finish().unwrap();
        sess.commit(&CommitInfo::default()).unwrap();
        let f = meter.figures();
        eprintln!("encrypted {encrypted}: {f:?}");
        assert_eq!(entry.new_chunks, data_chunks, "{entry:?}");
        assert_eq!(f.hash.bytes, img.len() as u64, "every chunk is hashed");
        assert_eq!(f.compress.bytes, entry.new_data_bytes);
        assert_eq!(f.verify.bytes, entry.new_data_bytes);
        assert_eq!(f.write.bytes, entry.stored_bytes);
        for (name, s) in [
            ("hash", f.hash),
            ("compress", f.compress),
            ("verify", f.verify),
            ("write", f.write),
        ] {
            assert!(s.cpu_s > 0.0, "{name}: {f:?}");
        }
        assert_eq!(f.read, StageFigure::default(), "the pipeline reads nothing");
        if encrypted {
            // The payloads: stored blobs less their headers and tags.
            let overhead = data_chunks * (BLOB_HEADER_LEN + TAG_LEN) as u64;
            assert_eq!(f.encrypt.bytes, entry.stored_bytes - overhead);
            assert!(f.encrypt.cpu_s > 0.0, "{f:?}");
        } else {
            assert_eq!(f.encrypt, StageFigure::default());
        }
    }
}

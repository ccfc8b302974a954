//! Store benchmark: write and restore throughput of the repository alone for
//! 1 GiB of mixed data, the dedup ratio of two similar images, and the cost
//! of the pre-store verification (F-45).
//!
//! Run: `cargo run --release -p shear --example repo_bench [DIR] [MiB]`
//! (DIR defaults to a temp dir under /var/tmp; MiB defaults to 1024).

// A benchmark binary: unwrap on setup failures, small casts for display.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use shear::repo::blob;
use shear::repo::format::ObjectType;
use shear::repo::{
    BackupMeta, ChunkPipeline, CommitInfo, DiskSpec, InitOptions, Key, Repository, RestoreOptions,
};

const CHUNK: usize = 4 << 20;

/// Mixed data, per 4 MiB chunk: 40 % random (incompressible), 30 % text-like
/// (compresses ~4x), 15 % zero, 15 % repeats of an earlier chunk.
fn mixed_image(seed: u64, chunks: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; chunks * CHUNK];
    let words: Vec<&[u8]> = [
        "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog ", "backup ",
        "chunk ", "index ", "\n", "0x1f ", "error: ", "kernel ", "ext4 ",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect();
    for i in 0..chunks {
        let (before, rest) = v.split_at_mut(i * CHUNK);
        let c = &mut rest[..CHUNK];
        match rng.random_range(0..100) {
            0..40 => rng.fill(c),
            40..70 => {
                let mut pos = 0;
                while pos < CHUNK {
                    let w = words[rng.random_range(0..words.len())];
                    let n = w.len().min(CHUNK - pos);
                    c[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                }
            }
            70..85 => {}
            _ if i > 0 => {
                let j = rng.random_range(0..i);
                c.copy_from_slice(&before[j * CHUNK..(j + 1) * CHUNK]);
            }
            _ => rng.fill(c),
        }
    }
    v
}

fn store(repo: &Repository, vmid: &str, img: &[u8]) -> (f64, shear::repo::DiskEntry) {
    let start = Instant::now();
    let s = repo.begin_backup(&BackupMeta::new(vmid, "bench")).unwrap();
    let d = s.add_disk(&DiskSpec::new("d0", img.len() as u64)).unwrap();
    let p = ChunkPipeline::new(2, 4);
    for (i, c) in img.chunks(CHUNK).enumerate() {
        p.submit(&d, i as u64, c.to_vec()).unwrap();
    }
    p.finish().unwrap();
    let e = d.finish().unwrap();
    s.commit(&CommitInfo::default()).unwrap();
    (start.elapsed().as_secs_f64(), e)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let base: PathBuf = args
        .next()
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let size_mib: usize = args.next().map_or(1024, |s| s.parse().unwrap());
    let chunks = size_mib * (1 << 20) / CHUNK;
    let work = tempfile::tempdir_in(&base).unwrap();
    println!("data: {size_mib} MiB mixed (40% random, 30% text, 15% zero, 15% repeated), 4 MiB chunks, zstd 1, 2 writer threads");
    let img = mixed_image(1, chunks);

    for encrypted in [false, true] {
        let rdir = work.path().join(if encrypted { "enc" } else { "plain" });
        let key = encrypted.then(Key::generate);
        let repo = Repository::init(&rdir, key, &InitOptions::default()).unwrap();
        let (secs, e) = store(&repo, "100", &img);
        let label = if encrypted { "encrypted" } else { "plain" };
        println!(
            "[{label}] write:   {:.0} MiB/s ({:.2} s; {:.0} MiB data, {:.0} MiB zero, stored {:.0} MiB new + {:.0} MiB deduplicated)",
            mib(img.len() as u64) / secs,
            secs,
            mib(e.data_bytes),
            mib(e.zero_bytes),
            mib(e.stored_bytes),
            mib(e.dedup_bytes),
        );
        let id = repo.list_backups(None).unwrap()[0].id.clone();
        let out = work.path().join(format!("out-{label}"));
        std::fs::create_dir(&out).unwrap();
        let start = Instant::now();
        let r = repo
            .restore_disk(&id, "d0", &out, &RestoreOptions::default())
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "[{label}] restore: {:.0} MiB/s raw ({:.2} s, digest verified)",
            mib(r.virtual_size) / secs,
            secs
        );
        assert_eq!(std::fs::read(&r.path).unwrap(), img);
        std::fs::remove_file(&r.path).unwrap();

        if !encrypted {
            // A similar second image: 10 % of the chunks rewritten.
            let mut img2 = img.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(2);
            for _ in 0..chunks / 10 {
                let c = rng.random_range(0..chunks);
                rng.fill(&mut img2[c * CHUNK..c * CHUNK + 4096]);
            }
            let (secs, e2) = store(&repo, "101", &img2);
            let logical = e.data_bytes + e2.data_bytes;
            let stored_plain = e.new_data_bytes + e2.new_data_bytes;
            let stored_disk = e.stored_bytes + e2.stored_bytes;
            println!(
                "[{label}] second similar image (10% chunks changed): {:.0} MiB/s, {:.0} MiB new",
                mib(img2.len() as u64) / secs,
                mib(e2.stored_bytes)
            );
            println!(
                "[{label}] dedup ratio of the two images: {:.2}x (non-zero data {:.0} MiB / unique chunks {:.0} MiB); with compression {:.2}x (on disk {:.0} MiB)",
                logical as f64 / stored_plain as f64,
                mib(logical),
                mib(stored_plain),
                logical as f64 / stored_disk as f64,
                mib(stored_disk),
            );
        }
    }

    // Cost of the F-45 pre-store check, single thread, on 64 MiB of the mix.
    let sample: Vec<&[u8]> = img
        .chunks(CHUNK)
        .filter(|c| !shear::repo::format::is_zero(c))
        .take(16)
        .collect();
    let total: usize = sample.iter().map(|c| c.len()).sum();
    let key = Arc::new(Key::generate());
    for k in [None, Some(key.as_ref())] {
        let hashes: Vec<_> = sample.iter().map(|c| blob::chunk_hash(k, c)).collect();
        // Best of 5 alternating runs: the machine may be shared.
        let (mut plain, mut verified) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t0 = Instant::now();
            for (c, h) in sample.iter().zip(&hashes) {
                blob::encode(ObjectType::Chunk, c, Some(1), k, &h.digest).unwrap();
            }
            plain = plain.min(t0.elapsed().as_secs_f64());
            let t1 = Instant::now();
            for (c, h) in sample.iter().zip(&hashes) {
                blob::encode_chunk_verified(c, h, k, 1).unwrap();
            }
            verified = verified.min(t1.elapsed().as_secs_f64());
        }
        println!(
            "[{}] encode per core: {:.0} MiB/s unchecked, {:.0} MiB/s with pre-store verification (+{:.0}% time)",
            if k.is_some() { "encrypted" } else { "plain" },
            mib(total as u64) / plain,
            mib(total as u64) / verified,
            (verified / plain - 1.0) * 100.0
        );
    }
}

//! The `shear serve --overlay` store: partial writes copy their block from
//! the backup first, zeroes read as zeroes, writes survive a reopen after
//! flush, an overlay of another backup or disk is refused, the repository
//! is never written.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

mod common;

use std::sync::Arc;

use common::*;
use nbd_export::server::BlockSource;
use shear::serve::overlay::{Overlay, BLOCK};
use shear::serve::BackupSource;

#[test]
fn overlay_copy_on_write_zeroes_persistence_and_owner_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = init_repo(&root, None);
    let img = image(11, 20 * CHUNK as usize + 777);
    let id = backup(&repo, "100", 1, &[("scsi0", &img)]);
    let before: Vec<_> = all_files(&root)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let ov = dir.path().join("ov");
    std::fs::create_dir(&ov).unwrap();
    let base = || {
        BackupSource(Arc::new(
            Arc::new(repo.open_backup(&id).unwrap())
                .shared_disk("scsi0", 1 << 20)
                .unwrap(),
        ))
    };
    let owner = format!("{id}/scsi0");
    let mut expect = img.clone();
    {
        let o = Overlay::open(&ov, "scsi0", &owner, base()).unwrap();
        // Partial write across a block boundary.
        let at = BLOCK as usize - 10;
        o.write_at(at as u64, &[0x42; 30]).unwrap();
        expect[at..at + 30].fill(0x42);
        // Zeroes: part of a block, then whole blocks (punched).
        o.write_zeroes(3 * BLOCK + 5, 100, false).unwrap();
        expect[3 * BLOCK as usize + 5..3 * BLOCK as usize + 105].fill(0);
        o.write_zeroes(5 * BLOCK, 2 * BLOCK, true).unwrap();
        expect[5 * BLOCK as usize..7 * BLOCK as usize].fill(0);
        // The tail block (shorter than BLOCK).
        let n = img.len();
        o.write_at(n as u64 - 3, b"end").unwrap();
        expect[n - 3..].copy_from_slice(b"end");
        let mut got = vec![0u8; img.len()];
        o.read_at(0, &mut got).unwrap();
        assert!(got == expect, "overlay view differs before flush");
        // Written blocks are data even where the backup had zeroes.
        let ext = o.extents(0, img.len() as u64).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), img.len() as u64);
        o.flush().unwrap();
    }
    // Reopened: the writes are there.
    let o = Overlay::open(&ov, "scsi0", &owner, base()).unwrap();
    let mut got = vec![0u8; img.len()];
    o.read_at(0, &mut got).unwrap();
    assert!(got == expect, "overlay writes lost across a reopen");
    // Held while open: a second opener is refused.
    Overlay::open(&ov, "scsi0", &owner, base()).unwrap_err();
    drop(o);
    // Another owner (backup or disk) is refused.
    let e = Overlay::open(&ov, "scsi0", "vm/100/other/scsi0", base()).unwrap_err();
    assert!(e.to_string().contains("does not belong"), "{e}");
    // The repository is byte-identical.
    let after: Vec<_> = all_files(&root)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let strip = |v: Vec<(std::path::PathBuf, Vec<u8>)>| {
        v.into_iter()
            .filter(|(p, _)| !p.to_string_lossy().ends_with(".lock"))
            .collect::<Vec<_>>()
    };
    assert!(strip(before) == strip(after), "the repository changed");
}

//! F-39 prune selection (Proxmox semantics) and prune against readers and
//! incrementals; F-36/F-37 GC never deletes a chunk referenced by a manifest
//! or by a backup in progress.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::time::Duration;

use common::*;
use shear::repo::gc::GcOptions;
use shear::repo::prune::compute_prune;
use shear::repo::{
    BackupMeta, CommitInfo, DiskSpec, ErrorKind, KeepOptions, PruneMark, VerifyTarget, VmId,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn ts(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &Rfc3339).unwrap()
}

/// Runs the selection and returns the kept times, oldest first.
fn kept(list: &[&str], keep: KeepOptions) -> Vec<String> {
    kept_p(list, &[], keep)
}

fn kept_p(list: &[&str], protected: &[&str], keep: KeepOptions) -> Vec<String> {
    let input: Vec<_> = list
        .iter()
        .map(|s| (ts(s), protected.contains(s)))
        .collect();
    let marks = compute_prune(&input, &keep);
    let mut out: Vec<String> = list
        .iter()
        .zip(marks)
        .filter(|(_, m)| *m != PruneMark::Remove)
        .map(|(s, _)| (*s).to_owned())
        .collect();
    out.sort();
    out
}

fn k() -> KeepOptions {
    KeepOptions::default()
}

#[test]
fn f39_prune_table_proxmox_cases() {
    // Cases as in Proxmox Backup Server's prune tests/simulator behaviour.
    let simple = [
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
        "2019-12-04T12:59:15Z",
    ];
    let all: Vec<String> = simple.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        kept(
            &simple,
            KeepOptions {
                last: Some(4),
                ..k()
            }
        ),
        all
    );
    assert_eq!(
        kept(
            &simple,
            KeepOptions {
                last: Some(3),
                ..k()
            }
        ),
        all[1..]
    );
    assert_eq!(
        kept(
            &simple,
            KeepOptions {
                last: Some(1),
                ..k()
            }
        ),
        all[3..]
    );
    assert!(kept(
        &simple,
        KeepOptions {
            last: Some(0),
            ..k()
        }
    )
    .is_empty());
    // keep-last 2 + keep-daily 2: daily reaches past the days already covered.
    assert_eq!(
        kept(
            &simple,
            KeepOptions {
                last: Some(2),
                daily: Some(2),
                ..k()
            }
        ),
        all
    );
    assert_eq!(
        kept(
            &simple,
            KeepOptions {
                daily: Some(3),
                ..k()
            }
        ),
        vec![all[0].clone(), all[1].clone(), all[3].clone()]
    );
    assert_eq!(
        kept(
            &simple,
            KeepOptions {
                daily: Some(2),
                ..k()
            }
        ),
        vec![all[1].clone(), all[3].clone()]
    );
    // All in one ISO week / month / year: one kept.
    for opts in [
        KeepOptions {
            weekly: Some(5),
            ..k()
        },
        KeepOptions {
            monthly: Some(6),
            ..k()
        },
        KeepOptions {
            yearly: Some(7),
            ..k()
        },
        KeepOptions {
            weekly: Some(5),
            monthly: Some(6),
            yearly: Some(7),
            ..k()
        },
        KeepOptions {
            daily: Some(1),
            weekly: Some(5),
            ..k()
        },
    ] {
        assert_eq!(kept(&simple, opts), vec![all[3].clone()], "{opts:?}");
    }

    let hourly = [
        "2019-11-15T09:39:15Z",
        "2019-11-15T10:49:15Z",
        "2019-11-15T10:59:15Z",
        "2019-11-15T11:39:15Z",
        "2019-11-15T11:49:15Z",
        "2019-11-15T11:59:15Z",
    ];
    assert_eq!(
        kept(
            &hourly,
            KeepOptions {
                hourly: Some(3),
                ..k()
            }
        ),
        vec![
            "2019-11-15T09:39:15Z",
            "2019-11-15T10:59:15Z",
            "2019-11-15T11:59:15Z"
        ]
    );
    assert_eq!(
        kept(
            &hourly,
            KeepOptions {
                hourly: Some(2),
                ..k()
            }
        ),
        vec!["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]
    );

    let spread = [
        "2018-11-15T11:59:15Z",
        "2019-11-15T11:59:15Z",
        "2019-11-21T11:59:15Z",
        "2019-11-22T11:59:15Z",
        "2019-11-29T11:59:15Z",
        "2019-12-01T11:59:15Z",
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
    ];
    assert_eq!(
        kept(
            &spread,
            KeepOptions {
                daily: Some(1),
                ..k()
            }
        ),
        vec!["2019-12-04T11:59:15Z"]
    );
    assert_eq!(
        kept(
            &spread,
            KeepOptions {
                last: Some(1),
                daily: Some(1),
                ..k()
            }
        ),
        vec!["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
    // Sunday 2019-12-01 is the previous ISO week of Wednesday 2019-12-04.
    assert_eq!(
        kept(
            &spread,
            KeepOptions {
                daily: Some(1),
                weekly: Some(1),
                ..k()
            }
        ),
        vec!["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
    assert_eq!(
        kept(
            &spread,
            KeepOptions {
                daily: Some(1),
                weekly: Some(1),
                monthly: Some(1),
                ..k()
            }
        ),
        vec![
            "2019-11-22T11:59:15Z",
            "2019-12-01T11:59:15Z",
            "2019-12-04T11:59:15Z"
        ]
    );
    assert_eq!(
        kept(
            &spread,
            KeepOptions {
                monthly: Some(1),
                yearly: Some(1),
                ..k()
            }
        ),
        vec!["2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
}

#[test]
fn f39_prune_year_boundary_iso_weeks_and_protected() {
    // 2020-12-31 (Thu) and 2021-01-03 (Sun) are both ISO week 2020-W53;
    // 2021-01-04 (Mon) is 2021-W01.
    let list = [
        "2020-12-28T10:00:00Z",
        "2020-12-31T10:00:00Z",
        "2021-01-03T10:00:00Z",
        "2021-01-04T10:00:00Z",
    ];
    assert_eq!(
        kept(
            &list,
            KeepOptions {
                weekly: Some(2),
                ..k()
            }
        ),
        vec!["2021-01-03T10:00:00Z", "2021-01-04T10:00:00Z"]
    );
    // Yearly splits at the calendar year, not the ISO year.
    assert_eq!(
        kept(
            &list,
            KeepOptions {
                yearly: Some(2),
                ..k()
            }
        ),
        vec!["2020-12-31T10:00:00Z", "2021-01-04T10:00:00Z"]
    );
    // Monthly across the boundary.
    assert_eq!(
        kept(
            &list,
            KeepOptions {
                last: Some(1),
                monthly: Some(1),
                ..k()
            }
        ),
        vec!["2020-12-31T10:00:00Z", "2021-01-04T10:00:00Z"]
    );
    // Protected backups are kept and do not count for a rule.
    assert_eq!(
        kept_p(
            &list,
            &["2021-01-04T10:00:00Z"],
            KeepOptions {
                last: Some(1),
                ..k()
            }
        ),
        vec!["2021-01-03T10:00:00Z", "2021-01-04T10:00:00Z"]
    );
    assert_eq!(
        kept_p(
            &list,
            &["2020-12-28T10:00:00Z"],
            KeepOptions {
                last: Some(1),
                ..k()
            }
        ),
        vec!["2020-12-28T10:00:00Z", "2021-01-04T10:00:00Z"]
    );
    // Hourly at midnight of New Year.
    let ny = [
        "2020-12-31T23:10:00Z",
        "2020-12-31T23:50:00Z",
        "2021-01-01T00:05:00Z",
    ];
    assert_eq!(
        kept(
            &ny,
            KeepOptions {
                hourly: Some(2),
                ..k()
            }
        ),
        vec!["2020-12-31T23:50:00Z", "2021-01-01T00:05:00Z"]
    );
}

#[test]
fn f39_prune_repo_dry_run_protect_and_busy() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(30, 2 * CHUNK as usize);
    let ids: Vec<_> = (0..5)
        .map(|n| backup(&repo, "100", n * 86_400, &[("d0", &img)]))
        .collect();
    let other = backup(&repo, "101", 0, &[("d0", &img)]);
    let vm = VmId::new("100").unwrap();
    // Refuses to keep nothing.
    assert_eq!(
        repo.prune(&vm, &KeepOptions::default(), false)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let keep = KeepOptions {
        last: Some(2),
        ..k()
    };
    let dry = repo.prune(&vm, &keep, true).unwrap();
    assert_eq!(
        dry.iter().filter(|e| e.mark == PruneMark::Remove).count(),
        3
    );
    assert!(dry.iter().all(|e| !e.removed));
    assert_eq!(repo.list_backups(Some(&vm)).unwrap().len(), 5);

    repo.set_protected(&ids[0], true).unwrap();
    // A reader holds ids[1]: prune skips it (F-39 prune while restore reads).
    let reader = repo.open_backup(&ids[1]).unwrap();
    let res = repo.prune(&vm, &keep, false).unwrap();
    drop(reader);
    let mark_of = |id| res.iter().find(|e| &e.backup == id).unwrap();
    assert_eq!(mark_of(&ids[0]).mark, PruneMark::Protected);
    assert!(mark_of(&ids[1]).skipped.is_some());
    assert!(mark_of(&ids[2]).removed);
    let left: Vec<_> = repo
        .list_backups(Some(&vm))
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(
        left,
        vec![
            ids[0].clone(),
            ids[1].clone(),
            ids[3].clone(),
            ids[4].clone()
        ]
    );
    assert_eq!(
        repo.list_backups(None).unwrap().len(),
        5,
        "VM 101 untouched: {other}"
    );
    // Protected survives a forget too.
    repo.forget(&ids[0]).unwrap_err();
    repo.set_protected(&ids[0], false).unwrap();
    repo.forget(&ids[0]).unwrap();
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &ids[4], "d0", out.path()), img);
}

#[test]
fn f36_gc_keeps_chunks_of_manifests_and_running_backups() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let keep_img = image(40, 6 * CHUNK as usize);
    let gone_img = image(41, 6 * CHUNK as usize);
    let kept_id = backup(&repo, "100", 0, &[("d0", &keep_img)]);
    let gone_id = backup(&repo, "101", 0, &[("d0", &gone_img)]);
    repo.forget(&gone_id).unwrap();
    let orphaned = chunk_files(dir.path()).len();

    // A backup in progress deduplicates against the orphaned chunks of the
    // forgotten backup (the PBS 068e5268 race).
    let mut meta = BackupMeta::new("102", "vm");
    meta.time = Some(t(0));
    let session = repo.begin_backup(&meta).unwrap();
    let d = session
        .add_disk(&DiskSpec::new("d0", gone_img.len() as u64))
        .unwrap();
    for (i, c) in gone_img.chunks(CHUNK as usize).enumerate() {
        d.put_chunk(i as u64, c).unwrap();
    }
    // GC cannot sweep while the backup runs: it waits (bounded) and gives up
    // without deleting anything.
    let e = repo
        .gc(&GcOptions {
            wait: Duration::from_millis(200),
            dry_run: false,
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(chunk_files(dir.path()).len(), orphaned);

    // GC started while the backup runs completes after the commit and keeps
    // every chunk the new backup references.
    let committed = std::thread::scope(|s| {
        let repo2 = repo.clone();
        let gc = s.spawn(move || repo2.gc(&GcOptions::default()));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!gc.is_finished(), "GC must wait for the running backup");
        d.finish().unwrap();
        let id = session.commit(&CommitInfo::default()).unwrap();
        let r = gc.join().unwrap().unwrap();
        assert_eq!(r.chunks_removed, 0, "{r:?}");
        id
    });
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &committed, "d0", out.path()), gone_img);
    assert_eq!(restore_raw(&repo, &kept_id, "d0", out.path()), keep_img);

    // Now forget it: GC removes exactly its unique chunks, never kept ones.
    let kept_chunks: Vec<_> = repo
        .open_backup(&kept_id)
        .unwrap()
        .open_disk("d0")
        .unwrap()
        .entries()
        .iter()
        .filter(|e| **e != [0; 32])
        .map(hex::encode)
        .collect();
    repo.forget(&committed).unwrap();
    let r = repo.gc(&GcOptions::default()).unwrap();
    assert!(r.chunks_removed > 0);
    let left: Vec<String> = chunk_files(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut want = kept_chunks.clone();
    want.sort();
    want.dedup();
    let mut got = left.clone();
    got.sort();
    assert_eq!(got, want);
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
}

#[test]
fn f31_gc_sweeps_temp_files_and_abandoned_backups() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(50, 4 * CHUNK as usize);
    let id = backup(&repo, "100", 0, &[("d0", &img)]);
    // Leftovers of a killed writer: temp files, a directory without manifest.
    let chunk_dir = dir.path().join("chunks/ab");
    std::fs::write(chunk_dir.join("abcd.tmp-999-1"), b"partial").unwrap();
    let abandoned = dir.path().join("backups/vm/100/2030-01-01T00:00:00Z");
    std::fs::create_dir(&abandoned).unwrap();
    std::fs::write(abandoned.join("d0.fidx"), b"x").unwrap();
    std::fs::write(abandoned.join("manifest.blob.tmp-999-2"), b"x").unwrap();
    assert_eq!(
        repo.list_backups(None).unwrap().len(),
        1,
        "abandoned is invisible"
    );
    let dry = repo
        .gc(&GcOptions {
            dry_run: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(dry.temp_files_removed, 1);
    assert!(abandoned.exists());
    let r = repo.gc(&GcOptions::default()).unwrap();
    assert_eq!(r.temp_files_removed, 1);
    assert_eq!(r.incomplete_backups_removed, 1);
    assert_eq!(r.chunks_removed, 0);
    assert!(!abandoned.exists());
    assert!(!chunk_dir.join("abcd.tmp-999-1").exists());
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id, "d0", out.path()), img);
    // One GC at a time.
    let _held = std::fs::File::open(dir.path().join("gc.lock")).unwrap();
    _held.lock().unwrap();
    assert_eq!(
        repo.gc(&GcOptions::default()).unwrap_err().kind(),
        ErrorKind::Busy
    );
}

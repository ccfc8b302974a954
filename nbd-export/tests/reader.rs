//! The chunk reader and the single-connection client against the in-process
//! fake server, for both engines: exact data, zero/clean classification,
//! pipelining and out-of-order replies, bounded memory, read errors never
//! zero-filled (F-18), stalls and hang-ups (F-19).

// Test sizes are small constants; narrowing casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{engines, within, Behavior, FakeServer, Image, Seg};
use nbd_export::{
    Chunk, ChunkKind, ChunkReader, Client, ClientOptions, EngineChoice, Error, ErrorKind, Extent,
    ReaderConfig,
};
use proptest::prelude::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn cfg(engine: EngineChoice) -> ReaderConfig {
    ReaderConfig {
        engine,
        read_request_len: 64 * KIB as u32,
        connections: 3,
        byte_budget: 2 * MIB,
        idle_timeout: Duration::from_secs(10),
        ..ReaderConfig::new(256 * KIB as u32)
    }
}

fn mixed_image() -> Image {
    Image::new(&[
        (100 * KIB, Seg::Data(1)),
        (412 * KIB, Seg::Hole),
        (256 * KIB, Seg::Hole),
        (64 * KIB, Seg::Data(2)),
        (64 * KIB, Seg::ZeroData),
        (128 * KIB, Seg::Hole),
        (MIB, Seg::Data(3)),
        (2 * MIB, Seg::Hole),
        (4 * KIB, Seg::Data(4)),
        (252 * KIB, Seg::Hole),
    ])
}

/// Reads everything; returns chunks by index.
fn read_all(src: &FakeServer, c: &ReaderConfig) -> Result<BTreeMap<u64, Chunk>, Error> {
    let mut out = BTreeMap::new();
    let mut s = ChunkReader::start(&src.source(), c)?;
    for item in &mut s {
        let ch = item?;
        assert!(out.insert(ch.index, ch).is_none(), "chunk delivered twice");
    }
    assert_eq!(out.len() as u64, s.chunk_count());
    Ok(out)
}

/// Checks chunks against the image: data exact, zero chunks really zero,
/// no chunk that holds data reported as zero.
fn check_against(image: &Image, chunks: &BTreeMap<u64, Chunk>, chunk_size: u64) {
    for (&i, ch) in chunks {
        assert_eq!(ch.offset, i * chunk_size);
        let want = &image.data[ch.offset as usize..(ch.offset + u64::from(ch.len)) as usize];
        match &ch.kind {
            ChunkKind::Data(d) => {
                assert_eq!(d.len(), want.len());
                assert!(d == want, "chunk {i} differs");
            }
            ChunkKind::Zero => assert!(want.iter().all(|&b| b == 0), "chunk {i} is not zero"),
            ChunkKind::Clean => {}
        }
    }
}

#[test]
fn full_read_equals_image_both_engines() {
    let image = mixed_image();
    for engine in engines() {
        for (reverse, fragment, hole_chunks, conns) in [
            (false, u64::MAX, false, 1),
            (true, 10 * KIB, true, 3),
            (true, 4 * KIB, false, 2),
        ] {
            let srv = FakeServer::start(
                image.clone(),
                Behavior {
                    reverse_replies: reverse,
                    read_fragment: fragment,
                    hole_chunks,
                    ..Behavior::default()
                },
            );
            let c = ReaderConfig {
                connections: conns,
                ..cfg(engine)
            };
            let mut s = ChunkReader::start(&srv.source(), &c).unwrap();
            assert_eq!(s.connections(), conns);
            let mut chunks = BTreeMap::new();
            for item in &mut s {
                let ch = item.unwrap();
                chunks.insert(ch.index, ch);
            }
            check_against(&image, &chunks, c.chunk_size.into());
            let kinds: Vec<char> = chunks
                .values()
                .map(|c| match c.kind {
                    ChunkKind::Data(_) => 'D',
                    ChunkKind::Zero => 'Z',
                    ChunkKind::Clean => 'C',
                })
                .collect();
            // 256 KiB chunks over the mixed image.
            assert_eq!(
                kinds.iter().collect::<String>(),
                "DZZDDDDDZZZZZZZZD",
                "{engine:?}"
            );
            let st = s.stats();
            // Only data extents were requested: 100K + 64K + 64K + 1M + 4K.
            let data = 100 * KIB + 64 * KIB + 64 * KIB + MIB + 4 * KIB;
            let requested: u64 = srv
                .requests()
                .iter()
                .filter(|r| r.command == nbd_export::wire::NBD_CMD_READ)
                .map(|r| u64::from(r.len))
                .sum();
            assert_eq!(requested, data, "{engine:?}: zero extents must not be read");
            // Reads never cover zero extents, so no hole chunks come back.
            assert_eq!(st.bytes_read, data, "{engine:?}");
            assert_eq!(st.hole_bytes, 0);
            assert_eq!(st.data_chunks + st.zero_chunks, 17);
        }
    }
}

/// A rate limit holds some of a chunk's reads back while others are in
/// flight: every chunk still comes back whole and exact, on both engines,
/// with one and several connections. (The queueing of a held-back read
/// while its buffer is lent to io_uring is pinned by the unit test
/// `conn::tests::read_queued_while_its_buffer_is_lent_lands_in_place`.)
#[test]
fn rate_limited_reads_deliver_every_chunk_exactly() {
    let image = Image::new(&[
        (3 * MIB, Seg::Data(7)),
        (MIB, Seg::Hole),
        (MIB, Seg::Data(9)),
    ]);
    for engine in engines() {
        for conns in [1, 3] {
            let srv = FakeServer::start(image.clone(), Behavior::default());
            let c = ReaderConfig {
                connections: conns,
                rate_limit: 16 * MIB,
                ..cfg(engine)
            };
            let chunks = read_all(&srv, &c).unwrap();
            check_against(&image, &chunks, c.chunk_size.into());
        }
    }
}

/// Block status never asks over chunks another connection has read: the
/// backup releases what it has read, and QEMU's snapshot-access fails block
/// status over any released byte. Short replies (few extents per reply)
/// make every worker ask again from mid-range; before the fix those asks
/// reached a whole work range ahead, into ranges other workers were reading.
#[test]
fn block_status_never_reaches_into_ranges_others_read() {
    // Four 64 MiB work ranges, each with a 64 KiB data run every MiB.
    let mut segs = Vec::new();
    for i in 0..256u64 {
        segs.push((64 * KIB, Seg::Data((i % 200) as u8 + 1)));
        segs.push((MIB - 64 * KIB, Seg::Hole));
    }
    let image = Image::new(&segs);
    for engine in engines() {
        let srv = FakeServer::start(
            image.clone(),
            Behavior {
                max_extents: 8,
                released_after_read: true,
                ..Behavior::default()
            },
        );
        let c = ReaderConfig {
            connections: 3,
            byte_budget: 8 * MIB,
            ..cfg(engine)
        };
        let chunks = read_all(&srv, &c).unwrap_or_else(|e| panic!("{engine:?}: {e:?}"));
        check_against(&image, &chunks, 256 * KIB);
    }
}

#[test]
fn incremental_reads_only_dirty_chunks() {
    let image = mixed_image().with_dirty(&[
        (300 * KIB, false),
        (KIB, true), // dirty byte in chunk 1 (256K..512K)
        (3027 * KIB, false),
        (MIB, true), // chunk 15 and 16
    ]);
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let src = srv.source().with_dirty_bitmap("bitmap0");
        let c = cfg(engine);
        let mut s = ChunkReader::start(&src, &c).unwrap();
        let mut kinds = BTreeMap::new();
        let mut chunks = BTreeMap::new();
        for item in &mut s {
            let ch = item.unwrap();
            kinds.insert(ch.index, ch.kind.clone());
            chunks.insert(ch.index, ch);
        }
        check_against(&image, &chunks, c.chunk_size.into());
        for (i, k) in &kinds {
            let expect_clean = !matches!(i, 1 | 13 | 14 | 15 | 16);
            assert_eq!(
                matches!(k, ChunkKind::Clean),
                expect_clean,
                "chunk {i}: {k:?}"
            );
        }
        // Chunk 1 (256K..512K) is dirty in one KiB and a hole: zero, not
        // clean. Chunk 16 is dirty with data.
        assert_eq!(kinds[&1], ChunkKind::Zero);
        assert!(matches!(kinds[&16], ChunkKind::Data(_)));
        let reads: Vec<_> = srv
            .requests()
            .into_iter()
            .filter(|r| r.command == nbd_export::wire::NBD_CMD_READ)
            .collect();
        assert!(
            reads.iter().all(
                |r| r.offset >= 256 * KIB && r.offset < 512 * KIB || r.offset >= 13 * 256 * KIB
            ),
            "clean chunks were read: {reads:?}"
        );
    }
}

#[test]
fn missing_dirty_bitmap_context_is_an_error() {
    let srv = FakeServer::start(mixed_image(), Behavior::default());
    let src = srv.source().with_dirty_bitmap("nope");
    let err = ChunkReader::start(&src, &cfg(EngineChoice::Sync)).unwrap_err();
    assert!(
        matches!(err, Error::ContextMissing(ref n) if n == "qemu:dirty-bitmap:nope"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
}

#[test]
fn extents_that_end_early_and_overrun_are_handled() {
    let image = mixed_image();
    for engine in engines() {
        for (max_extents, overrun) in [(1, false), (2, true)] {
            let srv = FakeServer::start(
                image.clone(),
                Behavior {
                    max_extents,
                    extent_overrun: overrun,
                    ..Behavior::default()
                },
            );
            let chunks = read_all(&srv, &cfg(engine)).unwrap();
            check_against(&image, &chunks, 256 * KIB);
            assert!(chunks.values().any(|c| c.kind == ChunkKind::Zero));
        }
    }
}

#[test]
fn no_multi_conn_means_one_connection() {
    let srv = FakeServer::start(
        mixed_image(),
        Behavior {
            multi_conn: false,
            ..Behavior::default()
        },
    );
    let s = ChunkReader::start(&srv.source(), &cfg(EngineChoice::Sync)).unwrap();
    assert_eq!(s.connections(), 1);
    drop(s);
    assert_eq!(srv.connections_accepted(), 1);
}

#[test]
fn pipelining_is_bounded() {
    let image = Image::new(&[(8 * MIB, Seg::Data(9))]);
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let c = ReaderConfig {
            connections: 1,
            requests_in_flight: 5,
            read_request_len: 16 * KIB as u32,
            byte_budget: 64 * MIB,
            ..cfg(engine)
        };
        let chunks = read_all(&srv, &c).unwrap();
        check_against(&image, &chunks, 256 * KIB);
        let seen = srv.max_in_flight_seen();
        assert!(
            (2..=5).contains(&seen),
            "{engine:?}: {seen} requests in flight"
        );
    }
}

/// Memory stays within the byte budget while the consumer is slow.
#[test]
fn byte_budget_bounds_memory() {
    let image = Image::new(&[(16 * MIB, Seg::Data(5))]);
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let c = ReaderConfig {
            byte_budget: 3 * 256 * KIB,
            ..cfg(engine)
        };
        let mut s = ChunkReader::start(&srv.source(), &c).unwrap();
        let mut n = 0;
        let mut peak = 0;
        while let Some(item) = s.next() {
            let ch = item.unwrap();
            let used = s.budget_in_use();
            peak = peak.max(used);
            assert!(used <= c.byte_budget, "{used} > budget");
            if n % 8 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            n += 1;
            drop(ch);
        }
        assert_eq!(n, 64);
        assert!(peak > 0);
    }
}

/// With `budget_until_recycled` the budget covers the consumer's stages:
/// chunks it holds (not given back yet) keep the reader waiting, and the
/// pool never holds more than the budget leaves; every chunk still
/// arrives, exact, once the consumer gives buffers back.
#[test]
fn budget_until_recycled_bounds_held_and_pooled_buffers() {
    let image = Image::new(&[(16 * MIB, Seg::Data(5))]);
    let chunk = 256 * KIB;
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let c = ReaderConfig {
            byte_budget: 4 * chunk,
            budget_until_recycled: true,
            ..cfg(engine)
        };
        let mut s = ChunkReader::start(&srv.source(), &c).unwrap();
        let recycler = s.recycler();
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut chunks = BTreeMap::new();
        while let Some(item) = s.next() {
            let ch = item.unwrap();
            if let ChunkKind::Data(d) = &ch.kind {
                held.push(d.clone());
                // Received but not given back: still paid for.
                assert!(
                    s.budget_in_use() >= held.len() as u64 * chunk,
                    "{engine:?}: {} held, {} in use",
                    held.len(),
                    s.budget_in_use()
                );
                assert!(s.budget_in_use() <= c.byte_budget);
                if held.len() == 4 {
                    for b in held.drain(..) {
                        recycler.recycle(b);
                    }
                }
            }
            chunks.insert(ch.index, ch);
        }
        assert_eq!(chunks.len(), 64);
        check_against(&image, &chunks, chunk);
    }
}

/// Recycled buffers come back full of garbage; chunks built from them must
/// still be exact (parts not read are zeroed).
#[test]
fn recycled_buffers_are_reused_and_cleaned() {
    // Every chunk mixes data and holes, so a stale byte would show.
    let mut segs = Vec::new();
    for i in 0..24u8 {
        segs.push((96 * KIB, Seg::Data(i)));
        segs.push((160 * KIB, Seg::Hole));
    }
    let image = Image::new(&segs);
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let c = ReaderConfig {
            byte_budget: 4 * 256 * KIB,
            connections: 2,
            ..cfg(engine)
        };
        let mut s = ChunkReader::start(&srv.source(), &c).unwrap();
        let recycler = s.recycler();
        let mut chunks = BTreeMap::new();
        while let Some(item) = s.next() {
            let mut ch = item.unwrap();
            assert!(s.budget_in_use() <= c.byte_budget);
            if let ChunkKind::Data(d) = &mut ch.kind {
                let copy = d.clone();
                d.fill(0xff);
                recycler.recycle(std::mem::take(d));
                ch.kind = ChunkKind::Data(copy);
            }
            chunks.insert(ch.index, ch);
        }
        check_against(&image, &chunks, 256 * KIB);
        assert_eq!(chunks.len(), 24);
        // Most of the 24 data chunks were built in recycled buffers.
        let reused = s.stats().buffers_reused;
        assert!(reused >= 12, "{engine:?}: only {reused} buffers reused");
    }
}

/// F-18: a read error is an error for that range; a chunk overlapping it
/// is never delivered (zero-filled or otherwise).
#[test]
fn read_error_surfaces_with_offset_never_zeroes() {
    let image = mixed_image();
    let bad = (1024 * KIB + 100 * KIB, 8 * KIB); // inside the 1 MiB data run
    for engine in engines() {
        let srv = FakeServer::start(
            image.clone(),
            Behavior {
                bad_ranges: vec![bad],
                ..Behavior::default()
            },
        );
        let c = ReaderConfig {
            read_retries: 2,
            ..cfg(engine)
        };
        let mut s = ChunkReader::start(&srv.source(), &c).unwrap();
        let mut err = None;
        for item in &mut s {
            match item {
                Ok(ch) => {
                    let end = ch.offset + u64::from(ch.len);
                    assert!(
                        !(ch.offset < bad.0 + bad.1 && bad.0 < end),
                        "chunk {} overlapping the bad range was delivered",
                        ch.index
                    );
                }
                Err(e) => {
                    err = Some(e);
                }
            }
        }
        let e = err.expect("the read error must surface");
        assert_eq!(e.offset(), Some(bad.0), "{e}");
        assert!(matches!(e, Error::Chunk { index: 4, .. }), "{e:?}");
        assert!(matches!(e.root(), Error::Command { errno: 5, .. }));
        assert_eq!(e.kind(), ErrorKind::Temporary);
        // Tried 1 + 2 times.
        let tries = srv
            .requests()
            .iter()
            .filter(|r| r.command == 0 && r.offset <= bad.0 && bad.0 < r.offset + u64::from(r.len))
            .count();
        assert_eq!(tries, 3, "{engine:?}");
    }
}

#[test]
fn transient_read_error_is_retried() {
    let image = mixed_image();
    for engine in engines() {
        let srv = FakeServer::start(
            image.clone(),
            Behavior {
                bad_ranges: vec![(1024 * KIB, KIB)],
                fail_times: 1,
                hole_chunks: true,
                ..Behavior::default()
            },
        );
        let mut s = ChunkReader::start(&srv.source(), &cfg(engine)).unwrap();
        let mut chunks = BTreeMap::new();
        for item in &mut s {
            let ch = item.unwrap();
            chunks.insert(ch.index, ch);
        }
        check_against(&image, &chunks, 256 * KIB);
        assert_eq!(s.stats().read_retries, 1);
    }
}

/// F-19: a server that stops answering trips the idle deadline.
#[test]
fn stalled_server_times_out() {
    for engine in engines() {
        let srv = FakeServer::start(
            mixed_image(),
            Behavior {
                stall_after: Some(3),
                ..Behavior::default()
            },
        );
        let c = ReaderConfig {
            idle_timeout: Duration::from_millis(400),
            ..cfg(engine)
        };
        let src = srv.source();
        let t = Instant::now();
        let err = within(Duration::from_secs(10), move || {
            let mut s = ChunkReader::start(&src, &c).unwrap();
            s.find_map(Result::err)
        })
        .expect("an error");
        assert!(
            matches!(err.root(), Error::Timeout { .. }),
            "{engine:?}: {err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Temporary);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn hangup_is_a_temporary_disconnect() {
    for engine in engines() {
        let srv = FakeServer::start(
            mixed_image(),
            Behavior {
                hangup_after: Some(2),
                ..Behavior::default()
            },
        );
        let src = srv.source();
        let c = cfg(engine);
        let err = within(Duration::from_secs(10), move || {
            let mut s = ChunkReader::start(&src, &c).unwrap();
            s.find_map(Result::err)
        })
        .expect("an error");
        assert!(
            matches!(err.root(), Error::Disconnected { .. } | Error::Io { .. }),
            "{engine:?}: {err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Temporary);
    }
}

#[test]
fn dropping_the_stream_cancels_promptly() {
    let image = Image::new(&[(32 * MIB, Seg::Data(7))]);
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let src = srv.source();
        let c = cfg(engine);
        within(Duration::from_secs(10), move || {
            let mut s = ChunkReader::start(&src, &c).unwrap();
            let first = s.next().unwrap().unwrap();
            assert_eq!(first.len, 256 * KIB as u32);
            drop(s);
        });
    }
}

#[test]
fn empty_and_unaligned_exports() {
    for engine in engines() {
        let srv = FakeServer::start(Image::new(&[]), Behavior::default());
        let chunks = read_all(&srv, &cfg(engine)).unwrap();
        assert!(chunks.is_empty());
        // Size not a multiple of the chunk size: a short last chunk.
        let img = Image::new(&[(300 * KIB + 512, Seg::Data(3))]);
        let srv = FakeServer::start(img.clone(), Behavior::default());
        let chunks = read_all(&srv, &cfg(engine)).unwrap();
        assert_eq!(chunks[&1].len, 44 * KIB as u32 + 512);
        check_against(&img, &chunks, 256 * KIB);
    }
}

#[test]
fn config_is_validated() {
    let srv = FakeServer::start(mixed_image(), Behavior::default());
    for bad in [
        ReaderConfig {
            byte_budget: 1000,
            ..cfg(EngineChoice::Sync)
        },
        ReaderConfig {
            connections: 0,
            ..cfg(EngineChoice::Sync)
        },
        ReaderConfig {
            chunk_size: 0,
            ..cfg(EngineChoice::Sync)
        },
    ] {
        let e = ChunkReader::start(&srv.source(), &bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
    // Chunk size not a multiple of the server's minimum block size.
    let srv = FakeServer::start(
        mixed_image(),
        Behavior {
            block_sizes: Some((4096, 4096, 1 << 20)),
            ..Behavior::default()
        },
    );
    let e = ChunkReader::start(
        &srv.source(),
        &ReaderConfig {
            chunk_size: 6000,
            ..cfg(EngineChoice::Sync)
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn client_map_read_and_block_sizes() {
    let image = mixed_image();
    for engine in engines() {
        let srv = FakeServer::start(
            image.clone(),
            Behavior {
                block_sizes: Some((512, 4096, 128 * KIB as u32)),
                max_extents: 3,
                hole_chunks: true,
                reverse_replies: true,
                read_fragment: 3 * KIB,
                ..Behavior::default()
            },
        );
        let opts = ClientOptions {
            engine,
            allocation_depth: true,
            ..ClientOptions::default()
        };
        let mut c = Client::connect(&srv.source().with_dirty_bitmap("bitmap0"), &opts).unwrap();
        assert_eq!(c.info().min_block(), 512);
        assert_eq!(c.info().max_request(), 128 * KIB as u32);
        assert_eq!(c.info().contexts.len(), 3);
        let map = c.map("base:allocation").unwrap();
        let want: Vec<Extent> = image
            .alloc_extents()
            .into_iter()
            .map(|(offset, len, flags)| Extent { offset, len, flags })
            .collect();
        assert_eq!(map, want);
        let depth = c.map("qemu:allocation-depth").unwrap();
        assert_eq!(depth.len(), want.len());
        let data = c.read(0, image.data.len()).unwrap();
        assert!(data == image.data);
        // Holes came back as OFFSET_HOLE chunks: only allocated bytes moved.
        let allocated: u64 = image.alloc.iter().filter(|a| a.1 == 0).map(|a| a.0).sum();
        assert_eq!(c.bytes_read(), allocated);
        // Unaligned read is refused locally.
        assert!(matches!(c.read(100, 512), Err(Error::InvalidArgument(_))));
        c.disconnect().unwrap();
        let t = Instant::now();
        while srv.requests().last().map(|r| r.command) != Some(nbd_export::wire::NBD_CMD_DISC) {
            assert!(t.elapsed() < Duration::from_secs(5), "no NBD_CMD_DISC");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn client_over_a_socketpair() {
    let image = mixed_image();
    for engine in engines() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let srv = FakeServer::serve_stream(b, image.clone(), Behavior::default());
        let opts = ClientOptions {
            engine,
            ..ClientOptions::default()
        };
        let mut c = Client::from_stream(a, "exp", None, &opts).unwrap();
        assert_eq!(
            c.engine().to_string(),
            if engine == EngineChoice::Sync {
                "sync"
            } else {
                "uring"
            }
        );
        let d = c.read(MIB, 64 * KIB as usize).unwrap();
        assert!(d[..] == image.data[MIB as usize..(MIB + 64 * KIB) as usize]);
        c.disconnect().unwrap();
        srv.join().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Model check: whatever the image, chunk size, fragmentation and reply
    /// order, the reader returns exactly the image, and zero chunks are
    /// exactly the chunks with no data extent.
    #[test]
    fn reader_matches_model(
        segs in proptest::collection::vec((1u64..64, 0u8..3), 1..12),
        chunk_kib in prop::sample::select(vec![16u32, 64, 256]),
        req_kib in prop::sample::select(vec![4u32, 16, 64]),
        fragment in prop::sample::select(vec![1024u64, 4096, u64::MAX]),
        reverse in any::<bool>(),
        holes in any::<bool>(),
        conns in 1usize..4,
        max_extents in prop::sample::select(vec![1usize, 3, usize::MAX]),
        uring in any::<bool>(),
    ) {
        let segs: Vec<(u64, Seg)> = segs.iter().map(|&(k, t)| (k * 4 * KIB, match t {
            0 => Seg::Data(k as u8),
            1 => Seg::Hole,
            _ => Seg::ZeroData,
        })).collect();
        let image = Image::new(&segs);
        let engine = if uring && engines().len() > 1 { EngineChoice::Uring } else { EngineChoice::Sync };
        let srv = FakeServer::start(image.clone(), Behavior {
            reverse_replies: reverse,
            read_fragment: fragment,
            hole_chunks: holes,
            max_extents,
            ..Behavior::default()
        });
        let c = ReaderConfig {
            chunk_size: chunk_kib * 1024,
            read_request_len: req_kib * 1024,
            connections: conns,
            byte_budget: 4 * u64::from(chunk_kib) * KIB,
            ..cfg(engine)
        };
        let chunks = read_all(&srv, &c).unwrap();
        check_against(&image, &chunks, u64::from(c.chunk_size));
        let alloc = image.alloc_extents();
        for ch in chunks.values() {
            let end = ch.offset + u64::from(ch.len);
            let has_data = alloc.iter().any(|&(o, l, f)| f == 0 && o < end && ch.offset < o + l);
            prop_assert_eq!(matches!(ch.kind, ChunkKind::Data(_)), has_data);
        }
    }
}

/// Issue 10: a big export that is nearly all hole and barely dirty is mapped
/// in a few block status round trips (one per reply, not one per 32 MiB or
/// per work range), every chunk still classified right; only block status
/// asks for more than the payload limit, reads never do.
#[test]
fn sparse_export_is_mapped_in_few_block_status_requests() {
    const GIB: u64 = 1 << 30;
    const CHUNK: u64 = 4 * MIB;
    // 1 GiB: holes, one 1 MiB data region at 700 MiB (dirty), and a data
    // region at 900 MiB that is not dirty.
    let segs = [
        (700 * MIB, Seg::Hole),
        (MIB, Seg::Data(7)),
        (199 * MIB, Seg::Hole),
        (MIB, Seg::Data(8)),
        (GIB - 901 * MIB, Seg::Hole),
    ];
    let dirty = [(700 * MIB, false), (MIB, true), (GIB - 701 * MIB, false)];
    for engine in engines() {
        // A fresh image per server: the data vector stays mostly untouched
        // (lazily zeroed) memory; a clone would copy the whole gibibyte.
        let srv = FakeServer::start(Image::new(&segs).with_dirty(&dirty), Behavior::default());
        let src = srv.source().with_dirty_bitmap("bitmap0");
        let c = ReaderConfig {
            engine,
            connections: 2,
            idle_timeout: Duration::from_secs(10),
            ..ReaderConfig::new(CHUNK as u32)
        };
        let mut s = ChunkReader::start(&src, &c).unwrap();
        let mut kinds = BTreeMap::new();
        for item in &mut s {
            let ch = item.unwrap();
            if let ChunkKind::Data(d) = &ch.kind {
                // Chunk 175 (700..704 MiB): the first MiB is the data.
                assert_eq!(ch.index, 700 * MIB / CHUNK);
                let mut expect = vec![0u8; CHUNK as usize];
                expect[..MIB as usize].copy_from_slice(&pattern_at(7, 700 * MIB, MIB));
                assert!(*d == expect, "dirty chunk differs");
            }
            assert!(kinds.insert(ch.index, ch.kind).is_none(), "chunk twice");
        }
        assert_eq!(kinds.len() as u64, GIB / CHUNK);
        for (i, k) in &kinds {
            match i {
                175 => assert!(matches!(k, ChunkKind::Data(_)), "chunk {i}: {k:?}"),
                225 => assert_eq!(*k, ChunkKind::Clean, "chunk {i}"),
                _ => assert!(
                    matches!(k, ChunkKind::Zero | ChunkKind::Clean),
                    "chunk {i}: {k:?}"
                ),
            }
        }
        let stats = s.stats();
        let reqs = srv.requests();
        let status: Vec<_> = reqs
            .iter()
            .filter(|r| r.command == nbd_export::wire::NBD_CMD_BLOCK_STATUS)
            .collect();
        // 32 MiB at a time, one range at a time, this was 32 requests.
        assert!(
            status.len() <= 12,
            "{engine:?}: {} block status requests: {status:?}",
            status.len()
        );
        assert_eq!(stats.block_status_requests, status.len() as u64);
        assert!(status.iter().any(|r| u64::from(r.len) > 32 * MIB));
        assert!(reqs
            .iter()
            .filter(|r| r.command == nbd_export::wire::NBD_CMD_READ)
            .all(|r| u64::from(r.len) <= u64::from(c.read_request_len)));
        assert_eq!(stats.bytes_read, MIB);
    }
}

/// The pattern the fake server fills `Seg::Data(seed)` with at `offset`.
fn pattern_at(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    let img = Image::new(&[(offset, Seg::Hole), (len, Seg::Data(seed))]);
    img.data[offset as usize..].to_vec()
}

/// `Client::map` over a big export: a few large requests in flight, short
/// replies asked again from where they ended, the same map either way.
#[test]
fn client_map_pipelines_large_block_status_requests() {
    const GIB: u64 = 1 << 30;
    let segs = [
        (300 * MIB, Seg::Hole),
        (MIB, Seg::Data(1)),
        (GIB - 302 * MIB, Seg::Hole),
        (MIB, Seg::Data(2)),
    ];
    for (max_extents, most) in [(usize::MAX, 1), (1, 8)] {
        let srv = FakeServer::start(
            Image::new(&segs),
            Behavior {
                max_extents,
                ..Behavior::default()
            },
        );
        let mut c = Client::connect(&srv.source(), &ClientOptions::default()).unwrap();
        let map = c.map("base:allocation").unwrap();
        let flags = nbd_export::wire::NBD_STATE_HOLE | nbd_export::wire::NBD_STATE_ZERO;
        let want = vec![
            Extent {
                offset: 0,
                len: 300 * MIB,
                flags,
            },
            Extent {
                offset: 300 * MIB,
                len: MIB,
                flags: 0,
            },
            Extent {
                offset: 301 * MIB,
                len: GIB - 302 * MIB,
                flags,
            },
            Extent {
                offset: GIB - MIB,
                len: MIB,
                flags: 0,
            },
        ];
        assert_eq!(map, want, "max_extents {max_extents}");
        let n = srv
            .requests()
            .iter()
            .filter(|r| r.command == nbd_export::wire::NBD_CMD_BLOCK_STATUS)
            .count();
        assert!(n <= most, "max_extents {max_extents}: {n} requests");
        c.disconnect().unwrap();
    }
}

/// `thread_end` runs once on every reader thread (one per connection with
/// the sync engine, one ring for all with io_uring), on that thread, and
/// every call has returned when the stream reports its end.
#[test]
fn thread_end_hook_runs_once_per_reader_thread_before_the_end() {
    use std::sync::{Arc, Mutex};
    let image = mixed_image();
    for engine in engines() {
        let srv = FakeServer::start(image.clone(), Behavior::default());
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        let c = ReaderConfig {
            connections: 3,
            thread_end: Some(nbd_export::ThreadHook(Arc::new(move || {
                let name = std::thread::current().name().unwrap_or("").to_string();
                seen2.lock().unwrap().push(name);
            }))),
            ..cfg(engine)
        };
        let mut s = ChunkReader::start(&srv.source(), &c).unwrap();
        let threads = match s.engine() {
            nbd_export::EngineKind::Sync => 3,
            nbd_export::EngineKind::Uring => 1,
        };
        for item in &mut s {
            item.unwrap();
        }
        // The stream has ended (and not been dropped): every hook ran.
        let mut names = seen.lock().unwrap().clone();
        names.sort();
        let want: Vec<String> = (0..threads).map(|g| format!("nbd-read-{g}")).collect();
        assert_eq!(names, want, "{engine:?}");
        drop(s);
        assert_eq!(seen.lock().unwrap().len(), threads, "{engine:?}");
    }
}

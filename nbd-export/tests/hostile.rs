//! F-20: a hostile or buggy NBD server. Each misbehaviour must end in a
//! typed error (Permanent for protocol violations), never a panic, a hang
//! or an unbounded allocation. Every case runs against both engines and
//! under a deadline.

// Test sizes are small constants; narrowing casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::{engines, within, Behavior, FakeServer, Image, Req, Seg};
use nbd_export::wire::*;
use nbd_export::{
    ChunkReader, Client, ClientOptions, EngineChoice, Error, ErrorKind, ReaderConfig, Violation,
};
use zerocopy::{FromBytes, IntoBytes};

const KIB: u64 = 1 << 10;
const LIMIT: Duration = Duration::from_secs(15);

fn image() -> Image {
    Image::new(&[
        (64 * KIB, Seg::Data(1)),
        (192 * KIB, Seg::Hole),
        (256 * KIB, Seg::Data(2)),
    ])
}

fn cfg(engine: EngineChoice) -> ReaderConfig {
    ReaderConfig {
        engine,
        read_request_len: 64 * KIB as u32,
        connections: 2,
        byte_budget: KIB * KIB,
        idle_timeout: Duration::from_secs(3),
        handshake_timeout: Duration::from_secs(3),
        ..ReaderConfig::new(128 * KIB as u32)
    }
}

/// Runs a full read against a server with `behavior`; returns the error.
fn read_error(behavior: Behavior, engine: EngineChoice, bitmap: bool) -> Error {
    let srv = FakeServer::start(image(), behavior);
    let mut src = srv.source();
    if bitmap {
        src = src.with_dirty_bitmap("bitmap0");
    }
    let c = cfg(engine);
    within(LIMIT, move || {
        let _keep = &srv;
        match ChunkReader::start(&src, &c) {
            Err(e) => e,
            Ok(mut s) => s
                .find_map(Result::err)
                .expect("the misbehaviour must surface as an error"),
        }
    })
}

fn tamper(f: impl Fn(&Req, Vec<u8>) -> Vec<u8> + Send + Sync + 'static) -> Behavior {
    Behavior {
        tamper: Some(Arc::new(f)),
        ..Behavior::default()
    }
}

fn handshake_tamper(
    f: impl Fn(&str, usize, Vec<u8>) -> Vec<u8> + Send + Sync + 'static,
) -> Behavior {
    Behavior {
        tamper_handshake: Some(Arc::new(f)),
        ..Behavior::default()
    }
}

fn expect_violation(
    name: &str,
    behavior: &Behavior,
    bitmap: bool,
    want: impl Fn(&Violation) -> bool,
) {
    for engine in engines() {
        let e = read_error(behavior.clone(), engine, bitmap);
        let v = e.violation();
        assert!(v.is_some_and(&want), "{name} ({engine:?}): got {e:?}");
        assert_eq!(e.kind(), ErrorKind::Permanent, "{name}: {e}");
    }
}

fn is_read(r: &Req) -> bool {
    r.command == NBD_CMD_READ
}

fn is_status(r: &Req) -> bool {
    r.command == NBD_CMD_BLOCK_STATUS
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    let mut v = Vec::new();
    encode_chunk(&mut v, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &p);
    v
}

fn status_chunk(cookie: u64, id: u32, ext: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_chunk(
        &mut v,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        &encode_block_status(id, ext),
    );
    v
}

// ------------------------------------------------------------ handshake

#[test]
fn f20_bad_greeting_magic() {
    expect_violation(
        "greeting",
        &handshake_tamper(|stage, _, mut b| {
            if stage == "greeting" {
                b[3] ^= 0xff;
            }
            b
        }),
        false,
        |v| {
            matches!(
                v,
                Violation::BadMagic {
                    what: "greeting",
                    ..
                }
            )
        },
    );
}

#[test]
fn f20_oldstyle_and_not_fixed_newstyle() {
    expect_violation(
        "oldstyle",
        &handshake_tamper(|stage, _, mut b| {
            if stage == "greeting" {
                b[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
            }
            b
        }),
        false,
        |v| {
            matches!(
                v,
                Violation::BadMagic {
                    what: "newstyle",
                    ..
                }
            )
        },
    );
    expect_violation(
        "not fixed newstyle",
        &handshake_tamper(|stage, _, b| {
            if stage == "greeting" {
                return Greeting::new(0).as_bytes().to_vec();
            }
            b
        }),
        false,
        |v| matches!(v, Violation::NotFixedNewstyle(_)),
    );
}

#[test]
fn f20_oversized_option_reply_is_refused_before_allocation() {
    expect_violation(
        "option reply length",
        &handshake_tamper(|stage, _, mut b| {
            if stage == "structured" {
                b[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
            }
            b
        }),
        false,
        |v| {
            matches!(
                v,
                Violation::Oversized {
                    what: "option reply",
                    ..
                }
            )
        },
    );
}

#[test]
fn f20_option_reply_for_another_option() {
    expect_violation(
        "wrong option",
        &handshake_tamper(|stage, _, mut b| {
            if stage == "structured" {
                b[8..12].copy_from_slice(&NBD_OPT_LIST.to_be_bytes());
            }
            b
        }),
        false,
        |v| matches!(v, Violation::WrongOption { .. }),
    );
}

/// F-20: an export size of 2^63 or more.
#[test]
fn f20_huge_export_size() {
    for size in [1u64 << 63, u64::MAX] {
        expect_violation(
            "huge size",
            &Behavior {
                size_override: Some(Arc::new(move |_| size)),
                ..Behavior::default()
            },
            false,
            |v| matches!(v, Violation::ExportTooLarge(_)),
        );
    }
}

/// F-20: a size that changes between connections.
#[test]
fn f20_size_changes_between_connections() {
    expect_violation(
        "size change",
        &Behavior {
            size_override: Some(Arc::new(
                |conn| if conn == 0 { 512 * KIB } else { 1024 * KIB },
            )),
            ..Behavior::default()
        },
        false,
        |v| matches!(v, Violation::ExportChanged(_)),
    );
}

#[test]
fn f20_go_without_export_info_and_bad_block_sizes() {
    expect_violation(
        "no NBD_INFO_EXPORT",
        &handshake_tamper(|stage, _, b| {
            if stage == "go" {
                let mut v = Vec::new();
                v.extend_from_slice(OptionReply::new(NBD_OPT_GO, NBD_REP_ACK, 0).as_bytes());
                return v;
            }
            b
        }),
        false,
        |v| matches!(v, Violation::Handshake(_)),
    );
    expect_violation(
        "bad block sizes",
        &Behavior {
            block_sizes: Some((3, 4096, 1 << 20)),
            ..Behavior::default()
        },
        false,
        |v| matches!(v, Violation::BadBlockSizes { .. }),
    );
}

#[test]
fn f20_context_not_asked_for() {
    expect_violation(
        "foreign context",
        &handshake_tamper(|stage, _, b| {
            if stage == "meta" {
                let mut v = Vec::new();
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(b"x-evil:all");
                v.extend_from_slice(
                    OptionReply::new(
                        NBD_OPT_SET_META_CONTEXT,
                        NBD_REP_META_CONTEXT,
                        p.len() as u32,
                    )
                    .as_bytes(),
                );
                v.extend_from_slice(&p);
                v.extend_from_slice(&b);
                return v;
            }
            b
        }),
        false,
        |v| matches!(v, Violation::Handshake(_)),
    );
}

#[test]
fn f20_unknown_export_and_refusals_are_typed() {
    for engine in engines() {
        let e = read_error(
            handshake_tamper(|stage, _, b| {
                if stage == "go" {
                    let msg = b"no such export";
                    let mut v = OptionReply::new(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, msg.len() as u32)
                        .as_bytes()
                        .to_vec();
                    v.extend_from_slice(msg);
                    return v;
                }
                b
            }),
            engine,
            false,
        );
        assert!(
            matches!(e, Error::ExportNotFound { ref message, .. } if message == "no such export"),
            "{e:?}"
        );
        let e = read_error(
            handshake_tamper(|stage, _, b| {
                if stage == "structured" {
                    return OptionReply::new(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_UNSUP, 0)
                        .as_bytes()
                        .to_vec();
                }
                b
            }),
            engine,
            false,
        );
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        let e = read_error(
            handshake_tamper(|stage, _, b| {
                if stage == "go" {
                    return OptionReply::new(NBD_OPT_GO, NBD_REP_ERR_SHUTDOWN, 0)
                        .as_bytes()
                        .to_vec();
                }
                b
            }),
            engine,
            false,
        );
        assert!(matches!(e, Error::OptionRefused { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Temporary);
    }
}

/// Early EOF and silence during the handshake: typed, bounded by the
/// handshake deadline.
#[test]
fn f20_handshake_eof_and_silence() {
    for engine in engines() {
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let mut b = b;
            b.write_all(&Greeting::new(NBD_FLAG_FIXED_NEWSTYLE).as_bytes()[..10])
                .unwrap();
        });
        let opts = ClientOptions {
            engine,
            handshake_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        };
        let o2 = opts.clone();
        let e = within(LIMIT, move || {
            Client::from_stream(a, "", None, &o2).unwrap_err()
        });
        assert!(matches!(e, Error::Disconnected { .. }), "{e:?}");
        srv.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        let e = within(LIMIT, move || {
            Client::from_stream(a, "", None, &opts).unwrap_err()
        });
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(b);
    }
}

// --------------------------------------------------------- transmission

#[test]
fn f20_bad_reply_magic() {
    expect_violation(
        "reply magic",
        &tamper(|r, mut b| {
            if is_read(r) {
                b[0] = 0x42;
            }
            b
        }),
        false,
        |v| matches!(v, Violation::BadMagic { what: "reply", .. }),
    );
}

#[test]
fn f20_wrong_cookie() {
    expect_violation(
        "cookie",
        &tamper(|r, mut b| {
            if is_read(r) {
                b[8..16].copy_from_slice(&(r.cookie ^ 0xdead_0000).to_be_bytes());
            }
            b
        }),
        false,
        |v| matches!(v, Violation::UnknownCookie(_)),
    );
}

#[test]
fn f20_unknown_reply_type() {
    expect_violation(
        "reply type",
        &tamper(|r, mut b| {
            if is_status(r) {
                b[6..8].copy_from_slice(&77u16.to_be_bytes());
            }
            b
        }),
        false,
        |v| matches!(v, Violation::UnknownReplyType(77)),
    );
}

/// A data chunk longer than the request, and a length field of ~4 GiB:
/// refused from the header, before any allocation.
#[test]
fn f20_chunk_longer_than_requested() {
    expect_violation(
        "long chunk",
        &tamper(|r, b| {
            if is_read(r) {
                let n = r.len as usize + 512;
                return data_chunk(NBD_REPLY_FLAG_DONE, r.cookie, r.offset, &vec![1; n]);
            }
            b
        }),
        false,
        |v| matches!(v, Violation::Oversized { .. }),
    );
    expect_violation(
        "4 GiB length",
        &tamper(|r, mut b| {
            if is_read(r) {
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                b.truncate(28);
            }
            b
        }),
        false,
        |v| matches!(v, Violation::Oversized { .. }),
    );
    expect_violation(
        "huge block status",
        &tamper(|r, mut b| {
            if is_status(r) {
                b[16..20].copy_from_slice(&(64u32 << 20).to_be_bytes());
                b.truncate(24);
            }
            b
        }),
        false,
        |v| matches!(v, Violation::Oversized { .. }),
    );
}

#[test]
fn f20_data_outside_request_overlap_and_short_reads() {
    expect_violation(
        "out of range",
        &tamper(|r, b| {
            if is_read(r) {
                return data_chunk(
                    NBD_REPLY_FLAG_DONE,
                    r.cookie,
                    r.offset + 512,
                    &vec![1; r.len as usize],
                );
            }
            b
        }),
        false,
        |v| {
            matches!(
                v,
                Violation::ChunkOutOfRange { .. } | Violation::Oversized { .. }
            )
        },
    );
    expect_violation(
        "overlap",
        &tamper(|r, b| {
            if is_read(r) {
                let half = r.len as usize / 2;
                let mut v = data_chunk(0, r.cookie, r.offset, &vec![1; half + 512]);
                v.extend(data_chunk(
                    NBD_REPLY_FLAG_DONE,
                    r.cookie,
                    r.offset + half as u64,
                    &vec![1; half],
                ));
                return v;
            }
            b
        }),
        false,
        |v| matches!(v, Violation::OverlappingChunk { .. }),
    );
    expect_violation(
        "short",
        &tamper(|r, b| {
            if is_read(r) {
                return data_chunk(
                    NBD_REPLY_FLAG_DONE,
                    r.cookie,
                    r.offset,
                    &vec![1; r.len as usize - 512],
                );
            }
            b
        }),
        false,
        |v| matches!(v, Violation::IncompleteRead { .. }),
    );
    expect_violation(
        "simple reply to read",
        &tamper(|r, b| {
            if is_read(r) {
                let mut v = SimpleReply::new(0, r.cookie).as_bytes().to_vec();
                v.extend(vec![0u8; r.len as usize]);
                return v;
            }
            b
        }),
        false,
        |v| matches!(v, Violation::UnexpectedSimpleReply(_)),
    );
}

#[test]
fn f20_error_chunk_with_bad_message_length() {
    expect_violation(
        "message length",
        &tamper(|r, b| {
            if is_read(r) {
                let mut p = encode_error(NBD_EIO, "x", None);
                p[4..6].copy_from_slice(&4000u16.to_be_bytes());
                let mut v = Vec::new();
                encode_chunk(
                    &mut v,
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_ERROR,
                    r.cookie,
                    &p,
                );
                return v;
            }
            b
        }),
        false,
        |v| matches!(v, Violation::BadLength { .. }),
    );
}

/// Block status extents that are zero-length, past EOF, overlapping or
/// runaway, for unknown or missing contexts.
#[test]
fn f20_bad_extents() {
    let id_of = |b: &[u8]| u32::from_be_bytes(b[20..24].try_into().unwrap());
    expect_violation(
        "zero length",
        &tamper(move |r, b| {
            if is_status(r) {
                status_chunk(r.cookie, id_of(&b), &[(0, 0)])
            } else {
                b
            }
        }),
        false,
        |v| matches!(v, Violation::ZeroLengthExtent(_)),
    );
    expect_violation(
        "past eof",
        &tamper(move |r, b| {
            if is_status(r) {
                return status_chunk(r.cookie, id_of(&b), &[(r.len, 0), (1 << 30, 0)][1..]);
            }
            b
        }),
        false,
        |v| matches!(v, Violation::ExtentPastEof { .. }),
    );
    expect_violation(
        "runaway",
        &tamper(move |r, b| {
            if is_status(r) {
                return status_chunk(r.cookie, id_of(&b), &[(r.len, 0), (4096, 0)]);
            }
            b
        }),
        false,
        |v| matches!(v, Violation::ExtentsBeyondRequest(_)),
    );
    expect_violation(
        "unknown context",
        &tamper(|r, b| {
            if is_status(r) {
                status_chunk(r.cookie, 9999, &[(r.len, 0)])
            } else {
                b
            }
        }),
        false,
        |v| matches!(v, Violation::UnknownContext(9999)),
    );
    // Two contexts negotiated (allocation + bitmap); only one answered.
    expect_violation(
        "missing context",
        &tamper(move |r, b| {
            if is_status(r) {
                return status_chunk(r.cookie, id_of(&b), &[(r.len, 0)]);
            }
            b
        }),
        true,
        |v| matches!(v, Violation::MissingContext(_)),
    );
}

/// Early EOF in the middle of a reply: a Temporary disconnect, promptly.
#[test]
fn f20_eof_mid_reply() {
    for engine in engines() {
        let e = read_error(
            Behavior {
                tamper: Some(Arc::new(|r: &Req, mut b: Vec<u8>| {
                    if r.command == NBD_CMD_READ {
                        b.truncate(b.len() / 2);
                    }
                    b
                })),
                eof_after_reply: Some(1),
                ..Behavior::default()
            },
            engine,
            false,
        );
        assert!(
            matches!(
                e.root(),
                Error::Disconnected { .. } | Error::Timeout { .. } | Error::Io { .. }
            ),
            "{engine:?}: {e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::Temporary);
    }
}

/// A raw scripted server on a socketpair that answers the handshake
/// correctly and then sends garbage: the client errors, nothing hangs.
#[test]
fn f20_garbage_after_handshake_on_a_socketpair() {
    for engine in engines() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            b.write_all(Greeting::new(NBD_FLAG_FIXED_NEWSTYLE).as_bytes())
                .unwrap();
            let mut buf = [0u8; 4];
            b.read_exact(&mut buf).unwrap();
            loop {
                let mut h = [0u8; 16];
                if b.read_exact(&mut h).is_err() {
                    return;
                }
                let o = OptionRequest::read_from_bytes(&h).unwrap();
                let mut d = vec![0; o.length.get() as usize];
                b.read_exact(&mut d).unwrap();
                let opt = o.option.get();
                let mut out = Vec::new();
                if opt == NBD_OPT_GO {
                    let info = encode_info_export(1 << 20, NBD_FLAG_HAS_FLAGS);
                    out.extend_from_slice(OptionReply::new(opt, NBD_REP_INFO, 12).as_bytes());
                    out.extend_from_slice(&info);
                }
                let ty = if opt == NBD_OPT_SET_META_CONTEXT {
                    NBD_REP_ERR_UNSUP
                } else {
                    NBD_REP_ACK
                };
                out.extend_from_slice(OptionReply::new(opt, ty, 0).as_bytes());
                b.write_all(&out).unwrap();
                if opt == NBD_OPT_GO {
                    break;
                }
            }
            let mut req = [0u8; 28];
            b.read_exact(&mut req).unwrap();
            let _ = b.write_all(&[0xa5; 4096]);
            std::thread::sleep(Duration::from_millis(200));
        });
        let opts = ClientOptions {
            engine,
            ..ClientOptions::default()
        };
        let e = within(LIMIT, move || {
            let mut c = Client::from_stream(a, "", None, &opts).unwrap();
            assert!(c.info().contexts.is_empty());
            c.read(0, 4096).unwrap_err()
        });
        assert!(
            matches!(e.violation(), Some(Violation::BadMagic { .. })),
            "{e:?}"
        );
        srv.join().unwrap();
    }
}

/// F-20 with issue 10's long block status requests: asking for more than
/// 32 MiB at once (a 1 GiB sparse export) does not raise what a reply may
/// hold. A reply chunk announcing more than MAX_EXTENTS_PER_CHUNK extents
/// is refused before anything is allocated for it, and descriptors beyond
/// the (long) request are refused too.
#[test]
fn f20_long_block_status_requests_keep_replies_bounded() {
    const GIB: u64 = 1 << 30;
    let big = |r: &Req| u64::from(r.len) > 32 * KIB * KIB;
    type Case = (&'static str, Behavior, fn(&Violation) -> bool);
    let cases: Vec<Case> = vec![
        (
            "oversized reply to a long request",
            tamper(move |r, mut b| {
                if is_status(r) && big(r) {
                    let len = MAX_BLOCK_STATUS_PAYLOAD + 8;
                    b[16..20].copy_from_slice(&len.to_be_bytes());
                    b.truncate(24);
                }
                b
            }),
            |v| matches!(v, Violation::Oversized { .. }),
        ),
        (
            "extents beyond a long request",
            tamper(move |r, b| {
                if is_status(r) && big(r) {
                    let id = u32::from_be_bytes(b[20..24].try_into().unwrap());
                    return status_chunk(r.cookie, id, &[(r.len, 3), (64 << 10, 3)]);
                }
                b
            }),
            |v| matches!(v, Violation::ExtentsBeyondRequest(_)),
        ),
    ];
    for (name, behavior, want) in cases {
        for engine in engines() {
            let srv = FakeServer::start(
                Image::new(&[(GIB - KIB * KIB, Seg::Hole), (KIB * KIB, Seg::Data(3))]),
                behavior.clone(),
            );
            let src = srv.source();
            let c = ReaderConfig {
                engine,
                idle_timeout: Duration::from_secs(3),
                handshake_timeout: Duration::from_secs(3),
                ..ReaderConfig::new(4 * (KIB * KIB) as u32)
            };
            let e = within(LIMIT, move || {
                let _keep = &srv;
                match ChunkReader::start(&src, &c) {
                    Err(e) => e,
                    Ok(mut s) => s
                        .find_map(Result::err)
                        .expect("the misbehaviour must surface as an error"),
                }
            });
            assert!(
                e.violation().is_some_and(want),
                "{name} ({engine:?}): {e:?}"
            );
            assert_eq!(e.kind(), ErrorKind::Permanent, "{name}: {e}");
        }
    }
}

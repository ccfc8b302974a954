//! Entry points for the fuzz targets (`nbd-export/fuzz`) and the proptest
//! fuzzing in the test suite. Not a stable API.
//!
//! Each takes arbitrary bytes as what a hostile server sends and must return
//! (an error or not) without panicking, hanging or allocating without bound.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::conn::{Conn, DoneOk};
use crate::error::Result;
use crate::handshake::{self, ExportFlags, ExportInfo, HandshakeParams, MetaContext};
use crate::wire;

/// What a reply-stream run ended with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplyOutcome {
    /// Commands that completed successfully.
    pub ok: usize,
    /// Commands that completed with a server error.
    pub server_errors: usize,
    /// The stream ended in a protocol violation or EOF.
    pub fatal: bool,
}

/// The requests [`reply_stream`] has in flight first: `(cookie, is_read,
/// offset, len)`.
pub fn initial_requests() -> Vec<(u64, bool, u64, u32)> {
    (1..=6u64)
        .map(|tag| {
            if tag % 3 == 0 {
                (tag, false, (tag % 7) * 4096, 1 << 16)
            } else {
                (tag, true, (tag % 5) * 8192, 512 * (1 + (tag % 16) as u32))
            }
        })
        .collect()
}

/// A well-formed server answer to [`initial_requests`] (preceded by the
/// shape byte), in reverse order, mixing data, holes, errors and extents:
/// the seed for mutation-based fuzzing.
pub fn sample_replies() -> Vec<u8> {
    let mut out = vec![7u8];
    for (cookie, is_read, off, len) in initial_requests().into_iter().rev() {
        if is_read {
            let half = len / 2;
            wire::encode_chunk(
                &mut out,
                0,
                wire::NBD_REPLY_TYPE_OFFSET_HOLE,
                cookie,
                &wire::encode_hole(off + u64::from(half), len - half),
            );
            let mut p = off.to_be_bytes().to_vec();
            p.extend(std::iter::repeat_n(0x5a, half as usize));
            wire::encode_chunk(
                &mut out,
                if cookie == 4 {
                    0
                } else {
                    wire::NBD_REPLY_FLAG_DONE
                },
                wire::NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
                &p,
            );
            if cookie == 4 {
                wire::encode_chunk(
                    &mut out,
                    wire::NBD_REPLY_FLAG_DONE,
                    wire::NBD_REPLY_TYPE_ERROR_OFFSET,
                    cookie,
                    &wire::encode_error(wire::NBD_EIO, "bad", Some(off)),
                );
            }
        } else {
            wire::encode_chunk(
                &mut out,
                0,
                wire::NBD_REPLY_TYPE_BLOCK_STATUS,
                cookie,
                &wire::encode_block_status(2, &[(len, 1)]),
            );
            wire::encode_chunk(
                &mut out,
                wire::NBD_REPLY_FLAG_DONE,
                wire::NBD_REPLY_TYPE_BLOCK_STATUS,
                cookie,
                &wire::encode_block_status(1, &[(4096, 0), (len - 4096, 3)]),
            );
        }
    }
    out
}

fn test_info() -> Arc<ExportInfo> {
    Arc::new(ExportInfo {
        name: String::new(),
        size: 1 << 24,
        flags: ExportFlags(wire::NBD_FLAG_HAS_FLAGS | wire::NBD_FLAG_READ_ONLY),
        block_sizes: None,
        contexts: vec![
            MetaContext {
                id: 1,
                name: wire::CONTEXT_BASE_ALLOCATION.into(),
            },
            MetaContext {
                id: 2,
                name: "qemu:dirty-bitmap:b".into(),
            },
        ],
    })
}

/// Feeds `data` as the server side of a connection with reads (cookies 1,
/// 2, 4, ...) and block status requests (3, 6, ...) in flight, in pieces
/// whose sizes come from the first byte. Checks the invariants that must
/// hold whatever the server sends: a successful read covered its whole
/// range (filled from the server, never from an error), and block status
/// extents lie inside their request.
pub fn reply_stream(data: &[u8]) -> ReplyOutcome {
    let mut out = ReplyOutcome::default();
    let Some((&shape, rest)) = data.split_first() else {
        return out;
    };
    let step = 1 + usize::from(shape % 61);
    let mut conn = Conn::new(test_info());
    let buf = conn.add_buf(vec![0xa5; 1 << 16]);
    let mut tag = 0u64;
    let mut submit = |conn: &mut Conn| -> Result<()> {
        tag += 1;
        let t = (tag - 1) % 6 + 1;
        let (_, is_read, off, len) = initial_requests()[usize::try_from(t - 1).unwrap_or(0)];
        if is_read {
            conn.submit_read(tag, off, len, buf, (tag % 4) as usize * 4096)
        } else {
            conn.submit_block_status(tag, off, len)
        }
    };
    for _ in 0..6 {
        if submit(&mut conn).is_err() {
            return out;
        }
    }
    let mut pos = 0;
    while pos < rest.len() {
        if let Some(tx) = conn.tx_begin() {
            let n = tx.len();
            conn.tx_end(tx, n);
        }
        let Some(mut b) = conn.rx_begin() else {
            // Nothing in flight: keep the server talking.
            if submit(&mut conn).is_err() {
                break;
            }
            continue;
        };
        let n = b.len().min(step).min(rest.len() - pos);
        b.data[b.start..b.start + n].copy_from_slice(&rest[pos..pos + n]);
        pos += n;
        if conn.rx_end(b, n).is_err() {
            out.fatal = true;
            return out;
        }
        for d in conn.take_done() {
            match d.result {
                Ok(DoneOk::Read | DoneOk::Trim) => out.ok += 1,
                Ok(DoneOk::BlockStatus(ctx)) => {
                    out.ok += 1;
                    for c in ctx {
                        let end = d.offset + u64::from(d.len);
                        assert!(c
                            .extents
                            .iter()
                            .all(|e| e.offset >= d.offset && e.end() <= end));
                    }
                }
                Err(_) => out.server_errors += 1,
            }
        }
    }
    out
}

struct Scripted<'a> {
    input: &'a [u8],
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A well-formed server side of the handshake that [`handshake()`] runs: the
/// seed for mutation-based fuzzing.
pub fn sample_handshake() -> Vec<u8> {
    use zerocopy::IntoBytes;
    let mut out = wire::Greeting::new(wire::NBD_FLAG_FIXED_NEWSTYLE | wire::NBD_FLAG_NO_ZEROES)
        .as_bytes()
        .to_vec();
    let mut reply = |opt: u32, ty: u32, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(wire::OptionReply::new(opt, ty, len).as_bytes());
        out.extend_from_slice(payload);
    };
    reply(wire::NBD_OPT_STRUCTURED_REPLY, wire::NBD_REP_ACK, &[]);
    let mut m = 7u32.to_be_bytes().to_vec();
    m.extend_from_slice(wire::CONTEXT_BASE_ALLOCATION.as_bytes());
    reply(
        wire::NBD_OPT_SET_META_CONTEXT,
        wire::NBD_REP_META_CONTEXT,
        &m,
    );
    reply(wire::NBD_OPT_SET_META_CONTEXT, wire::NBD_REP_ACK, &[]);
    reply(
        wire::NBD_OPT_GO,
        wire::NBD_REP_INFO,
        &wire::encode_info_export(1 << 30, wire::NBD_FLAG_HAS_FLAGS),
    );
    reply(
        wire::NBD_OPT_GO,
        wire::NBD_REP_INFO,
        &wire::encode_info_block_size(512, 4096, 1 << 25),
    );
    reply(wire::NBD_OPT_GO, wire::NBD_REP_ACK, &[]);
    out
}

/// Feeds `data` as everything the server says during the handshake.
pub fn handshake(data: &[u8]) -> Result<ExportInfo> {
    let mut s = Scripted { input: data };
    let info = handshake::negotiate(
        &mut s,
        &HandshakeParams {
            export_name: "e",
            contexts: vec![
                wire::CONTEXT_BASE_ALLOCATION.into(),
                "qemu:dirty-bitmap:b".into(),
            ],
            required: vec![],
            timeout: Duration::from_secs(5),
        },
    )?;
    assert!(info.size < 1 << 63);
    Ok(info)
}

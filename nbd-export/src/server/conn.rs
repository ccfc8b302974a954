//! Server transmission phase: a reader thread parses requests and hands
//! them to workers (or answers a read whose bytes the source holds ready
//! itself); replies are written whole under one lock.
//!
//! Every `u64` narrowed here is bounded by a request length (a `u32`, at
//! most the maximum payload once checked), hence the module-wide allow.
#![allow(clippy::cast_possible_truncation)]

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use zerocopy::{FromBytes, IntoBytes};

use super::handshake::{Negotiated, BASE_ALLOCATION_ID};
use super::{Permit, Server, SourceExtent, Stream};
use crate::wire::{self, ChunkHeader, Request, SimpleReply};

/// `NBD_CMD_FLAG_FUA`.
const FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES`.
const CMD_WRITE_ZEROES: u16 = 6;
/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

struct Job<'a> {
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
    _permit: Option<Permit<'a>>,
}

/// Serves requests until `NBD_CMD_DISC`, EOF or a fatal error.
pub(super) fn transmission(
    server: &Arc<Server>,
    mut stream: Box<dyn Stream>,
    neg: &Negotiated,
) -> io::Result<()> {
    let writer = Mutex::new(stream.try_clone_box()?);
    let workers = server.config.workers_per_connection;
    let writer = &writer;
    let (tx, rx) = sync_channel::<Job<'_>>(workers);
    let rx = Mutex::new(rx);
    let rx = &rx;
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(move || worker(server, neg, writer, rx));
        }
        let r = read_loop(server, neg, &mut stream, writer, |job| {
            tx.send(job).map_err(|_| io::Error::other("workers gone"))
        });
        drop(tx);
        if r.is_err() {
            // Unblock workers stuck writing to a dead peer.
            let _ = stream.shutdown();
        }
        r
    })
}

fn worker(
    server: &Server,
    neg: &Negotiated,
    writer: &Mutex<Box<dyn Stream>>,
    rx: &Mutex<Receiver<Job<'_>>>,
) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        if let Err(e) = handle(server, neg, writer, &job) {
            tracing::debug!(error = %e, "NBD reply failed; closing the connection");
            let w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.shutdown();
            return;
        }
    }
}

fn read_full(stream: &mut Box<dyn Stream>, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn discard(stream: &mut Box<dyn Stream>, mut n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        if !read_full(stream, &mut buf[..k])? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        n -= k as u64;
    }
    Ok(())
}

fn read_loop<'a>(
    server: &'a Server,
    neg: &Negotiated,
    stream: &mut Box<dyn Stream>,
    writer: &Mutex<Box<dyn Stream>>,
    mut dispatch: impl FnMut(Job<'a>) -> io::Result<()>,
) -> io::Result<()> {
    let max = server.config.max_payload;
    loop {
        let mut h = [0u8; 28];
        if !read_full(stream, &mut h)? {
            return Ok(()); // EOF without DISC: fine for us.
        }
        let req = Request::read_from_bytes(&h[..]).map_err(|_| io::Error::other("request"))?;
        if req.magic.get() != wire::REQUEST_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request magic {:#x}", req.magic.get()),
            ));
        }
        let (cmd, flags, cookie) = (req.command.get(), req.flags.get(), req.cookie.get());
        let (offset, length) = (req.offset.get(), req.length.get());
        let simple_err = |errno: u32| -> io::Result<()> {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            reply_error(&mut *w, neg.structured, cookie, errno, "")
        };
        match cmd {
            wire::NBD_CMD_DISC => return Ok(()),
            wire::NBD_CMD_WRITE => {
                if length > max {
                    discard(stream, length.into())?;
                    simple_err(wire::NBD_EOVERFLOW)?;
                    continue;
                }
                let permit = server.budget.take(length.into());
                let mut payload = vec![0u8; length as usize];
                if !read_full(stream, &mut payload)? && length > 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                dispatch(Job {
                    cmd,
                    flags,
                    cookie,
                    offset,
                    length,
                    payload,
                    _permit: Some(permit),
                })?;
            }
            wire::NBD_CMD_READ => {
                if length <= max && reply_ready(neg, writer, cookie, offset, length)? {
                    continue;
                }
                let permit = (length <= max).then(|| server.budget.take(length.into()));
                dispatch(Job {
                    cmd,
                    flags,
                    cookie,
                    offset,
                    length,
                    payload: Vec::new(),
                    _permit: permit,
                })?;
            }
            _ => dispatch(Job {
                cmd,
                flags,
                cookie,
                offset,
                length,
                payload: Vec::new(),
                _permit: None,
            })?,
        }
    }
}

/// Answers a read on the reader thread when the source holds its bytes
/// ready ([`super::BlockSource::read_ready`]); a sequential reader of a
/// cached chunk then costs no hand-over to a worker (two thread wake-ups
/// per request). False: not ready, a worker answers.
fn reply_ready(
    neg: &Negotiated,
    writer: &Mutex<Box<dyn Stream>>,
    cookie: u64,
    offset: u64,
    length: u32,
) -> io::Result<bool> {
    let src = &neg.export.source;
    if check_range(src.size(), offset, length, false).is_err() {
        return Ok(false);
    }
    let Some(bytes) = src
        .read_ready(offset, length as usize)
        .filter(|b| b.as_slice().len() == length as usize)
    else {
        return Ok(false);
    };
    reply_data(neg, writer, cookie, offset, bytes.as_slice())?;
    Ok(true)
}

/// The whole successful reply to a read of `data` at `offset`: one data
/// chunk (structured) or a simple reply and the data.
fn reply_data(
    neg: &Negotiated,
    writer: &Mutex<Box<dyn Stream>>,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    if neg.structured {
        w.write_all(&data_chunk_header(
            wire::NBD_REPLY_FLAG_DONE,
            cookie,
            offset,
            wire::sat_u32(data.len() as u64),
        ))?;
    } else {
        reply_ok_simple(&mut *w, cookie)?;
    }
    w.write_all(data)
}

/// Maps an I/O error of the source to an NBD errno.
fn errno_of(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::PermissionDenied => wire::NBD_EPERM,
        io::ErrorKind::InvalidInput => wire::NBD_EINVAL,
        io::ErrorKind::OutOfMemory => wire::NBD_ENOMEM,
        io::ErrorKind::StorageFull => wire::NBD_ENOSPC,
        _ => wire::NBD_EIO,
    }
}

fn reply_error(
    w: &mut dyn Write,
    structured: bool,
    cookie: u64,
    errno: u32,
    msg: &str,
) -> io::Result<()> {
    if structured {
        let mut v = Vec::new();
        wire::encode_chunk(
            &mut v,
            wire::NBD_REPLY_FLAG_DONE,
            wire::NBD_REPLY_TYPE_ERROR,
            cookie,
            &wire::encode_error(errno, msg, None),
        );
        w.write_all(&v)
    } else {
        w.write_all(SimpleReply::new(errno, cookie).as_bytes())
    }
}

fn reply_ok_simple(w: &mut dyn Write, cookie: u64) -> io::Result<()> {
    w.write_all(SimpleReply::new(0, cookie).as_bytes())
}

/// Checks a request's range: Ok(()) or the errno to answer.
fn check_range(size: u64, offset: u64, length: u32, allow_zero: bool) -> Result<(), u32> {
    if length == 0 && !allow_zero {
        return Err(wire::NBD_EINVAL);
    }
    match offset.checked_add(u64::from(length)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(wire::NBD_EINVAL),
    }
}

fn handle(
    server: &Server,
    neg: &Negotiated,
    writer: &Mutex<Box<dyn Stream>>,
    job: &Job<'_>,
) -> io::Result<()> {
    let src = &neg.export.source;
    let size = src.size();
    let writable = src.writable();
    let send_err = |errno: u32, msg: &str| -> io::Result<()> {
        tracing::debug!(
            cmd = wire::command_name(job.cmd),
            offset = job.offset,
            length = job.length,
            errno = wire::errno_name(errno),
            msg,
            "NBD request refused"
        );
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        reply_error(&mut *w, neg.structured, job.cookie, errno, msg)
    };
    let ok = || -> io::Result<()> {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if neg.structured {
            let mut v = Vec::new();
            wire::encode_chunk(
                &mut v,
                wire::NBD_REPLY_FLAG_DONE,
                wire::NBD_REPLY_TYPE_NONE,
                job.cookie,
                &[],
            );
            w.write_all(&v)
        } else {
            reply_ok_simple(&mut *w, job.cookie)
        }
    };
    match job.cmd {
        wire::NBD_CMD_READ => {
            if job.length > server.config.max_payload {
                return send_err(
                    wire::NBD_EOVERFLOW,
                    "read longer than the maximum block size",
                );
            }
            if let Err(e) = check_range(size, job.offset, job.length, false) {
                return send_err(e, "read outside the export");
            }
            read_reply(neg, writer, job)
        }
        wire::NBD_CMD_WRITE | CMD_WRITE_ZEROES | wire::NBD_CMD_TRIM => {
            if !writable {
                return send_err(wire::NBD_EPERM, "the export is read-only");
            }
            if let Err(e) = check_range(size, job.offset, job.length, true) {
                let e = if e == wire::NBD_EINVAL && job.cmd != wire::NBD_CMD_TRIM {
                    wire::NBD_ENOSPC
                } else {
                    e
                };
                return send_err(e, "request outside the export");
            }
            let r = match job.cmd {
                wire::NBD_CMD_WRITE => src.write_at(job.offset, &job.payload),
                CMD_WRITE_ZEROES => src.write_zeroes(job.offset, job.length.into(), false),
                _ => src.write_zeroes(job.offset, job.length.into(), true),
            }
            .and_then(|()| {
                if job.flags & FLAG_FUA != 0 {
                    src.flush()
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(()) => ok(),
                Err(e) => send_err(errno_of(&e), &e.to_string()),
            }
        }
        wire::NBD_CMD_FLUSH => match src.flush() {
            Ok(()) => ok(),
            Err(e) => send_err(errno_of(&e), &e.to_string()),
        },
        wire::NBD_CMD_BLOCK_STATUS => {
            if !neg.base_allocation {
                return send_err(wire::NBD_EINVAL, "no meta context negotiated");
            }
            if let Err(e) = check_range(size, job.offset, job.length, false) {
                return send_err(e, "block status outside the export");
            }
            let ext = match src.extents(job.offset, job.length.into()) {
                Ok(x) => x,
                Err(e) => return send_err(errno_of(&e), &e.to_string()),
            };
            let one = job.flags & wire::NBD_CMD_FLAG_REQ_ONE != 0;
            let descs = descriptors(
                &ext,
                job.length.into(),
                if one { 1 } else { MAX_DESCRIPTORS },
            );
            if descs.is_empty() {
                return send_err(wire::NBD_EIO, "source reported no extents");
            }
            let mut v = Vec::new();
            wire::encode_chunk(
                &mut v,
                wire::NBD_REPLY_FLAG_DONE,
                wire::NBD_REPLY_TYPE_BLOCK_STATUS,
                job.cookie,
                &wire::encode_block_status(BASE_ALLOCATION_ID, &descs),
            );
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&v)
        }
        other => send_err(
            wire::NBD_EINVAL,
            &format!("command {other} is not supported"),
        ),
    }
}

/// Block status descriptors for `ext`, clipped to `len` bytes, merged, at
/// most `max`.
fn descriptors(ext: &[SourceExtent], len: u64, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for e in ext {
        if left == 0 {
            break;
        }
        let flags = if e.hole {
            wire::NBD_STATE_HOLE | wire::NBD_STATE_ZERO
        } else {
            0
        };
        let mut n = e.length.min(left);
        left -= n;
        while n > 0 {
            // Request lengths are u32, so a piece fits; merge with the last.
            let piece = n.min(u64::from(!0xfffu32));
            n -= piece;
            match out.last_mut() {
                Some((l, f)) if *f == flags && u64::from(*l) + piece <= u64::from(u32::MAX) => {
                    *l += piece as u32;
                }
                _ => {
                    if out.len() == max {
                        return out;
                    }
                    out.push((piece as u32, flags));
                }
            }
        }
    }
    out
}

fn read_reply(neg: &Negotiated, writer: &Mutex<Box<dyn Stream>>, job: &Job<'_>) -> io::Result<()> {
    let src = &neg.export.source;
    let len = u64::from(job.length);
    let df = job.flags & wire::NBD_CMD_FLAG_DF != 0;
    // The extents decide which parts are read and which go out as holes.
    let mut parts: Vec<(u64, u64, bool)> = Vec::new(); // (rel offset, len, hole)
    let mut pos = 0u64;
    while pos < len {
        let ext = match src.extents(job.offset + pos, len - pos) {
            Ok(x) if !x.is_empty() => x,
            Ok(_) => return reply_read_error(neg, writer, job, wire::NBD_EIO, "no extents", pos),
            Err(e) => return reply_read_error(neg, writer, job, errno_of(&e), &e.to_string(), pos),
        };
        for e in ext {
            if pos >= len || e.length == 0 {
                break;
            }
            let n = e.length.min(len - pos);
            match parts.last_mut() {
                Some(last) if last.2 == e.hole => last.1 += n,
                _ => parts.push((pos, n, e.hole)),
            }
            pos += n;
        }
    }
    // All data: straight from memory the source holds, if it does.
    if let [(0, _, false)] = parts[..] {
        let shared = match src.read_shared(job.offset, job.length as usize) {
            Ok(s) => s.filter(|b| b.as_slice().len() == job.length as usize),
            Err(e) => return reply_read_error(neg, writer, job, errno_of(&e), &e.to_string(), 0),
        };
        if let Some(bytes) = shared {
            return reply_data(neg, writer, job.cookie, job.offset, bytes.as_slice());
        }
    }
    let mut buf = vec![0u8; job.length as usize];
    for &(rel, n, hole) in &parts {
        if hole {
            continue;
        }
        let (a, b) = (rel as usize, (rel + n) as usize);
        if let Err(e) = src.read_at(job.offset + rel, &mut buf[a..b]) {
            return reply_read_error(neg, writer, job, errno_of(&e), &e.to_string(), rel);
        }
    }
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    if !neg.structured {
        reply_ok_simple(&mut *w, job.cookie)?;
        return w.write_all(&buf);
    }
    if df || parts.len() == 1 && !parts[0].2 {
        w.write_all(&data_chunk_header(
            wire::NBD_REPLY_FLAG_DONE,
            job.cookie,
            job.offset,
            job.length,
        ))?;
        return w.write_all(&buf);
    }
    let last = parts.len() - 1;
    for (i, &(rel, n, hole)) in parts.iter().enumerate() {
        let flags = if i == last {
            wire::NBD_REPLY_FLAG_DONE
        } else {
            0
        };
        if hole {
            let mut v = Vec::new();
            wire::encode_chunk(
                &mut v,
                flags,
                wire::NBD_REPLY_TYPE_OFFSET_HOLE,
                job.cookie,
                &wire::encode_hole(job.offset + rel, n as u32),
            );
            w.write_all(&v)?;
        } else {
            w.write_all(&data_chunk_header(
                flags,
                job.cookie,
                job.offset + rel,
                n as u32,
            ))?;
            w.write_all(&buf[rel as usize..(rel + n) as usize])?;
        }
    }
    Ok(())
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `len` data
/// bytes at `offset` (the data follows it).
fn data_chunk_header(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = ChunkHeader::new(
        flags,
        wire::NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        len.saturating_add(8),
    )
    .as_bytes()
    .to_vec();
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

fn reply_read_error(
    neg: &Negotiated,
    writer: &Mutex<Box<dyn Stream>>,
    job: &Job<'_>,
    errno: u32,
    msg: &str,
    rel: u64,
) -> io::Result<()> {
    tracing::warn!(
        export = %neg.export.name,
        offset = job.offset + rel,
        error = msg,
        "NBD read failed"
    );
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    if neg.structured {
        let mut v = Vec::new();
        wire::encode_chunk(
            &mut v,
            wire::NBD_REPLY_FLAG_DONE,
            wire::NBD_REPLY_TYPE_ERROR_OFFSET,
            job.cookie,
            &wire::encode_error(errno, msg, Some(job.offset + rel)),
        );
        w.write_all(&v)
    } else {
        w.write_all(SimpleReply::new(errno, job.cookie).as_bytes())
    }
}

#[cfg(test)]
pub(super) fn descriptors_for_test(ext: &[SourceExtent], len: u64, max: usize) -> Vec<(u32, u32)> {
    descriptors(ext, len, max)
}

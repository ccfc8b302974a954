//! Server side of fixed newstyle negotiation.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use zerocopy::{FromBytes, IntoBytes};

use super::{Export, Server, Stream};
use crate::wire::{self, OptionReply, OptionRequest};

/// Meta context id of `base:allocation`.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase needs from the negotiation.
pub(super) struct Negotiated {
    pub export: Export,
    pub structured: bool,
    pub base_allocation: bool,
}

struct Hs<'a> {
    stream: &'a mut Box<dyn Stream>,
    deadline: Instant,
}

impl Hs<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let left = self
                .deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "handshake deadline"))?;
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake deadline",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(io::Error::other)?;
        let mut v = OptionReply::new(option, reply_type, len)
            .as_bytes()
            .to_vec();
        v.extend_from_slice(data);
        self.stream.write_all(&v)
    }

    fn error(&mut self, option: u32, reply_type: u32, msg: &str) -> io::Result<()> {
        tracing::debug!(
            option = wire::option_name(option),
            reply = wire::reply_name(reply_type),
            msg,
            "NBD option refused"
        );
        self.reply(option, reply_type, msg.as_bytes())
    }
}

/// A cursor over option data that never reads past its end.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.u32()?).ok()?;
        if n > crate::tuning::MAX_STRING_LEN {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Runs the negotiation. `Ok(None)`: the client aborted cleanly.
pub(super) fn negotiate(
    server: &Arc<Server>,
    stream: &mut Box<dyn Stream>,
) -> io::Result<Option<Negotiated>> {
    let deadline = Instant::now() + server.config.handshake_timeout;
    stream.set_write_timeout(Some(server.config.handshake_timeout))?;
    let mut hs = Hs { stream, deadline };
    hs.stream.write_all(
        wire::Greeting::new(wire::NBD_FLAG_FIXED_NEWSTYLE | wire::NBD_FLAG_NO_ZEROES).as_bytes(),
    )?;
    let mut cf = [0u8; 4];
    hs.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    let known = wire::NBD_FLAG_C_FIXED_NEWSTYLE | wire::NBD_FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 || client_flags & wire::NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("client flags {client_flags:#x}: fixed newstyle required, no unknown bits"),
        ));
    }
    let no_zeroes = client_flags & wire::NBD_FLAG_C_NO_ZEROES != 0;
    // With TLS configured, nothing but STARTTLS and ABORT before it.
    let mut tls_done = false;
    let mut structured = false;
    // (export name, base:allocation selected) of the last SET_META_CONTEXT.
    let mut meta: Option<(String, bool)> = None;
    for _ in 0..server.config.max_options {
        let mut h = [0u8; 16];
        hs.read_exact(&mut h)?;
        let req = OptionRequest::read_from_bytes(&h[..])
            .map_err(|_| io::Error::other("option header"))?;
        let option = req.option.get();
        if req.magic.get() != wire::IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option magic {:#x}", req.magic.get()),
            ));
        }
        let len = req.length.get();
        if len > server.config.max_option_len {
            // Too much to read and discard within reason: end it.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option data of {len} bytes"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        hs.read_exact(&mut data)?;
        match option {
            wire::NBD_OPT_ABORT => {
                let _ = hs.reply(option, wire::NBD_REP_ACK, &[]);
                return Ok(None);
            }
            wire::NBD_OPT_STARTTLS => {
                let Some(tls) = &server.config.tls else {
                    hs.error(
                        option,
                        wire::NBD_REP_ERR_POLICY,
                        "TLS is not configured on this server",
                    )?;
                    continue;
                };
                if !data.is_empty() {
                    hs.error(option, wire::NBD_REP_ERR_INVALID, "takes no data")?;
                } else if tls_done {
                    hs.error(option, wire::NBD_REP_ERR_INVALID, "TLS is already on")?;
                } else {
                    hs.reply(option, wire::NBD_REP_ACK, &[])?;
                    let t = super::tls::accept(&**hs.stream, tls, hs.deadline)?;
                    *hs.stream = Box::new(t);
                    tls_done = true;
                    // The negotiation starts over inside TLS.
                    structured = false;
                    meta = None;
                }
            }
            wire::NBD_OPT_EXPORT_NAME if server.config.tls.is_some() && !tls_done => {
                // Cannot be answered with an error: the spec says close.
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS server",
                ));
            }
            other if server.config.tls.is_some() && !tls_done => {
                hs.error(
                    other,
                    wire::NBD_REP_ERR_TLS_REQD,
                    "TLS is required: send NBD_OPT_STARTTLS first",
                )?;
            }
            wire::NBD_OPT_LIST => {
                if !data.is_empty() {
                    hs.error(
                        option,
                        wire::NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )?;
                    continue;
                }
                for e in &server.exports {
                    let mut d = wire::sat_u32(e.name.len() as u64).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    hs.reply(option, wire::NBD_REP_SERVER, &d)?;
                }
                hs.reply(option, wire::NBD_REP_ACK, &[])?;
            }
            wire::NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    hs.error(option, wire::NBD_REP_ERR_INVALID, "takes no data")?;
                } else if structured {
                    hs.error(option, wire::NBD_REP_ERR_INVALID, "already negotiated")?;
                } else {
                    structured = true;
                    hs.reply(option, wire::NBD_REP_ACK, &[])?;
                }
            }
            wire::NBD_OPT_LIST_META_CONTEXT | wire::NBD_OPT_SET_META_CONTEXT => {
                let set = option == wire::NBD_OPT_SET_META_CONTEXT;
                if !structured {
                    hs.error(
                        option,
                        wire::NBD_REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    hs.error(
                        option,
                        wire::NBD_REP_ERR_INVALID,
                        "malformed meta context request",
                    )?;
                    continue;
                };
                if server.export(name).is_none() {
                    hs.error(option, wire::NBD_REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let want = if queries.is_empty() {
                    !set
                } else {
                    queries
                        .iter()
                        .any(|q| *q == wire::CONTEXT_BASE_ALLOCATION || (!set && (*q == "base:")))
                };
                if want {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(wire::CONTEXT_BASE_ALLOCATION.as_bytes());
                    hs.reply(option, wire::NBD_REP_META_CONTEXT, &d)?;
                }
                if set {
                    meta = Some((name.to_owned(), want));
                }
                hs.reply(option, wire::NBD_REP_ACK, &[])?;
            }
            wire::NBD_OPT_INFO | wire::NBD_OPT_GO => {
                let Some((name, infos)) = parse_go(&data) else {
                    hs.error(
                        option,
                        wire::NBD_REP_ERR_INVALID,
                        "malformed NBD_OPT_GO/INFO",
                    )?;
                    continue;
                };
                let Some(export) = server.export(name).cloned() else {
                    hs.error(
                        option,
                        wire::NBD_REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    )?;
                    continue;
                };
                let flags = transmission_flags(&export, structured);
                let src = &export.source;
                hs.reply(
                    option,
                    wire::NBD_REP_INFO,
                    &wire::encode_info_export(src.size(), flags),
                )?;
                let pref = src
                    .preferred_block_size()
                    .clamp(512, server.config.max_payload);
                let pref = if pref.is_power_of_two() { pref } else { 4096 };
                hs.reply(
                    option,
                    wire::NBD_REP_INFO,
                    &wire::encode_info_block_size(1, pref, server.config.max_payload),
                )?;
                if infos.contains(&wire::NBD_INFO_NAME) {
                    let mut d = wire::NBD_INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    hs.reply(option, wire::NBD_REP_INFO, &d)?;
                }
                if infos.contains(&wire::NBD_INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = wire::NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    hs.reply(option, wire::NBD_REP_INFO, &d)?;
                }
                hs.reply(option, wire::NBD_REP_ACK, &[])?;
                if option == wire::NBD_OPT_GO {
                    let base_allocation = structured
                        && meta.as_ref().is_some_and(|(n, on)| {
                            *on && server.export(n).map(|e| &e.name) == Some(&export.name)
                        });
                    return Ok(Some(Negotiated {
                        export,
                        structured,
                        base_allocation,
                    }));
                }
            }
            wire::NBD_OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data).unwrap_or("\u{0}");
                let Some(export) = server.export(name).cloned() else {
                    // No way to answer an error here: the spec says close.
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("NBD_OPT_EXPORT_NAME for unknown export {name:?}"),
                    ));
                };
                let flags = transmission_flags(&export, structured);
                let mut d = export.source.size().to_be_bytes().to_vec();
                d.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    d.extend_from_slice(&[0u8; 124]);
                }
                hs.stream.write_all(&d)?;
                let base_allocation = structured
                    && meta.as_ref().is_some_and(|(n, on)| {
                        *on && server.export(n).map(|e| &e.name) == Some(&export.name)
                    });
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    base_allocation,
                }));
            }
            other => {
                hs.error(
                    other,
                    wire::NBD_REP_ERR_UNSUP,
                    &format!("option {other} is not supported"),
                )?;
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many options in one handshake",
    ))
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f =
        wire::NBD_FLAG_HAS_FLAGS | wire::NBD_FLAG_SEND_FLUSH | wire::NBD_FLAG_CAN_MULTI_CONN;
    if export.source.writable() {
        f |= wire::NBD_FLAG_SEND_FUA | wire::NBD_FLAG_SEND_TRIM | wire::NBD_FLAG_SEND_WRITE_ZEROES;
    } else {
        f |= wire::NBD_FLAG_READ_ONLY;
    }
    if structured {
        f |= wire::NBD_FLAG_SEND_DF;
    }
    f
}

fn parse_go(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut v = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        v.push(c.u16()?);
    }
    c.0.is_empty().then_some((name, v))
}

fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(c.string()?);
    }
    c.0.is_empty().then_some((name, v))
}

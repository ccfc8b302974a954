//! Client side of fixed newstyle negotiation.
//!
//! Blocking, over any `Read + Write` (a socket with timeouts set, or a byte
//! slice in the fuzz target). Order: greeting → client flags →
//! `NBD_OPT_STRUCTURED_REPLY` → `NBD_OPT_SET_META_CONTEXT` → `NBD_OPT_GO`
//! asking for `NBD_INFO_BLOCK_SIZE`. Every reply header is validated and its
//! length bounded before its payload is read.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use zerocopy::FromBytes;

use crate::error::{Error, Result};
use crate::tuning;
use crate::violation::Violation;
use crate::wire::{self, Info, OptionReply};

/// Transmission flags of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportFlags(pub u16);

impl ExportFlags {
    /// The export is read-only.
    pub fn read_only(self) -> bool {
        self.0 & wire::NBD_FLAG_READ_ONLY != 0
    }
    /// Several connections may be used at once.
    pub fn can_multi_conn(self) -> bool {
        self.0 & wire::NBD_FLAG_CAN_MULTI_CONN != 0
    }
    /// `NBD_CMD_FLAG_DF` is supported.
    pub fn can_df(self) -> bool {
        self.0 & wire::NBD_FLAG_SEND_DF != 0
    }
    /// `NBD_CMD_TRIM` is supported.
    pub fn can_trim(self) -> bool {
        self.0 & wire::NBD_FLAG_SEND_TRIM != 0
    }
    /// `NBD_CMD_FLUSH` is supported.
    pub fn can_flush(self) -> bool {
        self.0 & wire::NBD_FLAG_SEND_FLUSH != 0
    }
}

/// Block size constraints advertised by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to this.
    pub minimum: u32,
    /// Efficient I/O size.
    pub preferred: u32,
    /// Largest payload the server accepts.
    pub maximum: u32,
}

/// A metadata context selected on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Id the server assigned (valid on this connection only).
    pub id: u32,
    /// Context name, e.g. `base:allocation`.
    pub name: String,
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name used.
    pub name: String,
    /// Size in bytes (< 2^63).
    pub size: u64,
    /// Transmission flags.
    pub flags: ExportFlags,
    /// Size constraints, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
    /// Selected metadata contexts.
    pub contexts: Vec<MetaContext>,
}

impl ExportInfo {
    /// Id of a selected context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.name == name).map(|c| c.id)
    }

    /// Alignment every request must honour.
    pub fn min_block(&self) -> u32 {
        self.block_sizes.map_or(1, |b| b.minimum)
    }

    /// Largest read request: the server's maximum, capped at 32 MiB (F-20),
    /// rounded down to the minimum block size.
    pub fn max_request(&self) -> u32 {
        let max = self
            .block_sizes
            .map_or(tuning::MAX_REQUEST_LEN, |b| b.maximum)
            .min(tuning::MAX_REQUEST_LEN);
        let min = self.min_block();
        (max / min * min).max(min)
    }
}

/// What to ask for in the handshake.
#[derive(Debug, Clone)]
pub(crate) struct HandshakeParams<'a> {
    pub export_name: &'a str,
    /// Context queries to select (exact names).
    pub contexts: Vec<String>,
    /// Subset of `contexts` whose absence is an error.
    pub required: Vec<String>,
    /// Deadline for the whole negotiation.
    pub timeout: Duration,
}

struct Negotiator<'s, S> {
    stream: &'s mut S,
    deadline: Instant,
    timeout: Duration,
}

impl<S: Read + Write> Negotiator<'_, S> {
    fn check_deadline(&self, step: &'static str) -> Result<()> {
        if Instant::now() > self.deadline {
            return Err(Error::Timeout {
                step,
                timeout: self.timeout,
            });
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], step: &'static str) -> Result<()> {
        self.check_deadline(step)?;
        self.stream
            .read_exact(buf)
            .map_err(|e| Error::io(step, e, self.timeout))
    }

    fn write_all(&mut self, buf: &[u8], step: &'static str) -> Result<()> {
        self.check_deadline(step)?;
        self.stream
            .write_all(buf)
            .map_err(|e| Error::io(step, e, self.timeout))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut buf = Vec::with_capacity(16 + data.len());
        wire::encode_option(&mut buf, option, data)?;
        self.write_all(&buf, "sending an option")
    }

    /// Reads one option reply for `option`: (type, bounded payload).
    fn read_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut hdr = [0u8; size_of::<OptionReply>()];
        self.read_exact(&mut hdr, "reading an option reply")?;
        let h = OptionReply::read_from_bytes(&hdr).map_err(|_| Violation::BadLength {
            what: "option reply",
            len: hdr.len() as u64,
        })?;
        h.validate(option)?;
        // Bounded by validate() to MAX_OPTION_REPLY_LEN.
        let mut payload = vec![0u8; h.length.get() as usize];
        self.read_exact(&mut payload, "reading an option reply")?;
        Ok((h.reply_type.get(), payload))
    }
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> Error {
    let message = wire::server_text(payload);
    Error::OptionRefused {
        option: wire::option_name(option),
        reply: wire::reply_name(reply),
        message,
    }
}

/// Runs the whole negotiation on `stream`.
pub(crate) fn negotiate<S: Read + Write>(
    stream: &mut S,
    p: &HandshakeParams<'_>,
) -> Result<ExportInfo> {
    let mut n = Negotiator {
        stream,
        deadline: Instant::now() + p.timeout,
        timeout: p.timeout,
    };

    let mut g = [0u8; size_of::<wire::Greeting>()];
    n.read_exact(&mut g, "reading the server greeting")?;
    let greeting = wire::Greeting::read_from_bytes(&g).map_err(|_| Violation::BadLength {
        what: "greeting",
        len: g.len() as u64,
    })?;
    let server_flags = greeting.validate()?;
    let mut client_flags = wire::NBD_FLAG_C_FIXED_NEWSTYLE;
    if server_flags & wire::NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= wire::NBD_FLAG_C_NO_ZEROES;
    }
    n.write_all(&client_flags.to_be_bytes(), "sending client flags")?;

    // Structured replies: required (READ error ranges, holes, block status).
    n.send_option(wire::NBD_OPT_STRUCTURED_REPLY, &[])?;
    let (ty, payload) = n.read_reply(wire::NBD_OPT_STRUCTURED_REPLY)?;
    match ty {
        wire::NBD_REP_ACK if payload.is_empty() => {}
        wire::NBD_REP_ACK => {
            return Err(Violation::BadLength {
                what: "NBD_REP_ACK",
                len: payload.len() as u64,
            }
            .into())
        }
        wire::NBD_REP_ERR_UNSUP => return Err(Error::Unsupported("structured replies")),
        t if t & wire::NBD_REP_FLAG_ERROR != 0 => {
            return Err(refused(wire::NBD_OPT_STRUCTURED_REPLY, t, &payload))
        }
        t => {
            return Err(Violation::Handshake(format!(
                "unexpected reply {} to NBD_OPT_STRUCTURED_REPLY",
                wire::reply_name(t)
            ))
            .into())
        }
    }

    let contexts = if p.contexts.is_empty() {
        Vec::new()
    } else {
        set_meta_context(&mut n, p)?
    };
    for r in &p.required {
        if !contexts.iter().any(|c| &c.name == r) {
            return Err(Error::ContextMissing(r.clone()));
        }
    }

    let (size, flags, block_sizes) = go(&mut n, p.export_name)?;
    Ok(ExportInfo {
        name: p.export_name.to_owned(),
        size,
        flags,
        block_sizes,
        contexts,
    })
}

fn set_meta_context<S: Read + Write>(
    n: &mut Negotiator<'_, S>,
    p: &HandshakeParams<'_>,
) -> Result<Vec<MetaContext>> {
    let queries: Vec<&str> = p.contexts.iter().map(String::as_str).collect();
    let data = wire::encode_meta_context_data(p.export_name, &queries)?;
    n.send_option(wire::NBD_OPT_SET_META_CONTEXT, &data)?;
    let mut selected: Vec<MetaContext> = Vec::new();
    for _ in 0..tuning::MAX_OPTION_REPLIES {
        let (ty, payload) = n.read_reply(wire::NBD_OPT_SET_META_CONTEXT)?;
        match ty {
            wire::NBD_REP_META_CONTEXT => {
                let (id, name) = wire::decode_meta_context(&payload)?;
                if !queries.contains(&name.as_str()) {
                    return Err(Violation::Handshake(format!(
                        "server selected context {name:?} that was not asked for"
                    ))
                    .into());
                }
                if selected.iter().any(|c| c.id == id || c.name == name) {
                    return Err(Violation::Handshake(format!(
                        "context {name:?} (id {id}) selected twice or id reused"
                    ))
                    .into());
                }
                selected.push(MetaContext { id, name });
            }
            wire::NBD_REP_ACK => return Ok(selected),
            // No metadata support: every context is missing; callers that
            // required one fail with ContextMissing.
            wire::NBD_REP_ERR_UNSUP | wire::NBD_REP_ERR_INVALID | wire::NBD_REP_ERR_POLICY => {
                return Ok(Vec::new())
            }
            wire::NBD_REP_ERR_UNKNOWN => {
                return Err(Error::ExportNotFound {
                    name: p.export_name.to_owned(),
                    message: wire::server_text(&payload),
                })
            }
            t if t & wire::NBD_REP_FLAG_ERROR != 0 => {
                return Err(refused(wire::NBD_OPT_SET_META_CONTEXT, t, &payload))
            }
            t => {
                return Err(Violation::Handshake(format!(
                    "unexpected reply {} to NBD_OPT_SET_META_CONTEXT",
                    wire::reply_name(t)
                ))
                .into())
            }
        }
    }
    Err(Violation::Handshake("too many NBD_OPT_SET_META_CONTEXT replies".into()).into())
}

fn go<S: Read + Write>(
    n: &mut Negotiator<'_, S>,
    export: &str,
) -> Result<(u64, ExportFlags, Option<BlockSizes>)> {
    let data = wire::encode_go_data(export, &[wire::NBD_INFO_BLOCK_SIZE])?;
    n.send_option(wire::NBD_OPT_GO, &data)?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    for _ in 0..tuning::MAX_OPTION_REPLIES {
        let (ty, payload) = n.read_reply(wire::NBD_OPT_GO)?;
        match ty {
            wire::NBD_REP_INFO => match wire::decode_info(&payload)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                } => {
                    wire::validate_block_sizes(minimum, preferred, maximum)?;
                    block_sizes = Some(BlockSizes {
                        minimum,
                        preferred,
                        maximum,
                    });
                }
                Info::Text(_) | Info::Unknown(_) => {}
            },
            wire::NBD_REP_ACK => {
                if !payload.is_empty() {
                    return Err(Violation::BadLength {
                        what: "NBD_REP_ACK",
                        len: payload.len() as u64,
                    }
                    .into());
                }
                let (size, flags) = export_info.ok_or_else(|| {
                    Violation::Handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into())
                })?;
                if size >= 1 << 63 {
                    return Err(Violation::ExportTooLarge(size).into());
                }
                if flags & wire::NBD_FLAG_HAS_FLAGS == 0 {
                    return Err(Violation::Handshake(format!(
                        "transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS"
                    ))
                    .into());
                }
                if let Some(b) = block_sizes {
                    if size % u64::from(b.minimum) != 0 {
                        return Err(Violation::Handshake(format!(
                            "export size {size} is not a multiple of the minimum block size {}",
                            b.minimum
                        ))
                        .into());
                    }
                }
                return Ok((size, ExportFlags(flags), block_sizes));
            }
            wire::NBD_REP_ERR_UNKNOWN => {
                return Err(Error::ExportNotFound {
                    name: export.to_owned(),
                    message: wire::server_text(&payload),
                })
            }
            wire::NBD_REP_ERR_UNSUP => return Err(Error::Unsupported("NBD_OPT_GO")),
            t if t & wire::NBD_REP_FLAG_ERROR != 0 => {
                return Err(refused(wire::NBD_OPT_GO, t, &payload))
            }
            t => {
                return Err(Violation::Handshake(format!(
                    "unexpected reply {} to NBD_OPT_GO",
                    wire::reply_name(t)
                ))
                .into())
            }
        }
    }
    Err(Violation::Handshake("too many NBD_OPT_GO replies".into()).into())
}

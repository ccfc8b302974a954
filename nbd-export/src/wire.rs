//! NBD wire format: constants, fixed-layout messages and their validators.
//!
//! Pure byte-level code, shared by the client here and a future server
//! (instant restore): every message can be encoded and decoded. Fixed parts
//! are `zerocopy` structs with explicit big-endian fields and compile-time
//! size checks; variable parts are parsed by functions that check every
//! length before a byte is trusted. Nothing here allocates more than a
//! caller-bounded length.
//!
//! Reference: the NBD protocol (`NetworkBlockDevice/nbd` doc/proto.md).

use zerocopy::byteorder::{BigEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::tuning;
use crate::violation::Violation;

type Be16 = U16<BigEndian>;
type Be32 = U32<BigEndian>;
type Be64 = U64<BigEndian>;

// ---------------------------------------------------------------- magics

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ------------------------------------------------------------ handshake

/// Handshake flag: server supports fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: export name (old way to end negotiation).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: ask about an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: select an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success, no data.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: an export description.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: export information item.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: a selected metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Option error: invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Option error: unsupported platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// Option error: TLS required.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Option error: export unknown.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Option error: server shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Option error: block size negotiation required.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Option error: too big.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

/// Info item: export size and flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info item: canonical name.
pub const NBD_INFO_NAME: u16 = 1;
/// Info item: description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags field is valid (always set).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: flush supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: trim supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: write zeroes supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: don't-fragment supported.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may be used.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: cache supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;

// ---------------------------------------------------------- transmission

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write.
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: don't fragment.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// Reply chunk: no payload (final).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Reply chunk: data at offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Reply chunk: zeroes at offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Reply chunk: block status extents.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Reply chunk: error.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Reply chunk: error at offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation`: not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: dirty.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: I/O error.
pub const NBD_EIO: u32 = 5;
/// NBD error: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Name of a metadata context: `base:allocation`.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Name of a metadata context: `qemu:allocation-depth`.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of qemu dirty bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Narrows a value that is bounded well below `u32::MAX` by construction
/// (chunk and request lengths ≤ 64 MiB); saturates instead of wrapping, so
/// a broken bound shows up as a failed range check, never as a wrong length.
pub(crate) fn sat_u32(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Like [`sat_u32`], for buffer positions.
pub(crate) fn sat_usize(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// Text from the server for humans: lossy UTF-8, control characters
/// replaced, at most [`tuning::MAX_STRING_LEN`] bytes.
pub fn server_text(bytes: &[u8]) -> String {
    let b = &bytes[..bytes.len().min(tuning::MAX_STRING_LEN)];
    String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Human name of an NBD error number.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Human name of an option.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// Human name of an option reply type.
pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        r if r & NBD_REP_FLAG_ERROR != 0 => "unknown option error",
        _ => "unknown option reply",
    }
}

/// Human name of a command.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

// ------------------------------------------------------- fixed messages

/// Server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Greeting {
    /// `NBDMAGIC`.
    pub nbd_magic: Be64,
    /// `IHAVEOPT`.
    pub opt_magic: Be64,
    /// Handshake flags.
    pub flags: Be16,
}
const _: () = assert!(size_of::<Greeting>() == 18);

impl Greeting {
    /// A greeting as a server sends it.
    pub fn new(flags: u16) -> Self {
        Greeting {
            nbd_magic: NBDMAGIC.into(),
            opt_magic: IHAVEOPT.into(),
            flags: flags.into(),
        }
    }

    /// Checks magics and that fixed newstyle is offered; returns the flags.
    pub fn validate(&self) -> Result<u16, Violation> {
        if self.nbd_magic.get() != NBDMAGIC {
            return Err(Violation::BadMagic {
                what: "greeting",
                got: self.nbd_magic.get(),
            });
        }
        if self.opt_magic.get() != IHAVEOPT {
            // Oldstyle servers send cliserv_magic here: not supported.
            return Err(Violation::BadMagic {
                what: "newstyle",
                got: self.opt_magic.get(),
            });
        }
        let flags = self.flags.get();
        if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Violation::NotFixedNewstyle(flags));
        }
        Ok(flags)
    }
}

/// Header of an option request (client → server).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionRequest {
    /// `IHAVEOPT`.
    pub magic: Be64,
    /// Option number.
    pub option: Be32,
    /// Length of the data that follows.
    pub length: Be32,
}
const _: () = assert!(size_of::<OptionRequest>() == 16);

impl OptionRequest {
    /// Checks the magic and bounds the data length (server side).
    pub fn validate(&self, max_len: u32) -> Result<(), Violation> {
        if self.magic.get() != IHAVEOPT {
            return Err(Violation::BadMagic {
                what: "option request",
                got: self.magic.get(),
            });
        }
        if self.length.get() > max_len {
            return Err(Violation::Oversized {
                what: "option data",
                len: self.length.get().into(),
                max: max_len.into(),
            });
        }
        Ok(())
    }
}

/// Header of an option reply (server → client).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReply {
    /// `OPTION_REPLY_MAGIC`.
    pub magic: Be64,
    /// The option this answers.
    pub option: Be32,
    /// Reply type.
    pub reply_type: Be32,
    /// Length of the data that follows.
    pub length: Be32,
}
const _: () = assert!(size_of::<OptionReply>() == 20);

impl OptionReply {
    /// A reply header as a server sends it.
    pub fn new(option: u32, reply_type: u32, length: u32) -> Self {
        OptionReply {
            magic: OPTION_REPLY_MAGIC.into(),
            option: option.into(),
            reply_type: reply_type.into(),
            length: length.into(),
        }
    }

    /// Checks the magic, that it answers `option`, and bounds the length.
    pub fn validate(&self, option: u32) -> Result<(), Violation> {
        if self.magic.get() != OPTION_REPLY_MAGIC {
            return Err(Violation::BadMagic {
                what: "option reply",
                got: self.magic.get(),
            });
        }
        if self.option.get() != option {
            return Err(Violation::WrongOption {
                expected: option,
                got: self.option.get(),
            });
        }
        if self.length.get() > tuning::MAX_OPTION_REPLY_LEN {
            return Err(Violation::Oversized {
                what: "option reply",
                len: self.length.get().into(),
                max: tuning::MAX_OPTION_REPLY_LEN.into(),
            });
        }
        Ok(())
    }
}

/// `NBD_INFO_EXPORT` payload after the 2-byte type.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoExport {
    /// Export size in bytes.
    pub size: Be64,
    /// Transmission flags.
    pub flags: Be16,
}
const _: () = assert!(size_of::<InfoExport>() == 10);

/// `NBD_INFO_BLOCK_SIZE` payload after the 2-byte type.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoBlockSize {
    /// Minimum block size.
    pub minimum: Be32,
    /// Preferred block size.
    pub preferred: Be32,
    /// Maximum payload.
    pub maximum: Be32,
}
const _: () = assert!(size_of::<InfoBlockSize>() == 12);

/// Transmission request header (client → server).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Request {
    /// `REQUEST_MAGIC`.
    pub magic: Be32,
    /// Command flags.
    pub flags: Be16,
    /// Command.
    pub command: Be16,
    /// Opaque cookie echoed in the reply.
    pub cookie: Be64,
    /// Offset.
    pub offset: Be64,
    /// Length.
    pub length: Be32,
}
const _: () = assert!(size_of::<Request>() == 28);

impl Request {
    /// Builds a request header.
    pub fn new(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Self {
        Request {
            magic: REQUEST_MAGIC.into(),
            flags: flags.into(),
            command: command.into(),
            cookie: cookie.into(),
            offset: offset.into(),
            length: length.into(),
        }
    }

    /// Checks the magic (server side).
    pub fn validate(&self) -> Result<(), Violation> {
        if self.magic.get() != REQUEST_MAGIC {
            return Err(Violation::BadMagic {
                what: "request",
                got: self.magic.get().into(),
            });
        }
        Ok(())
    }
}

/// The 16 bytes every reply starts with. A simple reply is exactly this; a
/// structured reply chunk has 4 more header bytes (its length).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyPrefix {
    /// `SIMPLE_REPLY_MAGIC` or `STRUCTURED_REPLY_MAGIC`.
    pub magic: Be32,
    /// Simple: error. Structured: flags (high 16 bits) and type (low 16).
    pub word: Be32,
    /// Cookie.
    pub cookie: Be64,
}
const _: () = assert!(size_of::<ReplyPrefix>() == 16);

/// A simple reply (error is the only payload for non-read commands).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReply {
    /// `SIMPLE_REPLY_MAGIC`.
    pub magic: Be32,
    /// NBD error, 0 for success.
    pub error: Be32,
    /// Cookie.
    pub cookie: Be64,
}
const _: () = assert!(size_of::<SimpleReply>() == 16);

impl SimpleReply {
    /// Builds a simple reply.
    pub fn new(error: u32, cookie: u64) -> Self {
        SimpleReply {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: error.into(),
            cookie: cookie.into(),
        }
    }
}

/// Structured reply chunk header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkHeader {
    /// `STRUCTURED_REPLY_MAGIC`.
    pub magic: Be32,
    /// Reply flags.
    pub flags: Be16,
    /// Reply type.
    pub reply_type: Be16,
    /// Cookie.
    pub cookie: Be64,
    /// Payload length.
    pub length: Be32,
}
const _: () = assert!(size_of::<ChunkHeader>() == 20);

impl ChunkHeader {
    /// Builds a chunk header.
    pub fn new(flags: u16, reply_type: u16, cookie: u64, length: u32) -> Self {
        ChunkHeader {
            magic: STRUCTURED_REPLY_MAGIC.into(),
            flags: flags.into(),
            reply_type: reply_type.into(),
            cookie: cookie.into(),
            length: length.into(),
        }
    }

    /// Whether this is the last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags.get() & NBD_REPLY_FLAG_DONE != 0
    }
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Descriptor {
    /// Extent length (nonzero).
    pub length: Be32,
    /// Status flags.
    pub flags: Be32,
}
const _: () = assert!(size_of::<Descriptor>() == 8);

/// `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HolePayload {
    /// Offset.
    pub offset: Be64,
    /// Hole size (nonzero).
    pub size: Be32,
}
const _: () = assert!(size_of::<HolePayload>() == 12);

/// Fixed start of every error chunk payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorPayloadHead {
    /// NBD error (nonzero).
    pub error: Be32,
    /// Message length.
    pub message_len: Be16,
}
const _: () = assert!(size_of::<ErrorPayloadHead>() == 6);

// -------------------------------------------------- parsed reply pieces

/// A decoded reply prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    /// A complete simple reply.
    Simple {
        /// NBD error, 0 for success.
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// A structured chunk: 4 more header bytes follow.
    Structured,
}

/// Decodes the common 16-byte reply prefix.
pub fn decode_reply_prefix(bytes: &[u8; 16]) -> Result<ReplyStart, Violation> {
    let (p, _) = ReplyPrefix::read_from_prefix(bytes).map_err(|_| Violation::BadLength {
        what: "reply prefix",
        len: 16,
    })?;
    match p.magic.get() {
        SIMPLE_REPLY_MAGIC => Ok(ReplyStart::Simple {
            error: p.word.get(),
            cookie: p.cookie.get(),
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyStart::Structured),
        other => Err(Violation::BadMagic {
            what: "reply",
            got: other.into(),
        }),
    }
}

/// Decodes a full structured chunk header (magic already known good).
pub fn decode_chunk_header(bytes: &[u8; 20]) -> Result<ChunkHeader, Violation> {
    let (h, _) = ChunkHeader::read_from_prefix(bytes).map_err(|_| Violation::BadLength {
        what: "chunk header",
        len: 20,
    })?;
    if h.magic.get() != STRUCTURED_REPLY_MAGIC {
        return Err(Violation::BadMagic {
            what: "structured reply",
            got: h.magic.get().into(),
        });
    }
    Ok(h)
}

/// A decoded error chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// NBD error number.
    pub errno: u32,
    /// Server's message (lossily decoded; it is for humans).
    pub message: String,
    /// Failing offset (`NBD_REPLY_TYPE_ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

/// Decodes the payload of an error chunk of type `reply_type` (bit 15 set).
/// Known types must have exactly their documented length; unknown error
/// types only need a message that fits.
pub fn decode_error_chunk(reply_type: u16, payload: &[u8]) -> Result<ErrorChunk, Violation> {
    let bad = |what| Violation::BadLength {
        what,
        len: payload.len() as u64,
    };
    let (head, rest) =
        ErrorPayloadHead::read_from_prefix(payload).map_err(|_| bad("error chunk"))?;
    let errno = head.error.get();
    let msg_len = usize::from(head.message_len.get());
    if msg_len > tuning::MAX_STRING_LEN || msg_len > rest.len() {
        return Err(bad("error chunk message"));
    }
    let (msg, tail) = rest.split_at(msg_len);
    let offset = match reply_type {
        NBD_REPLY_TYPE_ERROR => {
            if !tail.is_empty() {
                return Err(bad("NBD_REPLY_TYPE_ERROR"));
            }
            None
        }
        NBD_REPLY_TYPE_ERROR_OFFSET => {
            let off: [u8; 8] = tail
                .try_into()
                .map_err(|_| bad("NBD_REPLY_TYPE_ERROR_OFFSET"))?;
            Some(u64::from_be_bytes(off))
        }
        _ => None,
    };
    if errno == 0 {
        // "MUST be nonzero": an error chunk that claims success is nonsense.
        return Err(Violation::Malformed("error chunk with error 0".into()));
    }
    Ok(ErrorChunk {
        errno,
        message: server_text(msg),
        offset,
    })
}

/// Splits a block status payload into its context id and descriptors.
/// The payload length must be 4 + 8·n with n ≥ 1.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, &[Descriptor]), Violation> {
    let bad = || Violation::BadLength {
        what: "block status chunk",
        len: payload.len() as u64,
    };
    if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
        return Err(bad());
    }
    let (id, rest) = payload.split_at(4);
    let id = u32::from_be_bytes(id.try_into().map_err(|_| bad())?);
    let descs = <[Descriptor]>::ref_from_bytes(rest).map_err(|_| bad())?;
    if descs.len() > tuning::MAX_EXTENTS_PER_CHUNK {
        return Err(Violation::Oversized {
            what: "block status extents",
            len: descs.len() as u64,
            max: tuning::MAX_EXTENTS_PER_CHUNK as u64,
        });
    }
    Ok((id, descs))
}

/// Largest block status payload accepted (spec: SHOULD NOT exceed 2^20
/// descriptors).
pub const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 20);
const _: () = assert!(tuning::MAX_EXTENTS_PER_CHUNK == 1 << 20);

// ----------------------------------------------------- option payloads

/// Appends an option request with `data` to `out`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) -> Result<(), Violation> {
    let length = u32::try_from(data.len()).map_err(|_| Violation::Oversized {
        what: "option data",
        len: data.len() as u64,
        max: u32::MAX.into(),
    })?;
    let hdr = OptionRequest {
        magic: IHAVEOPT.into(),
        option: option.into(),
        length: length.into(),
    };
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(data);
    Ok(())
}

fn push_string(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), Violation> {
    if s.len() > tuning::MAX_STRING_LEN || s.contains('\0') {
        return Err(Violation::BadString(what));
    }
    out.extend_from_slice(&sat_u32(s.len() as u64).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Data of `NBD_OPT_GO`/`NBD_OPT_INFO`: name and information requests.
pub fn encode_go_data(export: &str, info: &[u16]) -> Result<Vec<u8>, Violation> {
    let mut d = Vec::with_capacity(8 + export.len() + 2 * info.len());
    push_string(&mut d, export, "export name")?;
    let n = u16::try_from(info.len()).map_err(|_| Violation::BadLength {
        what: "info requests",
        len: info.len() as u64,
    })?;
    d.extend_from_slice(&n.to_be_bytes());
    for i in info {
        d.extend_from_slice(&i.to_be_bytes());
    }
    Ok(d)
}

/// Data of `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_LIST_META_CONTEXT`.
pub fn encode_meta_context_data(export: &str, queries: &[&str]) -> Result<Vec<u8>, Violation> {
    let mut d = Vec::new();
    push_string(&mut d, export, "export name")?;
    let n = u32::try_from(queries.len()).map_err(|_| Violation::BadLength {
        what: "meta context queries",
        len: queries.len() as u64,
    })?;
    d.extend_from_slice(&n.to_be_bytes());
    for q in queries {
        push_string(&mut d, q, "meta context query")?;
    }
    Ok(d)
}

/// Decodes a `NBD_REP_META_CONTEXT` payload: id and name.
pub fn decode_meta_context(payload: &[u8]) -> Result<(u32, String), Violation> {
    if payload.len() < 4 || payload.len() - 4 > tuning::MAX_STRING_LEN {
        return Err(Violation::BadLength {
            what: "NBD_REP_META_CONTEXT",
            len: payload.len() as u64,
        });
    }
    let (id, name) = payload.split_at(4);
    let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
    let name = std::str::from_utf8(name)
        .map_err(|_| Violation::BadString("meta context name"))?
        .to_owned();
    Ok((id, name))
}

/// A decoded `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// Size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        minimum: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        maximum: u32,
    },
    /// Canonical name or description (ignored by the client).
    Text(u16),
    /// An item type this client does not know (ignored, as the spec says).
    Unknown(u16),
}

/// Decodes an `NBD_REP_INFO` payload, enforcing the documented lengths.
pub fn decode_info(payload: &[u8]) -> Result<Info, Violation> {
    if payload.len() < 2 {
        return Err(Violation::BadLength {
            what: "NBD_REP_INFO",
            len: payload.len() as u64,
        });
    }
    let (ty, rest) = payload.split_at(2);
    let ty = u16::from_be_bytes([ty[0], ty[1]]);
    let bad = |what| Violation::BadLength {
        what,
        len: payload.len() as u64,
    };
    match ty {
        NBD_INFO_EXPORT => {
            let e = InfoExport::read_from_bytes(rest).map_err(|_| bad("NBD_INFO_EXPORT"))?;
            Ok(Info::Export {
                size: e.size.get(),
                flags: e.flags.get(),
            })
        }
        NBD_INFO_BLOCK_SIZE => {
            let b = InfoBlockSize::read_from_bytes(rest).map_err(|_| bad("NBD_INFO_BLOCK_SIZE"))?;
            Ok(Info::BlockSize {
                minimum: b.minimum.get(),
                preferred: b.preferred.get(),
                maximum: b.maximum.get(),
            })
        }
        NBD_INFO_NAME | NBD_INFO_DESCRIPTION => {
            if rest.len() > tuning::MAX_STRING_LEN {
                return Err(bad("NBD_INFO_NAME"));
            }
            Ok(Info::Text(ty))
        }
        other => Ok(Info::Unknown(other)),
    }
}

/// Encodes an `NBD_INFO_EXPORT` item (server side).
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(
        InfoExport {
            size: size.into(),
            flags: flags.into(),
        }
        .as_bytes(),
    );
    v
}

/// Encodes an `NBD_INFO_BLOCK_SIZE` item (server side).
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut v = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    v.extend_from_slice(
        InfoBlockSize {
            minimum: minimum.into(),
            preferred: preferred.into(),
            maximum: maximum.into(),
        }
        .as_bytes(),
    );
    v
}

/// Validates block size constraints against the rules of the spec.
pub fn validate_block_sizes(minimum: u32, preferred: u32, maximum: u32) -> Result<(), Violation> {
    let ok = minimum.is_power_of_two()
        && minimum <= 1 << 16
        && preferred.is_power_of_two()
        && preferred >= minimum.max(512)
        && maximum >= preferred
        && (maximum == u32::MAX || maximum % minimum == 0);
    if ok {
        Ok(())
    } else {
        Err(Violation::BadBlockSizes {
            min: minimum,
            preferred,
            max: maximum,
        })
    }
}

// ------------------------------------------------ server-side encoders

/// Appends a structured chunk (header + payload) to `out` (server side).
pub fn encode_chunk(out: &mut Vec<u8>, flags: u16, reply_type: u16, cookie: u64, payload: &[u8]) {
    // Payloads built by a server are bounded by the request length (≤ 2^32).
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(ChunkHeader::new(flags, reply_type, cookie, len).as_bytes());
    out.extend_from_slice(payload);
}

/// Payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (server side).
pub fn encode_hole(offset: u64, size: u32) -> Vec<u8> {
    HolePayload {
        offset: offset.into(),
        size: size.into(),
    }
    .as_bytes()
    .to_vec()
}

/// Payload of an error chunk (server side); `offset` makes it
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub fn encode_error(errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(tuning::MAX_STRING_LEN)];
    let mut v = ErrorPayloadHead {
        error: errno.into(),
        // ≤ MAX_STRING_LEN (4096).
        message_len: u16::try_from(msg.len()).unwrap_or(u16::MAX).into(),
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(msg);
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

/// Payload of a block status chunk (server side).
pub fn encode_block_status(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = context.to_be_bytes().to_vec();
    for &(length, flags) in extents {
        v.extend_from_slice(
            Descriptor {
                length: length.into(),
                flags: flags.into(),
            }
            .as_bytes(),
        );
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_validation() {
        let g = Greeting::new(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(g.validate(), Ok(3));
        let mut bytes = g.as_bytes().to_vec();
        bytes[0] ^= 1;
        let bad = Greeting::read_from_bytes(&bytes).unwrap();
        assert!(matches!(bad.validate(), Err(Violation::BadMagic { .. })));
        let plain = Greeting::new(0);
        assert!(matches!(
            plain.validate(),
            Err(Violation::NotFixedNewstyle(0))
        ));
    }

    #[test]
    fn request_layout_is_big_endian() {
        let r = Request::new(NBD_CMD_READ, 0, 0x0102_0304_0506_0708, 0x10, 0x20);
        let b = r.as_bytes();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0, 0, 0, 0x20]);
        assert_eq!(Request::read_from_bytes(b).unwrap().validate(), Ok(()));
    }

    #[test]
    fn reply_prefix_kinds() {
        let s = SimpleReply::new(5, 9);
        let b: [u8; 16] = s.as_bytes().try_into().unwrap();
        assert_eq!(
            decode_reply_prefix(&b),
            Ok(ReplyStart::Simple {
                error: 5,
                cookie: 9
            })
        );
        let h = ChunkHeader::new(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 9, 0);
        let hb: [u8; 20] = h.as_bytes().try_into().unwrap();
        let pre: [u8; 16] = hb[..16].try_into().unwrap();
        assert_eq!(decode_reply_prefix(&pre), Ok(ReplyStart::Structured));
        let d = decode_chunk_header(&hb).unwrap();
        assert!(d.is_done());
        assert_eq!(d.cookie.get(), 9);
        let junk = [0xffu8; 16];
        assert!(matches!(
            decode_reply_prefix(&junk),
            Err(Violation::BadMagic { .. })
        ));
    }

    #[test]
    fn error_chunks() {
        let p = encode_error(NBD_EIO, "boom", Some(4096));
        let e = decode_error_chunk(NBD_REPLY_TYPE_ERROR_OFFSET, &p).unwrap();
        assert_eq!(e.errno, NBD_EIO);
        assert_eq!(e.message, "boom");
        assert_eq!(e.offset, Some(4096));
        // ERROR_OFFSET without its offset, ERROR with trailing bytes.
        let p2 = encode_error(NBD_EIO, "boom", None);
        decode_error_chunk(NBD_REPLY_TYPE_ERROR_OFFSET, &p2).unwrap_err();
        decode_error_chunk(NBD_REPLY_TYPE_ERROR, &p).unwrap_err();
        decode_error_chunk(NBD_REPLY_TYPE_ERROR, &p2).unwrap();
        // Message length beyond the payload.
        let mut p3 = p2.clone();
        p3[5] = 200;
        decode_error_chunk(NBD_REPLY_TYPE_ERROR, &p3).unwrap_err();
        // Error 0.
        let p4 = encode_error(0, "", None);
        decode_error_chunk(NBD_REPLY_TYPE_ERROR, &p4).unwrap_err();
        // Unknown error type: trailing fields allowed.
        decode_error_chunk(NBD_REPLY_TYPE_ERROR_BIT | 9, &p).unwrap();
        decode_error_chunk(NBD_REPLY_TYPE_ERROR, &[0, 0]).unwrap_err();
    }

    #[test]
    fn block_status_payloads() {
        let p = encode_block_status(7, &[(4096, 3), (512, 0)]);
        let (id, d) = decode_block_status(&p).unwrap();
        assert_eq!(id, 7);
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].length.get(), 512);
        decode_block_status(&p[..4]).unwrap_err();
        decode_block_status(&p[..13]).unwrap_err();
    }

    #[test]
    fn info_items() {
        let e = encode_info_export(1 << 30, NBD_FLAG_HAS_FLAGS);
        assert_eq!(
            decode_info(&e),
            Ok(Info::Export {
                size: 1 << 30,
                flags: 1
            })
        );
        decode_info(&e[..11]).unwrap_err();
        let b = encode_info_block_size(1, 4096, 1 << 25);
        assert!(matches!(decode_info(&b), Ok(Info::BlockSize { .. })));
        assert_eq!(decode_info(&[0, 99, 1]), Ok(Info::Unknown(99)));
    }

    #[test]
    fn block_size_rules() {
        validate_block_sizes(1, 4096, 1 << 25).unwrap();
        validate_block_sizes(512, 4096, u32::MAX).unwrap();
        validate_block_sizes(3, 4096, 1 << 25).unwrap_err();
        validate_block_sizes(1 << 17, 1 << 17, 1 << 25).unwrap_err();
        validate_block_sizes(1, 256, 1 << 25).unwrap_err();
        validate_block_sizes(1, 4096, 1024).unwrap_err();
    }

    #[test]
    fn option_encoding() {
        let d = encode_go_data("exp", &[NBD_INFO_BLOCK_SIZE]).unwrap();
        assert_eq!(d, [0, 0, 0, 3, b'e', b'x', b'p', 0, 1, 0, 3]);
        let m = encode_meta_context_data("", &["base:allocation"]).unwrap();
        assert_eq!(&m[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        encode_go_data(&"x".repeat(5000), &[]).unwrap_err();
        encode_go_data("a\0b", &[]).unwrap_err();
        let (id, name) = decode_meta_context(&[0, 0, 0, 5, b'a', b':', b'b']).unwrap();
        assert_eq!((id, name.as_str()), (5, "a:b"));
        decode_meta_context(&[0, 0, 0, 5, 0xff]).unwrap_err();
    }
}

//! [`Violation`]: the ways a server can break the NBD protocol. A module of
//! its own, depending on nothing else in the crate, so that the wire codec
//! (`wire.rs`) and the error type (`error.rs`) both use it and only the
//! error type depends on the codec (for errno names).

/// A way in which the server broke the NBD protocol. Any of these ends the
/// connection (hard disconnect): the byte stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A magic number did not match.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// The server does not speak fixed newstyle negotiation.
    #[error("server does not offer fixed newstyle negotiation (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    /// An option reply answered a different option than the one sent.
    #[error("option reply for option {got}, expected {expected}")]
    WrongOption {
        /// Option sent.
        expected: u32,
        /// Option in the reply.
        got: u32,
    },
    /// A length field is larger than this client accepts.
    #[error("{what} length {len} exceeds the limit {max}")]
    Oversized {
        /// Which field.
        what: &'static str,
        /// Length received.
        len: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A length field is inconsistent with the message it describes.
    #[error("{what} has invalid length {len}")]
    BadLength {
        /// Which message.
        what: &'static str,
        /// Length received.
        len: u64,
    },
    /// An export size of 2^63 or more (F-20).
    #[error("export size {0} is 2^63 or larger")]
    ExportTooLarge(u64),
    /// The sizes or flags of two connections to one export differ (F-20).
    #[error("export changed between connections: {0}")]
    ExportChanged(String),
    /// Advertised block size constraints break the rules of the spec.
    #[error("invalid block size constraints min={min} preferred={preferred} max={max}")]
    BadBlockSizes {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// `NBD_OPT_GO` succeeded without `NBD_INFO_EXPORT`, or similar.
    #[error("handshake: {0}")]
    Handshake(String),
    /// A reply for a cookie that has no request in flight.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// A structured reply type this client does not know (not an error type).
    #[error("unknown structured reply type {0}")]
    UnknownReplyType(u16),
    /// A reply type that is not valid for the command it answers.
    #[error("reply type {reply_type} is not valid for {command}")]
    UnexpectedReplyType {
        /// The command.
        command: &'static str,
        /// The reply type.
        reply_type: u16,
    },
    /// A simple reply where only structured replies are allowed.
    #[error("simple reply to {0}, which needs a structured reply")]
    UnexpectedSimpleReply(&'static str),
    /// A content chunk outside the requested range.
    #[error("reply chunk {offset}+{len} lies outside the request {req_offset}+{req_len}")]
    ChunkOutOfRange {
        /// Chunk start.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Request start.
        req_offset: u64,
        /// Request length.
        req_len: u64,
    },
    /// Two content chunks of one reply overlap.
    #[error("reply chunk {offset}+{len} overlaps an earlier chunk")]
    OverlappingChunk {
        /// Chunk start.
        offset: u64,
        /// Chunk length.
        len: u64,
    },
    /// A reply split into more fragments than this client tracks.
    #[error("read reply split into more than {0} separate fragments")]
    TooFragmented(usize),
    /// A read completed without covering the whole request.
    #[error("read reply covered {covered} of {len} bytes")]
    IncompleteRead {
        /// Bytes covered.
        covered: u64,
        /// Bytes requested.
        len: u64,
    },
    /// `NBD_REPLY_TYPE_NONE` without the done flag, or similar.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// A block status extent of length zero.
    #[error("zero-length extent for context {0}")]
    ZeroLengthExtent(u32),
    /// Extents continue after the requested range was already covered.
    #[error("extents overlap or continue past the request for context {0}")]
    ExtentsBeyondRequest(u32),
    /// An extent that ends past the end of the export.
    #[error("extent ends at {end}, past the export size {size}")]
    ExtentPastEof {
        /// End of the extent.
        end: u64,
        /// Export size.
        size: u64,
    },
    /// A block status chunk for a context id that was not negotiated.
    #[error("block status for unknown context id {0}")]
    UnknownContext(u32),
    /// Two block status chunks for one context in one reply.
    #[error("two block status chunks for context id {0}")]
    DuplicateContext(u32),
    /// A successful block status reply lacking a negotiated context.
    #[error("block status reply lacks context id {0}")]
    MissingContext(u32),
    /// A string that is not UTF-8 or breaks the length rules.
    #[error("invalid string in {0}")]
    BadString(&'static str),
}

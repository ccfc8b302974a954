//! Sans-IO protocol core shared by the async client and the blocking thaw
//! path: line framing with the 0xFF sentinel, bounded buffers, a JSON depth
//! pre-check, reply parsing and reply matching.
//!
//! Framing rules (qemu-ga writes one JSON reply per line):
//! - `0xFF` is the sync sentinel (never valid in UTF-8 JSON). It means
//!   "reset your parser": the partial line before it is dropped.
//! - In *skip* mode (while syncing, and after a framing error) every byte is
//!   dropped until a sentinel arrives; nothing is buffered.
//! - A line longer than the cap, or nesting deeper than the depth limit, is
//!   an error as soon as the offending byte arrives (no waiting for `\n`).
//! - Blank lines are dropped. Dropped bytes count against a junk budget so a
//!   flood of them ends in an error rather than a spin until the deadline.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::Config;
use crate::error::{sanitize_guest_text, Error};

/// The sync sentinel qemu-ga puts before its `guest-sync-delimited` reply.
pub(crate) const SENTINEL: u8 = 0xFF;

/// Name used in errors for the sync round-trip.
pub(crate) const SYNC_COMMAND: &str = "guest-sync-delimited";

/// Why the framer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The current line exceeded the cap.
    TooLong { limit: usize },
    /// The current line nests deeper than allowed.
    TooDeep { limit: usize },
    /// More bytes were dropped than the junk budget allows.
    Junk { limit: usize },
}

impl FrameError {
    pub(crate) fn into_error(self, command: &'static str) -> Error {
        match self {
            FrameError::TooLong { limit } => Error::ReplyTooLarge { command, limit },
            FrameError::TooDeep { limit } => Error::ReplyTooDeep { command, limit },
            FrameError::Junk { limit } if command == SYNC_COMMAND => Error::SyncFlood { limit },
            FrameError::Junk { limit } => Error::UnsolicitedFlood { command, limit },
        }
    }
}

/// Tracks JSON nesting depth over raw bytes, aware of strings and escapes.
/// It does not validate JSON; it only bounds what the real parser will see.
#[derive(Debug, Default, Clone)]
pub(crate) struct DepthScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl DepthScan {
    /// Feeds one byte; returns the nesting depth after it.
    pub(crate) fn step(&mut self, byte: u8) -> usize {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
        } else {
            match byte {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        self.depth
    }
}

/// True when `bytes` nest arrays/objects deeper than `limit`.
pub(crate) fn exceeds_depth(bytes: &[u8], limit: usize) -> bool {
    let mut scan = DepthScan::default();
    bytes.iter().any(|&b| scan.step(b) > limit)
}

/// Splits the agent's byte stream into bounded lines.
#[derive(Debug)]
pub(crate) struct Framer {
    line: Vec<u8>,
    scan: DepthScan,
    max_line: usize,
    max_depth: usize,
    skipping: bool,
    /// Bytes received but not yet looked at (at most one read's worth).
    input: Vec<u8>,
    pos: usize,
    junk: usize,
    junk_limit: usize,
}

impl Framer {
    pub(crate) fn new(max_line: usize, max_depth: usize) -> Self {
        Framer {
            line: Vec::new(),
            scan: DepthScan::default(),
            max_line,
            max_depth,
            skipping: false,
            input: Vec::new(),
            pos: 0,
            junk: 0,
            junk_limit: usize::MAX,
        }
    }

    /// True when all pushed input has been consumed (the caller may read
    /// more).
    pub(crate) fn needs_input(&self) -> bool {
        self.pos >= self.input.len()
    }

    /// Hands newly read bytes to the framer. Callers push only after
    /// [`Framer::next_frame`] returned `None`, so at most one read's worth
    /// is ever held here.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.needs_input() {
            self.input.clear();
            self.pos = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Drops the partial line and every byte up to the next sentinel.
    pub(crate) fn skip_until_sentinel(&mut self) {
        self.junk += self.line.len();
        self.reset_line();
        self.skipping = true;
    }

    /// Starts a new junk budget (per sync or per command).
    pub(crate) fn set_junk_limit(&mut self, limit: usize) {
        self.junk = 0;
        self.junk_limit = limit;
    }

    /// Bytes dropped since the last [`Framer::set_junk_limit`].
    pub(crate) fn junk(&self) -> usize {
        self.junk
    }

    /// Counts externally discarded bytes (whole lines the session ignored)
    /// against the junk budget.
    pub(crate) fn add_junk(&mut self, bytes: usize) -> Result<(), FrameError> {
        self.junk = self.junk.saturating_add(bytes);
        if self.junk > self.junk_limit {
            return Err(FrameError::Junk {
                limit: self.junk_limit,
            });
        }
        Ok(())
    }

    fn reset_line(&mut self) {
        self.line.clear();
        self.scan = DepthScan::default();
    }

    /// Returns the next complete, non-blank line (without the `\n`), an
    /// error, or `None` when more input is needed.
    pub(crate) fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        while self.pos < self.input.len() {
            let byte = self.input[self.pos];
            self.pos += 1;
            if byte == SENTINEL {
                self.junk += self.line.len();
                self.reset_line();
                self.skipping = false;
            } else if self.skipping {
                self.junk += 1;
            } else if byte == b'\n' {
                if self.line.iter().all(u8::is_ascii_whitespace) {
                    self.junk += self.line.len() + 1;
                    self.reset_line();
                } else {
                    let line = std::mem::take(&mut self.line);
                    self.scan = DepthScan::default();
                    return Some(Ok(line));
                }
            } else if self.line.len() >= self.max_line {
                self.skip_until_sentinel();
                return Some(Err(FrameError::TooLong {
                    limit: self.max_line,
                }));
            } else if self.scan.step(byte) > self.max_depth {
                self.skip_until_sentinel();
                return Some(Err(FrameError::TooDeep {
                    limit: self.max_depth,
                }));
            } else {
                self.line.push(byte);
            }
            if self.junk > self.junk_limit {
                return Some(Err(FrameError::Junk {
                    limit: self.junk_limit,
                }));
            }
        }
        None
    }

    /// Bytes currently buffered (partial line plus unread input); the bound
    /// the property tests and the fuzz targets check.
    pub(crate) fn buffered(&self) -> usize {
        self.line.len() + (self.input.len() - self.pos)
    }
}

/// What a reply line says. `Return` borrows the raw JSON text of the
/// value: no tree is built until it is decoded into the expected type.
#[derive(Debug, Clone)]
pub(crate) enum ReplyBody<'a> {
    Return(&'a RawValue),
    Error { class: String, desc: String },
}

/// One parsed reply line, borrowing from it.
#[derive(Debug, Clone)]
pub(crate) struct Reply<'a> {
    pub(crate) id: Option<&'a RawValue>,
    pub(crate) body: ReplyBody<'a>,
}

/// The reply envelope as sent. Unknown members are skipped without
/// allocating; a duplicated member is a parse error.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(rename = "return", borrow, default)]
    ret: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// The `error` member.
#[derive(Deserialize)]
struct AgentErrorWire {
    class: String,
    desc: String,
}

/// Why a line is not a reply.
#[derive(Debug)]
pub(crate) enum ParseError {
    Utf8,
    TooDeep { limit: usize },
    Json(serde_json::Error),
    Malformed(String),
}

impl ParseError {
    pub(crate) fn into_error(self, command: &'static str) -> Error {
        match self {
            ParseError::Utf8 => Error::InvalidUtf8 { command },
            ParseError::TooDeep { limit } => Error::ReplyTooDeep { command, limit },
            ParseError::Json(source) => Error::InvalidJson { command, source },
            ParseError::Malformed(detail) => Error::MalformedReply { command, detail },
        }
    }
}

/// Parses one line as a QGA reply: `{"return": V}` or
/// `{"error": {"class": S, "desc": S}}`, each with an optional `"id"`.
/// Depth is checked on the raw bytes before serde sees them.
pub(crate) fn parse_reply(line: &[u8], max_depth: usize) -> Result<Reply<'_>, ParseError> {
    let text = std::str::from_utf8(line).map_err(|_| ParseError::Utf8)?;
    if exceeds_depth(line, max_depth) {
        return Err(ParseError::TooDeep { limit: max_depth });
    }
    if !text.trim_start().starts_with('{') {
        // Not an object: still say whether it is JSON at all.
        serde_json::from_str::<IgnoredAny>(text).map_err(ParseError::Json)?;
        return Err(ParseError::Malformed("expected an object".into()));
    }
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(ParseError::Json)?;
    let body = match (envelope.ret, envelope.error) {
        (Some(ret), None) => ReplyBody::Return(ret),
        (None, Some(err)) => {
            let err: AgentErrorWire = serde_json::from_str(err.get()).map_err(|e| {
                ParseError::Malformed(format!(
                    "error is not {{class, desc}}: {}",
                    sanitize_guest_text(&e.to_string())
                ))
            })?;
            ReplyBody::Error {
                class: sanitize_guest_text(&err.class),
                desc: sanitize_guest_text(&err.desc),
            }
        }
        (Some(_), Some(_)) => {
            return Err(ParseError::Malformed(
                "both return and error present".into(),
            ))
        }
        (None, None) => {
            return Err(ParseError::Malformed(
                "neither return nor error present".into(),
            ))
        }
    };
    Ok(Reply {
        id: envelope.id,
        body,
    })
}

/// Whether a reply's `id` is exactly `expected` (our ids never need JSON
/// escapes, so a borrowed string compares exactly; anything else is not
/// ours). Nothing is allocated for a hostile id.
fn id_is(id: &RawValue, expected: &str) -> bool {
    serde_json::from_str::<&str>(id.get()).is_ok_and(|s| s == expected)
}

/// A sync round-trip in progress.
#[derive(Debug)]
pub(crate) struct SyncPending {
    value: i64,
    id: String,
}

/// A command awaiting its reply.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) command: &'static str,
    id: String,
    unsolicited: usize,
}

/// Per-connection protocol state: framing, request ids, and whether this
/// agent echoes request ids (qemu-ga has for years; verified on 10.0).
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) framer: Framer,
    nonce: u64,
    seq: u64,
    echoes_ids: bool,
    max_depth: usize,
    max_unsolicited: usize,
    reply_cap: usize,
    sync_discard_cap: usize,
}

impl Session {
    pub(crate) fn new(config: &Config) -> Self {
        Session {
            framer: Framer::new(config.reply_cap(), config.depth_cap()),
            nonce: rand::random(),
            seq: 0,
            echoes_ids: true,
            max_depth: config.depth_cap(),
            max_unsolicited: config.max_unsolicited_replies,
            reply_cap: config.reply_cap(),
            sync_discard_cap: config.max_sync_discard_bytes,
        }
    }

    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("shear-{:016x}-{}", self.nonce, self.seq)
    }

    /// Builds `0xFF` + `guest-sync-delimited` with a fresh random value and
    /// puts the framer into skip mode: everything before the agent's
    /// sentinel is stale and dropped unparsed.
    pub(crate) fn start_sync(&mut self) -> (Vec<u8>, SyncPending) {
        // 53 bits: plenty to be unique, and exact even for a peer that
        // parses JSON numbers as doubles.
        let value = i64::try_from(rand::random::<u64>() >> 11)
            .unwrap_or(1)
            .max(1);
        let id = self.next_id();
        let request = serde_json::json!({
            "execute": SYNC_COMMAND,
            "arguments": { "id": value },
            "id": id,
        });
        let mut bytes = vec![SENTINEL];
        bytes.extend_from_slice(request.to_string().as_bytes());
        bytes.push(b'\n');
        self.framer.skip_until_sentinel();
        self.framer.set_junk_limit(self.sync_discard_cap);
        (bytes, SyncPending { value, id })
    }

    /// Handles one line that followed a sentinel while syncing. Returns
    /// true when it is our sync reply; anything else (stale sync replies of
    /// earlier clients, garbage) is dropped and we skip to the next
    /// sentinel.
    pub(crate) fn on_sync_line(
        &mut self,
        pending: &SyncPending,
        line: &[u8],
    ) -> Result<bool, Error> {
        if let Ok(Reply {
            id,
            body: ReplyBody::Return(ret),
        }) = parse_reply(line, self.max_depth)
        {
            if serde_json::from_str::<i64>(ret.get()).ok() == Some(pending.value) {
                match id {
                    Some(id) if id_is(id, &pending.id) => {
                        self.echoes_ids = true;
                        return Ok(true);
                    }
                    // An agent that does not echo ids: the random value
                    // alone identifies our reply; match later replies by
                    // order.
                    None => {
                        self.echoes_ids = false;
                        return Ok(true);
                    }
                    Some(_) => {}
                }
            }
        }
        tracing::debug!(
            bytes = line.len(),
            "qga sync: dropping a line that is not our sync reply"
        );
        self.framer.skip_until_sentinel();
        self.framer
            .add_junk(line.len())
            .map_err(|e| e.into_error(SYNC_COMMAND))?;
        Ok(false)
    }

    /// Builds a request line with a fresh id.
    pub(crate) fn start_command<A: Serialize>(
        &mut self,
        command: &'static str,
        arguments: &A,
    ) -> Result<(Vec<u8>, Pending), Error> {
        let id = self.next_id();
        let arguments = serde_json::to_value(arguments).map_err(|e| Error::InvalidArgument {
            command,
            detail: e.to_string(),
        })?;
        let request = serde_json::json!({
            "execute": command,
            "arguments": arguments,
            "id": id,
        });
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        self.framer.set_junk_limit(self.reply_cap);
        Ok((
            bytes,
            Pending {
                command,
                id,
                unsolicited: 0,
            },
        ))
    }

    /// Handles one reply line. `Ok(Some(raw))` is the raw JSON of our
    /// `return` value; `Ok(None)` means the line was a well-formed reply to
    /// something else (dropped, within a budget); errors are typed.
    pub(crate) fn on_reply_line(
        &mut self,
        pending: &mut Pending,
        line: &[u8],
    ) -> Result<Option<Box<RawValue>>, Error> {
        let reply = parse_reply(line, self.max_depth).map_err(|e| e.into_error(pending.command))?;
        let ours = match reply.id {
            Some(id) => id_is(id, &pending.id),
            None => !self.echoes_ids,
        };
        if !ours {
            pending.unsolicited += 1;
            tracing::debug!(
                command = pending.command,
                count = pending.unsolicited,
                "qga: dropping a reply that is not ours"
            );
            if pending.unsolicited > self.max_unsolicited {
                return Err(Error::UnsolicitedFlood {
                    command: pending.command,
                    limit: self.max_unsolicited,
                });
            }
            self.framer
                .add_junk(line.len())
                .map_err(|e| e.into_error(pending.command))?;
            return Ok(None);
        }
        match reply.body {
            ReplyBody::Return(raw) => Ok(Some(raw.to_owned())),
            ReplyBody::Error { class, desc } => Err(Error::Agent {
                command: pending.command,
                class,
                desc,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut Framer, data: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        framer.push(data);
        let mut out = Vec::new();
        while let Some(f) = framer.next_frame() {
            out.push(f);
        }
        out
    }

    use serde_json::Value;

    #[test]
    fn splits_lines_and_drops_blank_ones() {
        let mut f = Framer::new(1024, 8);
        let got = frames(&mut f, b"{\"a\":1}\n\n  \n{\"b\":2}\n{\"c\"");
        assert_eq!(
            got,
            vec![Ok(b"{\"a\":1}".to_vec()), Ok(b"{\"b\":2}".to_vec())]
        );
        let got = frames(&mut f, b":3}\n");
        assert_eq!(got, vec![Ok(b"{\"c\":3}".to_vec())]);
    }

    #[test]
    fn sentinel_resets_the_partial_line() {
        let mut f = Framer::new(1024, 8);
        let got = frames(&mut f, b"{\"stale\": tru\xff{\"return\": 5}\n");
        assert_eq!(got, vec![Ok(b"{\"return\": 5}".to_vec())]);
    }

    #[test]
    fn skip_mode_drops_until_sentinel_without_buffering() {
        let mut f = Framer::new(16, 8);
        f.skip_until_sentinel();
        let junk = vec![b'x'; 100_000];
        assert!(frames(&mut f, &junk).is_empty());
        assert_eq!(f.buffered(), 0);
        assert_eq!(frames(&mut f, b"\xff{}\n"), vec![Ok(b"{}".to_vec())]);
    }

    #[test]
    fn over_long_line_fails_at_the_cap_not_at_newline() {
        let mut f = Framer::new(64, 8);
        let got = frames(&mut f, &[b'a'; 65]);
        assert_eq!(got, vec![Err(FrameError::TooLong { limit: 64 })]);
        // Broken until the next sentinel.
        assert!(frames(&mut f, b"{}\n").is_empty());
        assert_eq!(frames(&mut f, b"\xff{}\n"), vec![Ok(b"{}".to_vec())]);
    }

    #[test]
    fn deep_nesting_fails_before_newline() {
        let mut f = Framer::new(1 << 20, 32);
        let got = frames(&mut f, &[b'['; 100_000]);
        assert_eq!(got, vec![Err(FrameError::TooDeep { limit: 32 })]);
        assert!(f.buffered() <= 100_000);
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        assert!(!exceeds_depth(br#"{"a": "[[[[[[[[[[\"[[[[[[["}"#, 2));
        assert!(exceeds_depth(br#"{"a": [[1]]}"#, 2));
    }

    #[test]
    fn junk_budget_ends_a_blank_line_flood() {
        let mut f = Framer::new(1024, 8);
        f.set_junk_limit(100);
        let got = frames(&mut f, &[b'\n'; 1000]);
        assert!(matches!(
            got.first(),
            Some(Err(FrameError::Junk { limit: 100 }))
        ));
    }

    #[test]
    fn parse_reply_checks_shape() {
        let ok = parse_reply(br#"{"return": 3, "id": "x", "extra": [[1]]}"#, 8).unwrap();
        assert!(matches!(ok.body, ReplyBody::Return(r) if r.get() == "3"));
        assert!(ok.id.is_some_and(|id| id_is(id, "x")));
        let err = parse_reply(br#"{"error": {"class": "GenericError", "desc": "no"}}"#, 8).unwrap();
        assert!(matches!(
            err.body,
            ReplyBody::Error { ref class, ref desc } if class == "GenericError" && desc == "no"
        ));
        assert!(err.id.is_none());
        for bad in [
            &b"[1]"[..],
            br#"{"return": 1, "error": {}}"#,
            br#"{"error": "x"}"#,
            br#"{"error": {"class": 1, "desc": "x"}}"#,
            br#"{"id": 1}"#,
            br#"{"return": null}"#,
        ] {
            assert!(
                matches!(parse_reply(bad, 8), Err(ParseError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_reply(b"{\"return\": \"\xc3\x28\"}", 8),
            Err(ParseError::Utf8)
        ));
        assert!(matches!(
            parse_reply(b"{\"return\": 1}\0", 8),
            Err(ParseError::Json(_))
        ));
        // A duplicated member is refused rather than resolved either way.
        assert!(matches!(
            parse_reply(br#"{"return": 1, "return": 2}"#, 8),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_reply(b"nonsense", 8),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_reply(&[b'['; 100], 8),
            Err(ParseError::TooDeep { limit: 8 })
        ));
    }

    #[test]
    fn session_matches_ids_and_budgets_strangers() {
        let cfg = Config {
            max_unsolicited_replies: 2,
            ..Config::default()
        };
        let mut s = Session::new(&cfg);
        let (req, mut pending) = s
            .start_command("guest-ping", &serde_json::json!({}))
            .unwrap();
        let req: Value = serde_json::from_slice(&req).unwrap();
        let id = req["id"].as_str().unwrap().to_owned();
        assert_eq!(req["execute"], "guest-ping");
        let stranger = br#"{"return": 1, "id": "shear-old-1"}"#;
        assert!(s.on_reply_line(&mut pending, stranger).unwrap().is_none());
        assert!(s
            .on_reply_line(&mut pending, br#"{"return": 1}"#)
            .unwrap()
            .is_none());
        let ours = format!(r#"{{"return": {{}}, "id": "{id}"}}"#);
        assert_eq!(
            s.on_reply_line(&mut pending, ours.as_bytes())
                .unwrap()
                .map(|r| r.get().to_owned()),
            Some("{}".to_owned())
        );
        let (_, mut pending) = s
            .start_command("guest-ping", &serde_json::json!({}))
            .unwrap();
        for _ in 0..2 {
            assert!(s.on_reply_line(&mut pending, stranger).unwrap().is_none());
        }
        assert!(matches!(
            s.on_reply_line(&mut pending, stranger),
            Err(Error::UnsolicitedFlood { limit: 2, .. })
        ));
    }

    #[test]
    fn sync_accepts_only_our_value_and_id() {
        let mut s = Session::new(&Config::default());
        let (req, pending) = s.start_sync();
        assert_eq!(req[0], SENTINEL);
        let parsed: Value = serde_json::from_slice(&req[1..]).unwrap();
        let value = parsed["arguments"]["id"].as_i64().unwrap();
        let id = parsed["id"].as_str().unwrap().to_owned();
        assert!(value > 0);
        // Wrong value, right id; right value, wrong id: both dropped.
        let wrong_value = format!(r#"{{"return": {}, "id": "{id}"}}"#, value ^ 1);
        assert!(!s.on_sync_line(&pending, wrong_value.as_bytes()).unwrap());
        let wrong_id = format!(r#"{{"return": {value}, "id": "other"}}"#);
        assert!(!s.on_sync_line(&pending, wrong_id.as_bytes()).unwrap());
        let ours = format!(r#"{{"return": {value}, "id": "{id}"}}"#);
        assert!(s.on_sync_line(&pending, ours.as_bytes()).unwrap());
        assert!(s.echoes_ids);
    }

    #[test]
    fn agent_without_id_echo_is_matched_by_order() {
        let mut s = Session::new(&Config::default());
        let (req, pending) = s.start_sync();
        let parsed: Value = serde_json::from_slice(&req[1..]).unwrap();
        let value = parsed["arguments"]["id"].as_i64().unwrap();
        assert!(s
            .on_sync_line(&pending, format!(r#"{{"return": {value}}}"#).as_bytes())
            .unwrap());
        let (_, mut pending) = s
            .start_command("guest-ping", &serde_json::json!({}))
            .unwrap();
        assert_eq!(
            s.on_reply_line(&mut pending, br#"{"return": {}}"#)
                .unwrap()
                .map(|r| r.get().to_owned()),
            Some("{}".to_owned())
        );
    }
}

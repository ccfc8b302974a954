//! QMP framing and decoding: one JSON object per line, bounded.
//!
//! Every check happens before `serde_json` sees the bytes: the line length
//! while reading, then UTF-8, then JSON nesting depth. A failed check is a
//! typed [`Error`], never a panic, and memory use is bounded by the line
//! limit.

use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::error::{Error, Result};
use crate::events::Event;

/// Default maximum length of one QMP line (4 MiB). QEMU's largest routine
/// replies (`query-named-block-nodes`, `human-monitor-command "info qtree"`)
/// are tens of KiB; 4 MiB leaves room for hundreds of nodes while keeping a
/// runaway peer's cost small.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Default maximum JSON nesting depth. Kept below `serde_json`'s own
/// recursion limit (128) so deep input always fails here, with a typed
/// error, before the parser runs. A `query-block` reply nests about 6 levels
/// plus one per backing-chain element.
pub const DEFAULT_MAX_DEPTH: usize = 100;

/// Limits applied to every incoming line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum bytes in one line, newline excluded.
    pub max_line_bytes: usize,
    /// Maximum nesting of JSON arrays and objects.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Read one line (without its `\n`) into `line`, never holding more than
/// `max` bytes of it. Returns `Ok(false)` on a clean EOF at a line boundary.
///
/// Cancel-safety: not cancel-safe on its own (a partial line stays in
/// `line`); the reader task owns the stream and never cancels it.
pub async fn read_line_bounded<R>(reader: &mut R, line: &mut Vec<u8>, max: usize) -> Result<bool>
where
    R: AsyncBufRead + Unpin,
{
    line.clear();
    loop {
        let available = reader
            .fill_buf()
            .await
            .map_err(|source| Error::Read { source })?;
        if available.is_empty() {
            if line.is_empty() {
                return Ok(false);
            }
            return Err(Error::EofMidLine {
                partial_bytes: line.len(),
            });
        }
        let (chunk, consumed, done) = match available.iter().position(|&b| b == b'\n') {
            Some(newline) => (&available[..newline], newline + 1, true),
            None => (available, available.len(), false),
        };
        if line.len() + chunk.len() > max {
            return Err(Error::LineTooLong { limit: max });
        }
        line.extend_from_slice(chunk);
        reader.consume(consumed);
        if done {
            return Ok(true);
        }
    }
}

/// Check that the JSON text nests arrays/objects at most `max` deep, without
/// parsing it. Brackets inside strings do not count. Malformed text is left
/// for the parser to reject.
pub fn check_depth(bytes: &[u8], max: usize) -> Result<()> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(Error::TooDeep { limit: max });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// One decoded QMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The server greeting: the value of the `QMP` member.
    Greeting(Value),
    /// A successful reply.
    Return {
        /// The echoed command id, if any.
        id: Option<Value>,
        /// The `return` member.
        value: Value,
    },
    /// An error reply.
    Error {
        /// The echoed command id, if any (QEMU omits it when it could not
        /// parse the command).
        id: Option<Value>,
        /// `error.class`.
        class: String,
        /// `error.desc`.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
    /// A JSON object with none of the members above; kept, not an error.
    Unknown(Map<String, Value>),
    /// A line holding only whitespace (QEMU ends lines with `\r\n`).
    Blank,
}

/// Decode one line (without its `\n`) after the length check.
pub fn decode_line(line: &[u8], limits: &Limits) -> Result<Message> {
    if line.len() > limits.max_line_bytes {
        return Err(Error::LineTooLong {
            limit: limits.max_line_bytes,
        });
    }
    let text = std::str::from_utf8(line).map_err(|e| Error::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(Message::Blank);
    }
    check_depth(text.as_bytes(), limits.max_depth)?;
    let value: Value =
        serde_json::from_str(text).map_err(|source| Error::InvalidJson { source })?;
    let Value::Object(mut obj) = value else {
        return Err(Error::NotAnObject {
            detail: describe(&value),
        });
    };
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(err) = obj.get("error") {
        let class = err
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("<no class>")
            .to_owned();
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("<no description>")
            .to_owned();
        return Ok(Message::Error {
            id: obj.remove("id"),
            class,
            desc,
        });
    }
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return {
            id: obj.remove("id"),
            value,
        });
    }
    if matches!(obj.get("event"), Some(Value::String(_))) {
        return Ok(Message::Event(Event::from_object(obj)));
    }
    Ok(Message::Unknown(obj))
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncRead, BufReader, ReadBuf};

    fn limits(max_line_bytes: usize, max_depth: usize) -> Limits {
        Limits {
            max_line_bytes,
            max_depth,
        }
    }

    /// An AsyncRead that hands out its data in the given chunk sizes, to
    /// exercise every split of a line across reads.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        next: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let this = &mut *self;
            let size = if this.sizes.is_empty() {
                usize::MAX
            } else {
                this.sizes[this.next % this.sizes.len()].max(1)
            };
            this.next += 1;
            let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn read_all_lines(
        data: Vec<u8>,
        sizes: Vec<usize>,
        max: usize,
        buf_cap: usize,
    ) -> (Vec<Vec<u8>>, Option<Error>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut reader = BufReader::with_capacity(
                buf_cap,
                Chunked {
                    data,
                    pos: 0,
                    sizes,
                    next: 0,
                },
            );
            let mut lines = Vec::new();
            let mut line = Vec::new();
            loop {
                match read_line_bounded(&mut reader, &mut line, max).await {
                    Ok(true) => lines.push(line.clone()),
                    Ok(false) => return (lines, None),
                    Err(e) => return (lines, Some(e)),
                }
            }
        })
    }

    #[test]
    fn decodes_each_message_kind() {
        let l = Limits::default();
        assert!(matches!(
            decode_line(br#"{"QMP":{"version":{},"capabilities":[]}}"#, &l).unwrap(),
            Message::Greeting(_)
        ));
        assert_eq!(
            decode_line(br#"{"return":{},"id":7}"#, &l).unwrap(),
            Message::Return {
                id: Some(7.into()),
                value: serde_json::json!({})
            }
        );
        assert_eq!(
            decode_line(
                br#"{"id":3,"error":{"class":"GenericError","desc":"boom"}}"#,
                &l
            )
            .unwrap(),
            Message::Error {
                id: Some(3.into()),
                class: "GenericError".into(),
                desc: "boom".into()
            }
        );
        let Message::Event(ev) = decode_line(
            br#"{"event":"X_NEW_THING","data":{"a":[1]},"timestamp":{"seconds":1,"microseconds":2}}"#,
            &l,
        )
        .unwrap() else {
            panic!("not an event")
        };
        assert_eq!(ev.name, "X_NEW_THING");
        assert_eq!(ev.data, serde_json::json!({"a":[1]}));
        assert!(matches!(
            decode_line(br#"{"something":"else"}"#, &l).unwrap(),
            Message::Unknown(_)
        ));
        assert_eq!(decode_line(b"  \r", &l).unwrap(), Message::Blank);
        assert_eq!(
            decode_line(b"{\"return\":1}\r", &l).unwrap(),
            Message::Return {
                id: None,
                value: 1.into()
            }
        );
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        let l = limits(64, 4);
        assert!(matches!(
            decode_line(&[b'{'; 65], &l),
            Err(Error::LineTooLong { limit: 64 })
        ));
        assert!(matches!(
            decode_line(b"[[[[[1]]]]]", &l),
            Err(Error::TooDeep { limit: 4 })
        ));
        // Brackets inside strings do not count, escaped quotes do not end them.
        decode_line(br#"{"a":"[[[[[[\"[[[[["}"#, &l).unwrap();
        assert!(matches!(
            decode_line(b"{\"a\":\"\xff\"}", &l),
            Err(Error::InvalidUtf8 { valid_up_to: 6 })
        ));
        assert!(matches!(
            decode_line(b"{\"a\":", &l),
            Err(Error::InvalidJson { .. })
        ));
        assert!(matches!(
            decode_line(b"[1]", &l),
            Err(Error::NotAnObject { .. })
        ));
        // Exactly at the limits is fine.
        assert!(matches!(
            decode_line(b"[[[[1]]]]", &l),
            Err(Error::NotAnObject { .. })
        ));
        decode_line(br#"{"a":{"b":{"c":{}}}}"#, &l).unwrap();
    }

    #[test]
    fn deep_input_beyond_serde_limit_is_typed_error_not_overflow() {
        let deep = vec![b'['; 1_000_000];
        assert!(matches!(
            decode_line(&deep, &limits(2_000_000, DEFAULT_MAX_DEPTH)),
            Err(Error::TooDeep { .. })
        ));
        // Exactly at the limit parses: the object is one level.
        let inner = DEFAULT_MAX_DEPTH - 1;
        let ok = [
            b"{\"a\":".as_slice(),
            &vec![b'['; inner],
            &vec![b']'; inner],
            b"}",
        ]
        .concat();
        decode_line(&ok, &Limits::default()).unwrap();
    }

    #[test]
    fn line_reader_stops_at_limit_without_buffering_more() {
        let (lines, err) = read_all_lines(vec![b'x'; 10_000], vec![100], 1000, 64);
        assert!(lines.is_empty());
        assert!(matches!(err, Some(Error::LineTooLong { limit: 1000 })));
        let (lines, err) = read_all_lines(b"ab\ncd".to_vec(), vec![1], 10, 8);
        assert_eq!(lines, vec![b"ab".to_vec()]);
        assert!(matches!(err, Some(Error::EofMidLine { partial_bytes: 2 })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any bytes, any chunking: the reader never panics, never yields a
        /// line over the limit, and yields exactly the lines a plain split
        /// gives up to the first overlong one.
        #[test]
        fn line_reader_matches_split_and_is_bounded(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..2048),
            sizes in proptest::collection::vec(1usize..64, 0..8),
            max in 0usize..128,
            buf_cap in 1usize..64,
        ) {
            let (lines, err) = read_all_lines(data.clone(), sizes, max, buf_cap);
            let mut expected: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
            let trailing = expected.pop().unwrap_or_default();
            let mut want = Vec::new();
            let mut want_err = None;
            for l in expected {
                if l.len() > max { want_err = Some("long"); break; }
                want.push(l.to_vec());
            }
            if want_err.is_none() {
                if trailing.len() > max { want_err = Some("long"); }
                else if !trailing.is_empty() { want_err = Some("eof"); }
            }
            for l in &lines { prop_assert!(l.len() <= max); }
            prop_assert_eq!(lines, want);
            match (want_err, err) {
                (None, None) => {}
                (Some("long"), Some(Error::LineTooLong { .. })) => {}
                (Some("eof"), Some(Error::EofMidLine { .. })) => {}
                (w, e) => prop_assert!(false, "expected {:?}, got {:?}", w, e),
            }
        }

        /// Any bytes: decode never panics and deep input is always TooDeep,
        /// never a parser recursion error.
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_line(&data, &Limits::default());
        }

        /// Structured near-JSON: brackets, strings, escapes. Whatever the
        /// parser accepts nests at most max_depth.
        #[test]
        fn decode_bounds_depth(
            tokens in proptest::collection::vec(
                prop_oneof![
                    Just("["), Just("]"), Just("{"), Just("}"), Just("\""), Just("\\"),
                    Just(","), Just(":"), Just("1"), Just("\"k\""), Just("null"),
                ],
                0..400,
            ),
            max_depth in 1usize..20,
        ) {
            let text = tokens.concat();
            let l = limits(1 << 20, max_depth);
            if let Ok(Message::Unknown(obj)) = decode_line(text.as_bytes(), &l) {
                prop_assert!(depth_of(&Value::Object(obj)) <= max_depth);
            }
        }
    }

    fn depth_of(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }
}

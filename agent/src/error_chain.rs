//! The one error-chain printer of the workspace: an error and its causes
//! on one line, `a: b: c`. The CLI, the job layer, the watchdog and the
//! tests all print errors through it, so a cause (why a guest may still be
//! frozen, which NBD offset failed) is never dropped by one printer and
//! shown by another.

/// The error and its causes on one line: `a: b: c`. A cause whose text the
/// previous message already ends with is not repeated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !msg.is_empty() && !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_every_cause_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "outer: disk on fire");
    }
}

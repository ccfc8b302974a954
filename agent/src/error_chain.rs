//! The workspace's one error-chain printer. The protocol crates do not
//! print chains: their errors keep the cause in `source()`, and whoever
//! reports the error (the agent, the CLI, the tests through `shear::chain`)
//! prints the whole chain with [`chain`].

/// The error and its causes on one line: `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_walks_every_source() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}

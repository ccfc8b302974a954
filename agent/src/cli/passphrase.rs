//! Where passphrases come from: a file (`--passphrase-file`), an
//! environment variable (scripts), else a prompt on the terminal (no echo;
//! twice for a new passphrase). Without any of them and without a
//! terminal, a clear error: never a read that waits forever.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context};
use zeroize::Zeroizing;

/// One passphrase's non-interactive sources.
#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'a> {
    /// File holding it (one line; trailing newlines dropped).
    pub file: Option<&'a Path>,
    /// The `--…-file` option naming that file, for messages.
    pub file_option: &'static str,
    /// Environment variable holding it.
    pub env: &'static str,
}

/// The repository key's passphrase.
pub(super) fn key_source(file: Option<&Path>) -> Source<'_> {
    Source {
        file,
        file_option: "--passphrase-file",
        env: "SHEAR_KEY_PASSPHRASE",
    }
}

/// A master key's passphrase.
pub(super) fn master_source(file: Option<&Path>) -> Source<'_> {
    Source {
        file,
        file_option: "--master-passphrase-file",
        env: "SHEAR_MASTER_PASSPHRASE",
    }
}

/// Shortest passphrase accepted for a new key, and the length below which
/// a warning is printed.
const MIN_PASSPHRASE: usize = 8;
const GOOD_PASSPHRASE: usize = 12;

fn given(src: Source<'_>) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    if let Some(p) = src.file {
        let mut text = Zeroizing::new(
            std::fs::read(p)
                .with_context(|| format!("cannot read passphrase file {}", p.display()))?,
        );
        while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            text.pop();
        }
        return Ok(Some(text));
    }
    Ok(std::env::var_os(src.env).map(|v| Zeroizing::new(v.into_encoded_bytes())))
}

fn no_terminal(src: Source<'_>, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "no passphrase for {what}: not on a terminal, so none can be asked; set {} or use {}",
        src.env,
        src.file_option
    )
}

fn prompt(text: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let pw =
        rpassword::prompt_password(text).context("cannot read the passphrase from the terminal")?;
    Ok(Zeroizing::new(pw.into_bytes()))
}

/// The passphrase of an existing key (`what` names it in the prompt).
pub(super) fn existing(src: Source<'_>, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(pw) = given(src)? {
        return Ok(pw);
    }
    if !std::io::stdin().is_terminal() {
        return Err(no_terminal(src, what));
    }
    prompt(&format!("Passphrase for {what}: "))
}

/// A passphrase for a new key: from the file or variable, else asked twice
/// on the terminal (both entries must match). Refused when too short.
pub(super) fn new(src: Source<'_>, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let pw = match given(src)? {
        Some(pw) => pw,
        None => {
            if !std::io::stdin().is_terminal() {
                return Err(no_terminal(src, what));
            }
            let first = prompt(&format!("New passphrase for {what}: "))?;
            check_strength(&first)?;
            let second = prompt(&format!("Repeat the passphrase for {what}: "))?;
            if first != second {
                bail!("the two passphrases differ: nothing was written");
            }
            first
        }
    };
    check_strength(&pw)?;
    Ok(pw)
}

/// Refuses a passphrase shorter than [`MIN_PASSPHRASE`] characters; warns
/// below 12 characters or 5 distinct bytes.
pub(super) fn check_strength(pw: &[u8]) -> anyhow::Result<()> {
    let n = String::from_utf8_lossy(pw).chars().count();
    if n < MIN_PASSPHRASE {
        bail!("passphrase too short: {n} characters, at least {MIN_PASSPHRASE} are required (the key file is only as strong as it)");
    }
    let distinct: std::collections::HashSet<&u8> = pw.iter().collect();
    if n < GOOD_PASSPHRASE || distinct.len() < 5 {
        eprintln!(
            "shear: warning: weak passphrase ({n} characters, {} distinct): use {GOOD_PASSPHRASE} or more varied characters, or several words",
            distinct.len()
        );
    }
    Ok(())
}

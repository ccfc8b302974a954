//! `shear generate man|completions DIR` (hidden): man pages (clap_mangen)
//! and shell completions (clap_complete) generated from the CLI itself,
//! for packaging (`scripts/package`).
//!
//! A subcommand rather than a build script: the pages come from exactly
//! the binary being packaged (no second copy of the CLI definitions in a
//! build script, no build-time output outside `target/`), and a packager
//! can regenerate them from an installed binary.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, ValueEnum};

/// What `shear generate` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GenerateWhat {
    /// Man pages: shear.1 and shear-SUBCOMMAND.1 for each visible subcommand.
    Man,
    /// Completions: shear.bash, _shear (zsh), shear.fish.
    Completions,
}

/// Write `what` into `dir` (created if missing); prints each file written.
pub fn run(what: GenerateWhat, dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = super::Cli::command();
    let written = match what {
        GenerateWhat::Man => man_pages(&cmd, dir)?,
        GenerateWhat::Completions => completions(cmd, dir)?,
    };
    for p in written {
        crate::out!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    // build() names each subcommand "shear-backup", "shear-key-create"…
    // (its display name), which clap_mangen uses for the page's title.
    let mut root = cmd.clone().version(env!("CARGO_PKG_VERSION"));
    root.build();
    let mut todo = vec![root];
    while let Some(c) = todo.pop() {
        // Hidden ones and clap's `help` (the pages say it all) left out.
        for sub in c
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            todo.push(sub.clone().version(env!("CARGO_PKG_VERSION")));
        }
        let name = c
            .get_display_name()
            .unwrap_or_else(|| c.get_name())
            .to_string();
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(c)
            .render(&mut buf)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

fn completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use clap_complete::Shell;
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "shear.bash"),
        (Shell::Zsh, "_shear"),
        (Shell::Fish, "shear.fish"),
    ] {
        let path = dir.join(file);
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "shear", &mut buf);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn man_pages_cover_the_visible_subcommands_only() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = super::super::Cli::command();
        let written = man_pages(&cmd, dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "shear.1",
            "shear-backup.1",
            "shear-restore.1",
            "shear-key-create.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("watchdog") || n.contains("generate")),
            "hidden commands documented: {names:?}"
        );
        let backup = std::fs::read_to_string(dir.path().join("shear-backup.1")).unwrap();
        assert!(
            backup.contains("\\-\\-notify"),
            "backup page lacks --notify"
        );
        assert!(
            backup.contains("\\-\\-script"),
            "backup page lacks --script"
        );
    }
}

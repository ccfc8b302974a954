//! The `shear` command line.
#![forbid(unsafe_code)]

use clap::Parser;

/// Live backup of QEMU/KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "shear", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}

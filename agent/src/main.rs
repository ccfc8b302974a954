//! The `shear` command line.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = shear::cli::Cli::parse();
    match shear::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            shear::cli::print_error(&e);
            ExitCode::FAILURE
        }
    }
}

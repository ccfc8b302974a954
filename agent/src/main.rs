//! The `shear` command line.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Logs (warnings by default; RUST_LOG=shear=debug for phases) go to
    // stderr; a daemon would route the same events to the journal.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = shear::cli::Cli::parse();
    match shear::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            shear::cli::print_error(&e);
            ExitCode::FAILURE
        }
    }
}

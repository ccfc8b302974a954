//! The `shear` command line.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // Logs (warnings by default, info for `shear daemon`; RUST_LOG=shear=debug
    // for phases) go to stderr, which systemd sends to the journal.
    let default_level = if std::env::args().nth(1).as_deref() == Some("daemon") {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rustls warns about client quirks (libnbd sends an IP
                // address as SNI): not the server's problem.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(format!("{default_level},rustls=error"))
                }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = match shear::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; everything else is a
            // usage error, with its own status (2 means "verify found
            // damage").
            return if e.use_stderr() {
                ExitCode::from(shear::cli::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let json = cli.wants_json();
    match shear::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            shear::cli::print_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

//! finhub-sidecar command line: `run`, `check`, `demo`. Wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use finhub_sidecar::config::Config;
#[cfg(feature = "demo")]
use finhub_sidecar::demo;
use finhub_sidecar::{check, logging, server};

/// Sidecar proxy: apps speak plain HTTP to 127.0.0.1, the sidecar speaks mTLS + sessions to FinHub.
#[derive(Parser)]
#[command(name = "finhub-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// Configuration file (see proxy.toml.example).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration and every file it names; exit non-zero on any error.
    Check {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a FinHub emulator and the sidecar on loopback with throwaway certificates.
    #[cfg(feature = "demo")]
    Demo,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config } => {
            finhub_sidecar::lifecycle::ignore_signals_until_handled();
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(config.log.format, &config.log.level);
            for w in &config.warnings {
                tracing::warn!(warning = %w, "configuration warning");
            }
            match server::Sidecar::build(config) {
                Ok(s) => {
                    s.run();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, "finhub-sidecar cannot start");
                    eprintln!("finhub-sidecar: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config } => match check::check(&config, &mut std::io::stdout()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("finhub-sidecar check: {e}");
                ExitCode::from(1)
            }
        },
        #[cfg(feature = "demo")]
        Command::Demo => match demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("finhub-sidecar demo: {e}");
                ExitCode::from(1)
            }
        },
    }
}

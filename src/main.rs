//! The `partner-bridge` binary: parse the command line, load and validate the configuration (exit 64 naming the key
//! when it is invalid), set up logging, and hand over to the library.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use partner_bridge::cli::{Cli, Command};
use partner_bridge::config::{Config, LogFormat};
use partner_bridge::{commands, telemetry};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Config::load(Some(path), env)
        .and_then(|c| c.validate().map(|()| c))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                print!("{}", commands::check_config(&c));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Keygen { out } => report(commands::keygen(&out).map(|id| {
            println!(
                "wrote {0}/signing.key and {0}/signing.pub; key id {id}",
                out.display()
            );
        })),
        Command::Healthcheck { url } => report(commands::healthcheck(&url).await),
        Command::Sandbox {
            listen,
            fixture,
            no_rate_limit,
        } => {
            telemetry::init(LogFormat::Pretty, "info");
            report(partner_bridge::sandbox::run_cli(listen, fixture, !no_rate_limit).await)
        }
        other => {
            telemetry::init(LogFormat::Pretty, "info");
            eprintln!("error: {other:?} is not available in this build yet");
            ExitCode::FAILURE
        }
    }
}

//! The `partner-bridge` binary: parse the command line, load and validate the configuration (exit 64 naming the key
//! when it is invalid), set up logging, and hand over to the library.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use partner_bridge::cli::{Cli, Command, DeadLetterAction, TopologyAction};
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
        Command::Keygen { out, if_missing } => {
            report(commands::keygen(&out, if_missing).map(|done| match done {
                commands::Keygen::Created(id) => println!(
                    "wrote {0}/signing.key and {0}/signing.pub; key id {id}",
                    out.display()
                ),
                commands::Keygen::Kept(id) => {
                    println!("kept the existing key in {}; key id {id}", out.display())
                }
            }))
        }
        Command::Healthcheck { url } => report(commands::healthcheck(&url).await),
        Command::Sandbox {
            listen,
            fixture,
            no_rate_limit,
        } => {
            telemetry::init(LogFormat::Pretty, "info");
            report(partner_bridge::sandbox::run_cli(listen, fixture, !no_rate_limit).await)
        }
        Command::Run { config } => match load(&config) {
            Ok(c) => {
                telemetry::init(c.log.format, &c.log.level);
                report(partner_bridge::app::run(c).await)
            }
            Err(code) => code,
        },
        Command::Demo {
            amqp_url,
            sessions,
            keep_running,
            admin_listen,
            trust_review,
        } => {
            telemetry::init(LogFormat::Pretty, "warn");
            report(
                partner_bridge::demo::run(partner_bridge::demo::DemoOptions {
                    amqp_url,
                    sessions,
                    keep_running,
                    admin_listen,
                    trust_review,
                })
                .await,
            )
        }
        Command::Topology { action } => match action {
            TopologyAction::Show { config } => match load(&config) {
                Ok(c) => {
                    print!("{}", commands::topology_show(&c));
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
            TopologyAction::Declare { config } => match load(&config) {
                Ok(c) => {
                    telemetry::init(LogFormat::Pretty, "warn");
                    report(
                        commands::topology_declare(&c)
                            .await
                            .map(|out| print!("declared:\n{out}")),
                    )
                }
                Err(code) => code,
            },
        },
        Command::DeadLetters { action } => match action {
            DeadLetterAction::List {
                config,
                queue,
                limit,
            } => match load(&config) {
                Ok(c) => {
                    telemetry::init(LogFormat::Pretty, "warn");
                    report(
                        commands::dead_letters_list(&c, &queue, limit)
                            .await
                            .map(|out| print!("{out}")),
                    )
                }
                Err(code) => code,
            },
            DeadLetterAction::Replay {
                config,
                queue,
                limit,
            } => match load(&config) {
                Ok(c) => {
                    telemetry::init(LogFormat::Pretty, "warn");
                    report(
                        commands::dead_letters_replay(&c, &queue, limit)
                            .await
                            .map(|n| {
                                println!("moved {n} message(s) from {queue}.dead back to {queue}")
                            }),
                    )
                }
                Err(code) => code,
            },
        },
    }
}

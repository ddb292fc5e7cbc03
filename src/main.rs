//! The `partner-bridge` binary: parse the command line, load and validate the configuration (exit 64 naming the key
//! when it is invalid), set up logging, and hand over to the library.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use partner_bridge::cli::{
    AuditAction, AuditFilterArgs, Cli, Command, DeadLetterAction, TopologyAction,
};
use partner_bridge::config::{Config, ConfigError, LogFormat};
use partner_bridge::{app, backfill, commands, demo, sandbox, telemetry};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

/// Why a command failed, which decides the exit code.
enum Failure {
    /// The configuration is invalid (every problem found, one line each): exit 64.
    Config(Vec<ConfigError>),
    /// Anything else: exit 1.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

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
    let result = runtime.block_on(dispatch(cli.command));
    // Dropping a runtime waits for its blocking tasks without limit; the drain has had its deadline already.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The last spans, when OTLP export is on (outside the runtime: the exporter's client blocks).
    telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(errors)) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads and validates the configuration file with the process environment's overrides, collecting every problem.
fn load(path: &Path) -> Result<Config, Failure> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Config::load_checked(Some(path), env).map_err(Failure::Config)
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => {
            let config = load(&config)?;
            telemetry::init_run(config.log.format, &config.log.level);
            app::run(config).await?;
        }
        Command::CheckConfig { config } => {
            let config = load(&config)?;
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            print!("{}", commands::check_config(&config));
        }
        Command::Sandbox {
            listen,
            fixture,
            no_rate_limit,
            rate_limit_per_minute,
            rate_limit_headers,
        } => {
            telemetry::init(LogFormat::Pretty, "info");
            let headers = match rate_limit_headers {
                partner_bridge::cli::RateLimitHeadersArg::On429 => sandbox::RateLimitHeaders::On429,
                partner_bridge::cli::RateLimitHeadersArg::Always => {
                    sandbox::RateLimitHeaders::Always
                }
            };
            sandbox::run_cli(
                listen,
                fixture,
                !no_rate_limit,
                rate_limit_per_minute,
                headers,
            )
            .await?;
        }
        Command::Demo {
            amqp_url,
            sessions,
            keep_running,
            admin_listen,
            trust_review,
        } => {
            telemetry::init(LogFormat::Pretty, "warn");
            demo::run(demo::DemoOptions {
                amqp_url,
                sessions,
                keep_running,
                admin_listen,
                trust_review,
            })
            .await?;
        }
        Command::Topology {
            action: TopologyAction::Show { config },
        } => print!("{}", commands::topology_show(&load(&config)?)),
        Command::Topology {
            action: TopologyAction::Declare { config },
        } => {
            let config = load(&config)?;
            telemetry::init_cli("warn");
            print!("declared:\n{}", commands::topology_declare(&config).await?);
        }
        Command::DeadLetters {
            action:
                DeadLetterAction::List {
                    config,
                    queue,
                    limit,
                },
        } => {
            let config = load(&config)?;
            telemetry::init_cli("warn");
            print!(
                "{}",
                commands::dead_letters_list(&config, &queue, limit).await?
            );
        }
        Command::DeadLetters {
            action:
                DeadLetterAction::Replay {
                    config,
                    queue,
                    limit,
                },
        } => {
            let config = load(&config)?;
            telemetry::init_cli("warn");
            let replayed = commands::dead_letters_replay(&config, &queue, limit).await?;
            println!(
                "moved {} message(s) from {queue}.dead back to {queue}",
                replayed.moved
            );
            let left = usize::try_from(replayed.present)
                .unwrap_or(usize::MAX)
                .saturating_sub(replayed.moved);
            if left > 0 {
                println!(
                    "{left} of the {} message(s) there at the start were not moved and stay in {queue}.dead",
                    replayed.present
                );
            }
        }
        Command::Audit { action } => {
            let path = match &action {
                AuditAction::List { config, .. }
                | AuditAction::Export { config, .. }
                | AuditAction::Verify { config }
                | AuditAction::Recipients { config, .. } => config.clone(),
            };
            let config = load(&path)?;
            telemetry::init_cli("warn");
            let rows = |filter: AuditFilterArgs| {
                let config = &config;
                async move {
                    let (audit, _) = commands::open_audit(config).await?;
                    let filter = partner_bridge::audit::Filter {
                        session: filter.session,
                        partner: filter.partner,
                        since: filter.since,
                        until: filter.until,
                    };
                    Ok::<_, anyhow::Error>(audit.rows(&filter).await?)
                }
            };
            let out = match action {
                AuditAction::List { filter, .. } => commands::audit_list(&rows(filter).await?),
                AuditAction::Export { format, filter, .. } => {
                    commands::audit_export(&rows(filter).await?, format)
                }
                AuditAction::Verify { .. } => commands::audit_verify(&config).await?,
                AuditAction::Recipients { session, json, .. } => {
                    commands::audit_recipients(&config, &session, json).await?
                }
            };
            print!("{out}");
        }
        Command::Keygen {
            out,
            rotate,
            if_missing,
            public_out,
        } => {
            let rotate_dir = match rotate {
                Some(Some(dir)) => Some(dir),
                Some(None) => Some(out.clone().ok_or_else(|| {
                    anyhow::anyhow!("--rotate needs a directory (--rotate DIR or --out DIR)")
                })?),
                None => None,
            };
            let out = match (&rotate_dir, out) {
                (Some(dir), _) => dir.clone(),
                (None, Some(out)) => out,
                (None, None) => return Err(anyhow::anyhow!("--out DIR is required").into()),
            };
            let done = match &rotate_dir {
                Some(dir) => commands::keygen_rotate(dir)?,
                None => commands::keygen(&out, if_missing)?,
            };
            match done {
                commands::Keygen::Rotated(id, count) => println!(
                    "added key id {id} to {0}/signing.key ({count} keys; the newest signs) and its public key to {0}/signing.pub",
                    out.display()
                ),
                commands::Keygen::Created(id) => println!(
                    "wrote {0}/signing.key and {0}/signing.pub; key id {id}",
                    out.display()
                ),
                commands::Keygen::Kept(id) => {
                    println!("kept the existing key in {}; key id {id}", out.display())
                }
            }
            if let Some(public_out) = public_out {
                commands::export_public(&out, &public_out)?;
                println!("wrote {}/signing.pub", public_out.display());
            }
        }
        Command::Backfill { config, options } => {
            let config = load(&config)?;
            let plan = backfill::Plan::new(&config, &options).map_err(Failure::Config)?;
            telemetry::init_cli("warn");
            let started = std::time::Instant::now();
            let summary = tokio::select! {
                summary = backfill::run(&config, &plan) => summary?,
                _ = tokio::signal::ctrl_c() => {
                    return Err(anyhow::anyhow!(
                        "interrupted; every session published so far is in the checkpoint: run the same command again to continue"
                    )
                    .into());
                }
            };
            print!(
                "{}",
                backfill::render_summary(&plan, &summary, started.elapsed())
            );
        }
        Command::Notify {
            config,
            session,
            kind,
            reason,
            request_id,
        } => {
            let config = load(&config)?;
            telemetry::init_cli("warn");
            print!(
                "{}",
                commands::notify(&config, &session, kind.into(), reason, request_id).await?
            );
        }
        Command::Healthcheck { url } => commands::healthcheck(&url).await?,
    }
    Ok(())
}

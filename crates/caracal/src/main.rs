//! The `caracal` binary: parses the command line, resolves configuration, and hands off to the
//! library crates. Exit codes: 0 success, 1 runtime failure (including "not ready"), 2 usage
//! or configuration error.

mod admin_http;
mod agent;
mod audit;
mod bench;
mod bench_coordinator;
mod bench_disk;
mod bench_gateway;
mod bench_governed;
mod bench_hotpath;
mod bench_revocation;
mod bench_sts;
mod cli;
mod config;
mod console_users;
mod incident;
mod launcher;
mod logging;
mod preserve;
mod status;

use std::process::ExitCode;

use caracal_core::Role;
use caracal_services::Stack;
use clap::Parser as _;

use crate::cli::{BenchCommand, Cli, Command, ConfigCommand, KeysCommand};
use crate::config::Resolved;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let resolved = match config::resolve(&cli.overrides, &|name| std::env::var(name).ok()) {
        Ok(resolved) => resolved,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Config {
            command: ConfigCommand::Show { json },
        } => show_config(&resolved, json),
        Command::Status(args) => runtime(|| async {
            if status::run(&resolved, &args).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }),
        Command::Bench { command, governed } => runtime(|| async {
            // Interrupted, the benchmark is dropped where it stands: every process it started
            // (the stack, nginx) is stopped by its owner and its scratch directories removed.
            let interrupted = shutdown_signal();
            let work = async {
                match &command {
                    None => bench_governed::run(&governed).await,
                    Some(BenchCommand::Backends(args)) => bench::run(args).await,
                    Some(BenchCommand::Audit(args)) => bench::audit(args).await,
                    Some(BenchCommand::Sts(args)) => bench_sts::run(args).await,
                    Some(BenchCommand::Coordinator(args)) => bench_coordinator::run(args).await,
                    Some(BenchCommand::Gateway(args)) => bench_gateway::run(args).await,
                    Some(BenchCommand::Hotpath(args)) => bench_hotpath::run(args).await,
                    Some(BenchCommand::Revocation(args)) => bench_revocation::run(args).await,
                }
            };
            let result = tokio::select! {
                result = work => result,
                () = interrupted => Err(anyhow::anyhow!(
                    "interrupted: the processes the benchmark started are stopped"
                )),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }),
        Command::Incident { command } => runtime(|| async {
            match incident::run(&resolved, &command).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_FAILURE),
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }),
        Command::Console { command } => runtime(|| async {
            match console_users::run(&resolved.settings, &command).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_FAILURE),
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }),
        Command::Audit { command } => runtime(|| async {
            match audit::run(&resolved.settings, &command).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_FAILURE),
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }),
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    zone,
                    overlap_seconds,
                    reason,
                    token_file,
                },
        } => runtime(|| async {
            let path = format!("/v1/zones/{zone}/signing-keys/rotate");
            let body = serde_json::json!({ "overlap_seconds": overlap_seconds, "reason": reason });
            match admin_http::post(&resolved.settings, token_file.as_deref(), &path, body).await {
                Ok((status, answer)) if status.is_success() => {
                    println!(
                        "zone `{zone}` now signs with key {}",
                        answer
                            .get("kid")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("?")
                    );
                    ExitCode::SUCCESS
                }
                Ok((status, answer)) => {
                    println!(
                        "refused ({}): {}",
                        status.as_u16(),
                        admin_http::error_code(&answer)
                    );
                    ExitCode::from(EXIT_FAILURE)
                }
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }),
        Command::Run(args) => {
            let sts_url = args
                .sts_url
                .or_else(|| std::env::var("CARACAL_STS_URL").ok())
                .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
            runtime(|| launcher::run(&sts_url, &args.command))
        }
        Command::Up => serve(&resolved, &Role::ALL),
        Command::Serve { mut roles } => {
            roles.sort();
            roles.dedup();
            serve(&resolved, &roles)
        }
    }
}

fn runtime<F, Fut>(body: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(body()),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn serve(resolved: &Resolved, roles: &[Role]) -> ExitCode {
    logging::init(resolved.log_format, &resolved.log_filter);
    runtime(|| async {
        let shutdown = shutdown_signal();
        let mut stack = match Stack::start(&resolved.settings, roles).await {
            Ok(stack) => stack,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        stack.set_operator_tools(std::sync::Arc::new(incident::Tools::new(resolved.clone())));
        print_banner(&stack);
        match stack.serve(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

fn print_banner(stack: &Stack) {
    let home = stack.data_dir().path();
    println!(
        "caracal {} — data in {}",
        env!("CARGO_PKG_VERSION"),
        home.display()
    );
    for (role, address) in stack.addresses() {
        println!("  {:<12} http://{address}", role.name());
    }
    let token_path = home.join(caracal_store::ADMIN_TOKEN_FILE);
    match stack.minted_token() {
        Some(token) => {
            println!(
                "Bootstrap admin token (shown once; also in {}):",
                token_path.display()
            );
            println!("  {}", token.expose());
        }
        None => println!("Bootstrap admin token: see {}", token_path.display()),
    }
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that arrives during start-up is not lost (and does
/// not kill the process with the default action).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot listen for SIGTERM/SIGINT; stopping only on Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

fn show_config(resolved: &Resolved, json: bool) -> ExitCode {
    if json {
        let rows: Vec<serde_json::Value> = resolved
            .shown
            .iter()
            .map(|(key, value, source)| {
                serde_json::json!({ "key": key, "value": value, "source": source.to_string() })
            })
            .collect();
        match serde_json::to_string_pretty(&rows) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
        return ExitCode::SUCCESS;
    }
    let width = resolved
        .shown
        .iter()
        .map(|(key, _, _)| key.len())
        .max()
        .unwrap_or(0);
    let value_width = resolved
        .shown
        .iter()
        .map(|(_, value, _)| value.len())
        .max()
        .unwrap_or(0);
    for (key, value, source) in &resolved.shown {
        println!("{key:<width$}  {value:<value_width$}  {source}");
    }
    ExitCode::SUCCESS
}

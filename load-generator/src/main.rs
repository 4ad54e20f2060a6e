//! `dps-load`: simulates many devices registering over real HTTPS, each with its own TLS
//! connection as a device on first boot, and reports throughput, latency percentiles and errors
//! by code, as text or JSON.
//!
//! - `dps-load run`: against a running server. It creates the enrollments it needs through the
//!   admin API (individual symmetric-key enrollments in bulk, a symmetric-key group, or an X.509
//!   group with a CA whose device certificates it issues in software).
//! - `dps-load ceiling`: against a minimal server built from the same TLS stack and accept loop,
//!   answering the same requests with canned answers: the most this machine could do.
//! - `dps-load run --compare-ceiling`: both in one process, and the service's rate as a ratio
//!   of the ceiling's (compare ratios, not absolute rates, across machines).

mod ceiling;
mod devices;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::devices::{Fleet, Mode};
use crate::report::Report;

#[derive(Debug, Parser)]
#[command(name = "dps-load", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register simulated devices with a running server.
    Run(RunArgs),
    /// Register simulated devices with a canned in-process server (the ceiling).
    Ceiling(LoadArgs),
    /// Create many individual enrollments through the bulk admin API and report the rate (the
    /// scale benchmark's first half; its devices never register).
    Import(ImportArgs),
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// How many enrollments.
    #[arg(long, default_value_t = 100_000)]
    enrollments: usize,
    /// Bulk requests in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "DPS_ENDPOINT", default_value = "https://localhost:8443")]
    endpoint: String,
    /// A connection string with EnrollmentWrite (the owner policy's, printed at start).
    #[arg(long, env = "DPS_CONNECTION_STRING", hide_env_values = true)]
    connection_string: String,
    /// PEM CA certificate the server's certificate chains to.
    #[arg(long, env = "DPS_CA_CERT")]
    ca_cert: PathBuf,
}

/// Report format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// How many devices register.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// How many register at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Attestation of the simulated devices.
    #[arg(long, value_enum, default_value = "group")]
    mode: Mode,
    /// Poll every this many milliseconds instead of honouring Retry-After (to measure the
    /// service rather than the devices' patience).
    #[arg(long)]
    poll_ms: Option<u64>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    server: ServerArgs,
    /// The instance's ID scope (printed at start).
    #[arg(long, env = "DPS_ID_SCOPE")]
    id_scope: String,
    /// Also measure the ceiling in this process and report the ratio.
    #[arg(long)]
    compare_ceiling: bool,
}

fn print(output: Output, reports: &[Report]) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let ratio = ceiling_ratio(reports);
            let value = serde_json::json!({ "runs": reports, "ratioOfCeiling": ratio });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Output::Text => {
            for report in reports {
                println!("{report}");
            }
            if let Some(ratio) = ceiling_ratio(reports) {
                println!("service / ceiling throughput: {ratio:.3}");
            }
        }
    }
    Ok(())
}

fn ceiling_ratio(reports: &[Report]) -> Option<f64> {
    let ceiling = reports.iter().find(|r| r.target == "ceiling")?;
    let service = reports.iter().find(|r| r.target == "service")?;
    (ceiling.throughput_per_sec > 0.0)
        .then(|| service.throughput_per_sec / ceiling.throughput_per_sec)
}

async fn measure_ceiling(load: &LoadArgs) -> anyhow::Result<Report> {
    let server = ceiling::start().await?;
    let fleet = Fleet::for_ceiling(load.mode, load.devices, &server.ca_certificate)?;
    let report = fleet
        .register_all(
            "ceiling",
            &server.endpoint,
            &server.id_scope,
            load.concurrency,
            load.poll_ms.map(Duration::from_millis),
        )
        .await;
    server.stop().await;
    Ok(report)
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Ceiling(load) => {
            let report = measure_ceiling(&load).await?;
            print(load.output, &[report])
        }
        Command::Run(args) => {
            let mut reports = Vec::new();
            if args.compare_ceiling {
                reports.push(measure_ceiling(&args.load).await?);
            }
            let admin = devices::admin(
                &args.server.endpoint,
                &args.server.connection_string,
                &args.server.ca_cert,
            )?;
            eprintln!(
                "creating {} {:?} enrollments...",
                args.load.devices, args.load.mode
            );
            let fleet = Fleet::enroll(
                &admin,
                args.load.mode,
                args.load.devices,
                &args.server.ca_cert,
            )
            .await
            .context("creating the enrollments")?;
            let report = fleet
                .register_all(
                    "service",
                    &args.server.endpoint,
                    &args.id_scope,
                    args.load.concurrency,
                    args.load.poll_ms.map(Duration::from_millis),
                )
                .await;
            reports.push(report);
            print(args.load.output, &reports)
        }
        Command::Import(args) => {
            let server = &args.server;
            let admin = Arc::new(devices::admin(
                &server.endpoint,
                &server.connection_string,
                &server.ca_cert,
            )?);
            let started = std::time::Instant::now();
            devices::import(admin, args.enrollments, args.concurrency).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "imported {} individual enrollments in {secs:.1} s: {:.0} enrollments/s",
                args.enrollments,
                args.enrollments as f64 / secs
            );
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Arc::new(runtime),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

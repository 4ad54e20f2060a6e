//! `dps-load`: simulates many devices registering over real HTTPS, each with its own TLS
//! connection as a device on first boot, and reports throughput, latency percentiles and errors
//! by code, as text or JSON.
//!
//! - `dps-load run`: against a running server. It creates the enrollments it needs through the
//!   admin API (individual symmetric-key enrollments in bulk, a symmetric-key group, or an X.509
//!   group with a CA whose device certificates it issues in software).
//! - `dps-load serve-ceiling`: a minimal server built from the same TLS stack and accept loop,
//!   answering the same requests with canned answers: the most this machine could do. It is a
//!   process of its own, so that its CPU is measured like the service's.
//! - `dps-load ceiling`: the same devices against that ceiling (they need no enrollments).
//!
//! `--light` skips verifying the server's certificate, so that the generator costs less than
//! what it measures (benchmarks only). `scripts/bench-load.sh` runs both and compares the CPU
//! each server spent per registration.

mod ceiling;
mod connection;
mod cpu;
mod devices;
mod mqtt;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::devices::{Fleet, Mode, Trust};
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
    /// Register simulated devices with a running ceiling server (`serve-ceiling`).
    Ceiling(CeilingArgs),
    /// Serve the ceiling until SIGINT or SIGTERM: the service's TLS configuration and accept
    /// loop with canned answers.
    ServeCeiling(ServeCeilingArgs),
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
struct CeilingArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// The ceiling's base URL.
    #[arg(long, default_value = "https://localhost:8444")]
    endpoint: String,
    /// The CA the ceiling printed (not needed with `--light`).
    #[arg(long, required_unless_present = "light")]
    ca_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeCeilingArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: std::net::SocketAddr,
    /// Directory for its TLS material (created if missing; the CA is `ca.pem` there).
    #[arg(long)]
    dir: PathBuf,
    /// Also serve MQTT over TLS here (the service's MQTT sessions over the canned answers).
    #[arg(long)]
    mqtt_listen: Option<std::net::SocketAddr>,
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
    /// Do not verify the server's certificate (benchmarks against 127.0.0.1 only): the light
    /// client, so that the load generator is not the bottleneck.
    #[arg(long)]
    light: bool,
    /// Register over MQTT at the endpoint's host on this port instead of HTTPS (symmetric-key
    /// and X.509 modes).
    #[arg(long)]
    mqtt_port: Option<u16>,
    /// Report the CPU this process spent during the registrations (repeatable).
    #[arg(long = "cpu-pid", value_name = "PID")]
    cpu_pids: Vec<u32>,
    /// Report the CPU every process of this command name spent (repeatable; `postgres`).
    #[arg(long = "cpu-command", value_name = "NAME")]
    cpu_commands: Vec<String>,
}

impl LoadArgs {
    /// Registers `fleet` with the server at `endpoint`, reading the CPU of the processes named
    /// by the options before and after.
    async fn register(
        &self,
        fleet: Fleet,
        target: &str,
        endpoint: &str,
        scope: &str,
    ) -> anyhow::Result<Report> {
        let targets: Vec<cpu::Target> = self
            .cpu_pids
            .iter()
            .map(|&pid| cpu::Target::Pid(pid))
            .chain(self.cpu_commands.iter().cloned().map(cpu::Target::Command))
            .collect();
        let before = cpu::before(&targets).context("reading /proc")?;
        let mut report = fleet
            .register_all(
                target,
                endpoint,
                scope,
                self.concurrency,
                self.poll_ms.map(Duration::from_millis),
                self.mqtt_port,
            )
            .await?;
        report.cpu = before.spent(report.assigned).context("reading /proc")?;
        Ok(report)
    }

    fn trust(&self, ca_cert: Option<&std::path::Path>) -> anyhow::Result<Trust> {
        match (self.light, ca_cert) {
            (true, _) => Ok(Trust::Unverified),
            (false, Some(ca)) => Ok(Trust::Ca(ca.to_owned())),
            (false, None) => anyhow::bail!("--ca-cert is needed unless --light"),
        }
    }
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
}

fn print(output: Output, report: &Report) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(report)?),
        Output::Text => println!("{report}"),
    }
    Ok(())
}

/// Serves the ceiling until SIGINT or SIGTERM.
async fn serve_ceiling(args: &ServeCeilingArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let server = ceiling::start(args.listen, &args.dir, args.mqtt_listen).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening: {}", server.endpoint)?;
    if let Some(mqtt) = server.mqtt {
        writeln!(out, "mqtt: {mqtt}")?;
    }
    writeln!(out, "ca-certificate: {}", server.ca_certificate.display())?;
    out.flush()?;
    drop(out);
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    server.stop().await;
    Ok(())
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::ServeCeiling(args) => serve_ceiling(&args).await,
        Command::Ceiling(args) => {
            let trust = args.load.trust(args.ca_cert.as_deref())?;
            let fleet = Fleet::for_ceiling(args.load.mode, args.load.devices, &trust)?;
            // The ceiling answers any scope.
            let report = args
                .load
                .register(fleet, "ceiling", &args.endpoint, "0ne00CE1L1N")
                .await?;
            print(args.load.output, &report)
        }
        Command::Run(args) => {
            let admin = devices::admin(
                &args.server.endpoint,
                &args.server.connection_string,
                &args.server.ca_cert,
            )?;
            let trust = args.load.trust(Some(&args.server.ca_cert))?;
            eprintln!(
                "creating {} {:?} enrollments...",
                args.load.devices, args.load.mode
            );
            let fleet = Fleet::enroll(&admin, args.load.mode, args.load.devices, &trust)
                .await
                .context("creating the enrollments")?;
            let report = args
                .load
                .register(fleet, "service", &args.server.endpoint, &args.id_scope)
                .await?;
            print(args.load.output, &report)
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

//! The command line: `dps-server serve` and `dps-server admin ...`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

/// A self-hostable device provisioning service, wire-compatible with Azure IoT Hub DPS.
#[derive(Debug, Parser)]
#[command(name = "dps-server", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Manage a running service through its admin API (the same as `dps-admin`).
    Admin(Box<dps_admin::AdminArgs>),
}

/// `serve` flags; each overrides the configuration file and `DPS_*` variables.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "DPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the SQLite database and generated certificates [default: ./dps-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the HTTPS listener [default: 0.0.0.0:8443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// `sqlite://FILE` or `postgres://USER:PASSWORD@HOST/DB` [default: SQLite in the data dir].
    #[arg(long)]
    pub database_url: Option<String>,
}

/// Parses the command line, runs it and prints any error with its causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Admin(args) => dps_admin::run(*args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        database_url: args.database_url,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    crate::observability::init_logging(&config.log);
    crate::server::run(config).await
}

//! `dps-admin`: the admin CLI on its own (the same as `dps-server admin`).

use std::process::ExitCode;

use clap::Parser;

/// Manages a running dps-server through its admin API.
#[derive(Debug, Parser)]
#[command(name = "dps-admin", version)]
struct Cli {
    #[command(flatten)]
    args: dps_admin::AdminArgs,
}

fn main() -> ExitCode {
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
    match runtime.block_on(dps_admin::run(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

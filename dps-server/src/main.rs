//! `dps-server`: run the service (`serve`) or manage it (`admin`).

use std::process::ExitCode;

fn main() -> ExitCode {
    dps_server::cli::main()
}

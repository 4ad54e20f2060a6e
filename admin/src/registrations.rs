//! `registration ...`: devices' registration states.

use clap::Subcommand;
use dps_admin_client::{Client, Method, segment};

use crate::print::{self, Output};

/// Commands on registration states.
#[derive(Debug, Subcommand)]
pub enum RegistrationCommand {
    /// List the registrations of an enrollment group.
    List {
        /// The group.
        #[arg(long)]
        group: String,
    },
    /// Show one.
    Show {
        /// Registration id.
        id: String,
    },
    /// Delete one, so the device registers afresh.
    Delete {
        /// Registration id.
        id: String,
    },
}

/// Runs a registration command.
pub async fn run(
    client: &Client,
    output: Output,
    command: &RegistrationCommand,
) -> anyhow::Result<()> {
    let one = |id: &str| format!("/registrations/{}", segment(id));
    match command {
        RegistrationCommand::List { group } => {
            let path = format!("/registrations/{}/query", segment(group));
            let columns = [
                "registrationId",
                "status",
                "assignedHub",
                "deviceId",
                "lastUpdatedDateTimeUtc",
            ];
            print::list(client, output, Method::POST, &path, true, &columns).await
        }
        RegistrationCommand::Show { id } => print::show(client, output, &one(id), true).await,
        RegistrationCommand::Delete { id } => {
            print::delete(client, output, &one(id), true, id).await
        }
    }
}

//! `hub ...`: linked hubs.

use clap::Subcommand;
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output, set_opt};

/// Commands on linked hubs.
#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// List all.
    List,
    /// Show one.
    Show {
        /// Host name.
        host_name: String,
    },
    /// Create or replace one.
    Set {
        /// Host name devices connect to.
        host_name: String,
        /// Allocation weight, 1 to 1000.
        #[arg(long)]
        weight: Option<u32>,
        /// Region name.
        #[arg(long)]
        region: Option<String>,
        /// Latitude in degrees.
        #[arg(long, requires = "longitude", allow_negative_numbers = true)]
        latitude: Option<f64>,
        /// Longitude in degrees.
        #[arg(long, requires = "latitude", allow_negative_numbers = true)]
        longitude: Option<f64>,
        /// Keep the hub out of automatic allocation (enrollments may still name it).
        #[arg(long)]
        no_apply_allocation_policy: bool,
    },
    /// Unlink one.
    Delete {
        /// Host name.
        host_name: String,
    },
}

/// Runs a hub command.
pub async fn run(client: &Client, output: Output, command: &HubCommand) -> anyhow::Result<()> {
    let one = |host: &str| format!("/linkedHubs/{}", segment(host));
    match command {
        HubCommand::List => {
            let columns = [
                "hostName",
                "allocationWeight",
                "applyAllocationPolicy",
                "region",
                "connector.type",
            ];
            print::list(client, output, Method::GET, "/linkedHubs", true, &columns).await
        }
        HubCommand::Show { host_name } => print::show(client, output, &one(host_name), true).await,
        HubCommand::Set {
            host_name,
            weight,
            region,
            latitude,
            longitude,
            no_apply_allocation_policy,
        } => {
            let mut body = json!({
                "hostName": host_name,
                "applyAllocationPolicy": !no_apply_allocation_policy,
            });
            set_opt(&mut body, "allocationWeight", weight.map(Value::from));
            set_opt(&mut body, "region", region.clone().map(Value::from));
            set_opt(&mut body, "latitude", latitude.map(Value::from));
            set_opt(&mut body, "longitude", longitude.map(Value::from));
            let value = print::call(
                client,
                Method::PUT,
                &one(host_name),
                true,
                Some(&body),
                Some("*"),
            )
            .await?;
            print::one(output, value);
            Ok(())
        }
        HubCommand::Delete { host_name } => {
            print::delete(client, output, &one(host_name), true, host_name).await
        }
    }
}

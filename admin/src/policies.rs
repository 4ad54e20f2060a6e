//! `policy ...`, `token` and `connection-string`: shared access policies and the credentials
//! made from them.

use std::time::Duration;

use clap::Subcommand;
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output, pretty};

/// Commands on shared access policies.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List all.
    List,
    /// Show one (without keys).
    Show {
        /// Key name.
        name: String,
    },
    /// Create or replace one; keys are generated unless it exists.
    Set {
        /// Key name.
        name: String,
        /// Rights, comma-separated (ServiceConfig, EnrollmentRead, EnrollmentWrite,
        /// RegistrationStatusRead, RegistrationStatusWrite).
        #[arg(long, value_delimiter = ',', required = true)]
        rights: Vec<String>,
    },
    /// Delete one.
    Delete {
        /// Key name.
        name: String,
    },
}

/// Runs a policy command.
pub async fn run(client: &Client, output: Output, command: &PolicyCommand) -> anyhow::Result<()> {
    let one = |name: &str| format!("/accessPolicies/{}", segment(name));
    match command {
        PolicyCommand::List => {
            let columns = ["keyName", "rights"];
            print::list(
                client,
                output,
                Method::GET,
                "/accessPolicies",
                true,
                &columns,
            )
            .await
        }
        PolicyCommand::Show { name } => print::show(client, output, &one(name), true).await,
        PolicyCommand::Set { name, rights } => {
            let body = json!({ "keyName": name, "rights": rights });
            let mut value = print::call(
                client,
                Method::PUT,
                &one(name),
                true,
                Some(&body),
                Some("*"),
            )
            .await?;
            // Keys are for `connection-string` to show, on request.
            if let Some(Value::Object(map)) = &mut value {
                map.remove("primaryKey");
                map.remove("secondaryKey");
            }
            print::one(output, value);
            Ok(())
        }
        PolicyCommand::Delete { name } => {
            print::delete(client, output, &one(name), true, name).await
        }
    }
}

/// `token`: a SAS token for the connection string's policy.
pub fn token(client: &Client, output: Output, lifetime: u64) {
    let token = client.token(Duration::from_secs(lifetime));
    match output {
        Output::Json => println!("{}", pretty(&json!({ "authorization": token }))),
        Output::Table => println!("{token}"),
    }
}

/// `connection-string`: a policy's connection string (it contains the key).
pub async fn connection_string(
    client: &Client,
    output: Output,
    policy: &str,
) -> anyhow::Result<()> {
    let text = client.connection_string(policy).await?;
    match output {
        Output::Json => println!("{}", pretty(&json!({ "connectionString": text }))),
        Output::Table => println!("{text}"),
    }
    Ok(())
}

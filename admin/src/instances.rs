//! `instance ...`: instances (tenants), managed with `ServiceConfig` on the admin instance.

use anyhow::Context;
use clap::Subcommand;
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output, pretty, set_opt, str_at};

/// Commands on instances.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// List all.
    List,
    /// Show one.
    Show {
        /// Name.
        name: String,
    },
    /// Create one; prints its owner policy's connection string.
    Create {
        /// Name.
        name: String,
        /// Host name admins use for it (repeat for several).
        #[arg(long = "host-name")]
        host_names: Vec<String>,
        /// Fixed ID scope (generated when absent).
        #[arg(long)]
        id_scope: Option<String>,
    },
    /// Delete one and everything in it.
    Delete {
        /// Name.
        name: String,
    },
}

/// Runs an instance command.
pub async fn run(client: &Client, output: Output, command: &InstanceCommand) -> anyhow::Result<()> {
    let one = |name: &str| format!("/instances/{}", segment(name));
    match command {
        InstanceCommand::List => {
            let columns = ["name", "idScope", "hostNames", "defaultAllocationPolicy"];
            print::list(client, output, Method::GET, "/instances", false, &columns).await
        }
        InstanceCommand::Show { name } => print::show(client, output, &one(name), false).await,
        InstanceCommand::Create {
            name,
            host_names,
            id_scope,
        } => {
            let mut body = json!({ "name": name, "hostNames": host_names });
            set_opt(&mut body, "idScope", id_scope.clone().map(Value::from));
            let value = print::call(client, Method::PUT, &one(name), false, Some(&body), None)
                .await?
                .context("the server returned no instance")?;
            created(output, &value);
            Ok(())
        }
        InstanceCommand::Delete { name } => {
            print::delete(client, output, &one(name), false, name).await
        }
    }
}

/// A new instance: its ID scope and owner connection string (shown once), or the JSON.
fn created(output: Output, value: &Value) {
    if output == Output::Json {
        println!("{}", pretty(value));
        return;
    }
    println!("id-scope: {}", str_at(value, "idScope"));
    if let (Some(host), Some(key)) = (
        value.pointer("/hostNames/0").and_then(Value::as_str),
        value
            .pointer("/ownerPolicy/primaryKey")
            .and_then(Value::as_str),
    ) {
        println!(
            "service-connection-string: HostName={host};SharedAccessKeyName={};SharedAccessKey={key}",
            str_at(value, "ownerPolicy.keyName")
        );
    }
}

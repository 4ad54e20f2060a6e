//! `owner ...` and `ownership ...`: owners and their hubs, and who owns which device (for the
//! `ownership` allocation policy).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output};

/// Commands on owners.
#[derive(Debug, Subcommand)]
pub enum OwnerCommand {
    /// List all, with their device counts.
    List,
    /// Show one.
    Show {
        /// Name.
        name: String,
    },
    /// Create or replace one.
    Set {
        /// Name.
        name: String,
        /// Host name of a linked hub its devices go to (repeat for several).
        #[arg(long = "hub", required = true)]
        hubs: Vec<String>,
    },
    /// Delete one that owns no devices.
    Delete {
        /// Name.
        name: String,
    },
    /// List the devices an owner owns.
    Devices {
        /// Name.
        name: String,
    },
}

/// How a device is named on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceKind {
    /// By registration id.
    RegistrationId,
    /// By X.509 certificate serial (hex).
    CertificateSerial,
    /// By SHA-256 of the TPM endorsement key (hex).
    EkHash,
}

impl DeviceKind {
    fn field(self) -> &'static str {
        match self {
            DeviceKind::RegistrationId => "registrationId",
            DeviceKind::CertificateSerial => "certificateSerial",
            DeviceKind::EkHash => "ekHash",
        }
    }
}

/// Import file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportFormat {
    /// A header row with `owner` and `registrationId`, `certificateSerial` or `ekHash`.
    Csv,
    /// One JSON record per line.
    Jsonl,
}

/// Commands on ownership records.
#[derive(Debug, Subcommand)]
pub enum OwnershipCommand {
    /// Import records from a CSV or JSON-lines file, all or nothing.
    Import {
        /// The file.
        file: PathBuf,
        /// Its format (default: from the extension, `.csv` or `.jsonl`/`.ndjson`).
        #[arg(long, value_enum)]
        format: Option<ImportFormat>,
    },
    /// Move devices from one owner to another, all or nothing.
    Transfer {
        /// The current owner.
        #[arg(long)]
        from: String,
        /// The new owner.
        #[arg(long)]
        to: String,
        /// How the devices are named.
        #[arg(long, value_enum, default_value = "registration-id")]
        by: DeviceKind,
        /// The devices.
        #[arg(required = true)]
        devices: Vec<String>,
    },
    /// Show who owns a device.
    Show {
        /// How the device is named.
        #[arg(value_enum)]
        kind: DeviceKind,
        /// Its registration id, certificate serial or EK hash.
        value: String,
    },
    /// Forget who owns a device.
    Delete {
        /// How the device is named.
        #[arg(value_enum)]
        kind: DeviceKind,
        /// Its registration id, certificate serial or EK hash.
        value: String,
    },
}

/// Runs an owner command.
pub async fn owners(client: &Client, output: Output, command: &OwnerCommand) -> anyhow::Result<()> {
    let one = |name: &str| format!("/owners/{}", segment(name));
    match command {
        OwnerCommand::List => {
            let columns = ["name", "hubs", "deviceCount"];
            print::list(client, output, Method::GET, "/owners", true, &columns).await
        }
        OwnerCommand::Show { name } => print::show(client, output, &one(name), true).await,
        OwnerCommand::Set { name, hubs } => {
            let body = json!({ "name": name, "hubs": hubs });
            let value = print::call(
                client,
                Method::PUT,
                &one(name),
                true,
                Some(&body),
                Some("*"),
            )
            .await?;
            print::one(output, value);
            Ok(())
        }
        OwnerCommand::Delete { name } => {
            print::delete(client, output, &one(name), true, name).await
        }
        OwnerCommand::Devices { name } => {
            let columns = ["registrationId", "certificateSerial", "ekHash", "owner"];
            let path = format!("{}/devices", one(name));
            print::list(client, output, Method::GET, &path, true, &columns).await
        }
    }
}

/// Runs an ownership command.
pub async fn records(
    client: &Client,
    output: Output,
    command: &OwnershipCommand,
) -> anyhow::Result<()> {
    let one = |kind: &DeviceKind, value: &str| {
        format!("/ownershipRecords/{}/{}", kind.field(), segment(value))
    };
    match command {
        OwnershipCommand::Import { file, format } => {
            let format = match format {
                Some(format) => *format,
                None => match file.extension().and_then(|e| e.to_str()) {
                    Some("csv") => ImportFormat::Csv,
                    Some("jsonl" | "ndjson") => ImportFormat::Jsonl,
                    _ => bail!(
                        "cannot tell the format of {}: pass --format",
                        file.display()
                    ),
                },
            };
            let content_type = match format {
                ImportFormat::Csv => "text/csv",
                ImportFormat::Jsonl => "application/x-ndjson",
            };
            let body =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let answer = client.import_ownership(content_type, body).await?;
            print::one(output, Some(answer));
            Ok(())
        }
        OwnershipCommand::Transfer {
            from,
            to,
            by,
            devices,
        } => {
            let devices: Vec<Value> = devices.iter().map(|d| json!({ by.field(): d })).collect();
            let body = json!({ "from": from, "to": to, "devices": devices });
            let value = print::call(
                client,
                Method::POST,
                "/ownershipRecords:transfer",
                true,
                Some(&body),
                None,
            )
            .await?;
            print::one(output, value);
            Ok(())
        }
        OwnershipCommand::Show { kind, value } => {
            print::show(client, output, &one(kind, value), true).await
        }
        OwnershipCommand::Delete { kind, value } => {
            print::delete(client, output, &one(kind, value), true, value).await
        }
    }
}

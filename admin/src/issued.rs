//! `issued-certificate ...`: operational certificates the server issued for devices' CSRs,
//! and their revocation.

use clap::Subcommand;
use dps_admin_client::{Client, Method, segment};
use serde_json::json;

use crate::print::{self, Output};

/// Commands on issued certificates.
#[derive(Debug, Subcommand)]
pub enum IssuedCommand {
    /// List them (not yet expired), all or a device's.
    List {
        /// Only this device's.
        #[arg(long)]
        registration_id: Option<String>,
    },
    /// Show one.
    Show {
        /// Serial number (hex).
        serial: String,
    },
    /// Revoke one: it no longer admits its device.
    Revoke {
        /// Serial number (hex).
        serial: String,
        /// Why (kept with the record).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs an issued-certificate command.
pub async fn run(client: &Client, output: Output, command: &IssuedCommand) -> anyhow::Result<()> {
    let one = |serial: &str| format!("/issuedCertificates/{}", segment(serial));
    match command {
        IssuedCommand::List { registration_id } => {
            let path = match registration_id {
                Some(id) => format!("/registrations/{}/issuedCertificates", segment(id)),
                None => "/issuedCertificates".to_owned(),
            };
            let columns = [
                "serialNumber",
                "registrationId",
                "notAfter",
                "revokedDateTimeUtc",
                "credentialPolicyName",
            ];
            print::list(client, output, Method::GET, &path, true, &columns).await
        }
        IssuedCommand::Show { serial } => print::show(client, output, &one(serial), true).await,
        IssuedCommand::Revoke { serial, reason } => {
            let body = match reason {
                Some(reason) => json!({ "reason": reason }),
                None => json!({}),
            };
            let revoked = print::call(
                client,
                Method::POST,
                &format!("{}/revoke", one(serial)),
                true,
                Some(&body),
                None,
            )
            .await?;
            print::one(output, revoked);
            Ok(())
        }
    }
}

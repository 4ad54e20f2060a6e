//! `certificate ...`: CA certificates for groups' `caReferences`, with proof of possession.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output, pretty, str_at};

/// Commands on CA certificates.
#[derive(Debug, Subcommand)]
pub enum CertificateCommand {
    /// List all, with their verification state.
    List,
    /// Show one.
    Show {
        /// Name.
        name: String,
    },
    /// Upload (or replace) one from a PEM file; it starts unverified.
    Upload {
        /// Name, used in caReferences.
        name: String,
        /// PEM file.
        file: PathBuf,
    },
    /// Print a verification code: sign a certificate whose CN is the code with the CA's key.
    VerificationCode {
        /// Name.
        name: String,
    },
    /// Prove possession with a certificate (PEM file) whose CN is the verification code.
    Verify {
        /// Name.
        name: String,
        /// PEM file of the verification certificate.
        file: PathBuf,
    },
    /// Delete one.
    Delete {
        /// Name.
        name: String,
    },
}

/// Runs a certificate command.
pub async fn run(
    client: &Client,
    output: Output,
    command: &CertificateCommand,
) -> anyhow::Result<()> {
    let one = |name: &str| format!("/certificates/{}", segment(name));
    let pem = |file: &Path| {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    };
    match command {
        CertificateCommand::List => {
            let columns = ["name", "isVerified", "info.subjectName", "info.notAfterUtc"];
            print::list(client, output, Method::GET, "/certificates", true, &columns).await
        }
        CertificateCommand::Show { name } => print::show(client, output, &one(name), true).await,
        CertificateCommand::Upload { name, file } => {
            let body = json!({ "name": name, "certificate": pem(file)? });
            let mut value = print::call(
                client,
                Method::PUT,
                &one(name),
                true,
                Some(&body),
                Some("*"),
            )
            .await?;
            if let Some(Value::Object(map)) = &mut value {
                map.remove("certificate");
            }
            print::one(output, value);
            Ok(())
        }
        CertificateCommand::VerificationCode { name } => {
            let path = format!("{}/generateVerificationCode", one(name));
            let value =
                print::call(client, Method::POST, &path, true, Some(&json!({})), None).await?;
            let code = value
                .as_ref()
                .map(|v| str_at(v, "verificationCode"))
                .unwrap_or_default();
            match output {
                Output::Json => println!("{}", pretty(&json!({ "verificationCode": code }))),
                Output::Table => println!("{code}"),
            }
            Ok(())
        }
        CertificateCommand::Verify { name, file } => {
            let path = format!("{}/verify", one(name));
            let body = json!({ "certificate": pem(file)? });
            let value = print::call(client, Method::POST, &path, true, Some(&body), None).await?;
            print::one(output, value);
            Ok(())
        }
        CertificateCommand::Delete { name } => {
            print::delete(client, output, &one(name), true, name).await
        }
    }
}

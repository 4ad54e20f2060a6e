//! `issuing-ca ...` and `credential-policy ...`: an instance's issuing CAs (keys in a PKCS#11
//! token or a key file on the server) and the credential policies enrollments name.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Subcommand};
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output};

/// Commands on issuing CAs.
#[derive(Debug, Subcommand)]
pub enum IssuingCaCommand {
    /// List them.
    List,
    /// Show one (with its signing request while it waits for its certificate).
    Show {
        /// Name.
        name: String,
    },
    /// Create or replace one: its key by --key-uri (a pkcs11: URI) or --key-file (on the
    /// server, in its key directory), with --chain; or --generate-key in the token, then
    /// --self-signed (a root) or, later, `put --chain` with the certificate signed for the
    /// printed request.
    #[command(group = ArgGroup::new("key").required(true).args(["key_uri", "key_file"]))]
    Put {
        /// Name, used by credential policies.
        name: String,
        /// PEM file of the CA's chain (its own certificate first).
        #[arg(long)]
        chain: Option<PathBuf>,
        /// The key in a PKCS#11 token (RFC 7512; the PIN by pin-source).
        #[arg(long)]
        key_uri: Option<String>,
        /// The key file, a path on the server.
        #[arg(long)]
        key_file: Option<String>,
        /// Generate the key in the token: ecP256, ecP384, rsa2048 or rsa3072.
        #[arg(long, requires = "key_uri", conflicts_with = "chain")]
        generate_key: Option<String>,
        /// With --generate-key: certify the new key itself (a root CA).
        #[arg(long, requires = "generate_key")]
        self_signed: bool,
    },
    /// Delete one (refused while a credential policy names it; the key stays where it is).
    Delete {
        /// Name.
        name: String,
    },
}

/// Commands on credential policies.
#[derive(Debug, Subcommand)]
pub enum CredentialPolicyCommand {
    /// List them.
    List,
    /// Show one.
    Show {
        /// Name.
        name: String,
    },
    /// Create or replace one.
    Put {
        /// Name, as enrollments give it in credentialPolicyName.
        name: String,
        /// The issuing CA.
        #[arg(long)]
        ca: String,
        /// A key type devices may ask for (repeat): ecP256, ecP384, rsa2048, rsa3072.
        #[arg(long = "key-type", required = true)]
        key_types: Vec<String>,
        /// Validity of issued certificates in days [default: 30].
        #[arg(long)]
        validity_days: Option<u32>,
        /// A DNS name for every certificate's subjectAltName (repeat).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
    },
    /// Delete one.
    Delete {
        /// Name.
        name: String,
    },
}

/// Runs an issuing-CA command.
pub async fn cas(
    client: &Client,
    output: Output,
    command: &IssuingCaCommand,
) -> anyhow::Result<()> {
    let one = |name: &str| format!("/certificateAuthorities/{}", segment(name));
    match command {
        IssuingCaCommand::List => {
            let columns = ["name", "status", "info.subjectName", "info.notAfterUtc"];
            print::list(
                client,
                output,
                Method::GET,
                "/certificateAuthorities",
                true,
                &columns,
            )
            .await
        }
        IssuingCaCommand::Show { name } => print::show(client, output, &one(name), true).await,
        IssuingCaCommand::Put {
            name,
            chain,
            key_uri,
            key_file,
            generate_key,
            self_signed,
        } => {
            let mut body = json!({
                "name": name,
                "key": match (key_uri, key_file) {
                    (Some(uri), _) => json!({ "pkcs11Uri": uri }),
                    (None, file) => json!({ "file": file }),
                },
            });
            if let Some(chain) = chain {
                let text = std::fs::read_to_string(chain)
                    .with_context(|| format!("reading {}", chain.display()))?;
                body["certificateChain"] = Value::from(text);
            }
            if let Some(kind) = generate_key {
                body["generateKey"] = Value::from(kind.as_str());
                body["selfSigned"] = Value::from(*self_signed);
            }
            let stored = print::call(
                client,
                Method::PUT,
                &one(name),
                true,
                Some(&body),
                Some("*"),
            )
            .await?;
            print::one(output, stored);
            Ok(())
        }
        IssuingCaCommand::Delete { name } => {
            print::delete(client, output, &one(name), true, name).await
        }
    }
}

/// Runs a credential-policy command.
pub async fn policies(
    client: &Client,
    output: Output,
    command: &CredentialPolicyCommand,
) -> anyhow::Result<()> {
    let one = |name: &str| format!("/credentialPolicies/{}", segment(name));
    match command {
        CredentialPolicyCommand::List => {
            let columns = [
                "name",
                "certificateAuthorityName",
                "validityInDays",
                "keyTypes",
            ];
            print::list(
                client,
                output,
                Method::GET,
                "/credentialPolicies",
                true,
                &columns,
            )
            .await
        }
        CredentialPolicyCommand::Show { name } => {
            print::show(client, output, &one(name), true).await
        }
        CredentialPolicyCommand::Put {
            name,
            ca,
            key_types,
            validity_days,
            dns_names,
        } => {
            let mut body = json!({
                "name": name,
                "certificateAuthorityName": ca,
                "keyTypes": key_types,
                "dnsNames": dns_names,
            });
            if let Some(days) = validity_days {
                body["validityInDays"] = Value::from(*days);
            }
            let stored = print::call(
                client,
                Method::PUT,
                &one(name),
                true,
                Some(&body),
                Some("*"),
            )
            .await?;
            print::one(output, stored);
            Ok(())
        }
        CredentialPolicyCommand::Delete { name } => {
            print::delete(client, output, &one(name), true, name).await
        }
    }
}

//! `enrollment ...` and `group ...`: individual enrollments and enrollment groups.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

use crate::print::{self, Output, set_opt};

/// Commands on enrollments and groups.
#[derive(Debug, Subcommand)]
pub enum EnrollmentCommand {
    /// List all.
    List,
    /// Show one (without keys).
    Show {
        /// Registration id or group id.
        id: String,
    },
    /// Show the attestation with its keys.
    Keys {
        /// Registration id or group id.
        id: String,
    },
    /// Create one (fails if it exists unless --force).
    Create(Box<CreateEnrollment>),
    /// Delete one.
    Delete {
        /// Registration id or group id.
        id: String,
    },
}

/// What to enroll.
#[derive(Debug, Args)]
pub struct CreateEnrollment {
    /// Registration id (enrollments) or group id (groups).
    pub id: String,
    /// Symmetric-key attestation (the default); keys are generated unless given.
    #[arg(long, conflicts_with_all = ["certificate", "ca_reference", "endorsement_key", "tpm"])]
    pub symmetric_key: bool,
    /// Base64 primary key.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Base64 secondary key.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// X.509 attestation: the device certificate (enrollment) or signing CA (group), PEM file.
    #[arg(long, conflicts_with = "ca_reference")]
    pub certificate: Option<PathBuf>,
    /// X.509 attestation of a group: the name of a verified CA certificate (`certificate`).
    #[arg(long)]
    pub ca_reference: Option<String>,
    /// TPM attestation of an enrollment: base64 TPM2B_PUBLIC of the endorsement key.
    #[arg(long, conflicts_with_all = ["certificate", "ca_reference", "tpm"])]
    pub endorsement_key: Option<String>,
    /// TPM attestation of an enrollment: base64 TPM2B_PUBLIC of the storage root key
    /// (optional; the device presents its SRK when it registers).
    #[arg(long, requires = "endorsement_key")]
    pub storage_root_key: Option<String>,
    /// TPM attestation of a group: members are admitted by an EK certificate from a configured
    /// TPM manufacturer (tpm.manufacturer_certificates).
    #[arg(long, conflicts_with_all = ["certificate", "ca_reference"])]
    pub tpm: bool,
    /// Device id in the hub (enrollments only).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Candidate hub (repeat for several).
    #[arg(long = "hub")]
    pub hubs: Vec<String>,
    /// hashed, geoLatency, static or custom.
    #[arg(long)]
    pub allocation_policy: Option<String>,
    /// The credential policy that issues operational certificates to its devices (one of the
    /// server's `[issuance]` configuration, or of the instance's `credential-policy` list).
    #[arg(long)]
    pub credential_policy: Option<String>,
    /// Create it disabled.
    #[arg(long)]
    pub disabled: bool,
    /// Take the whole JSON body from this file instead (other options are ignored).
    #[arg(long)]
    pub from_file: Option<PathBuf>,
    /// Overwrite an existing one (`If-Match: *`).
    #[arg(long)]
    pub force: bool,
}

/// Runs an enrollment (or group) command on `collection`, whose ids are `id_field`.
pub async fn run(
    client: &Client,
    output: Output,
    command: &EnrollmentCommand,
    collection: &str,
    id_field: &str,
) -> anyhow::Result<()> {
    let one = |id: &str| format!("/{collection}/{}", segment(id));
    match command {
        EnrollmentCommand::List => {
            let columns = [
                id_field,
                "attestation.type",
                "provisioningStatus",
                "allocationPolicy",
                "iotHubs",
                "lastUpdatedDateTimeUtc",
            ];
            print::list(
                client,
                output,
                Method::POST,
                &format!("/{collection}/query"),
                true,
                &columns,
            )
            .await
        }
        EnrollmentCommand::Show { id } => print::show(client, output, &one(id), true).await,
        EnrollmentCommand::Keys { id } => {
            let path = format!("{}/attestationmechanism", one(id));
            print::one(
                output,
                print::call(client, Method::POST, &path, true, None, None).await?,
            );
            Ok(())
        }
        EnrollmentCommand::Create(create) => {
            let body = enrollment_body(create, id_field)?;
            let if_match = create.force.then_some("*");
            let value = print::call(
                client,
                Method::PUT,
                &one(&create.id),
                true,
                Some(&body),
                if_match,
            )
            .await?;
            print::one(output, value);
            Ok(())
        }
        EnrollmentCommand::Delete { id } => print::delete(client, output, &one(id), true, id).await,
    }
}

fn enrollment_body(create: &CreateEnrollment, id_field: &str) -> anyhow::Result<Value> {
    if let Some(file) = &create.from_file {
        return read_json(file);
    }
    let is_group = id_field == "enrollmentGroupId";
    let attestation = if let Some(path) = &create.certificate {
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let slot = if is_group {
            "signingCertificates"
        } else {
            "clientCertificates"
        };
        json!({ "type": "x509", "x509": { slot: { "primary": { "certificate": pem } } } })
    } else if let Some(name) = &create.ca_reference {
        json!({ "type": "x509", "x509": { "caReferences": { "primary": name } } })
    } else if let Some(ek) = &create.endorsement_key {
        let mut keys = json!({ "endorsementKey": ek });
        set_opt(
            &mut keys,
            "storageRootKey",
            create.storage_root_key.clone().map(Value::from),
        );
        json!({ "type": "tpm", "tpm": keys })
    } else if create.tpm {
        json!({ "type": "tpm" })
    } else {
        let mut keys = json!({});
        set_opt(
            &mut keys,
            "primaryKey",
            create.primary_key.clone().map(Value::from),
        );
        set_opt(
            &mut keys,
            "secondaryKey",
            create.secondary_key.clone().map(Value::from),
        );
        json!({ "type": "symmetricKey", "symmetricKey": keys })
    };
    let mut body = json!({ id_field: create.id, "attestation": attestation });
    set_opt(
        &mut body,
        "deviceId",
        create.device_id.clone().map(Value::from),
    );
    if !create.hubs.is_empty() {
        body["iotHubs"] = json!(create.hubs);
    }
    set_opt(
        &mut body,
        "allocationPolicy",
        create.allocation_policy.clone().map(Value::from),
    );
    set_opt(
        &mut body,
        "credentialPolicyName",
        create.credential_policy.clone().map(Value::from),
    );
    if create.disabled {
        body["provisioningStatus"] = json!("disabled");
    }
    Ok(body)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

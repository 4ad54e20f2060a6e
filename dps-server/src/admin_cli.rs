//! `dps-server admin ...`: the admin API from the shell. It signs a SAS token from a connection
//! string (never printing the key), prints tables for people and `--output json` for scripts.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use attestation::ConnectionString;
use attestation::sas::{encode_uri_component, sign};
use clap::{Args, Subcommand, ValueEnum};
use dps_protocol::ErrorBody;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::cli::Output;

/// Lifetime of the tokens the CLI signs.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Connection and output options, then the command.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Service connection string (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`).
    #[arg(long, env = "DPS_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: String,
    /// Base URL of the server, when it differs from `https://{HostName}`.
    #[arg(long, env = "DPS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// PEM file of the CA that issued the server's certificate (the one `serve` prints).
    #[arg(long, env = "DPS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Act on this instance (`/instances/{name}/...`) instead of the one the host name selects.
    #[arg(long)]
    pub instance: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table", env = "DPS_OUTPUT")]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Individual enrollments.
    #[command(subcommand)]
    Enrollment(EnrollmentCommand),
    /// Enrollment groups.
    #[command(subcommand)]
    Group(EnrollmentCommand),
    /// Registration states.
    #[command(subcommand)]
    Registration(RegistrationCommand),
    /// Linked hubs.
    #[command(subcommand)]
    Hub(HubCommand),
    /// Instances (needs ServiceConfig on the admin instance).
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Shared access policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// CA certificates for groups' caReferences, with proof of possession.
    #[command(subcommand)]
    Certificate(CertificateCommand),
    /// Owners and their hubs (for the `ownership` allocation policy).
    #[command(subcommand)]
    Owner(OwnerCommand),
    /// Ownership records: who owns which device.
    #[command(subcommand)]
    Ownership(OwnershipCommand),
    /// Print a SAS token for the connection string's policy, for curl and other HTTP clients.
    Token {
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        lifetime: u64,
    },
    /// Print the connection string of a policy (it contains the key).
    ConnectionString {
        /// The policy.
        #[arg(long, default_value = "provisioningserviceowner")]
        policy: String,
    },
}

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

/// An authenticated client of the admin API (the CLI's, and the load generator's).
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    prefix: String,
    credentials: ConnectionString,
}

impl Client {
    fn new(args: &AdminArgs) -> anyhow::Result<Self> {
        Self::connect(
            &args.connection_string,
            args.endpoint.as_deref(),
            args.ca_cert.as_deref(),
            args.instance.as_deref(),
        )
    }

    /// A client signing with `connection_string`'s policy, at `endpoint` (else
    /// `https://{HostName}`), trusting `ca_cert` (else the system roots), acting on `instance`
    /// (else the one the host name selects).
    pub fn connect(
        connection_string: &str,
        endpoint: Option<&str>,
        ca_cert: Option<&Path>,
        instance: Option<&str>,
    ) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let credentials =
            ConnectionString::parse(connection_string).context("invalid --connection-string")?;
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if let Some(ca) = ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
            builder = builder.tls_certs_only([cert]);
        }
        let base = endpoint
            .map(str::to_owned)
            .unwrap_or_else(|| format!("https://{}", credentials.host_name));
        let prefix = instance
            .map(|i| format!("/instances/{}", encode_uri_component(i)))
            .unwrap_or_default();
        Ok(Self {
            http: builder.build().context("building the HTTP client")?,
            base: base.trim_end_matches('/').to_owned(),
            prefix,
            credentials,
        })
    }

    fn token(&self) -> String {
        self.token_for(TOKEN_LIFETIME)
    }

    fn token_for(&self, lifetime: Duration) -> String {
        let expiry = SystemTime::now()
            .checked_add(lifetime)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        sign(
            &self.credentials.host_name,
            &self.credentials.key,
            expiry,
            Some(&self.credentials.key_name),
        )
    }

    fn url(&self, path: &str, scoped: bool) -> String {
        let prefix = if scoped { self.prefix.as_str() } else { "" };
        format!("{}{prefix}{path}?api-version=2021-10-01", self.base)
    }

    /// Sends a request and returns its status, continuation header and body text; a non-2xx
    /// answer becomes an error carrying the server's error code and message.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<(StatusCode, Option<String>, String)> {
        let response = request
            .header("Authorization", self.token())
            .send()
            .await
            .with_context(|| format!("calling {}", self.base))?;
        let status = response.status();
        let continuation = response
            .headers()
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.context("reading the answer")?;
        if !status.is_success() {
            let detail = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| format!("{status} ({}): {}", e.error_code, e.message))
                .unwrap_or_else(|_| format!("{status}: {text}"));
            bail!("{detail}");
        }
        Ok((status, continuation, text))
    }

    /// Calls a path (instance-scoped unless `scoped` is false) and returns its JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        scoped: bool,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Option<Value>> {
        let mut request = self.http.request(method, self.url(path, scoped));
        if let Some(tag) = if_match {
            request = request.header("If-Match", tag);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let (status, _, text) = self.send(request).await?;
        if status == StatusCode::NO_CONTENT || text.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_str(&text).context("the answer is not JSON")?,
        ))
    }

    /// Follows `x-ms-continuation` through every page of a query (POST) or listing (GET).
    async fn all_pages(
        &self,
        method: Method,
        path: &str,
        scoped: bool,
    ) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut request = self
                .http
                .request(method.clone(), self.url(path, scoped))
                .header("x-ms-max-item-count", "1000");
            if method == Method::POST {
                request = request.json(&json!({ "query": "*" }));
            }
            if let Some(token) = &continuation {
                request = request.header("x-ms-continuation", token);
            }
            let (_, next, text) = self.send(request).await?;
            let page: Vec<Value> =
                serde_json::from_str(&text).context("the answer is not a JSON array")?;
            items.extend(page);
            continuation = next;
            if continuation.is_none() {
                return Ok(items);
            }
        }
    }

    /// GET one resource and print it.
    async fn show(&self, output: Output, path: &str, scoped: bool) -> anyhow::Result<()> {
        print_one(
            output,
            self.call(Method::GET, path, scoped, None, None).await?,
        );
        Ok(())
    }

    /// DELETE one resource and say so.
    async fn delete(
        &self,
        output: Output,
        path: &str,
        scoped: bool,
        id: &str,
    ) -> anyhow::Result<()> {
        self.call(Method::DELETE, path, scoped, None, None).await?;
        print_done(output, "deleted", id);
        Ok(())
    }

    /// Every item of a listing, printed with `columns`.
    async fn list(
        &self,
        output: Output,
        method: Method,
        path: &str,
        scoped: bool,
        columns: &[&str],
    ) -> anyhow::Result<()> {
        let items = self.all_pages(method, path, scoped).await?;
        print_list(output, &items, columns);
        Ok(())
    }
}

fn segment(id: &str) -> String {
    encode_uri_component(id)
}

/// Runs an admin command.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let client = Client::new(&args)?;
    let output = args.output;
    match &args.command {
        AdminCommand::Enrollment(command) => {
            enrollment_command(&client, output, command, "enrollments", "registrationId").await
        }
        AdminCommand::Group(command) => {
            enrollment_command(
                &client,
                output,
                command,
                "enrollmentGroups",
                "enrollmentGroupId",
            )
            .await
        }
        AdminCommand::Registration(command) => {
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
                    client
                        .list(output, Method::POST, &path, true, &columns)
                        .await
                }
                RegistrationCommand::Show { id } => client.show(output, &one(id), true).await,
                RegistrationCommand::Delete { id } => {
                    client.delete(output, &one(id), true, id).await
                }
            }
        }
        AdminCommand::Hub(command) => {
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
                    client
                        .list(output, Method::GET, "/linkedHubs", true, &columns)
                        .await
                }
                HubCommand::Show { host_name } => client.show(output, &one(host_name), true).await,
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
                    let value = client
                        .call(Method::PUT, &one(host_name), true, Some(&body), Some("*"))
                        .await?;
                    print_one(output, value);
                    Ok(())
                }
                HubCommand::Delete { host_name } => {
                    client
                        .delete(output, &one(host_name), true, host_name)
                        .await
                }
            }
        }
        AdminCommand::Instance(command) => {
            let one = |name: &str| format!("/instances/{}", segment(name));
            match command {
                InstanceCommand::List => {
                    let columns = ["name", "idScope", "hostNames", "defaultAllocationPolicy"];
                    client
                        .list(output, Method::GET, "/instances", false, &columns)
                        .await
                }
                InstanceCommand::Show { name } => client.show(output, &one(name), false).await,
                InstanceCommand::Create {
                    name,
                    host_names,
                    id_scope,
                } => {
                    let mut body = json!({ "name": name, "hostNames": host_names });
                    set_opt(&mut body, "idScope", id_scope.clone().map(Value::from));
                    let value = client
                        .call(Method::PUT, &one(name), false, Some(&body), None)
                        .await?
                        .context("the server returned no instance")?;
                    print_created_instance(output, &value);
                    Ok(())
                }
                InstanceCommand::Delete { name } => {
                    client.delete(output, &one(name), false, name).await
                }
            }
        }
        AdminCommand::Policy(command) => {
            let one = |name: &str| format!("/accessPolicies/{}", segment(name));
            match command {
                PolicyCommand::List => {
                    client
                        .list(
                            output,
                            Method::GET,
                            "/accessPolicies",
                            true,
                            &["keyName", "rights"],
                        )
                        .await
                }
                PolicyCommand::Show { name } => client.show(output, &one(name), true).await,
                PolicyCommand::Set { name, rights } => {
                    let body = json!({ "keyName": name, "rights": rights });
                    let mut value = client
                        .call(Method::PUT, &one(name), true, Some(&body), Some("*"))
                        .await?;
                    if let Some(Value::Object(map)) = &mut value {
                        map.remove("primaryKey");
                        map.remove("secondaryKey");
                    }
                    print_one(output, value);
                    Ok(())
                }
                PolicyCommand::Delete { name } => {
                    client.delete(output, &one(name), true, name).await
                }
            }
        }
        AdminCommand::Certificate(command) => certificate_command(&client, output, command).await,
        AdminCommand::Owner(command) => owner_command(&client, output, command).await,
        AdminCommand::Ownership(command) => ownership_command(&client, output, command).await,
        AdminCommand::Token { lifetime } => {
            let token = client.token_for(Duration::from_secs(*lifetime));
            match output {
                Output::Json => println!("{}", pretty(&json!({ "authorization": token }))),
                Output::Table => println!("{token}"),
            }
            Ok(())
        }
        AdminCommand::ConnectionString { policy } => {
            let path = format!("/accessPolicies/{}/listKeys", segment(policy));
            let value = client
                .call(Method::POST, &path, true, None, None)
                .await?
                .context("the server returned no keys")?;
            let text = format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                client.credentials.host_name,
                str_at(&value, "keyName"),
                str_at(&value, "primaryKey")
            );
            match output {
                Output::Json => println!("{}", pretty(&json!({ "connectionString": text }))),
                Output::Table => println!("{text}"),
            }
            Ok(())
        }
    }
}

/// A new instance: its ID scope and owner connection string (shown once), or the JSON.
async fn certificate_command(
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
            client
                .list(output, Method::GET, "/certificates", true, &columns)
                .await
        }
        CertificateCommand::Show { name } => client.show(output, &one(name), true).await,
        CertificateCommand::Upload { name, file } => {
            let body = json!({ "name": name, "certificate": pem(file)? });
            let mut value = client
                .call(Method::PUT, &one(name), true, Some(&body), Some("*"))
                .await?;
            if let Some(Value::Object(map)) = &mut value {
                map.remove("certificate");
            }
            print_one(output, value);
            Ok(())
        }
        CertificateCommand::VerificationCode { name } => {
            let path = format!("{}/generateVerificationCode", one(name));
            let value = client
                .call(Method::POST, &path, true, Some(&json!({})), None)
                .await?;
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
            let value = client
                .call(Method::POST, &path, true, Some(&body), None)
                .await?;
            print_one(output, value);
            Ok(())
        }
        CertificateCommand::Delete { name } => client.delete(output, &one(name), true, name).await,
    }
}

async fn owner_command(
    client: &Client,
    output: Output,
    command: &OwnerCommand,
) -> anyhow::Result<()> {
    let one = |name: &str| format!("/owners/{}", segment(name));
    match command {
        OwnerCommand::List => {
            let columns = ["name", "hubs", "deviceCount"];
            client
                .list(output, Method::GET, "/owners", true, &columns)
                .await
        }
        OwnerCommand::Show { name } => client.show(output, &one(name), true).await,
        OwnerCommand::Set { name, hubs } => {
            let body = json!({ "name": name, "hubs": hubs });
            let value = client
                .call(Method::PUT, &one(name), true, Some(&body), Some("*"))
                .await?;
            print_one(output, value);
            Ok(())
        }
        OwnerCommand::Delete { name } => client.delete(output, &one(name), true, name).await,
        OwnerCommand::Devices { name } => {
            let columns = ["registrationId", "certificateSerial", "ekHash", "owner"];
            let path = format!("{}/devices", one(name));
            client
                .list(output, Method::GET, &path, true, &columns)
                .await
        }
    }
}

async fn ownership_command(
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
            let request = client
                .http
                .post(client.url("/ownershipRecords:import", true))
                .header("Content-Type", content_type)
                .body(body);
            let (_, _, text) = client.send(request).await?;
            print_one(
                output,
                Some(serde_json::from_str(&text).context("the answer is not JSON")?),
            );
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
            let value = client
                .call(
                    Method::POST,
                    "/ownershipRecords:transfer",
                    true,
                    Some(&body),
                    None,
                )
                .await?;
            print_one(output, value);
            Ok(())
        }
        OwnershipCommand::Show { kind, value } => {
            client.show(output, &one(kind, value), true).await
        }
        OwnershipCommand::Delete { kind, value } => {
            client.delete(output, &one(kind, value), true, value).await
        }
    }
}

fn print_created_instance(output: Output, value: &Value) {
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

async fn enrollment_command(
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
            client
                .list(
                    output,
                    Method::POST,
                    &format!("/{collection}/query"),
                    true,
                    &columns,
                )
                .await
        }
        EnrollmentCommand::Show { id } => client.show(output, &one(id), true).await,
        EnrollmentCommand::Keys { id } => {
            let path = format!("{}/attestationmechanism", one(id));
            print_one(
                output,
                client.call(Method::POST, &path, true, None, None).await?,
            );
            Ok(())
        }
        EnrollmentCommand::Create(create) => {
            let body = enrollment_body(create, id_field)?;
            let if_match = create.force.then_some("*");
            let value = client
                .call(Method::PUT, &one(&create.id), true, Some(&body), if_match)
                .await?;
            print_one(output, value);
            Ok(())
        }
        EnrollmentCommand::Delete { id } => client.delete(output, &one(id), true, id).await,
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

fn set_opt(body: &mut Value, key: &str, value: Option<Value>) {
    if let (Some(value), Value::Object(map)) = (value, body) {
        map.insert(key.to_owned(), value);
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A field by dotted path, as text for a table cell.
fn str_at(value: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match value.pointer(&pointer) {
        None | Some(Value::Null) => String::from("-"),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn print_list(output: Output, items: &[Value], columns: &[&str]) {
    if output == Output::Json {
        println!("{}", pretty(&Value::Array(items.to_vec())));
        return;
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|c| str_at(item, c)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for row in rows {
        println!("{}", line(row));
    }
}

fn print_one(output: Output, value: Option<Value>) {
    let value = value.unwrap_or(Value::Null);
    match output {
        Output::Json => println!("{}", pretty(&value)),
        Output::Table => {
            let mut lines = Vec::new();
            flatten("", &value, &mut lines);
            let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (key, text) in lines {
                println!("{key:<width$}  {text}");
            }
        }
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, inner) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, inner, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

fn print_done(output: Output, what: &str, id: &str) {
    match output {
        Output::Json => println!("{}", json!({ "result": what, "id": id })),
        Output::Table => println!("{what} {id}"),
    }
}

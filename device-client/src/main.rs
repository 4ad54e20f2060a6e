//! `dps-device register`: first-boot registration from the command line, with a symmetric key
//! (the device's or its group's), an X.509 certificate, or the device's TPM.
//!
//! Exit codes: 0 assigned (or already registered), 1 misconfigured (key, CA, state file),
//! 2 bad command line, 3 refused by the service (credentials, request), 4 the service ended the
//! registration as failed or disabled, 5 gave up (unreachable or still assigning at the timeout).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use attestation::issuance::KeyType;
use attestation::tpm::{KeyRole, RsaPublic, registration_id};
use clap::{Args, Parser, Subcommand, ValueEnum};
use device_client::issue;
use device_client::pkcs11::PinSource;
use device_client::state::{self, DeviceState};
use device_client::tpm::Tpm;
use device_client::{
    ClientCertificate, Credential, KeySource, PrivateKeySource, Proof, Registration, SasSigner,
    Transport, register,
};

/// Registers this device with a provisioning service (Azure DPS compatible).
#[derive(Debug, Parser)]
#[command(name = "dps-device", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register (unless the state file already holds an assignment) and print the assignment.
    Register(RegisterArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Https,
    Mqtt,
    MqttWs,
}

#[derive(Debug, Args)]
#[command(
    group = clap::ArgGroup::new("credential").required(true).args(["symmetric_key", "group_key", "certificate", "tpm"]),
    args_override_self = true
)]
struct RegisterArgs {
    /// Service URL, e.g. https://dps.example.com (port 443) or https://localhost:8443.
    #[arg(long, env = "DPS_ENDPOINT")]
    endpoint: String,
    /// The instance's ID scope.
    #[arg(long, env = "DPS_ID_SCOPE")]
    id_scope: String,
    /// This device's registration id (with --certificate: the certificate's common name when
    /// omitted; with --tpm: lower-case base32 of the SHA-256 of the EK, as the Azure SDKs do).
    #[arg(long, env = "DPS_REGISTRATION_ID")]
    registration_id: Option<String>,
    /// The device's own key: file:PATH, env:NAME or a pkcs11: URI.
    #[arg(long)]
    symmetric_key: Option<String>,
    /// The enrollment group's key (the device key is derived from it): file:PATH, env:NAME or a
    /// pkcs11: URI.
    #[arg(long)]
    group_key: Option<String>,
    /// X.509: PEM file with the device certificate first, then any intermediates to send.
    #[arg(long, requires = "private_key")]
    certificate: Option<PathBuf>,
    /// X.509: the certificate's private key, file:PATH (PEM) or a pkcs11: URI (used in place).
    #[arg(long, requires = "certificate")]
    private_key: Option<String>,
    /// TPM attestation through this TCTI: device:/dev/tpmrm0, swtpm:host=HOST,port=PORT or
    /// tabrmd. The EK and SRK are used from (or created at) 0x81010001 and 0x81000001, the EK
    /// certificate in NV is sent when present, and the hub key is persisted at 0x81000100.
    #[arg(long, value_name = "TCTI")]
    tpm: Option<String>,
    /// File holding the PKCS#11 PIN (when the URI has no pin-source).
    #[arg(long, conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// Environment variable holding the PKCS#11 PIN.
    #[arg(long)]
    pin_env: Option<String>,
    /// PEM CA certificate to trust (the one the server prints), instead of the system roots.
    #[arg(long, env = "DPS_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// JSON payload passed to allocation.
    #[arg(long)]
    payload: Option<String>,
    /// Where the assignment is kept between boots.
    #[arg(long, default_value = "dps-device-state.json")]
    state_file: PathBuf,
    /// Register even if the state file holds an assignment.
    #[arg(long)]
    force: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// How to reach the service: https (the endpoint), mqtt (MQTT over TLS at the endpoint's
    /// host, on --mqtt-port) or mqtt-ws (MQTT over a WebSocket at the endpoint); MQTT takes
    /// symmetric keys and X.509, as in Azure.
    #[arg(long, value_enum, default_value = "https")]
    transport: TransportArg,
    /// The MQTT port, with --transport mqtt.
    #[arg(long, default_value_t = 8883)]
    mqtt_port: u16,
    /// Ask for an operational certificate for --issued-key (api-version 2025-07-01-preview;
    /// the enrollment needs a credential policy) and write the issued chain here as PEM, the
    /// new certificate first. Always registers, whatever the state file holds.
    #[arg(long, value_name = "PATH", requires = "issued_key")]
    issue_certificate: Option<PathBuf>,
    /// The operational certificate's key: file:PATH (a PEM file, made with mode 0600 when it
    /// does not exist) or a pkcs11: URI (generated inside the token when it holds no such key).
    #[arg(long, value_name = "SOURCE", requires = "issue_certificate")]
    issued_key: Option<String>,
    /// The type of key made for --issued-key when there is none.
    #[arg(long, value_enum, default_value = "ec-p256")]
    issued_key_type: KeyTypeArg,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

/// `--issued-key-type`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyTypeArg {
    EcP256,
    EcP384,
    Rsa2048,
    Rsa3072,
}

impl From<KeyTypeArg> for KeyType {
    fn from(value: KeyTypeArg) -> Self {
        match value {
            KeyTypeArg::EcP256 => KeyType::EcP256,
            KeyTypeArg::EcP384 => KeyType::EcP384,
            KeyTypeArg::Rsa2048 => KeyType::Rsa2048,
            KeyTypeArg::Rsa3072 => KeyType::Rsa3072,
        }
    }
}

fn print(output: Output, state: &DeviceState, fresh: bool, issued: Option<&PathBuf>) {
    match output {
        Output::Json => {
            let mut value = serde_json::to_value(state).unwrap_or_default();
            if let serde_json::Value::Object(map) = &mut value {
                map.insert("fresh".into(), fresh.into());
                if let Some(path) = issued {
                    map.insert(
                        "issuedCertificate".into(),
                        path.display().to_string().into(),
                    );
                }
            }
            println!("{value}");
        }
        Output::Text => {
            println!("assigned-hub: {}", state.assignment.assigned_hub);
            println!("device-id: {}", state.assignment.device_id);
            if let Some(handle) = &state.assignment.hub_key_handle {
                println!("hub-key-handle: {handle}");
            }
            if let Some(path) = issued {
                println!("issued-certificate: {}", path.display());
            }
            if !fresh {
                println!("(from the state file; use --force to register again)");
            }
        }
    }
}

async fn run(args: RegisterArgs) -> Result<(), (u8, String)> {
    let misconfigured = |e: String| (1u8, e);
    let pin = match (&args.pin_file, &args.pin_env) {
        (Some(file), _) => Some(PinSource::File(file.clone())),
        (_, Some(name)) => Some(PinSource::Env(name.clone())),
        _ => None,
    };
    let certificate = match (&args.certificate, &args.private_key) {
        (Some(path), Some(key)) => {
            let key = key
                .parse::<PrivateKeySource>()
                .map_err(|e| misconfigured(e.to_string()))?;
            Some(
                ClientCertificate::load(path, &key, pin.as_ref())
                    .map_err(|e| misconfigured(e.to_string()))?,
            )
        }
        _ => None,
    };
    let tpm = args
        .tpm
        .as_deref()
        .map(Tpm::open)
        .transpose()
        .map_err(|e| misconfigured(e.to_string()))?;
    let registration_id = match (&args.registration_id, &certificate, &tpm) {
        (Some(id), _, _) => id.clone(),
        (None, Some(certificate), _) => certificate.common_name().ok_or_else(|| {
            misconfigured("the certificate has no common name: give --registration-id".into())
        })?,
        (None, None, Some(tpm)) => {
            let ek = RsaPublic::parse(tpm.endorsement_key(), KeyRole::Endorsement)
                .map_err(|e| misconfigured(e.to_string()))?;
            registration_id(&ek)
        }
        (None, None, None) => return Err(misconfigured("give --registration-id".into())),
    };
    if !args.force
        && args.issue_certificate.is_none()
        && let Some(saved) = state::load(&args.state_file)
        && saved.endpoint == args.endpoint
        && saved.id_scope == args.id_scope
        && saved
            .assignment
            .registration_id
            .eq_ignore_ascii_case(&registration_id)
    {
        print(args.output, &saved, false, None);
        return Ok(());
    }
    let proof = match (certificate, tpm) {
        (Some(certificate), _) => Proof::Certificate(certificate),
        (None, Some(tpm)) => Proof::Tpm(tpm),
        (None, None) => {
            let credential = match (&args.symmetric_key, &args.group_key) {
                (Some(source), _) => Credential::DeviceKey(
                    source
                        .parse::<KeySource>()
                        .map_err(|e| misconfigured(e.to_string()))?,
                ),
                (_, Some(source)) => Credential::GroupKey(
                    source
                        .parse::<KeySource>()
                        .map_err(|e| misconfigured(e.to_string()))?,
                ),
                (None, None) => {
                    return Err(misconfigured(
                        "give --symmetric-key, --group-key, --certificate or --tpm".into(),
                    ));
                }
            };
            Proof::Sas(
                SasSigner::load(&credential, &registration_id, pin.as_ref())
                    .map_err(|e| misconfigured(e.to_string()))?,
            )
        }
    };
    let payload = args
        .payload
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| misconfigured(format!("--payload is not JSON: {e}")))?;
    let csr = match &args.issued_key {
        Some(source) => {
            let source = source
                .parse::<PrivateKeySource>()
                .map_err(|e| misconfigured(e.to_string()))?;
            let key = issue::open_or_generate(&source, args.issued_key_type.into(), pin.as_ref())
                .map_err(|e| misconfigured(e.to_string()))?;
            Some(issue::request(&key, &registration_id).map_err(|e| misconfigured(e.to_string()))?)
        }
        None => None,
    };
    let request = Registration {
        endpoint: args.endpoint.clone(),
        id_scope: args.id_scope.clone(),
        registration_id,
        ca_cert: args.ca_cert.clone(),
        payload,
        timeout: Duration::from_secs(args.timeout),
        transport: match args.transport {
            TransportArg::Https => Transport::Https,
            TransportArg::Mqtt => Transport::Mqtt {
                port: args.mqtt_port,
            },
            TransportArg::MqttWs => Transport::MqttWebSocket,
        },
        csr,
    };
    let assignment = register(&request, &proof)
        .await
        .map_err(|e| (e.exit_code(), e.to_string()))?;
    if let Some(path) = &args.issue_certificate {
        let chain = assignment
            .issued_certificate_chain
            .as_deref()
            .ok_or_else(|| {
                misconfigured("registered, but the service issued no certificate".into())
            })?;
        issue::write_chain(path, chain)
            .map_err(|e| misconfigured(format!("registered, but cannot write the chain: {e}")))?;
    }
    let saved = DeviceState {
        endpoint: args.endpoint,
        id_scope: args.id_scope,
        assignment,
    };
    state::save(&args.state_file, &saved).map_err(|e| {
        misconfigured(format!(
            "registered, but cannot write {}: {e}",
            args.state_file.display()
        ))
    })?;
    print(args.output, &saved, true, args.issue_certificate.as_ref());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let Command::Register(args) = cli.command;
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

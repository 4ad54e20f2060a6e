//! Configuration: built-in defaults, then a TOML file, then `DPS_*` environment variables
//! (`__` separates nested keys: `DPS_TLS__CERT`), then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use dps_protocol::admin::{AccessPolicy, LinkedHub};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The instance created when the configuration declares none.
pub const DEFAULT_INSTANCE: &str = "default";

/// Environment variables with the `DPS_` prefix that are not configuration keys.
const NOT_CONFIG_ENV: &[&str] = &["config", "connection_string", "ca_cert", "output"];

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the one HTTPS listener (devices and admins).
    pub listen: SocketAddr,
    /// Directory for the SQLite database and the development certificates.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; a SQLite file in `data_dir` when absent.
    pub database_url: Option<String>,
    /// The server certificate.
    pub tls: TlsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Request and authentication limits.
    pub limits: Limits,
    /// Device API throttling.
    pub throttle: crate::throttle::ThrottleConfig,
    /// Allocation policy settings.
    pub allocation: AllocationConfig,
    /// TPM attestation settings.
    pub tpm: TpmConfig,
    /// Operational certificates issued to devices that send a certificate signing request.
    pub issuance: IssuanceConfig,
    /// Registration events (`GET /events`).
    pub events: EventsConfig,
    /// The audit log of admin writes (`GET /auditLog`).
    pub audit: AuditConfig,
    /// Calls the server makes: allocation webhooks, hub connectors, latency probes.
    pub outbound: OutboundConfig,
    /// Address of the plain-HTTP listener of `/metrics` (and `/healthz`, `/readyz`); loopback
    /// by default, since the metrics name tenants, hubs and device counts.
    pub metrics_listen: SocketAddr,
    /// Address of the MQTT listener (TLS, devices only): `off` turns it off; absent, the
    /// address of `listen` on port 8883.
    pub mqtt_listen: Option<String>,
    /// The instance whose `ServiceConfig` policies manage all instances, and whose connection
    /// string is printed at start: the first configured instance, or `default`, when absent.
    pub admin_instance: Option<String>,
    /// Instances to create or update at start. When empty and the database holds no instance,
    /// one instance named `default` is created.
    pub instances: Vec<InstanceConfig>,
}

impl Config {
    /// Where the MQTT listener binds: `None` when it is off.
    pub fn mqtt_address(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.mqtt_listen.as_deref().map(str::trim) {
            None | Some("") => Ok(Some(SocketAddr::new(self.listen.ip(), 8883))),
            Some(off) if off.eq_ignore_ascii_case("off") => Ok(None),
            Some(address) => address.parse().map(Some).map_err(|_| {
                anyhow::anyhow!("mqtt_listen '{address}' is not an address (host:port) or 'off'")
            }),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            data_dir: PathBuf::from("./dps-data"),
            database_url: None,
            tls: TlsConfig::default(),
            log: LogConfig::default(),
            limits: Limits::default(),
            throttle: crate::throttle::ThrottleConfig::default(),
            allocation: AllocationConfig::default(),
            tpm: TpmConfig::default(),
            issuance: IssuanceConfig::default(),
            events: EventsConfig::default(),
            audit: AuditConfig::default(),
            outbound: OutboundConfig::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            mqtt_listen: None,
            admin_instance: None,
            instances: Vec::new(),
        }
    }
}

pub use dps_listener::TlsConfig;

/// Outbound calls. Their targets are chosen by admins, so the server refuses loopback,
/// private, link-local, unique-local and multicast addresses unless their network is listed
/// here, follows no redirects and reads bounded answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Networks outbound calls may reach although they are not public, e.g. `["10.20.0.0/16"]`
    /// for hubs on a private network, or `["127.0.0.0/8"]` for a webhook on the same machine.
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Largest answer read from a webhook or hub, bytes.
    pub max_answer_bytes: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            allowed_networks: Vec::new(),
            max_answer_bytes: 1024 * 1024,
        }
    }
}

/// TPM attestation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TpmConfig {
    /// PEM files of TPM manufacturer certificates. TPM enrollment groups admit devices whose EK
    /// certificate chains to one of them; every certificate in the files is trusted, so list
    /// the manufacturer's issuing CAs (or its root together with them).
    pub manufacturer_certificates: Vec<PathBuf>,
    /// How long a TPM challenge's key may be used, seconds. Each key signs one registration.
    pub challenge_ttl_secs: u64,
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self {
            manufacturer_certificates: Vec::new(),
            challenge_ttl_secs: 300,
        }
    }
}

/// Registration events: every outcome is kept this long, then swept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Days an event is kept; 0: no events are written.
    pub retention_days: u32,
    /// An HTTP(S) endpoint that receives every event this server commits, as a CloudEvent
    /// (signed with `allocation.webhook_signing_key` when set); none by default.
    pub webhook_url: Option<String>,
    /// Events waiting for the webhook at most; past it the oldest are dropped (and counted).
    pub webhook_queue: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            retention_days: 7,
            webhook_url: None,
            webhook_queue: 10_000,
        }
    }
}

/// The audit log: every admin write and key read is an entry, kept this long, and at most this
/// many per instance when a count is set (the oldest go first).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Days an entry is kept (at least 1).
    pub retention_days: u32,
    /// Entries kept per instance, past which the oldest are swept; 0 (the default): no count
    /// limit. A count lets a policy that writes in bulk push older entries (its own among
    /// them) out of the log.
    pub max_entries: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 365,
            max_entries: 0,
        }
    }
}

/// Certificate issuance: CAs whose keys sign devices' operational certificates, and the
/// credential policies enrollments name in `credentialPolicyName`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IssuanceConfig {
    /// Issuing CAs by name.
    pub certificate_authorities: std::collections::BTreeMap<String, IssuingCaConfig>,
    /// Credential policies by name.
    pub credential_policies: std::collections::BTreeMap<String, CredentialPolicyConfig>,
    /// PKCS#11 modules the admin API's issuing CAs may name (`module-path`); a URI that names
    /// none uses the first. Empty (the default): no token keys through the admin API. The API
    /// cannot make the server load any other library.
    pub pkcs11_modules: Vec<PathBuf>,
    /// The directory of one directory per instance (`<key_directory>/<instance>/`) holding the
    /// PEM key files and PIN files that instance's issuing CAs may name; none (the default):
    /// no files through the admin API.
    pub key_directory: Option<PathBuf>,
}

/// An issuing CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuingCaConfig {
    /// PEM file of the CA's certificate chain: its own certificate first, its root last (the
    /// chain devices receive after their new certificate).
    pub certificate_chain: PathBuf,
    /// Its private key: a `pkcs11:` URI (RFC 7512: `token`, `object` or `id`, and the PIN by
    /// `pin-source`) naming a key used in place inside the token, or the path of a PEM file
    /// (PKCS#8: ECDSA P-256 or P-384, or RSA) readable by the server only.
    pub key: String,
}

/// What a credential policy issues.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialPolicyConfig {
    /// The issuing CA's name.
    pub certificate_authority: String,
    /// Validity of an issued certificate, days.
    pub validity_days: u32,
    /// Key types a request may carry: `ecP256`, `ecP384`, `rsa2048`, `rsa3072`.
    pub key_types: Vec<String>,
    /// DNS names of the subject alternative name of every certificate (none: no such
    /// extension).
    pub dns_names: Vec<String>,
}

impl Default for CredentialPolicyConfig {
    fn default() -> Self {
        Self {
            certificate_authority: String::new(),
            validity_days: 30,
            key_types: vec!["ecP256".into(), "ecP384".into()],
            dns_names: Vec::new(),
        }
    }
}

/// Allocation policy settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocationConfig {
    /// Time allowed for one call of a custom allocation webhook, seconds.
    pub custom_timeout_secs: u64,
    /// Further attempts after a failed webhook call (timeouts, 5xx, unreachable).
    pub custom_retries: u32,
    /// Policy that answers when a webhook stays down (`hashed`, ...); none: the registration fails.
    pub custom_fallback: Option<String>,
    /// Base64 key; when set, webhook requests carry `x-dps-signature: sha256=<hex HMAC>`.
    pub webhook_signing_key: Option<String>,
    /// Policy that places devices no ownership record names (`hashed`, ...); none: they fail
    /// to register, so that no device lands on another owner's hub.
    pub ownership_fallback: Option<String>,
    /// Where devices are, for `geoLatency`.
    pub geo: GeoConfig,
}

/// Location sources and distances for the `geoLatency` policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeoConfig {
    /// A request header naming the device's region, set by an edge you trust (unset: ignored).
    pub region_header: Option<String>,
    /// A request header with the device's `latitude,longitude`, set by an edge you trust.
    pub coordinates_header: Option<String>,
    /// Source networks and their regions.
    pub networks: Vec<GeoNetwork>,
    /// Coordinates of regions.
    pub regions: Vec<GeoRegion>,
    /// Latency in milliseconds from a region to a hub: `latency_ms.<region>.<hub> = 12`.
    pub latency_ms: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    /// A MaxMind-format GeoIP City database (`.mmdb`), read at start.
    pub geoip_database: Option<PathBuf>,
    /// The region this server runs in. When set, the server probes every linked hub and ranks
    /// hubs for devices in this region (or placed nowhere else) by the measured latency.
    pub probe_region: Option<String>,
    /// Seconds between probes.
    pub probe_interval_secs: u64,
}

impl Default for GeoConfig {
    fn default() -> Self {
        Self {
            region_header: None,
            coordinates_header: None,
            networks: Vec::new(),
            regions: Vec::new(),
            latency_ms: std::collections::BTreeMap::new(),
            geoip_database: None,
            probe_region: None,
            probe_interval_secs: 30,
        }
    }
}

/// A source network in a region.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoNetwork {
    /// The network, e.g. `10.20.0.0/16`.
    pub cidr: ipnet::IpNet,
    /// Its region.
    pub region: String,
}

/// A region's coordinates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoRegion {
    /// The region's name.
    pub name: String,
    /// Degrees, -90 to 90.
    pub latitude: f64,
    /// Degrees, -180 to 180.
    pub longitude: f64,
}

impl Default for AllocationConfig {
    fn default() -> Self {
        Self {
            custom_timeout_secs: 10,
            custom_retries: 2,
            custom_fallback: None,
            webhook_signing_key: None,
            ownership_fallback: None,
            geo: GeoConfig::default(),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `dps_server=debug` (`RUST_LOG` wins when set).
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits on what clients may send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Live event streams (`GET /events/stream`) open at once on this server; more are 503.
    pub max_event_streams: usize,
    /// Largest body of a device request, bytes (Azure: 96 KB).
    pub max_device_body_bytes: usize,
    /// `Retry-After` sent with 202 answers to devices, seconds (1 to 300).
    pub retry_after_secs: u64,
    /// A poll finishes an operation itself once it has been `assigning` this long (the server
    /// that started it may have stopped), seconds.
    pub resume_assigning_after_secs: u64,
    /// How long a register request waits for its assignment before answering 202, so that the
    /// device's first poll finds it finished, milliseconds (0: answer at once).
    pub assign_wait_ms: u64,
    /// How long a hub whose connector failed is tried only after the healthy ones, seconds.
    pub hub_unhealthy_secs: u64,
    /// Largest page a query may ask for (`x-ms-max-item-count`).
    pub max_page_size: usize,
    /// Page size when the client asks for none.
    pub default_page_size: usize,
    /// Most items in one bulk request (Azure allows 10; we allow more).
    pub max_bulk_items: usize,
    /// Most symmetric-key enrollment groups per instance (Azure: 100). A request whose id no
    /// individual enrollment or earlier registration names is tried against every one of them,
    /// so this bounds what an unauthenticated request can cost.
    pub max_symmetric_key_groups: usize,
    /// Largest ownership-record import (`POST /ownershipRecords:import`), bytes.
    pub max_import_bytes: usize,
    /// Most connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Time for a client to complete the TLS handshake, seconds.
    pub tls_handshake_timeout_secs: u64,
    /// Time for a client to send a request's headers, seconds.
    pub request_header_timeout_secs: u64,
    /// Time for a client to send a request's body, seconds.
    pub request_body_timeout_secs: u64,
    /// How long a connection may stay open without a request in flight, seconds (HTTP/1.1
    /// keep-alive and HTTP/2 alike).
    pub idle_timeout_secs: u64,
    /// Longest lifetime of a service (admin API) SAS token the service accepts, seconds.
    pub max_token_lifetime_secs: u64,
    /// Longest lifetime of a device SAS token, seconds; 0 (the default) sets no bound, as
    /// Azure does. A device token can only register its own id.
    pub max_device_token_lifetime_secs: u64,
    /// Clock skew allowed when checking a token's expiry, seconds.
    pub clock_skew_secs: u64,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    pub shutdown_grace_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_event_streams: 64,
            max_device_body_bytes: 96 * 1024,
            retry_after_secs: 1,
            resume_assigning_after_secs: 10,
            assign_wait_ms: 2000,
            hub_unhealthy_secs: 30,
            max_page_size: 1000,
            default_page_size: 100,
            max_bulk_items: 1000,
            max_symmetric_key_groups: 100,
            max_import_bytes: 32 * 1024 * 1024,
            max_connections: 4096,
            tls_handshake_timeout_secs: 10,
            request_header_timeout_secs: 30,
            request_body_timeout_secs: 30,
            idle_timeout_secs: 120,
            max_token_lifetime_secs: 30 * 24 * 3600,
            max_device_token_lifetime_secs: 0,
            clock_skew_secs: 300,
            shutdown_grace_secs: 30,
        }
    }
}

/// An instance declared in the configuration file. What it declares is applied at every start;
/// whatever the admin API added beside it is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Unique name.
    pub name: String,
    /// Fixed ID scope; generated once when absent.
    #[serde(default)]
    pub id_scope: Option<String>,
    /// Host names for this instance's admin API and connection string.
    #[serde(default)]
    pub host_names: Vec<String>,
    /// `hashed` when absent.
    #[serde(default)]
    pub default_allocation_policy: Option<String>,
    /// Linked hubs (JSON field names in camelCase, as in the admin API).
    #[serde(default)]
    pub linked_hubs: Vec<LinkedHub>,
    /// Shared access policies; an owner policy is generated when none is declared.
    #[serde(default)]
    pub access_policies: Vec<AccessPolicy>,
}

/// Values given on the command line; each overrides the file and the environment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--database-url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

impl Config {
    /// Loads defaults, then `file`, then the environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!("configuration file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment
            .merge(
                Env::prefixed("DPS_")
                    .ignore(NOT_CONFIG_ENV)
                    // The test suite's and the benchmark scripts' own variables.
                    .filter(|key| {
                        let key = key.as_str().to_ascii_lowercase();
                        !key.starts_with("test_") && !key.starts_with("bench_")
                    })
                    .split("__"),
            )
            .merge(Serialized::defaults(overrides));
        figment.extract().context("invalid configuration")
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("dps.sqlite").display()
            ),
        }
    }

    /// The admin instance's name.
    pub fn admin_instance(&self) -> String {
        self.admin_instance
            .clone()
            .or_else(|| self.instances.first().map(|i| i.name.clone()))
            .unwrap_or_else(|| DEFAULT_INSTANCE.to_owned())
    }

    /// The host name admins reach the listener by when the configuration names none:
    /// `localhost`, with the port unless it is 443 (or 0, an ephemeral port).
    pub fn default_host_name(&self) -> String {
        match self.listen.port() {
            0 | 443 => "localhost".into(),
            port => format!("localhost:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dps.toml");
        std::fs::write(
            &file,
            r#"
listen = "127.0.0.1:9000"
[limits]
max_page_size = 7
[[instances]]
name = "factory"
host_names = ["dps.example.com"]
linked_hubs = [{ hostName = "hub-a.example.com", allocationWeight = 3 }]
"#,
        )
        .unwrap();
        let overrides = Overrides {
            data_dir: Some("/tmp/x".into()),
            ..Overrides::default()
        };
        let config = Config::load(Some(&file), &overrides).unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.limits.max_page_size, 7);
        assert_eq!(
            config.limits.max_bulk_items,
            Limits::default().max_bulk_items
        );
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(
            config.instances[0].linked_hubs[0].allocation_weight,
            Some(3)
        );
        assert_eq!(config.default_host_name(), "localhost:9000");
    }

    #[test]
    fn the_documented_example_loads() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dps.example.toml");
        let config = Config::load(Some(Path::new(example)), &Overrides::default()).unwrap();
        assert_eq!(
            config.instances[0].linked_hubs[0].allocation_weight,
            Some(2)
        );
        assert_eq!(config.admin_instance(), "plant");
        assert_eq!(
            config.limits.max_bulk_items,
            Limits::default().max_bulk_items
        );
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dps.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
        assert!(Config::load(Some(&file), &Overrides::default()).is_err());
        assert!(Config::load(Some(&dir.path().join("nope.toml")), &Overrides::default()).is_err());
    }
}

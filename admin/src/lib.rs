//! The admin CLI: the admin API from the shell, one module per resource. It signs SAS tokens
//! from a connection string (never printing the key), prints tables for people and
//! `--output json` for scripts. Run as `dps-admin ...` or as `dps-server admin ...`.

pub mod audit;
pub mod certificates;
pub mod enrollments;
pub mod events;
pub mod hubs;
pub mod instances;
pub mod issued;
pub mod issuing;
pub mod ownership;
pub mod policies;
pub mod print;
pub mod registrations;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use dps_admin_client::Client;

pub use print::Output;

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

/// `event ...`.
#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// List the events that match the filters.
    List(events::EventFilters),
}

/// `audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List the entries that match the filters.
    List(audit::AuditFilters),
}

/// Admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Individual enrollments.
    #[command(subcommand)]
    Enrollment(enrollments::EnrollmentCommand),
    /// Enrollment groups.
    #[command(subcommand)]
    Group(enrollments::EnrollmentCommand),
    /// Registration states.
    #[command(subcommand)]
    Registration(registrations::RegistrationCommand),
    /// Linked hubs.
    #[command(subcommand)]
    Hub(hubs::HubCommand),
    /// Instances (needs ServiceConfig on the admin instance).
    #[command(subcommand)]
    Instance(instances::InstanceCommand),
    /// Shared access policies.
    #[command(subcommand)]
    Policy(policies::PolicyCommand),
    /// CA certificates for groups' caReferences, with proof of possession.
    #[command(subcommand)]
    Certificate(certificates::CertificateCommand),
    /// The instance's issuing CAs, for credential policies.
    #[command(subcommand)]
    IssuingCa(issuing::IssuingCaCommand),
    /// The instance's credential policies, for enrollments' credentialPolicyName.
    #[command(subcommand)]
    CredentialPolicy(issuing::CredentialPolicyCommand),
    /// Registration events (outcomes), oldest first.
    #[command(subcommand)]
    Event(EventCommand),
    /// The audit log: admin writes and key reads, oldest first (needs ServiceConfig).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Operational certificates issued for devices' CSRs, and their revocation.
    #[command(subcommand)]
    IssuedCertificate(issued::IssuedCommand),
    /// Owners and their hubs (for the `ownership` allocation policy).
    #[command(subcommand)]
    Owner(ownership::OwnerCommand),
    /// Ownership records: who owns which device.
    #[command(subcommand)]
    Ownership(ownership::OwnershipCommand),
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

/// Runs an admin command.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let client = Client::connect(
        &args.connection_string,
        args.endpoint.as_deref(),
        args.ca_cert.as_deref(),
        args.instance.as_deref(),
    )
    .context("the --connection-string, --endpoint or --ca-cert options")?;
    let output = args.output;
    match &args.command {
        AdminCommand::Enrollment(command) => {
            enrollments::run(&client, output, command, "enrollments", "registrationId").await
        }
        AdminCommand::Group(command) => {
            enrollments::run(
                &client,
                output,
                command,
                "enrollmentGroups",
                "enrollmentGroupId",
            )
            .await
        }
        AdminCommand::Registration(command) => registrations::run(&client, output, command).await,
        AdminCommand::Hub(command) => hubs::run(&client, output, command).await,
        AdminCommand::Instance(command) => instances::run(&client, output, command).await,
        AdminCommand::Policy(command) => policies::run(&client, output, command).await,
        AdminCommand::Certificate(command) => certificates::run(&client, output, command).await,
        AdminCommand::IssuedCertificate(command) => issued::run(&client, output, command).await,
        AdminCommand::Event(EventCommand::List(filters)) => {
            events::list(&client, output, filters).await
        }
        AdminCommand::Audit(AuditCommand::List(filters)) => {
            audit::list(&client, output, filters).await
        }
        AdminCommand::IssuingCa(command) => issuing::cas(&client, output, command).await,
        AdminCommand::CredentialPolicy(command) => {
            issuing::policies(&client, output, command).await
        }
        AdminCommand::Owner(command) => ownership::owners(&client, output, command).await,
        AdminCommand::Ownership(command) => ownership::records(&client, output, command).await,
        AdminCommand::Token { lifetime } => {
            policies::token(&client, output, *lifetime);
            Ok(())
        }
        AdminCommand::ConnectionString { policy } => {
            policies::connection_string(&client, output, policy).await
        }
    }
}

//! `audit list`: the audit log of admin writes and key reads, filtered.

use clap::Args;
use dps_admin_client::{Client, Method};

use crate::print::{self, Output};

/// Filters of `audit list`; each given one must match.
#[derive(Debug, Args)]
pub struct AuditFilters {
    /// The kind of record: enrollment, enrollment-group, registration, access-policy,
    /// linked-hub, instance, ...
    #[arg(long)]
    pub resource_kind: Option<String>,
    /// The record's id (with --resource-kind).
    #[arg(long, requires = "resource_kind")]
    pub resource_id: Option<String>,
    /// The shared access policy that made the change.
    #[arg(long)]
    pub policy: Option<String>,
    /// From this time on (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
}

/// Lists the entries that match `filters`, oldest first (`--output json` shows what changed).
pub async fn list(client: &Client, output: Output, filters: &AuditFilters) -> anyhow::Result<()> {
    let path = print::with_query(
        "/auditLog",
        &[
            ("resourceKind", &filters.resource_kind),
            ("resourceId", &filters.resource_id),
            ("policy", &filters.policy),
            ("from", &filters.from),
            ("to", &filters.to),
        ],
    );
    let columns = ["time", "action", "resourceKind", "resourceId", "policy"];
    print::list(client, output, Method::GET, &path, true, &columns).await
}

//! `event list`: registration outcomes, filtered.

use clap::Args;
use dps_admin_client::{Client, Method};

use crate::print::{self, Output};

/// Filters of `event list`; each given one must match.
#[derive(Debug, Args)]
pub struct EventFilters {
    /// registration.assigned, registration.moved, registration.failed or registration.disabled.
    #[arg(long)]
    pub kind: Option<String>,
    /// The device.
    #[arg(long)]
    pub registration_id: Option<String>,
    /// The individual enrollment.
    #[arg(long, conflicts_with = "group")]
    pub enrollment: Option<String>,
    /// The enrollment group.
    #[arg(long)]
    pub group: Option<String>,
    /// From this time on (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
}

/// Lists the events that match `filters`, oldest first.
pub async fn list(client: &Client, output: Output, filters: &EventFilters) -> anyhow::Result<()> {
    let path = print::with_query(
        "/events",
        &[
            ("kind", &filters.kind),
            ("registrationId", &filters.registration_id),
            ("enrollmentId", &filters.enrollment),
            ("enrollmentGroupId", &filters.group),
            ("from", &filters.from),
            ("to", &filters.to),
        ],
    );
    let columns = [
        "time",
        "kind",
        "registrationId",
        "assignedHub",
        "errorCode",
        "transport",
    ];
    print::list(client, output, Method::GET, &path, true, &columns).await
}

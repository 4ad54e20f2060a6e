//! What device requests need of an instance's enrollment groups, CA certificates, linked hubs,
//! issuing CAs, credential policies and revoked certificates, read and parsed once, and kept
//! until they change: symmetric-key groups with their decoded keys, the TPM group, X.509
//! anchors indexed by subject name, the hubs a registration chooses among, what issues
//! certificates, and which issued ones no longer admit.
//!
//! Unauthenticated requests must not cost more as the instance grows (security review item
//! 9). Without this, every SAS request for an unknown id listed and parsed every group, and
//! every X.509 request verified its chain against every group's anchors with every uploaded
//! certificate. Now a request costs one read (the version below) plus, for X.509, path
//! verification against only the anchors whose subject is on the device's possible path.
//!
//! Every write to an instance's enrollment groups, CA certificates, linked hubs, issuing CAs,
//! credential policies or revocations also changes
//! its credentials version, in the same transaction ([`credentials_changed`]); a request reads
//! the version and rebuilds the index when it differs, so no process (and no replica) uses
//! stale credentials or hubs for longer than one read.

use std::sync::Arc;

use dps_protocol::admin::{CaCertificate, LinkedHub};
use dps_protocol::enrollment::EnrollmentGroup;

use crate::domain::DomainError;
use crate::state::AppState;
use crate::store::{Kind, Page, Write};
use crate::trust::Credentials;

/// The storage key of an instance's credentials version.
pub(crate) const VERSION_KEY: &str = "credentials";
/// Groups and certificates read per page when the index is built.
const PAGE: usize = 500;

/// The write that marks an instance's groups or CA certificates as changed: part of the same
/// transaction as the change.
pub fn credentials_changed(ns: &str) -> Write {
    Write::CredentialsChanged { ns: ns.to_owned() }
}

/// The instance's credentials as of now: one read of the version, and a rebuild when it
/// changed.
pub async fn of(state: &AppState, instance: &str) -> Result<Arc<Credentials>, DomainError> {
    let version = state
        .store
        .get(instance, Kind::CredentialsVersion, VERSION_KEY)
        .await?
        .map(|stored| stored.etag);
    at_version(state, instance, version).await
}

/// The instance's credentials as of `version`, which the caller read: rebuilt when the cached
/// index is of another version.
pub async fn at_version(
    state: &AppState,
    instance: &str,
    version: Option<String>,
) -> Result<Arc<Credentials>, DomainError> {
    state
        .credentials
        .get_or_build(instance, version, |version| build(state, instance, version))
        .await
}

/// Reads and parses the instance's credentials, to be kept under `version`.
async fn build(
    state: &AppState,
    instance: &str,
    version: Option<String>,
) -> Result<Credentials, DomainError> {
    // Read after the version: what is loaded is at least as new as the version it is kept
    // under, so a change made meanwhile shows at the next read.
    let cas = all_of::<CaCertificate>(state, instance, Kind::CaCertificate).await?;
    let groups = all_of::<EnrollmentGroup>(state, instance, Kind::EnrollmentGroup).await?;
    let hubs = all_of::<LinkedHub>(state, instance, Kind::LinkedHub).await?;
    let issuing = all_of(state, instance, Kind::CertificateAuthority).await?;
    let policies = all_of(state, instance, Kind::CredentialPolicy).await?;
    let revoked =
        all_of::<dps_protocol::admin::IssuedCertificate>(state, instance, Kind::RevokedCertificate)
            .await?
            .iter()
            .filter_map(|r| crate::domain::issued_certificates::serial_key(&r.serial_number).ok())
            .collect();
    Ok(
        Credentials::build(version, cas, groups, hubs, &state.certificates)
            .with_issuance(issuing, policies, revoked),
    )
}

/// Every document of `kind` in `instance`, parsed.
async fn all_of<T: serde::de::DeserializeOwned>(
    state: &AppState,
    instance: &str,
    kind: Kind,
) -> Result<Vec<T>, DomainError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list(
                instance,
                kind,
                Page {
                    parent: None,
                    after: after.as_deref(),
                    limit: PAGE,
                },
            )
            .await?;
        for stored in &page {
            out.push(stored.doc_json()?);
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.key.clone()),
            _ => return Ok(out),
        }
    }
}

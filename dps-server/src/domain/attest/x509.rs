//! X.509 attestation: the device presents its certificate (and intermediates) in the TLS
//! handshake, which proved it holds the leaf's key. The leaf must name the registration id, and
//! must not be a certificate this server issued and an admin revoked; then an individual
//! enrollment whose client certificate has the leaf's thumbprint admits it, else
//! the enrollment groups whose anchors verify its chain: a group that revokes a certificate of
//! the verified path refuses, a disabled one blocks, otherwise the group closest to the leaf
//! admits.

use std::sync::Arc;

use attestation::chain::{ChainError, check_leaf, verify_chain};
use attestation::x509::{CertificateFacts, ParsedCache, ParsedCertificate, parse_der};
use dps_protocol::enrollment::{AttestationMechanism, AttestationType, EnrollmentGroup};
use dps_protocol::ids::RegistrationId;

use super::{Attested, DeviceReads, Source, disabled_reason, group_disabled_reason};
use crate::cache::Credential;
use crate::domain::DomainError;
use crate::domain::credentials;
use crate::domain::issued_certificates;
use crate::state::AppState;
use crate::trust::Anchor;

/// The client certificates of an individual X.509 enrollment, parsed.
fn client_certificates(
    attestation: &AttestationMechanism,
    cache: &ParsedCache,
) -> Vec<Arc<ParsedCertificate>> {
    if attestation.kind != AttestationType::X509 {
        return Vec::new();
    }
    attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .into_iter()
        .flat_map(|c| [c.primary.as_ref(), c.secondary.as_ref()])
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|text| cache.parse(text).ok())
        .collect()
}

/// Whether the group's revocation list names any certificate of `path` (by either
/// thumbprint, or serial).
fn revokes(group: &EnrollmentGroup, path: &[CertificateFacts]) -> bool {
    let Some(revoked) = group
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.revoked_certificates.as_ref())
    else {
        return false;
    };
    path.iter().any(|cert| {
        let serial = crate::domain::validate::normal_serial(&cert.serial_number);
        revoked
            .thumbprints
            .iter()
            .any(|t| *t == cert.sha1_thumbprint || *t == cert.sha256_thumbprint)
            || revoked
                .serial_numbers
                .iter()
                .any(|s| Some(s) == serial.as_ref())
    })
}

/// An anchor that verified the device's chain, and the verified path to it.
struct Verified<'a> {
    anchor: &'a Anchor,
    /// Leaf, intermediates, anchor.
    path: Vec<CertificateFacts>,
}

/// X.509: see the module documentation for the order.
pub(super) async fn authenticate(
    state: &AppState,
    instance: &str,
    id: &RegistrationId,
    chain: &[Vec<u8>],
    reads: &DeviceReads,
) -> Result<Attested, DomainError> {
    let now = crate::domain::unix_now();
    let rejected = |e: ChainError| DomainError::unauthorized(e.to_string());
    let leaf = check_leaf(chain, id.as_str(), now).map_err(rejected)?;
    let credentials =
        credentials::at_version(state, instance, reads.credentials_version.clone()).await?;
    issued_certificates::refuse_revoked(&credentials, &leaf.facts)?;

    // An individually enrolled id is admitted by its own certificate only, never by a group's
    // (security review item 2).
    if let Some(enrollment) = reads.enrollment.clone() {
        let enrolled = client_certificates(&enrollment.attestation, &state.certificates);
        if enrolled
            .iter()
            .any(|c| c.facts.sha256_thumbprint == leaf.facts.sha256_thumbprint)
        {
            return Ok(Attested {
                disabled: disabled_reason(&enrollment),
                source: Source::Individual(Box::new(enrollment)),
                credential: Credential::Certificate(leaf.facts.sha256_thumbprint.clone()),
                certificate: Some((leaf.facts, None)),
                tpm: None,
            });
        }
        return Err(not_enrolled_certificate());
    }

    let (anchors, extra) = credentials.anchors_on_the_way(&leaf, chain);
    let mut verified: Vec<Verified<'_>> = Vec::new();
    let mut first_error = None;
    for anchor in anchors {
        match verify_chain(chain, &anchor.certificate.der, &extra, now) {
            Ok(intermediates) => {
                let mut path = vec![leaf.facts.clone()];
                path.extend(
                    intermediates
                        .iter()
                        .filter_map(|der| parse_der(der).ok().map(|p| p.facts)),
                );
                path.push(anchor.certificate.facts.clone());
                verified.push(Verified { anchor, path });
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // Every group on a verified path has its say, whatever order the device sent its chain
    // in: one that revokes a certificate of the path refuses, one that is disabled blocks
    // (security review item 15). Otherwise the group closest to the leaf admits.
    for candidate in &verified {
        if let Some(group) = candidate
            .anchor
            .groups
            .iter()
            .find(|g| revokes(g, &candidate.path))
        {
            return Err(DomainError::unauthorized(format!(
                "the device certificate's chain is revoked by enrollment group '{}'",
                group.enrollment_group_id
            )));
        }
    }
    let chosen = verified
        .iter()
        .flat_map(|v| v.anchor.groups.iter().map(move |g| (v, g)))
        .min_by(|(a, g), (b, h)| {
            let blocked = |g: &EnrollmentGroup| group_disabled_reason(g).is_none();
            (blocked(g), a.path.len(), &g.enrollment_group_id).cmp(&(
                blocked(h),
                b.path.len(),
                &h.enrollment_group_id,
            ))
        });
    match chosen {
        Some((verified, group)) => Ok(Attested {
            credential: Credential::Certificate(leaf.facts.sha256_thumbprint.clone()),
            disabled: group_disabled_reason(group),
            source: Source::Group(Box::new(EnrollmentGroup::clone(group))),
            certificate: Some((leaf.facts, Some(verified.anchor.certificate.facts.clone()))),
            tpm: None,
        }),
        None => Err(match first_error {
            Some(e) => rejected(e),
            None => not_enrolled_certificate(),
        }),
    }
}

fn not_enrolled_certificate() -> DomainError {
    DomainError::unauthorized(
        "the device certificate is not enrolled and its chain reaches no enrollment group's signing certificate",
    )
}

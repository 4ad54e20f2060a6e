//! Checks and normalises enrollments before they are stored: every field gets a clear 400,
//! omitted symmetric keys are generated (or kept from the stored version on update), and
//! certificates are parsed so that reads can show their facts.

use std::collections::HashMap;

use allocation_policies::registry::Registry;
use attestation::SymmetricKey;
use attestation::x509::parse_certificate;
use dps_protocol::ErrorCode;
use dps_protocol::enrollment::{
    AttestationMechanism, AttestationType, EnrollmentSettings, ProvisioningStatus,
    ReprovisionPolicy, SymmetricKeyAttestation, TpmAttestation, X509Attestation,
    X509CertificateInfo, X509CertificateWithInfo, X509Certificates, X509Revocations,
};
use dps_protocol::ids::check_host_name;
use serde_json::Value;

use crate::domain::error::DomainError;
use crate::store::{Kind, Store};

/// Whether the enrollment describes one device or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// An individual enrollment.
    Individual,
    /// An enrollment group.
    Group,
}

/// Validates enrollments of one instance, remembering which hubs are linked.
#[derive(Debug)]
pub struct Validator<'a> {
    store: &'a dyn Store,
    policies: &'a Registry,
    instance: &'a str,
    linked: HashMap<String, bool>,
}

impl<'a> Validator<'a> {
    /// A validator for `instance`; policy names must be registered in `policies`.
    pub fn new(store: &'a dyn Store, policies: &'a Registry, instance: &'a str) -> Self {
        Self {
            store,
            policies,
            instance,
            linked: HashMap::new(),
        }
    }

    async fn is_linked(&mut self, host: &str) -> Result<bool, DomainError> {
        let key = host.to_ascii_lowercase();
        if let Some(known) = self.linked.get(&key) {
            return Ok(*known);
        }
        let found = self
            .store
            .get(self.instance, Kind::LinkedHub, &key)
            .await?
            .is_some();
        self.linked.insert(key, found);
        Ok(found)
    }

    /// Checks that the CA certificates an X.509 group names exist in the instance (verified
    /// or not: an unverified one simply admits no device until it is verified).
    pub async fn ca_references(
        &mut self,
        attestation: &AttestationMechanism,
    ) -> Result<(), DomainError> {
        let Some(refs) = attestation
            .x509
            .as_ref()
            .and_then(|x| x.ca_references.as_ref())
        else {
            return Ok(());
        };
        for (field, name) in [("primary", &refs.primary), ("secondary", &refs.secondary)] {
            let Some(name) = name else { continue };
            let found = self
                .store
                .get(
                    self.instance,
                    Kind::CaCertificate,
                    &name.to_ascii_lowercase(),
                )
                .await?
                .is_some();
            if !found {
                return Err(field_error(
                    &format!("attestation.x509.caReferences.{field}"),
                    format!(
                        "CA certificate '{name}' does not exist in this instance; upload it under /certificates"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks and normalises the settings shared by enrollments and groups.
    pub async fn settings(&mut self, settings: &mut EnrollmentSettings) -> Result<(), DomainError> {
        settings.etag = None;
        settings.created_date_time_utc = None;
        settings.last_updated_date_time_utc = None;

        let policy: Option<String> = match settings.allocation_policy.as_deref() {
            Some(name) => {
                let (canonical, _) = self.policies.get(name).ok_or_else(|| {
                    field_error(
                        "allocationPolicy",
                        format!(
                            "unknown allocation policy '{name}'; use one of {}",
                            self.policies.names().join(", ")
                        ),
                    )
                })?;
                settings.allocation_policy = Some(canonical.to_owned());
                Some(canonical.to_owned())
            }
            None => None,
        };

        let mut hubs: Vec<String> = Vec::new();
        if let Some(list) = &settings.iot_hubs {
            hubs.extend(list.iter().cloned());
        }
        if let Some(single) = &settings.iot_hub_host_name {
            hubs.push(single.clone());
        }
        for hub in &hubs {
            check_host_name(hub).map_err(|e| field_error("iotHubs", e.to_string()))?;
            if !self.is_linked(hub).await? {
                return Err(field_error(
                    "iotHubs",
                    format!("'{hub}' is not a linked hub of this instance; link it first"),
                ));
            }
        }
        if let Some(list) = &mut settings.iot_hubs {
            for hub in list.iter_mut() {
                *hub = hub.to_ascii_lowercase();
            }
            list.dedup();
        }

        // Without a hub, `static` takes the instance's one linked hub that applies allocation
        // (as Azure does); whether there is exactly one is decided when a device registers.
        if policy.as_deref() == Some("static") {
            let distinct: std::collections::BTreeSet<String> =
                hubs.iter().map(|h| h.to_ascii_lowercase()).collect();
            if distinct.len() > 1 {
                return Err(field_error(
                    "iotHubs",
                    "the static allocation policy takes at most one hub in iotHubs or iotHubHostName",
                ));
            }
        }
        if policy.as_deref() == Some("custom") {
            let definition = settings
                .custom_allocation_definition
                .as_ref()
                .ok_or_else(|| {
                    field_error(
                        "customAllocationDefinition",
                        "the custom allocation policy needs customAllocationDefinition",
                    )
                })?;
            check_endpoint_url(
                "customAllocationDefinition.webhookUrl",
                &definition.webhook_url,
            )?;
            if !is_api_version(&definition.api_version) {
                return Err(field_error(
                    "customAllocationDefinition.apiVersion",
                    "apiVersion must look like 2021-10-01 or 2019-03-31-preview",
                ));
            }
        }

        if let Some(twin) = &settings.initial_twin {
            check_initial_twin(twin)?;
        }
        check_certificate_policy_names(settings)?;
        settings.provisioning_status = Some(
            settings
                .provisioning_status
                .unwrap_or(ProvisioningStatus::Enabled),
        );
        if settings.reprovision_policy.is_none() {
            settings.reprovision_policy = Some(ReprovisionPolicy::default());
        }
        Ok(())
    }
}

/// The names that link an enrollment to a certificate policy: each a short name, and the three
/// names of the newer API version given together or not at all.
fn check_certificate_policy_names(settings: &EnrollmentSettings) -> Result<(), DomainError> {
    let named = [
        ("credentialPolicyName", &settings.credential_policy_name),
        ("namespaceName", &settings.namespace_name),
        (
            "certificateAuthorityName",
            &settings.certificate_authority_name,
        ),
        ("certificatePolicyName", &settings.certificate_policy_name),
    ];
    for (field, value) in named {
        if let Some(name) = value {
            dps_protocol::ids::check_name(field, name, 128)
                .map_err(|e| field_error(field, e.to_string()))?;
        }
    }
    let given = named[1..].iter().filter(|(_, v)| v.is_some()).count();
    if given != 0 && given != 3 {
        return Err(field_error(
            "certificatePolicyName",
            "namespaceName, certificateAuthorityName and certificatePolicyName are given together or not at all",
        ));
    }
    Ok(())
}

/// Checks and normalises an attestation. Omitted symmetric keys are taken from `existing` (the
/// stored version, on update) or generated.
pub fn attestation(
    scope: Scope,
    attestation: &mut AttestationMechanism,
    existing: Option<&AttestationMechanism>,
) -> Result<(), DomainError> {
    let only = |present: bool, name: &str| {
        if present {
            Err(field_error(
                "attestation",
                format!(
                    "attestation type '{}' cannot carry '{name}'",
                    attestation.kind.as_str()
                ),
            ))
        } else {
            Ok(())
        }
    };
    match attestation.kind {
        AttestationType::None => Err(field_error(
            "attestation.type",
            "attestation type must be tpm, x509 or symmetricKey",
        )),
        AttestationType::SymmetricKey => {
            only(attestation.tpm.is_some(), "tpm")?;
            only(attestation.x509.is_some(), "x509")?;
            let previous = existing
                .filter(|e| e.kind == AttestationType::SymmetricKey)
                .and_then(|e| e.symmetric_key.as_ref());
            let keys = attestation
                .symmetric_key
                .get_or_insert_with(SymmetricKeyAttestation::default);
            keys.primary_key = Some(key_or_generate(
                "attestation.symmetricKey.primaryKey",
                keys.primary_key.as_deref(),
                previous.and_then(|p| p.primary_key.as_deref()),
            )?);
            keys.secondary_key = Some(key_or_generate(
                "attestation.symmetricKey.secondaryKey",
                keys.secondary_key.as_deref(),
                previous.and_then(|p| p.secondary_key.as_deref()),
            )?);
            Ok(())
        }
        AttestationType::Tpm => {
            only(attestation.x509.is_some(), "x509")?;
            only(attestation.symmetric_key.is_some(), "symmetricKey")?;
            if scope == Scope::Group {
                // Members prove their EK with an EK certificate; the group names no key.
                return only(attestation.tpm.is_some(), "tpm");
            }
            let tpm = attestation.tpm.as_ref().ok_or_else(|| {
                missing("attestation.tpm", "TPM attestation needs attestation.tpm")
            })?;
            check_tpm(tpm)
        }
        AttestationType::X509 => {
            only(attestation.tpm.is_some(), "tpm")?;
            only(attestation.symmetric_key.is_some(), "symmetricKey")?;
            let x509 = attestation.x509.as_mut().ok_or_else(|| {
                missing(
                    "attestation.x509",
                    "X.509 attestation needs attestation.x509",
                )
            })?;
            check_x509(scope, x509, existing.and_then(|e| e.x509.as_ref()))
        }
    }
}

/// A base64 key: the one sent, else the stored one, else a new one; normalised.
pub fn key_or_generate(
    field: &str,
    sent: Option<&str>,
    previous: Option<&str>,
) -> Result<String, DomainError> {
    match sent.filter(|k| !k.is_empty()).or(previous) {
        Some(key) => SymmetricKey::from_base64(key)
            .map(|k| k.to_base64())
            .map_err(|e| field_error(field, e.to_string())),
        None => SymmetricKey::generate()
            .map(|k| k.to_base64())
            .map_err(|e| DomainError::internal("generating a key", &e)),
    }
}

/// The enrolled EK (and SRK, when given) must be the standard RSA-2048 templates: a device
/// could never prove any other.
fn check_tpm(tpm: &TpmAttestation) -> Result<(), DomainError> {
    use attestation::tpm::{KeyRole, RsaPublic};
    let refuse = |field: &str| {
        let field = field.to_owned();
        move |e: attestation::tpm::TpmError| {
            DomainError::new(ErrorCode::InvalidTpmKey, e.to_string())
                .with_info("field", field.clone())
        }
    };
    RsaPublic::from_base64(&tpm.endorsement_key, KeyRole::Endorsement)
        .map_err(refuse("attestation.tpm.endorsementKey"))?;
    if let Some(srk) = &tpm.storage_root_key {
        RsaPublic::from_base64(srk, KeyRole::StorageRoot)
            .map_err(refuse("attestation.tpm.storageRootKey"))?;
    }
    Ok(())
}

fn check_x509(
    scope: Scope,
    x509: &mut X509Attestation,
    existing: Option<&X509Attestation>,
) -> Result<(), DomainError> {
    match scope {
        Scope::Individual => {
            if x509.signing_certificates.is_some() || x509.ca_references.is_some() {
                return Err(field_error(
                    "attestation.x509",
                    "individual enrollments use clientCertificates, not signingCertificates or caReferences",
                ));
            }
            if x509.revoked_certificates.is_some() {
                return Err(field_error(
                    "attestation.x509.revokedCertificates",
                    "only groups list revoked certificates; disable the individual enrollment instead",
                ));
            }
            let certs = x509.client_certificates.as_mut().ok_or_else(|| {
                missing(
                    "attestation.x509.clientCertificates",
                    "an X.509 individual enrollment needs clientCertificates",
                )
            })?;
            let previous = existing.and_then(|e| e.client_certificates.as_ref());
            certificates(
                "attestation.x509.clientCertificates",
                certs,
                previous,
                false,
            )
        }
        Scope::Group => {
            if x509.client_certificates.is_some() {
                return Err(field_error(
                    "attestation.x509",
                    "enrollment groups use signingCertificates or caReferences, not clientCertificates",
                ));
            }
            if let Some(revoked) = &mut x509.revoked_certificates {
                check_revocations(revoked)?;
            }
            match (&mut x509.signing_certificates, &x509.ca_references) {
                (Some(certs), None) => {
                    let previous = existing.and_then(|e| e.signing_certificates.as_ref());
                    certificates(
                        "attestation.x509.signingCertificates",
                        certs,
                        previous,
                        true,
                    )
                }
                (None, Some(refs)) => {
                    // That the names exist is checked against storage by
                    // [`Validator::ca_references`].
                    refs.primary.as_deref().ok_or_else(|| {
                        missing(
                            "attestation.x509.caReferences.primary",
                            "caReferences needs a primary CA name",
                        )
                    })?;
                    Ok(())
                }
                (Some(_), Some(_)) => Err(field_error(
                    "attestation.x509",
                    "give signingCertificates or caReferences, not both",
                )),
                (None, None) => Err(missing(
                    "attestation.x509.signingCertificates",
                    "an X.509 enrollment group needs signingCertificates or caReferences",
                )),
            }
        }
    }
}

/// Normalises a group's revocation list: thumbprints are 40 (SHA-1) or 64 (SHA-256) hex
/// digits, serials are hex; both upper-case, serials without separators or leading zeros.
fn check_revocations(revoked: &mut X509Revocations) -> Result<(), DomainError> {
    for thumbprint in &mut revoked.thumbprints {
        let hex: String = thumbprint
            .chars()
            .filter(|c| !matches!(c, ':' | ' '))
            .collect();
        if !matches!(hex.len(), 40 | 64) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(field_error(
                "attestation.x509.revokedCertificates.thumbprints",
                format!("'{thumbprint}' is not a SHA-1 or SHA-256 thumbprint in hex"),
            ));
        }
        *thumbprint = hex.to_ascii_uppercase();
    }
    for serial in &mut revoked.serial_numbers {
        *serial = normal_serial(serial).ok_or_else(|| {
            field_error(
                "attestation.x509.revokedCertificates.serialNumbers",
                format!("'{serial}' is not a serial number in hex"),
            )
        })?;
    }
    Ok(())
}

/// Longest serial number a revocation list takes, hex digits. RFC 5280 allows 20 bytes, but
/// longer ones are seen in the field and must be revocable too.
const MAX_SERIAL_HEX: usize = 256;

/// A certificate serial in one spelling: upper-case hex, no separators or leading zeros.
pub fn normal_serial(serial: &str) -> Option<String> {
    let hex: String = serial
        .trim()
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect();
    if hex.is_empty() || hex.len() > MAX_SERIAL_HEX || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // Leading zeros (a DER sign byte, say) are not part of the number.
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_ascii_uppercase()
    })
}

/// Parses the primary and secondary certificate, keeping a stored one when only its info is
/// sent back (what a client does after reading the enrollment).
fn certificates(
    field: &str,
    certs: &mut X509Certificates,
    previous: Option<&X509Certificates>,
    must_be_ca: bool,
) -> Result<(), DomainError> {
    let slots = [
        (
            "primary",
            &mut certs.primary,
            previous.and_then(|p| p.primary.as_ref()),
        ),
        (
            "secondary",
            &mut certs.secondary,
            previous.and_then(|p| p.secondary.as_ref()),
        ),
    ];
    for (name, slot, before) in slots {
        let Some(cert) = slot.as_mut() else { continue };
        let text = match (&cert.certificate, before) {
            (Some(text), _) => text.clone(),
            (
                None,
                Some(X509CertificateWithInfo {
                    certificate: Some(text),
                    ..
                }),
            ) => text.clone(),
            (None, _) => {
                return Err(missing(
                    &format!("{field}.{name}.certificate"),
                    "the certificate is missing",
                ));
            }
        };
        let at = format!("{field}.{name}.certificate");
        let parsed = parse_certificate(&text).map_err(|e| field_error(&at, e.to_string()))?;
        if must_be_ca && !parsed.facts.is_ca {
            return Err(field_error(
                &at,
                "a signing certificate must be a CA certificate (basic constraints CA:true)",
            ));
        }
        // The verifier must be able to use it: a device certificate it cannot parse would be
        // admitted without proof of possession (security review item 1).
        let usable = if must_be_ca {
            attestation::chain::check_anchor(&parsed.der)
        } else {
            attestation::chain::check_end_entity(&parsed.der)
        };
        usable.map_err(|e| field_error(&at, e.to_string()))?;
        *cert = X509CertificateWithInfo {
            certificate: Some(text),
            info: Some(info_of(parsed.facts)),
        };
    }
    if certs.primary.is_none() {
        return Err(missing(
            &format!("{field}.primary"),
            "a primary certificate is required",
        ));
    }
    Ok(())
}

/// The wire form of what a certificate says.
pub fn info_of(facts: attestation::x509::CertificateFacts) -> X509CertificateInfo {
    X509CertificateInfo {
        subject_name: facts.subject_name,
        sha1_thumbprint: facts.sha1_thumbprint,
        sha256_thumbprint: facts.sha256_thumbprint,
        issuer_name: facts.issuer_name,
        not_before_utc: facts.not_before_utc,
        not_after_utc: facts.not_after_utc,
        serial_number: facts.serial_number,
        version: facts.version,
    }
}

/// Removes what reads must not show: symmetric keys and certificate bodies (their facts stay).
pub fn hide_secrets(attestation: &mut AttestationMechanism) {
    if let Some(keys) = &mut attestation.symmetric_key {
        keys.primary_key = None;
        keys.secondary_key = None;
    }
    if let Some(x509) = &mut attestation.x509 {
        for certs in [
            &mut x509.client_certificates,
            &mut x509.signing_certificates,
        ]
        .into_iter()
        .flatten()
        {
            for cert in [&mut certs.primary, &mut certs.secondary]
                .into_iter()
                .flatten()
            {
                cert.certificate = None;
            }
        }
    }
}

/// Removes from `answer` the symmetric keys `sent` omitted: on an update they were kept from
/// the stored version, and an answer never echoes a secret the request did not send.
pub fn hide_unsent_keys(answer: &mut AttestationMechanism, sent: &AttestationMechanism) {
    let sent_keys = sent.symmetric_key.as_ref();
    let omitted =
        |key: Option<&Option<String>>| key.and_then(Option::as_deref).is_none_or(str::is_empty);
    if let Some(keys) = &mut answer.symmetric_key {
        if omitted(sent_keys.map(|k| &k.primary_key)) {
            keys.primary_key = None;
        }
        if omitted(sent_keys.map(|k| &k.secondary_key)) {
            keys.secondary_key = None;
        }
    }
}

fn check_initial_twin(twin: &Value) -> Result<(), DomainError> {
    let Value::Object(map) = twin else {
        return Err(field_error("initialTwin", "initialTwin must be an object"));
    };
    if let Some(tags) = map.get("tags")
        && !(tags.is_object() || tags.is_null())
    {
        return Err(field_error("initialTwin.tags", "tags must be an object"));
    }
    if let Some(properties) = map.get("properties") {
        let desired_ok = match properties {
            Value::Null => true,
            Value::Object(p) => p
                .get("desired")
                .is_none_or(|d| d.is_object() || d.is_null()),
            _ => false,
        };
        if !desired_ok {
            return Err(field_error(
                "initialTwin.properties",
                "properties must be an object whose 'desired' is an object",
            ));
        }
    }
    Ok(())
}

/// An endpoint URL (webhook, connector): absolute `https://`, or `http://` to a loopback
/// address (development and tests; keys and payloads must not cross a network in clear text).
pub fn check_endpoint_url(field: &str, url: &str) -> Result<(), DomainError> {
    let loopback = |host: &str| {
        host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let ok = reqwest::Url::parse(url).is_ok_and(|u| match (u.scheme(), u.host_str()) {
        ("https", Some(_)) => true,
        ("http", Some(host)) => loopback(host),
        _ => false,
    });
    if ok {
        Ok(())
    } else {
        Err(field_error(
            field,
            "must be an absolute https:// URL (http:// only for a loopback address)",
        ))
    }
}

fn is_api_version(value: &str) -> bool {
    let date = value.strip_suffix("-preview").unwrap_or(value).as_bytes();
    date.len() == 10
        && date.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// A 400 naming the field at fault.
pub fn field_error(field: &str, message: impl Into<String>) -> DomainError {
    DomainError::invalid(format!("{field}: {}", message.into())).with_info("field", field)
}

fn missing(field: &str, message: &str) -> DomainError {
    DomainError::new(
        dps_protocol::ErrorCode::ArgumentNull,
        format!("{field}: {message}"),
    )
    .with_info("field", field)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    #[test]
    fn api_versions_are_dates_with_an_optional_preview_suffix() {
        for ok in ["2021-10-01", "2019-03-31", "2018-09-01-preview"] {
            assert!(is_api_version(ok), "{ok}");
        }
        for bad in ["", "2021", "2021-10-1", "2021-10-01-beta", "abcd-ef-gh"] {
            assert!(!is_api_version(bad), "{bad}");
        }
    }

    #[test]
    fn symmetric_keys_are_generated_kept_or_refused() {
        let mut fresh = AttestationMechanism {
            kind: AttestationType::SymmetricKey,
            tpm: None,
            x509: None,
            symmetric_key: None,
        };
        attestation(Scope::Individual, &mut fresh, None).unwrap();
        let keys = fresh.symmetric_key.clone().unwrap();
        assert_eq!(
            STANDARD.decode(keys.primary_key.unwrap()).unwrap().len(),
            64
        );

        let mut update = AttestationMechanism {
            symmetric_key: Some(SymmetricKeyAttestation::default()),
            ..fresh.clone()
        };
        attestation(Scope::Individual, &mut update, Some(&fresh)).unwrap();
        assert_eq!(
            update.symmetric_key, fresh.symmetric_key,
            "keys kept on update"
        );

        let mut bad = AttestationMechanism {
            symmetric_key: Some(SymmetricKeyAttestation {
                primary_key: Some("not base64!".into()),
                secondary_key: None,
            }),
            ..fresh
        };
        let err = attestation(Scope::Individual, &mut bad, None).unwrap_err();
        assert!(err.message().contains("primaryKey"), "{}", err.message());
    }

    #[test]
    fn tpm_keys_must_be_the_standard_templates() {
        let tpm = attestation::tpm::soft::SoftTpm::fixture(0).unwrap();
        let (ek, srk) = (
            STANDARD.encode(tpm.endorsement_key()),
            STANDARD.encode(tpm.storage_root_key()),
        );
        let keys = |ek: &str, srk: Option<&str>| TpmAttestation {
            endorsement_key: ek.to_owned(),
            storage_root_key: srk.map(str::to_owned),
        };
        assert!(check_tpm(&keys(&ek, Some(&srk))).is_ok());
        assert!(check_tpm(&keys(&ek, None)).is_ok());
        for bad in [
            keys(&srk, None),
            keys(&ek, Some(&ek)),
            keys(&STANDARD.encode([0, 2, 1, 2]), None),
            keys("***", None),
        ] {
            let err = check_tpm(&bad).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidTpmKey, "{}", err.message());
        }
    }
}

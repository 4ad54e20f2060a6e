//! An instance's own issuing CAs (`/certificateAuthorities`) and credential policies
//! (`/credentialPolicies`), beside those of the configuration.
//!
//! A CA is stored only once its key has been opened where it lives and shown to sign for the
//! CA certificate (or, for a key just generated inside a token, while it waits for its
//! certificate: its answer carries a signing request for the operator's CA). What a CA's key
//! reference may name is the server's decision ([`KeyRules`]): PKCS#11 modules from a list, key
//! files from one directory, PINs by file only. A CA is not deleted while a policy names it; a
//! policy names a CA of its instance and cannot take a configured policy's name.

use attestation::issuance::{IssuingCa, KeyType, certificate_request};
use attestation::x509::parse_der;
use base64::Engine;
use dps_pkcs11::{Pkcs11Error, Pkcs11Uri, PrivateKey, Signer};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{CertificateAuthority, CredentialPolicy};
use dps_protocol::ids::{check_host_name, check_name, check_resource_name};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose, SerialNumber};

use super::issuance::{
    KeyRefError, KeyRules, MAX_VALIDITY_DAYS, chain_of, key_types, open_instance_key,
};
use super::resources::{self, Resource, render};
use super::validate::{field_error, info_of};
use super::{DomainError, load};
use crate::state::AppState;
use crate::store::{Kind, Page, Precondition, StoreError};

/// A CA that can sign.
const ACTIVE: &str = "active";
/// A CA whose key was generated and whose certificate is still to come.
const PENDING: &str = "pendingCertificate";
/// Validity of a self-signed CA certificate.
const SELF_SIGNED_YEARS: i64 = 10;

impl Resource for CertificateAuthority {
    const KIND: Kind = Kind::CertificateAuthority;
    const ITEM_TYPE: &'static str = "CertificateAuthority";

    fn key_of(id: &str) -> Result<String, DomainError> {
        check_resource_name("certificate authority name", id)
            .map(|()| id.to_ascii_lowercase())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    /// Checked and completed by [`put_certificate_authority`] before it is stored; what is
    /// only written is not kept.
    fn prepare(&mut self, _previous: Option<&Self>) -> Result<(), DomainError> {
        self.etag = None;
        self.generate_key = None;
        self.self_signed = None;
        Ok(())
    }

    // A CA's document holds no secret: a PIN is referred to by file, a key by where it is.
    fn hide_secrets(&mut self) {}

    fn hide_unsent_secrets(&mut self, _sent: &Self, _previous: Option<&Self>) {}
}

impl Resource for CredentialPolicy {
    const KIND: Kind = Kind::CredentialPolicy;
    const ITEM_TYPE: &'static str = "CredentialPolicy";

    fn key_of(id: &str) -> Result<String, DomainError> {
        // The name enrollments give as credentialPolicyName.
        check_name("credential policy name", id, 128)
            .map(|()| id.to_ascii_lowercase())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    fn prepare(&mut self, _previous: Option<&Self>) -> Result<(), DomainError> {
        self.etag = None;
        check_resource_name(
            "certificate authority name",
            &self.certificate_authority_name,
        )
        .map_err(|e| field_error("certificateAuthorityName", e.to_string()))?;
        if let Some(days) = self.validity_in_days
            && !(1..=MAX_VALIDITY_DAYS).contains(&days)
        {
            return Err(field_error(
                "validityInDays",
                format!("1 to {MAX_VALIDITY_DAYS} days"),
            ));
        }
        key_types(&self.key_types).map_err(|e| field_error("keyTypes", e))?;
        for name in &self.dns_names {
            check_host_name(name).map_err(|e| field_error("dnsNames", e.to_string()))?;
        }
        Ok(())
    }

    fn hide_secrets(&mut self) {}

    fn hide_unsent_secrets(&mut self, _sent: &Self, _previous: Option<&Self>) {}
}

/// The 400 of a key reference the server will not use, or cannot.
fn key_error(error: KeyRefError) -> DomainError {
    field_error("key", error.to_string())
}

/// Refuses what the request itself gets wrong, or the server's rules do not allow, before any
/// lookup: a key type that does not exist, `generateKey` without a token URI alone or with a
/// chain, `selfSigned` without `generateKey`, a key reference outside what the instance may
/// name.
fn check_request(ns: &str, ca: &CertificateAuthority, rules: &KeyRules) -> Result<(), DomainError> {
    if let Some(kind) = &ca.generate_key {
        if KeyType::parse(kind).is_none() {
            return Err(field_error(
                "generateKey",
                "one of ecP256, ecP384, rsa2048, rsa3072",
            ));
        }
        if ca.key.pkcs11_uri.is_none() || ca.key.file.is_some() {
            return Err(field_error(
                "generateKey",
                "a key is generated inside a token: give key.pkcs11Uri alone",
            ));
        }
        if ca.certificate_chain.is_some() {
            return Err(field_error(
                "certificateChain",
                "a chain cannot certify a key not yet generated: generate it, then PUT the chain",
            ));
        }
    } else if ca.self_signed == Some(true) {
        return Err(field_error(
            "selfSigned",
            "only with generateKey (an existing key comes with its chain)",
        ));
    }
    match (&ca.key.pkcs11_uri, &ca.key.file) {
        (Some(uri), None) => rules.token_uri(ns, uri).map(|_| ()),
        (None, Some(file)) => rules.key_file(ns, file).map(|_| ()),
        _ => Err(KeyRefError::Refused(
            "key: give exactly one of pkcs11Uri and file".into(),
        )),
    }
    .map_err(key_error)
}

/// Deletes a key generated for a CA that was then not stored, so that a retry finds the
/// name free.
fn discard(name: &str, uri: &Pkcs11Uri) {
    let deleted = PrivateKey::open(uri, None, 1).and_then(|key| key.destroy(uri, None));
    if let Err(e) = deleted {
        tracing::warn!(ca = name, error = %e, "a key generated for an issuing CA that was not stored could not be deleted");
    }
}

/// A pending CA: its key's signing request, for the operator's CA to sign.
fn pending(
    mut ca: CertificateAuthority,
    key: &Signer,
) -> Result<CertificateAuthority, DomainError> {
    let request = certificate_request(key, &ca.name)
        .map_err(|e| field_error("key", format!("signing the request: {e}")))?;
    ca.certificate_chain = None;
    ca.status = Some(PENDING.into());
    ca.certificate_signing_request =
        Some(base64::engine::general_purpose::STANDARD.encode(request));
    Ok(ca)
}

/// Checks instance `ns`'s CA `ca` and opens (or generates) its key where it lives; returns
/// the document to store, active with its certificate's facts or pending with a signing
/// request (no chain given), and the URI of a key it generated.
fn complete(
    ns: &str,
    mut ca: CertificateAuthority,
    rules: &KeyRules,
) -> Result<(CertificateAuthority, Option<Pkcs11Uri>), DomainError> {
    ca.info = None;
    ca.status = None;
    ca.certificate_signing_request = None;
    let self_signed = ca.self_signed.unwrap_or(false);
    let Some(kind) = ca.generate_key.clone() else {
        let key = open_instance_key(ns, &ca.name, &ca.key, rules, 1).map_err(key_error)?;
        let ca = match ca.certificate_chain.is_some() {
            true => activate(ca, key)?,
            false => pending(ca, &key)?,
        };
        return Ok((ca, None));
    };
    // `check_request` saw to the rest.
    let (Some(kind), Some(uri)) = (KeyType::parse(&kind), &ca.key.pkcs11_uri) else {
        return Err(field_error("generateKey", "a key type and key.pkcs11Uri"));
    };
    let uri = rules.token_uri(ns, uri).map_err(key_error)?;
    let name = ca.name.clone();
    let key = PrivateKey::generate(&uri, None, kind.into(), 1).map_err(|e| match e {
        Pkcs11Error::Exists(_) => DomainError::new(
            ErrorCode::Conflict,
            "the token already holds an object of the URI's label or id: PUT without generateKey to use its key",
        ),
        other => field_error("key", other.to_string()),
    })?;
    tracing::info!(ca = %ca.name, "issuing CA key generated in its token");
    let key = Signer::Token(key);
    let completed = if self_signed {
        self_signed_certificate(&ca.name, &key).and_then(|chain| {
            ca.certificate_chain = Some(chain);
            activate(ca, key)
        })
    } else {
        pending(ca, &key)
    };
    match completed {
        Ok(ca) => Ok((ca, Some(uri))),
        Err(e) => {
            discard(&name, &uri);
            Err(e)
        }
    }
}

/// An active CA: its chain checked, and its key shown to sign for the chain's first
/// certificate.
fn activate(
    mut ca: CertificateAuthority,
    key: Signer,
) -> Result<CertificateAuthority, DomainError> {
    let chain = chain_of(ca.certificate_chain.as_deref().unwrap_or_default())
        .map_err(|e| field_error("certificateChain", e))?;
    let own = parse_der(&chain[0]).map_err(|e| field_error("certificateChain", e.to_string()))?;
    IssuingCa::new(chain, key).map_err(|e| field_error("certificateChain", e.to_string()))?;
    ca.info = Some(info_of(own.facts));
    ca.status = Some(ACTIVE.into());
    Ok(ca)
}

/// A root CA certificate for a key just generated: `CN=<name>`, ten years, path length 0.
fn self_signed_certificate(name: &str, key: &Signer) -> Result<String, DomainError> {
    let failed = |e: rcgen::Error| field_error("selfSigned", format!("signing: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut serial: [u8; 16] = attestation::keys::random_bytes()
        .map_err(|e| DomainError::internal("randomness for a serial", &e))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::days(365 * SELF_SIGNED_YEARS);
    Ok(params.self_signed(key).map_err(failed)?.pem())
}

/// Stores issuing CA `ca` of instance `ns` (see the module documentation).
pub async fn put_certificate_authority(
    state: &AppState,
    ns: &str,
    ca: CertificateAuthority,
    precondition: Precondition,
) -> Result<CertificateAuthority, DomainError> {
    let key = CertificateAuthority::key_of(&ca.name)?;
    // What the body and the rules alone refuse is refused before anything is looked up.
    check_request(ns, &ca, &state.issuance.rules)?;
    // The etag is checked before a key is generated for nothing (the write checks it again).
    let existing = state
        .store
        .get(ns, Kind::CertificateAuthority, &key)
        .await?;
    let stale = match (&precondition, &existing) {
        (Precondition::MustNotExist, Some(_)) => Some(StoreError::Exists {
            kind: Kind::CertificateAuthority,
            key: key.clone(),
        }),
        (Precondition::IfMatch(tag), found) if found.as_ref().is_none_or(|f| &f.etag != tag) => {
            Some(StoreError::EtagMismatch {
                kind: Kind::CertificateAuthority,
                key: key.clone(),
            })
        }
        _ => None,
    };
    if let Some(stale) = stale {
        return Err(stale.into());
    }
    let rules = state.issuance.rules.clone();
    let owner = ns.to_owned();
    // Tokens and files block: off the request threads.
    let (ca, generated) = tokio::task::spawn_blocking(move || complete(&owner, ca, &rules))
        .await
        .map_err(|e| DomainError::internal("checking an issuing CA", &e))??;
    let name = ca.name.clone();
    match resources::store_resource(state, ns, ca, precondition).await {
        Ok((stored, _)) => render(&stored, true),
        Err(e) => {
            // Only when the write surely did not happen (a commit whose answer was lost may
            // have stored the CA with this key).
            let refused = matches!(
                e.code(),
                ErrorCode::Conflict | ErrorCode::PreconditionFailed
            );
            if let (Some(uri), true) = (generated, refused) {
                tokio::task::spawn_blocking(move || discard(&name, &uri));
            }
            Err(e)
        }
    }
}

/// Deletes issuing CA `name`; refused while a credential policy names it. The key stays where
/// it is (a token key is the token owner's to delete).
pub async fn delete_certificate_authority(
    state: &AppState,
    ns: &str,
    name: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    CertificateAuthority::key_of(name)?;
    let policies = state
        .store
        .list(
            ns,
            Kind::CredentialPolicy,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    for row in &policies {
        let policy: CredentialPolicy = row.doc_json()?;
        if policy.certificate_authority_name.eq_ignore_ascii_case(name) {
            return Err(DomainError::new(
                ErrorCode::ConflictWithState,
                format!(
                    "credential policy '{}' names issuing CA '{name}'; change or delete it first",
                    policy.name
                ),
            ));
        }
    }
    resources::delete::<CertificateAuthority>(state, ns, name, precondition).await
}

/// Stores credential policy `policy` of instance `ns`: its CA must be one of the instance's,
/// and its name not a configured policy's (that one would be used instead).
pub async fn put_credential_policy(
    state: &AppState,
    ns: &str,
    policy: CredentialPolicy,
    precondition: Precondition,
) -> Result<CredentialPolicy, DomainError> {
    CredentialPolicy::key_of(&policy.name)?;
    if state.issuance.is_configured(&policy.name) {
        return Err(DomainError::new(
            ErrorCode::Conflict,
            format!(
                "'{}' is a credential policy of the server's configuration",
                policy.name
            ),
        ));
    }
    let ca = CertificateAuthority::key_of(&policy.certificate_authority_name)
        .map_err(|e| field_error("certificateAuthorityName", e.message()))?;
    if let Err(e) = load(state.store.as_ref(), ns, Kind::CertificateAuthority, &ca).await {
        return Err(match e.code() {
            ErrorCode::CertificateAuthorityNotFound => field_error(
                "certificateAuthorityName",
                format!(
                    "no issuing CA '{}' in this instance",
                    policy.certificate_authority_name
                ),
            ),
            _ => e,
        });
    }
    let (stored, _) = resources::store_resource(state, ns, policy, precondition).await?;
    render(&stored, true)
}

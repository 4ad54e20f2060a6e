//! What device authentication trusts, as data: the TPM manufacturers' certificates (from the
//! configuration), and per instance an index of its enrollment groups and CA certificates:
//! symmetric-key groups with their decoded keys, the TPM group, and X.509 anchors by subject
//! name. The domain layer reads them from the store (`domain::credentials`) and keeps
//! them here until the instance's credentials version changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use attestation::SymmetricKey;
use attestation::chain::MAX_CHAIN_CERTIFICATES;
use attestation::x509::{ParsedCache, ParsedCertificate, parse_der};
use dps_protocol::admin::{CaCertificate, CertificateAuthority, CredentialPolicy, LinkedHub};
use dps_protocol::enrollment::{AttestationMechanism, AttestationType, EnrollmentGroup};

use crate::config::TpmConfig;

/// What TPM attestation trusts: the manufacturers' certificates and the challenge lifetime.
#[derive(Debug, Clone, Default)]
pub struct TpmTrust {
    /// DER certificates an EK certificate may chain to.
    pub manufacturer_certificates: Vec<Vec<u8>>,
    /// How long a challenge's key may be used, seconds.
    pub challenge_ttl_secs: u64,
}

impl TpmTrust {
    /// Reads the configured manufacturer certificates (PEM files).
    pub fn load(config: &TpmConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut manufacturer_certificates = Vec::new();
        for path in &config.manufacturer_certificates {
            let before = manufacturer_certificates.len();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
                manufacturer_certificates.push(cert.to_vec());
            }
            if manufacturer_certificates.len() == before {
                anyhow::bail!("{} holds no PEM certificate", path.display());
            }
        }
        Ok(Self {
            manufacturer_certificates,
            challenge_ttl_secs: config.challenge_ttl_secs,
        })
    }
}

/// A symmetric-key group and its decoded keys.
#[derive(Debug)]
pub struct SasGroup {
    /// The group.
    pub group: Arc<EnrollmentGroup>,
    /// Its primary and secondary key.
    pub keys: [SymmetricKey; 2],
}

/// A certificate that anchors X.509 groups, and the groups it anchors.
#[derive(Debug)]
pub struct Anchor {
    /// The certificate.
    pub certificate: Arc<ParsedCertificate>,
    /// The groups whose anchor it is.
    pub groups: Vec<Arc<EnrollmentGroup>>,
}

/// One instance's credentials and linked hubs, as of one version: what device requests read of
/// its configuration.
#[derive(Debug, Default)]
pub struct Credentials {
    version: Option<String>,
    /// The linked hubs, in host-name order.
    pub linked_hubs: Vec<LinkedHub>,
    /// Symmetric-key groups, in group-id order.
    pub sas_groups: Vec<SasGroup>,
    /// Positions in `sas_groups` by lower-case group id.
    sas_by_id: HashMap<String, usize>,
    /// The TPM group (there is at most one).
    pub tpm_group: Option<Arc<EnrollmentGroup>>,
    anchors: HashMap<Vec<u8>, Vec<Arc<Anchor>>>,
    uploaded: HashMap<Vec<u8>, Vec<Arc<ParsedCertificate>>>,
    /// The instance's issuing CAs and credential policies by lower-case name.
    certificate_authorities: HashMap<String, CertificateAuthority>,
    credential_policies: HashMap<String, CredentialPolicy>,
    /// Serial numbers (lower-case hex, no leading zeros) of the instance's revoked issued
    /// certificates: the serial is under the CA's signature, where a thumbprint is not (an
    /// ECDSA signature has a second valid form, which changes the certificate's hash).
    revoked: std::collections::HashSet<String>,
}

impl Credentials {
    /// Adds the instance's issuing CAs, credential policies and the serial numbers of its
    /// revoked certificates (normalised, lower case).
    pub fn with_issuance(
        mut self,
        cas: Vec<CertificateAuthority>,
        policies: Vec<CredentialPolicy>,
        revoked: std::collections::HashSet<String>,
    ) -> Self {
        self.revoked = revoked;
        self.certificate_authorities = cas
            .into_iter()
            .map(|ca| (ca.name.to_ascii_lowercase(), ca))
            .collect();
        self.credential_policies = policies
            .into_iter()
            .map(|p| (p.name.to_ascii_lowercase(), p))
            .collect();
        self
    }

    /// The instance's issuing CA `name` (ignoring case).
    pub fn certificate_authority(&self, name: &str) -> Option<&CertificateAuthority> {
        self.certificate_authorities.get(&name.to_ascii_lowercase())
    }

    /// The instance's credential policy `name` (ignoring case).
    pub fn credential_policy(&self, name: &str) -> Option<&CredentialPolicy> {
        self.credential_policies.get(&name.to_ascii_lowercase())
    }

    /// Whether the certificate of this serial number (normalised, lower case) was issued here
    /// and revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains(serial)
    }
    /// The linked hub `host` (ignoring case).
    pub fn linked_hub(&self, host: &str) -> Option<&LinkedHub> {
        self.linked_hubs
            .iter()
            .find(|hub| hub.host_name.eq_ignore_ascii_case(host))
    }

    /// The symmetric-key group `id` (ignoring case).
    pub fn sas_group(&self, id: &str) -> Option<&SasGroup> {
        let at = *self.sas_by_id.get(&id.to_ascii_lowercase())?;
        self.sas_groups.get(at)
    }

    /// The anchors whose subject name is `subject` (DER).
    pub fn anchors_named(&self, subject: &[u8]) -> &[Arc<Anchor>] {
        self.anchors.get(subject).map_or(&[], Vec::as_slice)
    }

    /// The uploaded CA certificates whose subject name is `subject` (DER): intermediates a
    /// path may use.
    pub fn uploaded_named(&self, subject: &[u8]) -> &[Arc<ParsedCertificate>] {
        self.uploaded.get(subject).map_or(&[], Vec::as_slice)
    }

    /// The anchors that can be on a path from `leaf` (and the intermediates to build it with):
    /// those whose subject is the issuer of the leaf, or of a certificate the device sent or an
    /// admin uploaded that lies above it. Found by name, so the work is bounded by the length of
    /// a chain, not by the number of groups or certificates in the instance.
    pub fn anchors_on_the_way(
        &self,
        leaf: &ParsedCertificate,
        chain: &[Vec<u8>],
    ) -> (Vec<&Anchor>, Vec<Vec<u8>>) {
        let presented: Vec<ParsedCertificate> = chain
            .iter()
            .skip(1)
            .filter_map(|der| parse_der(der).ok())
            .collect();
        let mut names: Vec<Vec<u8>> = vec![leaf.facts.issuer_der.clone()];
        let mut extra: Vec<Vec<u8>> = Vec::new();
        let mut next = 0;
        // A path is at most MAX_CHAIN_CERTIFICATES long; each step follows the certificates
        // named like the current issuer.
        while next < names.len() && names.len() <= MAX_CHAIN_CERTIFICATES * 2 {
            let name = names[next].clone();
            next += 1;
            let uploaded = self.uploaded_named(&name);
            let above = presented
                .iter()
                .filter(|c| c.facts.subject_der == name)
                .chain(uploaded.iter().map(Arc::as_ref));
            for cert in above {
                if uploaded.iter().any(|u| u.der == cert.der) && !extra.contains(&cert.der) {
                    extra.push(cert.der.clone());
                }
                let issuer = &cert.facts.issuer_der;
                if issuer != &cert.facts.subject_der && !names.contains(issuer) {
                    names.push(issuer.clone());
                }
            }
        }
        let mut anchors: Vec<&Anchor> = Vec::new();
        for name in &names {
            for anchor in self.anchors_named(name) {
                if !anchors.iter().any(|a| std::ptr::eq(*a, anchor.as_ref())) {
                    anchors.push(anchor);
                }
            }
        }
        (anchors, extra)
    }

    /// The index of an instance's CA certificates and groups, as of `version`.
    pub fn build(
        version: Option<String>,
        cas: Vec<CaCertificate>,
        groups: Vec<EnrollmentGroup>,
        linked_hubs: Vec<LinkedHub>,
        certificates: &ParsedCache,
    ) -> Self {
        let mut credentials = Self {
            version,
            linked_hubs,
            ..Self::default()
        };
        let mut verified: HashMap<String, Arc<ParsedCertificate>> = HashMap::new();
        for ca in cas {
            let Some(parsed) = ca
                .certificate
                .as_deref()
                .and_then(|text| certificates.parse(text).ok())
            else {
                continue;
            };
            if ca.is_verified {
                verified.insert(ca.name.to_ascii_lowercase(), parsed.clone());
            }
            credentials
                .uploaded
                .entry(parsed.facts.subject_der.clone())
                .or_default()
                .push(parsed);
        }
        let mut by_thumbprint: HashMap<String, Anchor> = HashMap::new();
        for group in groups {
            let group = Arc::new(group);
            match group.attestation.kind {
                AttestationType::SymmetricKey => {
                    if let Some(keys) = symmetric_keys(&group.attestation) {
                        credentials.sas_by_id.insert(
                            group.enrollment_group_id.to_ascii_lowercase(),
                            credentials.sas_groups.len(),
                        );
                        credentials.sas_groups.push(SasGroup {
                            group: group.clone(),
                            keys,
                        });
                    }
                }
                AttestationType::Tpm => credentials.tpm_group = Some(group.clone()),
                AttestationType::X509 => {
                    for certificate in group_anchors(&group.attestation, &verified, certificates) {
                        by_thumbprint
                            .entry(certificate.facts.sha256_thumbprint.clone())
                            .or_insert_with(|| Anchor {
                                certificate,
                                groups: Vec::new(),
                            })
                            .groups
                            .push(group.clone());
                    }
                }
                AttestationType::None => {}
            }
        }
        for anchor in by_thumbprint.into_values() {
            credentials
                .anchors
                .entry(anchor.certificate.facts.subject_der.clone())
                .or_default()
                .push(Arc::new(anchor));
        }
        credentials
    }
}

/// The primary and secondary key of a symmetric-key attestation.
pub fn symmetric_keys(attestation: &AttestationMechanism) -> Option<[SymmetricKey; 2]> {
    if attestation.kind != AttestationType::SymmetricKey {
        return None;
    }
    let keys = attestation.symmetric_key.as_ref()?;
    let parse = |k: &Option<String>| k.as_deref().and_then(|k| SymmetricKey::from_base64(k).ok());
    Some([parse(&keys.primary_key)?, parse(&keys.secondary_key)?])
}

/// A group's anchors: its signing certificates, or the verified CA certificates its
/// `caReferences` name (an unverified one is no anchor).
fn group_anchors(
    attestation: &AttestationMechanism,
    verified: &HashMap<String, Arc<ParsedCertificate>>,
    cache: &ParsedCache,
) -> Vec<Arc<ParsedCertificate>> {
    let Some(x509) = attestation.x509.as_ref() else {
        return Vec::new();
    };
    let mut anchors: Vec<Arc<ParsedCertificate>> = x509
        .signing_certificates
        .iter()
        .flat_map(|c| [c.primary.as_ref(), c.secondary.as_ref()])
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|text| cache.parse(text).ok())
        .collect();
    if let Some(refs) = &x509.ca_references {
        for name in [&refs.primary, &refs.secondary].into_iter().flatten() {
            anchors.extend(verified.get(&name.to_ascii_lowercase()).cloned());
        }
    }
    anchors
}

/// The credentials of every instance this process has served, by instance name.
#[derive(Debug, Default)]
pub struct CredentialCache {
    by_instance: Mutex<HashMap<String, Arc<Credentials>>>,
    /// Per instance, held while its credentials are being built.
    builds: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl CredentialCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Credentials>>> {
        // Only copies of stored data: a poisoned map is still usable.
        self.by_instance
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The instance's credentials if they were built as of `version`.
    fn current(&self, instance: &str, version: Option<&str>) -> Option<Arc<Credentials>> {
        self.entries()
            .get(instance)
            .filter(|cached| cached.version.as_deref() == version)
            .cloned()
    }

    /// The instance's credentials as of `version`: the kept ones, or what `build` makes (then
    /// kept). One caller at a time builds an instance's credentials; the others wait and take
    /// what it built when it is of their version, so that a change which many requests see at
    /// once is read and parsed once, not once per request (with 1,000 groups, 64 requests
    /// rebuilding at once held each of them about a third of a second).
    pub async fn get_or_build<E, F>(
        &self,
        instance: &str,
        version: Option<String>,
        build: impl FnOnce(Option<String>) -> F,
    ) -> Result<Arc<Credentials>, E>
    where
        F: Future<Output = Result<Credentials, E>>,
    {
        if let Some(kept) = self.current(instance, version.as_deref()) {
            return Ok(kept);
        }
        let lock = self.build_lock(instance);
        let _building = lock.lock().await;
        if let Some(kept) = self.current(instance, version.as_deref()) {
            return Ok(kept);
        }
        let built = Arc::new(build(version).await?);
        self.entries().insert(instance.to_owned(), built.clone());
        Ok(built)
    }

    fn build_lock(&self, instance: &str) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map still holds usable locks.
        self.builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(instance.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets an instance (it was deleted).
    pub fn forget(&self, instance: &str) {
        self.entries().remove(instance);
        self.builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(instance);
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    use super::*;

    fn ca(
        name: &str,
        parent: Option<&Issuer<'static, KeyPair>>,
    ) -> (Vec<u8>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = match parent {
            Some(parent) => params.signed_by(&key, parent).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert.der().to_vec(), Issuer::new(params, key))
    }

    fn parsed(der: &[u8]) -> Arc<ParsedCertificate> {
        Arc::new(parse_der(der).unwrap())
    }

    fn group(id: &str) -> Arc<EnrollmentGroup> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "enrollmentGroupId": id, "attestation": { "type": "x509" } }))
            .unwrap(),
        )
    }

    /// Security review item 9: the anchors tried for a device are found by name along its
    /// possible path, however many groups and certificates the instance holds.
    #[test]
    fn only_anchors_on_the_device_s_path_are_candidates() {
        let (root, root_issuer) = ca("Root", None);
        let (intermediate, intermediate_issuer) = ca("Intermediate", Some(&root_issuer));
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "dev-1");
        let leaf = params
            .signed_by(&key, &intermediate_issuer)
            .unwrap()
            .der()
            .to_vec();

        let mut credentials = Credentials::default();
        let mut anchor = |der: &[u8], id: &str| {
            let certificate = parsed(der);
            credentials
                .anchors
                .entry(certificate.facts.subject_der.clone())
                .or_default()
                .push(Arc::new(Anchor {
                    certificate,
                    groups: vec![group(id)],
                }));
        };
        anchor(&root, "by-root");
        for n in 0..1000 {
            anchor(&ca(&format!("Other {n}"), None).0, &format!("other-{n}"));
        }
        let uploaded = parsed(&intermediate);
        credentials
            .uploaded
            .insert(uploaded.facts.subject_der.clone(), vec![uploaded]);

        let leaf_parsed = parse_der(&leaf).unwrap();
        // Only the leaf: the uploaded intermediate leads to the root.
        let (anchors, extra) =
            credentials.anchors_on_the_way(&leaf_parsed, std::slice::from_ref(&leaf));
        let ids: Vec<&str> = anchors
            .iter()
            .flat_map(|a| a.groups.iter().map(|g| g.enrollment_group_id.as_str()))
            .collect();
        assert_eq!(ids, ["by-root"]);
        assert_eq!(extra, std::slice::from_ref(&intermediate));
        // The intermediate sent by the device: the same single candidate.
        let (anchors, _) =
            credentials.anchors_on_the_way(&leaf_parsed, &[leaf.clone(), intermediate]);
        assert_eq!(anchors.len(), 1);
        // A leaf from elsewhere: no candidate at all, so no chain is verified.
        let (stranger, stranger_issuer) = ca("Stranger", None);
        let _ = stranger;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "dev-2");
        let other = params
            .signed_by(&KeyPair::generate().unwrap(), &stranger_issuer)
            .unwrap();
        let other = parse_der(other.der()).unwrap();
        assert!(
            credentials
                .anchors_on_the_way(&other, std::slice::from_ref(&other.der))
                .0
                .is_empty()
        );
    }

    /// Requests that find the credentials changed at once build them once and share what was
    /// built; a request of another version builds its own.
    #[tokio::test]
    async fn requests_that_miss_at_once_build_once() {
        let cache = CredentialCache::default();
        let certificates = ParsedCache::default();
        let builds = std::sync::atomic::AtomicUsize::new(0);
        let build = |version| async {
            builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // As the store's reads do, so that the other requests run meanwhile.
            tokio::task::yield_now().await;
            Ok::<_, ()>(Credentials::build(
                version,
                vec![],
                vec![],
                vec![],
                &certificates,
            ))
        };
        let got = futures_util::future::join_all(
            (0..16).map(|_| cache.get_or_build("one", Some("v1".to_owned()), build)),
        )
        .await;
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
        let first = got[0].as_ref().unwrap();
        assert_eq!(first.version.as_deref(), Some("v1"));
        assert!(got.iter().all(|c| Arc::ptr_eq(c.as_ref().unwrap(), first)));

        let newer = cache
            .get_or_build("one", Some("v2".to_owned()), build)
            .await
            .unwrap();
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(newer.version.as_deref(), Some("v2"));
    }
}

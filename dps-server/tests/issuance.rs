//! Operational certificates from a CSR (`[issuance]` in the configuration): a device that sends
//! `csr` with its register request gets `registrationState.issuedCertificateChain` in its
//! final answer, signed by the CA its enrollment's credential policy names; that certificate
//! then admits it through an X.509 group anchored at the CA. A request that cannot be served
//! fails the registration with its error code, and nothing is issued.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{
    Backend, Device, TestServer, device_token, enroll, expect_error, expect_json, issuing_ca_files,
    issuing_ca_files_named, keys_of, mtls_client, pem_of, policy_with, register_over,
    registration_state,
};
use dps_server::config::{CredentialPolicyConfig, IssuingCaConfig};
use rcgen::KeyPair;
use reqwest::Method;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

struct Issuer {
    dir: tempfile::TempDir,
    ca_pem: String,
}

/// A P-384 issuing CA, in files the server reads.
fn issuer() -> (Issuer, IssuingCaConfig) {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, config) = issuing_ca_files(dir.path(), &rcgen::PKCS_ECDSA_P384_SHA384);
    (Issuer { dir, ca_pem }, config)
}

async fn server(backend: Backend) -> (TestServer, Issuer) {
    let (issuer, ca) = issuer();
    let t = TestServer::start_with(backend, |config| {
        config
            .issuance
            .certificate_authorities
            .insert("operational".into(), ca);
        config.issuance.credential_policies.insert(
            "devices".into(),
            CredentialPolicyConfig {
                certificate_authority: "operational".into(),
                validity_days: 30,
                key_types: vec!["ecP256".into(), "ecP384".into()],
                dns_names: Vec::new(),
            },
        );
        config.issuance.credential_policies.insert(
            "p384-only".into(),
            CredentialPolicyConfig {
                certificate_authority: "operational".into(),
                key_types: vec!["ecP384".into()],
                ..CredentialPolicyConfig::default()
            },
        );
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    (t, issuer)
}

fn csr(cn: &str, key: &KeyPair) -> String {
    STANDARD.encode(attestation::issuance::certificate_request(key, cn).unwrap())
}

/// The issued-certificate records at `path` (a listing).
async fn records(t: &TestServer, path: &str) -> Vec<Value> {
    let listed = expect_json(t.owner(Method::GET, path).send().await.unwrap(), 200).await;
    listed.as_array().unwrap().clone()
}

/// A certificate as DER sees it: the signed part, the algorithm, the signature.
#[derive(der::Sequence)]
struct RawCertificate<'a> {
    tbs: der::asn1::AnyRef<'a>,
    algorithm: der::asn1::AnyRef<'a>,
    signature: der::asn1::BitStringRef<'a>,
}

#[derive(der::Sequence)]
struct EcdsaSignature<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

/// The same P-384-signed certificate with its signature's other valid form (s replaced by
/// n - s): the signed part and the key are the same, the DER (and its thumbprint) is not.
fn with_other_signature(certificate: &[u8]) -> Vec<u8> {
    use der::{Decode, Encode};
    const N: [u8; 48] = [
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xC7, 0x63, 0x4D, 0x81, 0xF4, 0x37,
        0x2D, 0xDF, 0x58, 0x1A, 0x0D, 0xB2, 0x48, 0xB0, 0xA7, 0x7A, 0xEC, 0xEC, 0x19, 0x6A, 0xCC,
        0xC5, 0x29, 0x73,
    ];
    let raw = RawCertificate::from_der(certificate).unwrap();
    let signature = EcdsaSignature::from_der(raw.signature.raw_bytes()).unwrap();
    let s = signature.s.as_bytes();
    let mut padded = [0u8; 48];
    padded[48 - s.len()..].copy_from_slice(s);
    let mut other = [0u8; 48];
    let mut borrow = 0i16;
    for i in (0..48).rev() {
        let mut digit = i16::from(N[i]) - i16::from(padded[i]) - borrow;
        borrow = i16::from(digit < 0);
        if digit < 0 {
            digit += 256;
        }
        other[i] = u8::try_from(digit).unwrap();
    }
    let resigned = EcdsaSignature {
        r: signature.r,
        s: der::asn1::UintRef::new(&other).unwrap(),
    }
    .to_der()
    .unwrap();
    let copy = RawCertificate {
        tbs: raw.tbs,
        algorithm: raw.algorithm,
        signature: der::asn1::BitStringRef::from_bytes(&resigned).unwrap(),
    }
    .to_der()
    .unwrap();
    assert_ne!(copy, certificate);
    copy
}

/// Deletes `id`'s onboarding enrollment and enrolls group `group`, anchored at the issuing
/// CA `ca_pem`: from then on the device's issued certificates admit it (an individual
/// enrollment of an id keeps group certificates from claiming it).
async fn onboarded_to_ca_group(t: &TestServer, id: &str, group: &str, ca_pem: &str) {
    let deleted = t
        .owner(Method::DELETE, &format!("/enrollments/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    enroll(
        t,
        json!({ "enrollmentGroupId": group,
            "attestation": { "type": "x509", "x509": { "signingCertificates": { "primary": { "certificate": ca_pem } } } } }),
    )
    .await;
}

/// The leaf of a final answer's issued chain, DER.
fn issued_leaf(done: &Value) -> Vec<u8> {
    let leaf = done["registrationState"]["issuedCertificateChain"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no chain in {done}"));
    STANDARD.decode(leaf).unwrap()
}

/// Enrolls `id` with symmetric keys under `policy`; returns its device token.
async fn enrolled(t: &TestServer, id: &str, policy: Option<&str>) -> String {
    let mut body = json!({ "registrationId": id, "attestation": { "type": "symmetricKey" } });
    if let Some(policy) = policy {
        body["credentialPolicyName"] = json!(policy);
    }
    let enrollment = enroll(t, body).await;
    let (primary, _) = keys_of(&enrollment);
    device_token(&t.running().admin.id_scope, id, &primary)
}

async fn register_with_csr(t: &TestServer, id: &str, token: &str, csr: &str) -> Value {
    Device::new(t, id)
        .register_with(token, json!({ "registrationId": id, "csr": csr }), &[])
        .await
}

fn openssl_verify(ca: &std::path::Path, leaf_der: &[u8]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let leaf = dir.path().join("leaf.der");
    std::fs::write(&leaf, leaf_der).unwrap();
    let pem = std::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&leaf)
        .arg("-out")
        .arg(dir.path().join("leaf.pem"))
        .output()
        .unwrap();
    assert!(pem.status.success(), "{pem:?}");
    std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(ca)
        .arg(dir.path().join("leaf.pem"))
        .output()
        .unwrap()
}

/// The chain verifies (rustls-webpki and `openssl verify`), carries the device's key and id,
/// is answered once (not by the status lookup, not stored), and admits the device through an
/// X.509 group anchored at the issuing CA.
async fn a_csr_gets_a_certificate_that_then_admits_the_device(backend: Backend) {
    let (t, issuer) = server(backend).await;
    let id = "issued-01";
    let token = enrolled(&t, id, Some("devices")).await;
    let device_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let done = register_with_csr(&t, id, &token, &csr(id, &device_key)).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let chain: Vec<Vec<u8>> = done["registrationState"]["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no chain in {done}"))
        .iter()
        .map(|c| STANDARD.decode(c.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(chain.len(), 2);
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(issuer.ca_pem.as_bytes());
    assert_eq!(chain[1], ca_der.unwrap().to_vec());
    let now = common::now();
    attestation::chain::verify_chain(&chain[..1], &chain[1], &[], now).unwrap();
    attestation::chain::check_leaf(&chain, id, now).unwrap();
    let verified = openssl_verify(&issuer.dir.path().join("ca.pem"), &chain[0]);
    assert!(verified.status.success(), "openssl verify: {verified:?}");
    let leaf = attestation::x509::parse_der(&chain[0]).unwrap();
    assert_eq!(leaf.facts.subject_name, format!("CN={id}"));
    assert!(
        chain[0]
            .windows(device_key.public_key_raw().len())
            .any(|w| w == device_key.public_key_raw()),
        "the certificate does not carry the device's key"
    );

    // The status lookup and the stored registration state do not carry the chain.
    let lookup = expect_json(
        t.anonymous(
            Method::POST,
            &format!("/{}/registrations/{id}", t.running().admin.id_scope),
        )
        .header("Authorization", &token)
        .json(&json!({ "registrationId": id }))
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(lookup["status"], "assigned", "{lookup}");
    assert!(lookup.get("issuedCertificateChain").is_none(), "{lookup}");
    let stored = registration_state(&t, id).await.unwrap();
    assert!(stored.get("issuedCertificateChain").is_none(), "{stored}");

    // What was issued is recorded: serial, thumbprint, validity, device, policy and CA.
    let facts = attestation::x509::parse_der(&chain[0]).unwrap().facts;
    let recorded = records(&t, &format!("/registrations/{id}/issuedCertificates")).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let record = &recorded[0];
    assert_eq!(
        record["serialNumber"],
        facts.serial_number.trim_start_matches('0')
    );
    assert_eq!(record["sha256Thumbprint"], facts.sha256_thumbprint);
    assert_eq!(record["registrationId"], id);
    assert_eq!(record["credentialPolicyName"], "devices");
    assert_eq!(record["certificateAuthorityName"], "operational");
    assert!(record.get("revokedDateTimeUtc").is_none(), "{record}");
    let serial = record["serialNumber"].as_str().unwrap();
    let one = expect_json(
        t.owner(
            Method::GET,
            &format!("/issuedCertificates/{}", serial.to_ascii_lowercase()),
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(one["sha256Thumbprint"], facts.sha256_thumbprint);

    // A new CSR gets a new certificate.
    let renewed = register_with_csr(&t, id, &token, &csr(id, &device_key)).await;
    let renewed_leaf = renewed["registrationState"]["issuedCertificateChain"][0]
        .as_str()
        .unwrap();
    assert_ne!(renewed_leaf, STANDARD.encode(&chain[0]));
    assert_eq!(
        records(&t, &format!("/registrations/{id}/issuedCertificates"))
            .await
            .len(),
        2
    );
    assert_eq!(records(&t, "/issuedCertificates").await.len(), 2);

    // The issued certificate admits the device through a group anchored at the CA, once
    // the onboarding enrollment is gone (an individual enrollment of an id keeps group
    // certificates from claiming it).
    onboarded_to_ca_group(&t, id, "operational-devices", &issuer.ca_pem).await;
    let leaf_pem = pem_of(&STANDARD.decode(renewed_leaf).unwrap());
    let client = mtls_client(&t, &[&leaf_pem], &device_key.serialize_pem(), false);
    let (_, last) = register_over(&t, &client, id).await;
    assert_eq!(last["status"], "assigned", "{last}");
    assert_eq!(
        last["registrationState"]["x509"]["enrollmentGroupId"], "operational-devices",
        "{last}"
    );
}

/// Each bad request fails the registration with its code and a message, and no chain.
async fn requests_that_cannot_be_served_fail_the_registration(backend: Backend) {
    let (t, _issuer) = server(backend).await;
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let good = |id: &str| csr(id, &p256);
    let mut tampered = STANDARD.decode(good("bad-sig")).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    // (id, credential policy, csr, error code, a part of the message)
    let cases: Vec<(&str, Option<&str>, String, u32, &str)> = vec![
        (
            "bad-base64",
            Some("devices"),
            "not base64 at all!".into(),
            400209,
            "not base64",
        ),
        (
            "bad-der",
            Some("devices"),
            STANDARD.encode(b"not a request"),
            400209,
            "not DER",
        ),
        (
            "bad-cn",
            Some("devices"),
            good("someone-else"),
            400209,
            "CN must be",
        ),
        (
            "bad-sig",
            Some("devices"),
            STANDARD.encode(&tampered),
            400209,
            "signature",
        ),
        (
            "bad-key",
            Some("p384-only"),
            good("bad-key"),
            400209,
            "does not allow ecP256",
        ),
        (
            "too-big",
            Some("devices"),
            "A".repeat(20_000),
            400209,
            "larger than",
        ),
        (
            "no-policy",
            None,
            good("no-policy"),
            400210,
            "no credentialPolicyName",
        ),
        (
            "unknown-policy",
            Some("nonesuch"),
            good("unknown-policy"),
            400210,
            "does not exist",
        ),
    ];
    for (id, policy, request, code, says) in cases {
        let token = enrolled(&t, id, policy).await;
        // Assigned first without a csr: the refused request must leave that state as it is.
        let first = Device::new(&t, id).register(&token).await;
        assert_eq!(first["status"], "assigned", "{id}: {first}");
        let before = registration_state(&t, id).await.unwrap();
        let done = register_with_csr(&t, id, &token, &request).await;
        assert_eq!(done["status"], "failed", "{id}: {done}");
        let state = &done["registrationState"];
        assert_eq!(state["errorCode"], code, "{id}: {done}");
        let message = state["errorMessage"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{id}: {message}");
        assert!(
            state.get("issuedCertificateChain").is_none(),
            "{id}: {done}"
        );
        assert!(state.get("assignedHub").is_none(), "{id}: {done}");
        assert_eq!(
            registration_state(&t, id).await.unwrap(),
            before,
            "{id}: the refusal changed the state"
        );
    }
    assert_eq!(
        records(&t, "/issuedCertificates").await,
        Vec::<Value>::new(),
        "a refused request left a record"
    );
}

/// A revoked certificate no longer admits its device (refused, nothing changed), while the
/// device's other certificate still does; revocation takes the right to change enrollments,
/// happens once, and refuses what is malformed or unknown.
async fn a_revoked_certificate_no_longer_admits_its_device(backend: Backend) {
    let (t, issuer) = server(backend).await;
    let id = "revoked-01";
    let token = enrolled(&t, id, Some("devices")).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let first = issued_leaf(&register_with_csr(&t, id, &token, &csr(id, &key)).await);
    let second = issued_leaf(&register_with_csr(&t, id, &token, &csr(id, &key)).await);
    onboarded_to_ca_group(&t, id, "operational-devices", &issuer.ca_pem).await;
    let with = |leaf: &[u8]| mtls_client(&t, &[&pem_of(leaf)], &key.serialize_pem(), false);
    let (_, admitted) = register_over(&t, &with(&first), id).await;
    assert_eq!(admitted["status"], "assigned", "{admitted}");

    let serial = attestation::x509::parse_der(&first)
        .unwrap()
        .facts
        .serial_number;
    let revoke_path = format!("/issuedCertificates/{serial}/revoke");
    // A policy that may read registrations but not change enrollments cannot revoke.
    let reader = policy_with(&t, "reader", &["RegistrationStatusRead", "EnrollmentRead"]).await;
    let refused = t
        .signed(Method::POST, &revoke_path, "reader", &reader)
        .send()
        .await
        .unwrap();
    expect_error(refused, 403, 403001).await;
    let listed = records(&t, &format!("/registrations/{id}/issuedCertificates")).await;
    assert!(listed.iter().all(|r| r.get("revokedDateTimeUtc").is_none()));
    // Malformed, too long or unknown: refused, nothing changed.
    for (path, body, status, code) in [
        (
            "/issuedCertificates/not-hex/revoke".to_owned(),
            json!({}),
            400,
            400007,
        ),
        (
            revoke_path.clone(),
            json!({ "reason": "x".repeat(300) }),
            400,
            400004,
        ),
        (
            revoke_path.clone(),
            json!({ "reason": "ok", "extra": 1 }),
            400,
            400006,
        ),
        (
            "/issuedCertificates/ABCDEF0123/revoke".to_owned(),
            json!({}),
            404,
            404210,
        ),
    ] {
        let response = t
            .owner(Method::POST, &path)
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(response, status, code).await;
    }
    assert_eq!(
        records(&t, &format!("/registrations/{id}/issuedCertificates")).await,
        listed,
        "a refused revocation changed a record"
    );

    let revoked = expect_json(
        t.owner(Method::POST, &revoke_path)
            .json(&json!({ "reason": "key compromise" }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let when = revoked["revokedDateTimeUtc"].as_str().unwrap().to_owned();
    assert_eq!(revoked["revocationReason"], "key compromise");
    // Revoking again changes nothing; a body is optional.
    let again = expect_json(
        t.owner(Method::POST, &revoke_path).send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(again["revokedDateTimeUtc"], when.as_str());
    assert_eq!(again["revocationReason"], "key compromise");

    let before = registration_state(&t, id).await.unwrap();
    let (status, body) = register_over(&t, &with(&first), id).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errorCode"], 401002, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{body}"
    );
    assert_eq!(registration_state(&t, id).await.unwrap(), before);
    // Nor does the same certificate with its signature re-encoded (still valid, another
    // thumbprint): revocation goes by what the CA signed.
    let (status, body) = register_over(&t, &with(&with_other_signature(&first)), id).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{body}"
    );
    assert_eq!(registration_state(&t, id).await.unwrap(), before);
    // The device's other certificate still admits it, and so does its re-encoded copy: the
    // copy is a valid certificate, refused above only for its revocation.
    let (_, admitted) = register_over(&t, &with(&second), id).await;
    assert_eq!(admitted["status"], "assigned", "{admitted}");
    let (_, admitted) = register_over(&t, &with(&with_other_signature(&second)), id).await;
    assert_eq!(admitted["status"], "assigned", "{admitted}");
}

/// The hub connector creates a device that was issued a certificate with certificate-authority
/// authentication (it connects with that certificate), and hands it no keys; the same device
/// registering without a csr is given its keys again.
async fn a_device_with_an_issued_certificate_authenticates_to_its_hub_by_ca(backend: Backend) {
    let (t, _issuer) = server(backend).await;
    let hooks = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(204))
        .mount(&hooks)
        .await;
    expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-w.example.com")
            .json(&json!({ "hostName": "hub-w.example.com",
                "connector": { "type": "webhook", "url": format!("{}/hub-w", hooks.uri()) } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let id = "hub-ca-01";
    let enrollment = enroll(
        &t,
        json!({ "registrationId": id, "attestation": { "type": "symmetricKey" },
            "credentialPolicyName": "devices", "iotHubs": ["hub-w.example.com"] }),
    )
    .await;
    let (primary, _) = keys_of(&enrollment);
    let token = device_token(&t.running().admin.id_scope, id, &primary);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let done = register_with_csr(&t, id, &token, &csr(id, &key)).await;
    assert_eq!(
        done["registrationState"]["assignedHub"], "hub-w.example.com",
        "{done}"
    );
    let upserts = || async {
        hooks
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
            .filter(|b| b["operation"] == "upsert")
            .collect::<Vec<_>>()
    };
    let created = upserts().await;
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(
        created[0]["authentication"],
        json!({ "type": "certificateAuthority" })
    );
    assert!(!created[0].to_string().contains(&primary.to_base64()));

    let again = Device::new(&t, id).register(&token).await;
    assert_eq!(again["status"], "assigned", "{again}");
    let updated = upserts().await;
    assert_eq!(updated.len(), 2, "{updated:?}");
    assert_eq!(updated[1]["authentication"]["type"], "sas");
}

/// An instance's own issuing CA (a key file in the server's key directory) and credential
/// policy, created through the admin API, issue to its devices; a certificate of that CA,
/// revoked, admits its device no more. Each request an attacker with a ServiceConfig key (or
/// without one) could send to reach other files, load a library of their choosing or store a
/// PIN is refused, and nothing is stored.
async fn instance_cas_and_policies_issue_through_the_admin_api(backend: Backend) {
    // The key directory has one directory per instance; the other instance's key is as out
    // of reach as one outside.
    let keys = tempfile::tempdir().unwrap();
    let (mine, theirs) = (keys.path().join("default"), keys.path().join("other"));
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (ca_pem, ca_files) =
        issuing_ca_files_named(&mine, &rcgen::PKCS_ECDSA_P384_SHA384, "Instance CA");
    let (_, stranger) = issuing_ca_files(outside.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, neighbour) = issuing_ca_files(&theirs, &rcgen::PKCS_ECDSA_P256_SHA256);
    let configured_dir = tempfile::tempdir().unwrap();
    let (_, configured_ca) =
        issuing_ca_files(configured_dir.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let key_dir = keys.path().to_owned();
    let t = TestServer::start_with(backend, move |config| {
        config.issuance.key_directory = Some(key_dir);
        config
            .issuance
            .certificate_authorities
            .insert("x".into(), configured_ca);
        config.issuance.credential_policies.insert(
            "configured".into(),
            CredentialPolicyConfig {
                certificate_authority: "x".into(),
                ..CredentialPolicyConfig::default()
            },
        );
    })
    .await;
    t.link_hub("hub-a.example.com").await;
    let put = |path: String, body: Value| {
        let t = &t;
        async move {
            t.owner(Method::PUT, &path)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let chain_path = ca_files.certificate_chain.display().to_string();
    let ca_body = |key: Value| json!({ "name": "ops", "certificateChain": ca_pem, "key": key });

    // Refused: each leaves nothing stored.
    let link = mine.join("link.pem");
    std::os::unix::fs::symlink(&stranger.key, &link).unwrap();
    let refusals = [
        (
            ca_body(json!({ "file": stranger.key })),
            "must be a file inside",
        ),
        (
            ca_body(json!({ "file": link.display().to_string() })),
            "must be a file inside",
        ),
        (ca_body(json!({ "file": chain_path })), "not a PKCS#8"),
        (
            ca_body(json!({ "file": neighbour.key })),
            "must be a file inside",
        ),
        (
            ca_body(json!({ "file": "../other/ca-key.pem" })),
            "must be a file inside",
        ),
        (
            ca_body(
                json!({ "pkcs11Uri": "pkcs11:token=default;object=k?module-path=/tmp/evil.so" }),
            ),
            "not one of the modules",
        ),
        (
            ca_body(json!({ "pkcs11Uri": "pkcs11:token=default;object=k" })),
            "allows no PKCS#11 module",
        ),
        (
            ca_body(json!({ "pkcs11Uri": "pkcs11:token=other;object=k" })),
            "a token of this instance",
        ),
        (
            ca_body(json!({ "pkcs11Uri": "pkcs11:token=defaultish;object=k" })),
            "a token of this instance",
        ),
        (
            ca_body(json!({ "pkcs11Uri": "pkcs11:token=other:default;object=k" })),
            "a token of this instance",
        ),
        (
            ca_body(json!({ "pkcs11Uri": "pkcs11:token=default;object=k?pin-value=1234" })),
            "pin-source",
        ),
        (
            ca_body(json!({ "file": ca_files.key, "pkcs11Uri": "pkcs11:token=t;object=k" })),
            "exactly one",
        ),
        (
            json!({ "name": "ops", "certificateChain": ca_pem, "key": { "file": ca_files.key.replace("ca-key", "nope") } }),
            "does not exist",
        ),
        // Whether a file exists elsewhere is not said.
        (
            ca_body(json!({ "file": "/nonexistent/ca-key.pem" })),
            "must be a file inside",
        ),
        (
            json!({ "name": "ops", "certificateChain": "not pem", "key": { "file": ca_files.key } }),
            "certificateChain",
        ),
    ];
    for (body, says) in refusals {
        let refused = expect_error(
            put("/certificateAuthorities/ops".into(), body.clone()).await,
            400,
            400004,
        )
        .await;
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
        assert!(!message.contains("BEGIN"), "{message}");
    }
    // Without a chain, an existing key makes a CA that waits for its certificate: the answer
    // carries the key's signing request, CN=<name>.
    let waiting = expect_json(
        put(
            "/certificateAuthorities/ops".into(),
            json!({ "name": "ops", "key": { "file": "ca-key.pem" } }),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(waiting["status"], "pendingCertificate", "{waiting}");
    let request = STANDARD
        .decode(waiting["certificateSigningRequest"].as_str().unwrap())
        .unwrap();
    attestation::issuance::check_csr(&request, "ops", &attestation::issuance::KeyType::ALL)
        .unwrap();
    let deleted = t
        .owner(Method::DELETE, "/certificateAuthorities/ops")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    // A key that is not the certificate's.
    let other_key = mine.join("other-key.pem");
    std::fs::write(
        &other_key,
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .serialize_pem(),
    )
    .unwrap();
    let mismatched = expect_error(
        put(
            "/certificateAuthorities/ops".into(),
            ca_body(json!({ "file": other_key.display().to_string() })),
        )
        .await,
        400,
        400004,
    )
    .await;
    assert!(
        mismatched["message"]
            .as_str()
            .unwrap()
            .contains("does not sign"),
        "{mismatched}"
    );
    // Without ServiceConfig.
    let reader = policy_with(&t, "reader", &["EnrollmentRead", "EnrollmentWrite"]).await;
    let forbidden = t
        .signed(
            Method::PUT,
            "/certificateAuthorities/ops",
            "reader",
            &reader,
        )
        .json(&ca_body(json!({ "file": ca_files.key })))
        .send()
        .await
        .unwrap();
    expect_error(forbidden, 403, 403001).await;
    let missing = t
        .owner(Method::GET, "/certificateAuthorities/ops")
        .send()
        .await
        .unwrap();
    expect_error(missing, 404, 404211).await;

    // A relative path is taken from the instance's directory.
    let created = expect_json(
        put(
            "/certificateAuthorities/ops".into(),
            ca_body(json!({ "file": "ca-key.pem" })),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(created["status"], "active", "{created}");
    assert_eq!(created["info"]["subjectName"], "CN=Instance CA");

    // Policies: a missing CA, a configured name, bad fields: refused.
    for (body, status, code) in [
        (
            json!({ "name": "ops-devices", "certificateAuthorityName": "nope", "keyTypes": ["ecP256"] }),
            400,
            400004,
        ),
        (
            json!({ "name": "configured", "certificateAuthorityName": "ops", "keyTypes": ["ecP256"] }),
            409,
            409001,
        ),
        // Names are compared ignoring case: another spelling is the same policy.
        (
            json!({ "name": "CONFIGURED", "certificateAuthorityName": "ops", "keyTypes": ["ecP256"] }),
            409,
            409001,
        ),
        (
            json!({ "name": "ops-devices", "certificateAuthorityName": "ops", "keyTypes": ["dsa"] }),
            400,
            400004,
        ),
        (
            json!({ "name": "ops-devices", "certificateAuthorityName": "ops", "keyTypes": [] }),
            400,
            400004,
        ),
        (
            json!({ "name": "ops-devices", "certificateAuthorityName": "ops", "keyTypes": ["ecP256"], "validityInDays": 0 }),
            400,
            400004,
        ),
        (
            json!({ "name": "ops-devices", "certificateAuthorityName": "ops", "keyTypes": ["ecP256"], "dnsNames": ["a b"] }),
            400,
            400004,
        ),
    ] {
        let path = format!("/credentialPolicies/{}", body["name"].as_str().unwrap());
        expect_error(put(path, body).await, status, code).await;
    }
    let missing = t
        .owner(Method::GET, "/credentialPolicies/ops-devices")
        .send()
        .await
        .unwrap();
    expect_error(missing, 404, 404212).await;
    expect_json(
        put(
            "/credentialPolicies/ops-devices".into(),
            json!({ "name": "ops-devices", "certificateAuthorityName": "ops", "keyTypes": ["ecP256"], "validityInDays": 7 }),
        )
        .await,
        200,
    )
    .await;

    // A device of the instance gets a certificate of the instance's CA, for the policy's time.
    let id = "instance-ca-01";
    let token = enrolled(&t, id, Some("ops-devices")).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let done = register_with_csr(&t, id, &token, &csr(id, &key)).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let leaf = issued_leaf(&done);
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    let now = common::now();
    attestation::chain::verify_chain(std::slice::from_ref(&leaf), &ca_der, &[], now).unwrap();
    let recorded = records(&t, &format!("/registrations/{id}/issuedCertificates")).await;
    assert_eq!(recorded[0]["certificateAuthorityName"], "ops");
    let not_after = time::OffsetDateTime::parse(
        recorded[0]["notAfter"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let days = (not_after - time::OffsetDateTime::now_utc()).whole_days();
    assert!((6..=7).contains(&days), "{days} days");

    // Revoked, that certificate admits the device no more.
    onboarded_to_ca_group(&t, id, "ops-operational", &ca_pem).await;
    let client = mtls_client(&t, &[&pem_of(&leaf)], &key.serialize_pem(), false);
    let (_, admitted) = register_over(&t, &client, id).await;
    assert_eq!(admitted["status"], "assigned", "{admitted}");
    let serial = recorded[0]["serialNumber"].as_str().unwrap();
    expect_json(
        t.owner(
            Method::POST,
            &format!("/issuedCertificates/{serial}/revoke"),
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    let (status, body) = register_over(&t, &client, id).await;
    assert_eq!(
        (status, body["errorCode"].clone()),
        (401, json!(401002)),
        "{body}"
    );

    // The CA stays while a policy names it.
    let in_use = t
        .owner(Method::DELETE, "/certificateAuthorities/ops")
        .send()
        .await
        .unwrap();
    expect_error(in_use, 409, 409002).await;
    let still = t
        .owner(Method::GET, "/certificateAuthorities/ops")
        .send()
        .await
        .unwrap();
    expect_json(still, 200).await;
    for path in [
        "/credentialPolicies/ops-devices",
        "/certificateAuthorities/ops",
    ] {
        let deleted = t.owner(Method::DELETE, path).send().await.unwrap();
        assert_eq!(deleted.status(), 204, "{path}");
    }
    // A CA that cannot sign now (its key file gone) is the server's trouble, not the device's:
    // 503 to retry, nothing stored; once the key is back, the same request is served.
    std::fs::create_dir_all(mine.join("fragile")).unwrap();
    let (_, fragile) = issuing_ca_files_named(
        &mine.join("fragile"),
        &rcgen::PKCS_ECDSA_P256_SHA256,
        "Fragile CA",
    );
    let fragile_pem = std::fs::read_to_string(&fragile.certificate_chain).unwrap();
    let kept = std::fs::read(&fragile.key).unwrap();
    expect_json(
        put(
            "/certificateAuthorities/fragile".into(),
            json!({ "name": "fragile", "certificateChain": fragile_pem, "key": { "file": fragile.key } }),
        )
        .await,
        200,
    )
    .await;
    expect_json(
        put(
            "/credentialPolicies/fragile-devices".into(),
            json!({ "name": "fragile-devices", "certificateAuthorityName": "fragile", "keyTypes": ["ecP256"] }),
        )
        .await,
        200,
    )
    .await;
    let fragile_id = "fragile-01";
    let fragile_token = enrolled(&t, fragile_id, Some("fragile-devices")).await;
    std::fs::remove_file(&fragile.key).unwrap();
    let body = json!({ "registrationId": fragile_id, "csr": csr(fragile_id, &key) });
    let refused = Device::new(&t, fragile_id)
        .put(&fragile_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_error(refused, 503, 503001).await;
    assert!(registration_state(&t, fragile_id).await.is_none());
    // A request the policy refuses is refused as such, before the CA is opened at all.
    let bad = register_with_csr(&t, fragile_id, &fragile_token, "not base64!").await;
    assert_eq!(bad["registrationState"]["errorCode"], 400209, "{bad}");
    assert_eq!(
        records(
            &t,
            &format!("/registrations/{fragile_id}/issuedCertificates")
        )
        .await,
        Vec::<Value>::new()
    );
    std::fs::write(&fragile.key, kept).unwrap();
    let served = register_with_csr(&t, fragile_id, &fragile_token, &csr(fragile_id, &key)).await;
    assert_eq!(served["status"], "assigned", "{served}");

    // The revocation outlives the CA: the group still anchors its certificate.
    let (status, body) = register_over(&t, &client, id).await;
    assert_eq!(
        (status, body["errorCode"].clone()),
        (401, json!(401002)),
        "{body}"
    );
}

/// A server whose issuing CA's key is not the CA certificate's, or whose policy has a name no
/// enrollment can give, refuses to start.
#[tokio::test]
async fn unusable_issuance_settings_stop_the_start() {
    let (mine, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_, mut ca) = issuing_ca_files(mine.path(), &rcgen::PKCS_ECDSA_P384_SHA384);
    ca.key = issuing_ca_files(other.path(), &rcgen::PKCS_ECDSA_P256_SHA256)
        .1
        .key;
    let mut config = dps_server::config::IssuanceConfig::default();
    config.certificate_authorities.insert("x".into(), ca);
    let error = dps_server::domain::issuance::Issuance::load(&config).unwrap_err();
    assert!(format!("{error:#}").contains("does not sign"), "{error:#}");

    // Nor does a policy under a name no enrollment can give.
    let (_, ca) = issuing_ca_files(mine.path(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let mut config = dps_server::config::IssuanceConfig::default();
    config.certificate_authorities.insert("x".into(), ca);
    config.credential_policies.insert(
        "a b".into(),
        CredentialPolicyConfig {
            certificate_authority: "x".into(),
            ..CredentialPolicyConfig::default()
        },
    );
    let error = dps_server::domain::issuance::Issuance::load(&config).unwrap_err();
    assert!(
        format!("{error:#}").contains("credential policy 'a b'"),
        "{error:#}"
    );

    // Nor a DNS name no certificate could carry (it would fail every issuance instead).
    config.credential_policies.clear();
    config.credential_policies.insert(
        "bad-san".into(),
        CredentialPolicyConfig {
            certificate_authority: "x".into(),
            dns_names: vec!["not a host".into()],
            ..CredentialPolicyConfig::default()
        },
    );
    let error = dps_server::domain::issuance::Issuance::load(&config).unwrap_err();
    assert!(format!("{error:#}").contains("dns_names"), "{error:#}");
}

on_both_backends!(
    a_csr_gets_a_certificate_that_then_admits_the_device,
    requests_that_cannot_be_served_fail_the_registration,
    a_revoked_certificate_no_longer_admits_its_device,
    a_device_with_an_issued_certificate_authenticates_to_its_hub_by_ca,
    instance_cas_and_policies_issue_through_the_admin_api,
);

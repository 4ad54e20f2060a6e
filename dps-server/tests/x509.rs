//! X.509 attestation through the real server: devices present certificates in the TLS
//! handshake (no Authorization header) and register through individual enrollments and groups
//! anchored at a root or an intermediate; every refusal is a 401 that stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    Backend, TestServer, enroll, expect_json, mtls_client, pem_of, register_over,
    registration_state,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use reqwest::Method;
use serde_json::{Value, json};

/// A CA that can issue certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str, parent: Option<&Ca>) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = match parent {
        Some(parent) => params.signed_by(&key, &parent.issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A device certificate and its key, as PEM.
struct DeviceCert {
    cert: String,
    key: String,
}

fn device_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn issued(params: CertificateParams, by: Option<&Ca>) -> DeviceCert {
    let key = KeyPair::generate().unwrap();
    let cert = match by {
        Some(ca) => params.signed_by(&key, &ca.issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    DeviceCert {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

async fn x509_group(t: &TestServer, id: &str, signing: &Ca) {
    enroll(
        t,
        json!({ "enrollmentGroupId": id,
            "attestation": { "type": "x509", "x509": { "signingCertificates": { "primary": { "certificate": signing.pem } } } } }),
    )
    .await;
}

async fn individual_enrollments_match_the_certificate_thumbprint(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let device = issued(device_params("dev-x509"), None);
    let enrollment = enroll(
        &t,
        json!({ "registrationId": "dev-x509",
            "attestation": { "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": device.cert } } } } }),
    )
    .await;
    let thumbprint = enrollment["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
        ["sha1Thumbprint"]
        .clone();
    for tls12 in [false, true] {
        let (status, done) = register_over(
            &t,
            &mtls_client(&t, &[&device.cert], &device.key, tls12),
            "dev-x509",
        )
        .await;
        assert_eq!(status, 200, "{done}");
        assert_eq!(done["status"], "assigned", "{done}");
        let state = &done["registrationState"];
        assert_eq!(state["assignedHub"], "hub-a.example.com");
        assert_eq!(
            state["x509"]["certificateInfo"]["sha1Thumbprint"],
            thumbprint
        );
        assert!(state.get("symmetricKey").is_none(), "{state}");
    }
    // Another self-signed certificate with the same name is not the enrolled one.
    let impostor = issued(device_params("dev-x509"), None);
    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &[&impostor.cert], &impostor.key, false),
        "dev-x509",
    )
    .await;
    assert_eq!(
        (status, body["errorCode"].clone()),
        (401, json!(401002)),
        "{body}"
    );
}

async fn groups_are_matched_from_the_leaf_towards_the_root(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    let line_1 = ca("Line 1", Some(&root));
    let line_2 = ca("Line 2", Some(&root));
    x509_group(&t, "by-root", &root).await;
    x509_group(&t, "line-1", &line_1).await;

    // Anchored at a verified intermediate: the device may send only its leaf.
    let first = issued(device_params("dev-l1"), Some(&line_1));
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&first.cert], &first.key, false),
        "dev-l1",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["x509"]["enrollmentGroupId"],
        "line-1"
    );
    assert_eq!(
        done["registrationState"]["x509"]["signingCertificateInfo"]["subjectName"],
        "CN=Line 1"
    );
    // ECDSA P-384 device keys work as well as P-256.
    let p384 = {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = device_params("dev-p384")
            .signed_by(&key, &line_1.issuer)
            .unwrap();
        DeviceCert {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    };
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&p384.cert], &p384.key, false),
        "dev-p384",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");
    // The closest group wins even when the chain reaches the root's group too.
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&first.cert, &line_1.pem], &first.key, false),
        "dev-l1",
    )
    .await;
    assert_eq!(
        done["registrationState"]["x509"]["enrollmentGroupId"],
        "line-1"
    );

    // Anchored at the root: the device sends its intermediate.
    let second = issued(device_params("dev-l2"), Some(&line_2));
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&second.cert, &line_2.pem], &second.key, false),
        "dev-l2",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["x509"]["enrollmentGroupId"],
        "by-root"
    );
    let stored = expect_json(
        t.owner(Method::GET, "/registrations/dev-l2")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(stored["enrollmentGroupId"], "by-root");

    // Without its intermediate the chain does not reach the root.
    let third = issued(device_params("dev-l2b"), Some(&line_2));
    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &[&third.cert], &third.key, false),
        "dev-l2b",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        registration_state(&t, "dev-l2b").await.is_none(),
        "a registration state was stored"
    );

    // A disabled group answers `disabled`, like a disabled symmetric-key group.
    enroll(
        &t,
        json!({ "enrollmentGroupId": "line-1", "provisioningStatus": "disabled",
            "attestation": { "type": "x509", "x509": { "signingCertificates": { "primary": { "certificate": line_1.pem } } } } }),
    )
    .await;
    let blocked = issued(device_params("dev-l1b"), Some(&line_1));
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&blocked.cert], &blocked.key, false),
        "dev-l1b",
    )
    .await;
    assert_eq!(done["status"], "disabled", "{done}");
    assert!(
        registration_state(&t, "dev-l1b").await.is_none(),
        "a registration state was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_certificates_are_refused_with_401_and_store_nothing() {
    let t = TestServer::start(Backend::Sqlite).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    x509_group(&t, "fleet", &root).await;
    let stranger = ca("Someone Else", None);
    let now = time::OffsetDateTime::now_utc();

    let mut long_chain = vec![ca("Level 0", Some(&root))];
    for level in 1..6 {
        let next = ca(&format!("Level {level}"), long_chain.last());
        long_chain.push(next);
    }
    let deep = issued(device_params("dev-deep"), long_chain.last());
    let mut deep_chain: Vec<&str> = vec![&deep.cert];
    deep_chain.extend(long_chain.iter().rev().map(|c| c.pem.as_str()));

    let cases: Vec<(&str, DeviceCert, Vec<String>, &str)> = vec![
        (
            "dev-unknown-ca",
            issued(device_params("dev-unknown-ca"), Some(&stranger)),
            vec![],
            "not enrolled",
        ),
        (
            "dev-expired",
            issued(
                {
                    let mut p = device_params("dev-expired");
                    p.not_before = now - time::Duration::days(30);
                    p.not_after = now - time::Duration::days(1);
                    p
                },
                Some(&root),
            ),
            vec![],
            "expired",
        ),
        (
            "dev-early",
            issued(
                {
                    let mut p = device_params("dev-early");
                    p.not_before = now + time::Duration::days(1);
                    p
                },
                Some(&root),
            ),
            vec![],
            "not valid before",
        ),
        (
            "dev-ca",
            issued(
                {
                    let mut p = device_params("dev-ca");
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    p
                },
                Some(&root),
            ),
            vec![],
            "CA certificate",
        ),
        (
            "dev-no-eku",
            issued(
                {
                    let mut p = device_params("dev-no-eku");
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                    p
                },
                Some(&root),
            ),
            vec![],
            "clientAuth",
        ),
        (
            "dev-named",
            issued(device_params("somebody-else"), Some(&root)),
            vec![],
            "is not the registration id",
        ),
        (
            "dev-self",
            issued(device_params("dev-self"), None),
            vec![],
            "not enrolled",
        ),
    ];
    for (id, cert, extra, expected) in &cases {
        let mut chain: Vec<&str> = vec![&cert.cert];
        chain.extend(extra.iter().map(String::as_str));
        let (status, body) =
            register_over(&t, &mtls_client(&t, &chain, &cert.key, false), id).await;
        assert_eq!(status, 401, "{id}: {body}");
        assert_eq!(body["errorCode"], 401002, "{id}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(expected), "{id}: {message}");
        assert!(
            registration_state(&t, id).await.is_none(),
            "a registration state was stored"
        );
    }

    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &deep_chain, &deep.key, false),
        "dev-deep",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("at most 6"),
        "{body}"
    );
    assert!(
        registration_state(&t, "dev-deep").await.is_none(),
        "a registration state was stored"
    );

    // Bytes that are not a certificate end the handshake: nothing verified them.
    let attempt = register_with_foreign_key(
        &t,
        "dev-garbage",
        vec![b"not a certificate".to_vec()],
        false,
    )
    .await;
    assert!(attempt.is_err(), "{attempt:?}");
    assert!(
        registration_state(&t, "dev-garbage").await.is_none(),
        "a registration state was stored"
    );

    // No certificate and no token.
    let response = t
        .anonymous(
            Method::PUT,
            &format!(
                "/{}/registrations/dev-none/register",
                t.running().admin.id_scope
            ),
        )
        .json(&json!({ "registrationId": "dev-none" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// Registers over a raw TLS connection that presents `chain` and signs the handshake with a
/// fresh key of its own, whatever key the certificate names (what an attacker holding only a
/// device's public certificate does; no HTTP client lets one do it). `Ok` with the status and
/// answer, or `Err` when the server ended the connection without an HTTP answer.
async fn register_with_foreign_key(
    t: &TestServer,
    id: &str,
    chain: Vec<Vec<u8>>,
    tls12: bool,
) -> Result<(u16, String), String> {
    use std::sync::Arc;

    use rustls::client::ResolvesClientCert;
    use rustls::sign::CertifiedKey;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl ResolvesClientCert for Fixed {
        fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let key = KeyPair::generate().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key).unwrap();
    let certified = CertifiedKey::new(
        chain.into_iter().map(CertificateDer::from).collect(),
        signing,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&t.running().ca_certificate).unwrap())
        .unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let config = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(t.running().local_addr)
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let body = json!({ "registrationId": id }).to_string();
    let request = format!(
        "PUT /{}/registrations/{id}/register?api-version=2021-06-01 HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        t.running().admin.id_scope,
        body.len()
    );
    // Under TLS 1.3 the client finishes first; the server's refusal arrives as an alert.
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {answer:?}"))?;
    Ok((status, answer))
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A device certificate that rustls-webpki cannot parse but a lenient parser reads: an unknown
/// critical extension.
fn unparseable_by_webpki(cn: &str, by: &Ca) -> DeviceCert {
    let mut params = device_params(cn);
    let mut extension =
        rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![5, 0]);
    extension.set_criticality(true);
    params.custom_extensions.push(extension);
    issued(params, Some(by))
}

/// The same certificate as version 1 (no version field, no extensions), re-signed by `by`:
/// rustls-webpki refuses version 1 certificates, x509-cert reads them.
fn version_1(cn: &str, by: &Ca) -> DeviceCert {
    use der::{Decode, Encode, Tagged, asn1::Any};
    let v3 = issued(device_params(cn), Some(by));
    let outer: Vec<Any> = Vec::<Any>::from_der(&der_of(&v3.cert)).unwrap();
    let tbs: Vec<Any> = Vec::<Any>::from_der(&outer[0].to_der().unwrap()).unwrap();
    let kept: Vec<Any> = tbs
        .into_iter()
        .filter(|field| {
            let tag = field.tag();
            !(tag.is_context_specific() && matches!(tag.number().value(), 0 | 3))
        })
        .collect();
    let tbs_der = kept.to_der().unwrap();
    let signature = rcgen::SigningKey::sign(by.issuer.key(), &tbs_der).unwrap();
    let certificate = vec![
        Any::from_der(&tbs_der).unwrap(),
        outer[1].clone(),
        Any::from_der(
            &der::asn1::BitString::from_bytes(&signature)
                .unwrap()
                .to_der()
                .unwrap(),
        )
        .unwrap(),
    ]
    .to_der()
    .unwrap();
    let parsed = attestation::x509::parse_der(&certificate).unwrap();
    assert_eq!(parsed.facts.version, 1, "the lenient parser reads it");
    DeviceCert {
        cert: pem_of(&certificate),
        key: v3.key,
    }
}

/// Security review item 1: a certificate the handshake verifier cannot parse never stands for
/// a device. Refused when an admin enrolls it, and at connection, where the handshake
/// signature (made here with a key that is not the certificate's) must be checked.
async fn certificates_the_verifier_cannot_parse_are_refused(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    for (id, cert) in [
        ("dev-critical", unparseable_by_webpki("dev-critical", &root)),
        ("dev-v1", version_1("dev-v1", &root)),
    ] {
        let enrollment = json!({ "registrationId": id,
            "attestation": { "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": cert.cert } } } } });
        let refused = common::expect_error(
            t.owner(Method::PUT, &format!("/enrollments/{id}"))
                .json(&enrollment)
                .send()
                .await
                .unwrap(),
            400,
            400004,
        )
        .await;
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .contains("clientCertificates.primary"),
            "{refused}"
        );
        // An enrollment written before the check existed: the connection still refuses it.
        sneak_in_enrollment(&t, id, &cert.cert).await;
        for tls12 in [false, true] {
            let attempt = register_with_foreign_key(&t, id, vec![der_of(&cert.cert)], tls12).await;
            assert!(
                attempt.is_err(),
                "{id} (TLS 1.2: {tls12}) was answered: {attempt:?}"
            );
        }
        assert!(
            registration_state(&t, id).await.is_none(),
            "a registration state was stored"
        );
    }
    // The same attack with a parseable certificate: the handshake signature does not verify.
    let normal = issued(device_params("dev-normal"), Some(&root));
    sneak_in_enrollment(&t, "dev-normal", &normal.cert).await;
    let attempt =
        register_with_foreign_key(&t, "dev-normal", vec![der_of(&normal.cert)], false).await;
    assert!(attempt.is_err(), "{attempt:?}");
    assert!(
        registration_state(&t, "dev-normal").await.is_none(),
        "a registration state was stored"
    );
}

/// Stores an individual X.509 enrollment directly, past the admin API's checks (as a database
/// written by an older version could hold it).
async fn sneak_in_enrollment(t: &TestServer, id: &str, cert: &str) {
    use dps_server::store::{Columns, Kind, Precondition, Write};
    let doc = json!({ "registrationId": id, "provisioningStatus": "enabled",
        "attestation": { "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": cert } } } } });
    t.running()
        .store()
        .write(&[Write::Put {
            ns: "default".into(),
            kind: Kind::IndividualEnrollment,
            key: id.to_ascii_lowercase(),
            columns: Columns::Attestation {
                attestation_type: "x509".into(),
            },
            doc: doc.to_string(),
            precondition: Precondition::Always,
            etag: None,
        }])
        .await
        .unwrap();
}

/// Security review item 2: when an individual enrollment exists for an id, a group's
/// certificate naming that id does not admit the device, and a disabled individual enrollment
/// blocks the group path too. The refusal is 401 401002 and changes nothing.
async fn a_group_certificate_cannot_claim_an_individually_enrolled_id(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    x509_group(&t, "fleet", &root).await;
    let own = issued(device_params("dev-own"), None);
    enroll(
        &t,
        json!({ "registrationId": "dev-own",
            "attestation": { "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": own.cert } } } } }),
    )
    .await;
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&own.cert], &own.key, false),
        "dev-own",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let before = expect_json(
        t.owner(Method::GET, "/registrations/dev-own")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;

    // A certificate from the group's CA with CN = the id: refused, the state untouched.
    let claim = issued(device_params("dev-own"), Some(&root));
    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &[&claim.cert], &claim.key, false),
        "dev-own",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errorCode"], 401002, "{body}");
    let after = expect_json(
        t.owner(Method::GET, "/registrations/dev-own")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        before["etag"], after["etag"],
        "the registration state changed"
    );

    // Any individual enrollment blocks the group path: a symmetric-key one, enabled or disabled.
    for status in ["enabled", "disabled"] {
        enroll(
            &t,
            json!({ "registrationId": "dev-sym", "provisioningStatus": status,
                "attestation": { "type": "symmetricKey" } }),
        )
        .await;
        let member = issued(device_params("dev-sym"), Some(&root));
        let (code, body) = register_over(
            &t,
            &mtls_client(&t, &[&member.cert], &member.key, false),
            "dev-sym",
        )
        .await;
        assert_eq!(code, 401, "{status}: {body}");
        assert_eq!(body["errorCode"], 401002, "{body}");
        assert!(
            registration_state(&t, "dev-sym").await.is_none(),
            "a registration state was stored"
        );
    }
}

/// Security review item 15: revocation covers every certificate of the verified path, serials
/// of any length can be revoked, and the order a device sends its chain in does not choose
/// which group admits it: a revoking or disabled group on the verified path refuses.
async fn revocation_covers_the_path_and_chain_order_chooses_nothing(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    let line = ca("Line 1", Some(&root));
    let thumbprint = |pem: &str| {
        attestation::x509::parse_certificate(pem)
            .unwrap()
            .facts
            .sha256_thumbprint
    };

    // A revoked intermediate refuses every device under it.
    enroll(
        &t,
        json!({ "enrollmentGroupId": "by-root", "attestation": { "type": "x509", "x509": {
            "signingCertificates": { "primary": { "certificate": root.pem } },
            "revokedCertificates": { "thumbprints": [thumbprint(&line.pem)] } } } }),
    )
    .await;
    let under = issued(device_params("dev-under"), Some(&line));
    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &[&under.cert, &line.pem], &under.key, false),
        "dev-under",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    assert!(
        registration_state(&t, "dev-under").await.is_none(),
        "a registration state was stored"
    );

    // A 25-byte serial (longer than RFC 5280 allows, but seen in the field) can be revoked.
    let mut long = device_params("dev-long-serial");
    long.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x5a; 25]));
    let long = issued(long, Some(&root));
    enroll(
        &t,
        json!({ "enrollmentGroupId": "by-root", "attestation": { "type": "x509", "x509": {
            "signingCertificates": { "primary": { "certificate": root.pem } },
            "revokedCertificates": { "serialNumbers": ["5a".repeat(25)] } } } }),
    )
    .await;
    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &[&long.cert], &long.key, false),
        "dev-long-serial",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        registration_state(&t, "dev-long-serial").await.is_none(),
        "a registration state was stored"
    );

    // Two groups on one path: the intermediate's group revokes the leaf, the root's does not.
    // Whatever order the device sends its chain in, the revocation holds.
    enroll(
        &t,
        json!({ "enrollmentGroupId": "by-root", "attestation": { "type": "x509", "x509": {
            "signingCertificates": { "primary": { "certificate": root.pem } } } } }),
    )
    .await;
    let revoked = issued(device_params("dev-order"), Some(&line));
    enroll(
        &t,
        json!({ "enrollmentGroupId": "line-1", "attestation": { "type": "x509", "x509": {
            "signingCertificates": { "primary": { "certificate": line.pem } },
            "revokedCertificates": { "thumbprints": [thumbprint(&revoked.cert)] } } } }),
    )
    .await;
    for chain in [
        vec![revoked.cert.as_str(), line.pem.as_str()],
        vec![revoked.cert.as_str(), line.pem.as_str(), root.pem.as_str()],
        vec![revoked.cert.as_str(), root.pem.as_str(), line.pem.as_str()],
    ] {
        let (status, body) = register_over(
            &t,
            &mtls_client(&t, &chain, &revoked.key, false),
            "dev-order",
        )
        .await;
        assert_eq!(status, 401, "chain of {}: {body}", chain.len());
        assert!(
            registration_state(&t, "dev-order").await.is_none(),
            "a registration state was stored"
        );
    }
    // A disabled group on the path blocks the device the same way.
    enroll(
        &t,
        json!({ "enrollmentGroupId": "line-1", "provisioningStatus": "disabled",
            "attestation": { "type": "x509", "x509": {
            "signingCertificates": { "primary": { "certificate": line.pem } } } } }),
    )
    .await;
    let member = issued(device_params("dev-order-2"), Some(&line));
    for chain in [
        vec![member.cert.as_str(), line.pem.as_str()],
        vec![member.cert.as_str(), root.pem.as_str(), line.pem.as_str()],
    ] {
        let (_, done) = register_over(
            &t,
            &mtls_client(&t, &chain, &member.key, false),
            "dev-order-2",
        )
        .await;
        assert_eq!(done["status"], "disabled", "{done}");
        assert!(
            registration_state(&t, "dev-order-2").await.is_none(),
            "a registration state was stored"
        );
    }
}

async fn post(t: &TestServer, path: &str, body: Value) -> reqwest::Response {
    t.owner(Method::POST, path)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn ca_certificates_count_after_proof_of_possession(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    let line = ca("Line 9", Some(&root));
    let uploaded = expect_json(
        t.owner(Method::PUT, "/certificates/factory-root")
            .json(&json!({ "name": "factory-root", "certificate": root.pem, "isVerified": true }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        uploaded["isVerified"], false,
        "an upload is never verified: {uploaded}"
    );
    assert_eq!(uploaded["info"]["subjectName"], "CN=Factory Root");
    let leaf_ca = issued(device_params("not-a-ca"), Some(&root));
    common::expect_error(
        t.owner(Method::PUT, "/certificates/leaf")
            .json(&json!({ "name": "leaf", "certificate": leaf_ca.cert }))
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
    let group = |name: &str| {
        json!({ "enrollmentGroupId": "by-ca",
            "attestation": { "type": "x509", "x509": { "caReferences": { "primary": name } } } })
    };
    let missing = t
        .owner(Method::PUT, "/enrollmentGroups/by-ca")
        .json(&group("nope"))
        .send()
        .await
        .unwrap();
    let error = common::expect_error(missing, 400, 400004).await;
    assert!(
        error["message"].as_str().unwrap().contains("'nope'"),
        "{error}"
    );
    enroll(&t, group("Factory-Root")).await;

    // Unverified: the CA admits nobody.
    let device = issued(device_params("dev-ca-1"), Some(&line));
    let (status, body) = register_over(
        &t,
        &mtls_client(&t, &[&device.cert, &line.pem], &device.key, false),
        "dev-ca-1",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        registration_state(&t, "dev-ca-1").await.is_none(),
        "a registration state was stored"
    );

    // Proof of possession.
    common::expect_error(
        post(
            &t,
            "/certificates/factory-root/verify",
            json!({ "certificate": leaf_ca.cert }),
        )
        .await,
        409,
        409002,
    )
    .await;
    let pending = expect_json(
        post(
            &t,
            "/certificates/factory-root/generateVerificationCode",
            json!({}),
        )
        .await,
        200,
    )
    .await;
    let code = pending["verificationCode"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 32);
    let wrong_name = issued(device_params("not-the-code"), Some(&root));
    let wrong_key = issued(device_params(&code), None);
    for (proof, expected) in [
        (&wrong_name, "common name"),
        (&wrong_key, "not signed by this CA"),
    ] {
        let error = common::expect_error(
            post(
                &t,
                "/certificates/factory-root/verify",
                json!({ "certificate": proof.cert }),
            )
            .await,
            400,
            400004,
        )
        .await;
        assert!(
            error["message"].as_str().unwrap().contains(expected),
            "{error}"
        );
    }
    let proof = issued(device_params(&code), Some(&root));
    let verified = expect_json(
        post(
            &t,
            "/certificates/factory-root/verify",
            json!({ "certificate": proof.cert }),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(verified["isVerified"], true);
    let shown = expect_json(
        t.owner(Method::GET, "/certificates/factory-root")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(shown["isVerified"], true);
    assert!(
        shown.get("certificate").is_none() && shown.get("verificationCode").is_none(),
        "{shown}"
    );

    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&device.cert, &line.pem], &device.key, false),
        "dev-ca-1",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(
        done["registrationState"]["x509"]["enrollmentGroupId"],
        "by-ca"
    );

    // A device whose TLS stack sends only its leaf verifies once the intermediate is uploaded.
    let lonely = issued(device_params("dev-ca-2"), Some(&line));
    let (status, _) = register_over(
        &t,
        &mtls_client(&t, &[&lonely.cert], &lonely.key, false),
        "dev-ca-2",
    )
    .await;
    assert_eq!(status, 401);
    expect_json(
        t.owner(Method::PUT, "/certificates/line-9")
            .json(&json!({ "name": "line-9", "certificate": line.pem }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&lonely.cert], &lonely.key, false),
        "dev-ca-2",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");

    // A CA a group relies on cannot be deleted; an unreferenced one can.
    let error = common::expect_error(
        t.owner(Method::DELETE, "/certificates/factory-root")
            .send()
            .await
            .unwrap(),
        409,
        409002,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("by-ca"),
        "{error}"
    );
    let deleted = t
        .owner(Method::DELETE, "/certificates/line-9")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_leaves_and_disabled_individual_enrollments_block_devices() {
    let t = TestServer::start(Backend::Sqlite).await;
    t.link_hub("hub-a.example.com").await;
    let root = ca("Factory Root", None);
    let by_serial = issued(device_params("dev-r1"), Some(&root));
    let by_thumbprint = issued(device_params("dev-r2"), Some(&root));
    let fine = issued(device_params("dev-r3"), Some(&root));
    let facts = |c: &DeviceCert| attestation::x509::parse_certificate(&c.cert).unwrap().facts;
    // Serials in another spelling: lower case, with separators and a leading zero byte.
    let serial = facts(&by_serial)
        .serial_number
        .as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap().to_lowercase())
        .collect::<Vec<_>>()
        .join(":");
    let group = |thumbprint: &str| {
        json!({ "enrollmentGroupId": "fleet",
            "attestation": { "type": "x509", "x509": {
                "signingCertificates": { "primary": { "certificate": root.pem } },
                "revokedCertificates": { "serialNumbers": [format!("00:{serial}")], "thumbprints": [thumbprint] } } } })
    };
    common::expect_error(
        t.owner(Method::PUT, "/enrollmentGroups/fleet")
            .json(&group("abc"))
            .send()
            .await
            .unwrap(),
        400,
        400004,
    )
    .await;
    enroll(
        &t,
        group(&facts(&by_thumbprint).sha256_thumbprint.to_lowercase()),
    )
    .await;
    for (id, cert) in [("dev-r1", &by_serial), ("dev-r2", &by_thumbprint)] {
        let (status, body) =
            register_over(&t, &mtls_client(&t, &[&cert.cert], &cert.key, false), id).await;
        assert_eq!(status, 401, "{id}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("revoked"),
            "{body}"
        );
        assert!(
            registration_state(&t, id).await.is_none(),
            "a registration state was stored"
        );
    }
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&fine.cert], &fine.key, false),
        "dev-r3",
    )
    .await;
    assert_eq!(done["status"], "assigned", "{done}");

    // A disabled individual enrollment for a certificate blocks it inside an enabled group.
    let blocked = issued(device_params("dev-r4"), Some(&root));
    enroll(
        &t,
        json!({ "registrationId": "dev-r4", "provisioningStatus": "disabled",
            "attestation": { "type": "x509", "x509": { "clientCertificates": { "primary": { "certificate": blocked.cert } } } } }),
    )
    .await;
    let (_, done) = register_over(
        &t,
        &mtls_client(&t, &[&blocked.cert], &blocked.key, false),
        "dev-r4",
    )
    .await;
    assert_eq!(done["status"], "disabled", "{done}");
    assert!(
        registration_state(&t, "dev-r4").await.is_none(),
        "a registration state was stored"
    );
}

/// Device authentication keeps an instance's X.509 anchors in memory: a group's signing
/// certificate replaced or the group deleted through another replica counts at the next
/// request, and the device it no longer admits is refused with nothing stored.
async fn a_replica_refuses_a_replaced_anchor_at_once(backend: Backend) {
    let t = TestServer::start(backend).await;
    t.link_hub("hub-a.example.com").await;
    let replica = t.replica().await;
    let (old_root, new_root) = (ca("old root", None), ca("new root", None));
    x509_group(&t, "fleet", &old_root).await;
    let old_device = issued(device_params("dev-old"), Some(&old_root));
    let new_device = issued(device_params("dev-new"), Some(&new_root));
    let register = |device: &DeviceCert, id: &'static str| {
        let client = mtls_client(&replica, &[&device.cert], &device.key, false);
        let replica = &replica;
        async move { register_over(replica, &client, id).await }
    };
    assert_assigned(register(&old_device, "dev-old").await);

    // The group now trusts the new root only, changed through the first server.
    let before = registration_state(&t, "dev-old").await;
    x509_group(&t, "fleet", &new_root).await;
    assert_refused(register(&old_device, "dev-old").await);
    assert_eq!(registration_state(&t, "dev-old").await, before);
    assert_assigned(register(&new_device, "dev-new").await);

    // Deleted through the first server: the replica admits no device of it.
    let before = registration_state(&t, "dev-new").await;
    let gone = t
        .owner(Method::DELETE, "/enrollmentGroups/fleet")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    assert_refused(register(&new_device, "dev-new").await);
    assert_eq!(registration_state(&t, "dev-new").await, before);
}

fn assert_assigned((status, done): (u16, Value)) {
    assert_eq!(
        (status, &done["status"]),
        (200, &json!("assigned")),
        "{done}"
    );
}

/// 401 401002, the refusal of a device that proves nothing the service trusts.
fn assert_refused((status, body): (u16, Value)) {
    assert_eq!(
        (status, &body["errorCode"]),
        (401, &json!(401002)),
        "{body}"
    );
}

on_both_backends!(
    individual_enrollments_match_the_certificate_thumbprint,
    a_replica_refuses_a_replaced_anchor_at_once,
    groups_are_matched_from_the_leaf_towards_the_root,
    ca_certificates_count_after_proof_of_possession,
    certificates_the_verifier_cannot_parse_are_refused,
    a_group_certificate_cannot_claim_an_individually_enrolled_id,
    revocation_covers_the_path_and_chain_order_chooses_nothing,
);

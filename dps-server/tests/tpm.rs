//! TPM attestation through the real server, with a software TPM on the device side (the real
//! TPM path, swtpm and tss-esapi, is in softhsm-tests): the challenge, the SAS signed with the
//! challenge's key, the hub key in the final blob, TPM enrollment groups admitted by EK
//! certificate, and every refusal as a 4xx that stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use attestation::SymmetricKey;
use attestation::sas::{encode_uri_component, sign};
use attestation::tpm::soft::SoftTpm;
use attestation::tpm::{KeyRole, RsaPublic, registration_id};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{
    Backend, Device, TestServer, enroll, expect_error, expect_json, now, registration_state,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PublicKeyData, SignatureAlgorithm,
};
use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A device with a software TPM.
struct TpmDevice<'a> {
    device: Device<'a>,
    tpm: SoftTpm,
}

impl<'a> TpmDevice<'a> {
    fn new(t: &'a TestServer, id: &str, tpm: SoftTpm) -> Self {
        Self {
            device: Device::new(t, id),
            tpm,
        }
    }

    fn keys(&self) -> Value {
        json!({
            "endorsementKey": STANDARD.encode(self.tpm.endorsement_key()),
            "storageRootKey": STANDARD.encode(self.tpm.storage_root_key()),
        })
    }

    fn body(&self, payload: Option<Value>) -> Value {
        let mut body = json!({ "registrationId": self.device.id, "tpm": self.keys() });
        if let Some(payload) = payload {
            body["payload"] = payload;
        }
        body
    }

    /// The first, unauthenticated register request.
    async fn ask(&self, body: Value) -> reqwest::Response {
        self.device
            .t
            .anonymous(
                Method::PUT,
                &format!(
                    "/{}/registrations/{}/register",
                    self.device.scope, self.device.id
                ),
            )
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Asks for a challenge and opens it in the TPM: the key to sign with.
    async fn challenge(&self, payload: Option<Value>) -> SymmetricKey {
        let response = self.ask(self.body(payload)).await;
        self.open_challenge(response).await
    }

    /// Opens the challenge `response` must carry (a 401 with a blob, no error body, as the C
    /// SDK parses it) in the TPM: the key to sign with.
    async fn open_challenge(&self, response: reqwest::Response) -> SymmetricKey {
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["content-type"],
            "application/json; charset=utf-8"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["keyName"], "registration", "{body}");
        assert!(body.get("status").is_none());
        assert!(body.get("errorCode").is_none(), "{body}");
        let blob = STANDARD
            .decode(body["authenticationKey"].as_str().unwrap())
            .unwrap();
        self.tpm.activate(&blob).unwrap()
    }

    /// A token as the Node TPM client builds it (encoded `sr`, `skn=registration`).
    fn token(&self, key: &SymmetricKey) -> String {
        let resource = format!("{}/registrations/{}", self.device.scope, self.device.id);
        sign(
            &encode_uri_component(&resource),
            key,
            now() + 3600,
            Some("registration"),
        )
    }

    /// A register request signed with `token`.
    async fn send(&self, token: &str) -> reqwest::Response {
        self.device
            .put(token)
            .json(&self.body(None))
            .send()
            .await
            .unwrap()
    }

    /// The whole flow: challenge, then register with the challenge's key.
    async fn register(&self, payload: Option<Value>) -> Value {
        let key = self.challenge(payload.clone()).await;
        self.device
            .register_with(&self.token(&key), self.body(payload), &[])
            .await
    }
}

/// A simulated hub that records the identities it is given.
async fn hub(t: &TestServer) -> MockServer {
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&hooks)
        .await;
    expect_json(
        t.owner(Method::PUT, "/linkedHubs/hub-a.example.com")
            .header("If-Match", "*")
            .json(&json!({ "hostName": "hub-a.example.com",
                "connector": { "type": "webhook", "url": format!("{}/hub-a", hooks.uri()) } }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    hooks
}

async fn hub_keys(hooks: &MockServer) -> Vec<String> {
    hooks
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter_map(|b| {
            b["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

async fn enroll_tpm(t: &TestServer, id: &str, tpm: &SoftTpm) -> Value {
    enroll(
        t,
        json!({ "registrationId": id, "attestation": { "type": "tpm", "tpm": {
            "endorsementKey": STANDARD.encode(tpm.endorsement_key()) } } }),
    )
    .await
}

/// The registration state of `id` as the admin API shows it (`None` before the first).
async fn individual_enrollment_end_to_end(backend: Backend) {
    let t = TestServer::start(backend).await;
    let hooks = hub(&t).await;
    let tpm = SoftTpm::fixture(0).unwrap();
    enroll_tpm(&t, "tpm-dev-1", &tpm).await;
    let device = TpmDevice::new(&t, "tpm-dev-1", tpm);

    let done = device.register(None).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let state = &done["registrationState"];
    assert_eq!(state["assignedHub"], "hub-a.example.com");
    assert_eq!(state["deviceId"], "tpm-dev-1");
    assert!(state.get("symmetricKey").is_none());
    // The final blob carries the key the hub now holds for the device.
    let blob = STANDARD
        .decode(state["tpm"]["authenticationKey"].as_str().unwrap())
        .unwrap();
    let hub_key = device.tpm.activate(&blob).unwrap();
    assert_eq!(hub_keys(&hooks).await, [hub_key.to_base64()]);

    // A second registration runs the whole challenge again: a fresh key, a fresh hub key.
    let again = device.register(None).await;
    assert_eq!(again["status"], "assigned");
    let blob = STANDARD
        .decode(
            again["registrationState"]["tpm"]["authenticationKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let second_hub_key = device.tpm.activate(&blob).unwrap();
    assert_ne!(second_hub_key, hub_key);
    assert_eq!(
        hub_keys(&hooks).await.last(),
        Some(&second_hub_key.to_base64())
    );
    let stored = expect_json(
        t.owner(Method::GET, "/registrations/tpm-dev-1")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(stored["status"], "assigned");
}

async fn refusals_store_nothing(backend: Backend) {
    let t = TestServer::start(backend).await;
    hub(&t).await;
    let tpm = SoftTpm::fixture(0).unwrap();
    enroll_tpm(&t, "tpm-dev-2", &tpm).await;

    // An EK nobody enrolled, under an unknown id and under an enrolled one: the same answer.
    let stranger = TpmDevice::new(&t, "tpm-nobody", SoftTpm::fixture(1).unwrap());
    let unknown = expect_error(stranger.ask(stranger.body(None)).await, 401, 401002).await;
    let impostor = TpmDevice::new(&t, "tpm-dev-2", SoftTpm::fixture(1).unwrap());
    let wrong_ek = expect_error(impostor.ask(impostor.body(None)).await, 401, 401002).await;
    assert_eq!(unknown["message"], wrong_ek["message"]);

    // Malformed keys and other templates: 400 naming the field.
    let device = TpmDevice::new(&t, "tpm-dev-2", tpm.clone());
    let srk = STANDARD.encode(tpm.storage_root_key());
    let ek = tpm.endorsement_key();
    let mut other_attributes = ek.clone();
    other_attributes[9] = 0x72;
    let mut ecc = ek.clone();
    ecc[3] = 0x23;
    for (keys, field, says) in [
        (
            json!({ "endorsementKey": "not base64!", "storageRootKey": srk }),
            "tpm.endorsementKey",
            "base64",
        ),
        (
            json!({ "endorsementKey": STANDARD.encode(&ek[..200]), "storageRootKey": srk }),
            "tpm.endorsementKey",
            "TPM2B_PUBLIC",
        ),
        (
            json!({ "endorsementKey": STANDARD.encode(&other_attributes), "storageRootKey": srk }),
            "tpm.endorsementKey",
            "objectAttributes",
        ),
        (
            json!({ "endorsementKey": STANDARD.encode(&ecc), "storageRootKey": srk }),
            "tpm.endorsementKey",
            "type",
        ),
        (
            json!({ "endorsementKey": STANDARD.encode(&ek), "storageRootKey": STANDARD.encode(&ek) }),
            "tpm.storageRootKey",
            "objectAttributes",
        ),
        (
            json!({ "endorsementKey": STANDARD.encode(&ek) }),
            "tpm.storageRootKey",
            "required",
        ),
    ] {
        let body = json!({ "registrationId": "tpm-dev-2", "tpm": keys });
        let error = expect_error(device.ask(body).await, 400, 400011).await;
        assert_eq!(error["info"]["field"], field, "{error}");
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }

    // A key no challenge gave: nothing stored, and the answer is a fresh challenge (wire
    // fidelity item 4), whose key then registers.
    let response = device
        .send(&device.token(&SymmetricKey::generate().unwrap()))
        .await;
    let fresh = device.open_challenge(response).await;
    assert!(registration_state(&t, "tpm-dev-2").await.is_none());
    let done = device
        .device
        .register_with(&device.token(&fresh), device.body(None), &[])
        .await;
    assert_eq!(done["status"], "assigned", "{done}");

    // A newer challenge does not cancel an older one; each key starts one registration, and
    // replaying the same request is refused.
    let old = device.challenge(None).await;
    let current = device.challenge(None).await;
    let done = device
        .device
        .register_with(&device.token(&old), device.body(None), &[])
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    let token = device.token(&current);
    let done = device
        .device
        .register_with(&token, device.body(None), &[])
        .await;
    assert_eq!(done["status"], "assigned");
    // The replay starts nothing: it is answered with a new challenge. Without the TPM keys
    // in the body there is nothing to challenge, and the refusal says why.
    let before = registration_state(&t, "tpm-dev-2").await;
    let replay = device.send(&token).await;
    device.open_challenge(replay).await;
    let bare = device
        .device
        .put(&token)
        .json(&json!({ "registrationId": "tpm-dev-2" }))
        .send()
        .await
        .unwrap();
    let error = expect_error(bare, 401, 401002).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("already started"),
        "{error}"
    );
    assert_eq!(registration_state(&t, "tpm-dev-2").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_keys_expire() {
    let t = TestServer::start_with(Backend::Sqlite, |c| c.tpm.challenge_ttl_secs = 1).await;
    hub(&t).await;
    let tpm = SoftTpm::fixture(2).unwrap();
    enroll_tpm(&t, "tpm-slow", &tpm).await;
    let device = TpmDevice::new(&t, "tpm-slow", tpm);

    // A registration within the lifetime works, and its key is spent.
    let key = device.challenge(None).await;
    let token = device.token(&key);
    let done = device
        .device
        .register_with(&token, device.body(None), &[])
        .await;
    assert_eq!(done["status"], "assigned");

    // A key used after the lifetime starts nothing: the device gets a fresh challenge, as
    // on its first request, and registers with it. A replay gets a challenge too.
    let late = device.challenge(None).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = registration_state(&t, "tpm-slow").await;
    let response = device.send(&device.token(&late)).await;
    let fresh = device.open_challenge(response).await;
    assert_eq!(registration_state(&t, "tpm-slow").await, before);
    let replay = device.send(&token).await;
    device.open_challenge(replay).await;
    assert_eq!(registration_state(&t, "tpm-slow").await, before);
    let done = device
        .device
        .register_with(&device.token(&fresh), device.body(None), &[])
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    // Without the TPM keys in the body, an expired key is refused and says so.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = device.challenge(None).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let bare = device
        .device
        .put(&device.token(&expired))
        .json(&json!({ "registrationId": "tpm-slow" }))
        .send()
        .await
        .unwrap();
    let error = expect_error(bare, 401, 401002).await;
    assert!(
        error["message"].as_str().unwrap().contains("expired"),
        "{error}"
    );
}

/// A TPM manufacturer: a CA that issues EK certificates.
struct Manufacturer {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn manufacturer() -> Manufacturer {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Manufacturer {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// An RSA public key for rcgen: PKCS#1 DER.
struct Rsa(Vec<u8>);

impl PublicKeyData for Rsa {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

/// Base64 of an EK certificate for `tpm`'s EK, as the device sends it.
fn ek_certificate(tpm: &SoftTpm, by: &Manufacturer) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![2, 23, 133, 8, 1])];
    let cert = params
        .signed_by(&Rsa(tpm.endorsement_key_pkcs1().unwrap()), &by.issuer)
        .unwrap();
    STANDARD.encode(cert.der())
}

fn derived_id(tpm: &SoftTpm) -> String {
    registration_id(&RsaPublic::parse(&tpm.endorsement_key(), KeyRole::Endorsement).unwrap())
}

async fn groups_admit_by_ek_certificate(backend: Backend) {
    let maker = manufacturer();
    let pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pem.path(), &maker.pem).unwrap();
    let path = pem.path().to_owned();
    let t = TestServer::start_with(backend, |c| {
        c.tpm.manufacturer_certificates = vec![path];
    })
    .await;
    let hooks = hub(&t).await;
    enroll(
        &t,
        json!({ "enrollmentGroupId": "tpm-fleet", "attestation": { "type": "tpm" } }),
    )
    .await;
    // There is one TPM group per instance.
    let second = t
        .owner(Method::PUT, "/enrollmentGroups/tpm-fleet-2")
        .json(&json!({ "enrollmentGroupId": "tpm-fleet-2", "attestation": { "type": "tpm" } }))
        .send()
        .await
        .unwrap();
    expect_error(second, 409, 409001).await;

    let tpm = SoftTpm::fixture(1).unwrap();
    let device = TpmDevice::new(&t, &derived_id(&tpm), tpm.clone());
    let payload =
        json!({ "tpmEndorsementKeyCertificate": ek_certificate(&tpm, &maker), "line": 7 });
    let done = device.register(Some(payload.clone())).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(done["registrationState"]["enrollmentGroupId"], "tpm-fleet");
    let blob = STANDARD
        .decode(
            done["registrationState"]["tpm"]["authenticationKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(
        hub_keys(&hooks).await,
        [tpm.activate(&blob).unwrap().to_base64()]
    );

    // Refusals: no certificate, another manufacturer, a certificate for another EK, an id
    // that is not the EK's.
    let other = SoftTpm::fixture(2).unwrap();
    let device = TpmDevice::new(&t, &derived_id(&other), other.clone());
    let cases = [
        (None, "payload.tpmEndorsementKeyCertificate"),
        (
            Some(
                json!({ "tpmEndorsementKeyCertificate": ek_certificate(&other, &manufacturer()) }),
            ),
            "does not chain",
        ),
        (
            Some(json!({ "tpmEndorsementKeyCertificate": ek_certificate(&tpm, &maker) })),
            "different key",
        ),
    ];
    for (payload, says) in cases {
        let error = expect_error(device.ask(device.body(payload)).await, 401, 401002).await;
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    let misnamed = TpmDevice::new(&t, "my-own-name", other.clone());
    let payload = json!({ "tpmEndorsementKeyCertificate": ek_certificate(&other, &maker) });
    let error = expect_error(
        misnamed.ask(misnamed.body(Some(payload))).await,
        401,
        401002,
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&derived_id(&other)),
        "{error}"
    );
    let garbage = json!({ "tpmEndorsementKeyCertificate": "***" });
    expect_error(device.ask(device.body(Some(garbage))).await, 400, 400004).await;
    assert!(registration_state(&t, &derived_id(&other)).await.is_none());
    assert!(registration_state(&t, "my-own-name").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_take_only_standard_keys_and_groups_need_manufacturers() {
    let t = TestServer::start(Backend::Sqlite).await;
    let tpm = SoftTpm::fixture(0).unwrap();
    let mut ek = tpm.endorsement_key();
    ek[9] = 0x72;
    let bad = t
        .owner(Method::PUT, "/enrollments/tpm-bad")
        .json(
            &json!({ "registrationId": "tpm-bad", "attestation": { "type": "tpm",
            "tpm": { "endorsementKey": STANDARD.encode(&ek) } } }),
        )
        .send()
        .await
        .unwrap();
    let error = expect_error(bad, 400, 400011).await;
    assert_eq!(error["info"]["field"], "attestation.tpm.endorsementKey");

    let group = t
        .owner(Method::PUT, "/enrollmentGroups/tpm-fleet")
        .json(&json!({ "enrollmentGroupId": "tpm-fleet", "attestation": { "type": "tpm" } }))
        .send()
        .await
        .unwrap();
    let error = expect_error(group, 400, 400004).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("manufacturer_certificates"),
        "{error}"
    );
}

/// Security review item 6: anyone may send a device's public EK and SRK, so an
/// unauthenticated challenge request must not cancel the challenge the device is answering.
async fn a_stranger_asking_for_a_challenge_does_not_cancel_the_device_s(backend: Backend) {
    let t = TestServer::start(backend).await;
    hub(&t).await;
    let tpm = SoftTpm::fixture(0).unwrap();
    enroll_tpm(&t, "tpm-victim", &tpm).await;
    let device = TpmDevice::new(&t, "tpm-victim", tpm.clone());
    let key = device.challenge(None).await;
    // The stranger knows the public keys and asks, several times.
    for _ in 0..3 {
        let response = device.ask(device.body(None)).await;
        assert_eq!(response.status(), 401);
    }
    let done = device
        .device
        .register_with(&device.token(&key), device.body(None), &[])
        .await;
    assert_eq!(done["status"], "assigned", "{done}");
    // Still single-use: the second use starts nothing and gets a new challenge.
    let before = registration_state(&t, "tpm-victim").await;
    device
        .open_challenge(device.send(&device.token(&key)).await)
        .await;
    assert_eq!(registration_state(&t, "tpm-victim").await, before);
}

/// The EK as the device would send it with the exponent written out (65537) instead of the
/// template's 0 ("the default exponent"): the same key in other bytes.
fn with_explicit_exponent(tpm2b: &[u8]) -> Vec<u8> {
    let mut bytes = tpm2b.to_vec();
    // The public area ends with the exponent (4 bytes) and the 256-byte modulus (size-prefixed).
    let at = bytes.len() - 256 - 2 - 4;
    assert_eq!(
        &bytes[at..at + 4],
        &[0, 0, 0, 0],
        "the fixture uses exponent 0"
    );
    bytes[at..at + 4].copy_from_slice(&65_537u32.to_be_bytes());
    bytes
}

/// Security review item 17: one TPM is one device, whichever encoding of the exponent its EK
/// arrives in: the same registration id, the same enrollment.
async fn an_ek_has_one_identity_whatever_its_exponent_encoding(backend: Backend) {
    let maker = manufacturer();
    let pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pem.path(), &maker.pem).unwrap();
    let path = pem.path().to_owned();
    let t = TestServer::start_with(backend, |c| {
        c.tpm.manufacturer_certificates = vec![path];
    })
    .await;
    hub(&t).await;
    enroll(
        &t,
        json!({ "enrollmentGroupId": "tpm-fleet", "attestation": { "type": "tpm" } }),
    )
    .await;
    let tpm = SoftTpm::fixture(1).unwrap();
    let explicit = with_explicit_exponent(&tpm.endorsement_key());
    let canonical_id = derived_id(&tpm);
    let other_id = registration_id(&RsaPublic::parse(&explicit, KeyRole::Endorsement).unwrap());
    assert_eq!(
        canonical_id, other_id,
        "the id does not depend on the encoding"
    );
    // The registration id derived from the other bytes (what a device could compute) is not
    // a second identity of the same TPM.
    let raw_id = data_encoding_id(&explicit);
    assert_ne!(raw_id, canonical_id);
    let payload = json!({ "tpmEndorsementKeyCertificate": ek_certificate(&tpm, &maker) });
    let body = |id: &str| {
        json!({ "registrationId": id, "payload": payload, "tpm": {
            "endorsementKey": STANDARD.encode(&explicit),
            "storageRootKey": STANDARD.encode(tpm.storage_root_key()) } })
    };
    let second = TpmDevice::new(&t, &raw_id, tpm.clone());
    expect_error(second.ask(body(&raw_id)).await, 401, 401002).await;
    assert!(registration_state(&t, &raw_id).await.is_none());
    let device = TpmDevice::new(&t, &canonical_id, tpm.clone());
    let response = device.ask(body(&canonical_id)).await;
    assert_eq!(response.status(), 401);
    let challenge: Value = response.json().await.unwrap();
    assert!(challenge["authenticationKey"].is_string(), "{challenge}");

    // An individual enrollment of one encoding admits the other.
    enroll(
        &t,
        json!({ "registrationId": "tpm-individual", "attestation": { "type": "tpm", "tpm": {
            "endorsementKey": STANDARD.encode(with_explicit_exponent(&SoftTpm::fixture(2).unwrap().endorsement_key())) } } }),
    )
    .await;
    let individual = TpmDevice::new(&t, "tpm-individual", SoftTpm::fixture(2).unwrap());
    let done = individual.register(None).await;
    assert_eq!(done["status"], "assigned", "{done}");
}

/// What the Azure SDKs compute from EK bytes: base32 of their SHA-256, without looking inside.
fn data_encoding_id(tpm2b: &[u8]) -> String {
    use sha2::Digest as _;
    data_encoding::BASE32_NOPAD
        .encode(&sha2::Sha256::digest(tpm2b))
        .to_ascii_lowercase()
}

on_both_backends!(
    a_stranger_asking_for_a_challenge_does_not_cancel_the_device_s,
    an_ek_has_one_identity_whatever_its_exponent_encoding,
    individual_enrollment_end_to_end,
    refusals_store_nothing,
    groups_admit_by_ek_certificate,
);

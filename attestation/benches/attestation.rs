//! Hot functions of device authentication: SAS verification (individual and against a group's
//! derived key), group key derivation, X.509 leaf checks and chain verification, and TPM:
//! parsing the EK and SRK of a challenge and building its activation blob (the software TPM's
//! activation, the device's side, is measured for comparison); issuing an operational
//! certificate from a CSR.
//! Run: `cargo bench -p attestation --bench attestation`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use attestation::SymmetricKey;
use attestation::chain::{check_leaf, verify_chain};
use attestation::sas::{SasToken, sign};
use criterion::{Criterion, criterion_group, criterion_main};

const NOW: u64 = 1_795_000_000;

fn sas(c: &mut Criterion) {
    let key = SymmetricKey::generate().unwrap();
    let group = SymmetricKey::generate().unwrap();
    let resource = "0ne00000A1B%2Fregistrations%2Fsensor-000123";
    let token = sign(resource, &key, NOW + 3600, Some("registration"));
    let member = group.derive_device_key("sensor-000123");
    let member_token = sign(resource, &member, NOW + 3600, Some("registration"));
    c.bench_function("sas/parse_and_verify", |b| {
        b.iter(|| {
            let parsed = SasToken::parse(black_box(&token)).unwrap();
            parsed.verify_any([&key]).unwrap();
        })
    });
    c.bench_function("sas/derive_group_key", |b| {
        b.iter(|| group.derive_device_key(black_box("sensor-000123")))
    });
    c.bench_function("sas/verify_group_member", |b| {
        b.iter(|| {
            let parsed = SasToken::parse(black_box(&member_token)).unwrap();
            let derived = group.derive_device_key("sensor-000123");
            parsed.verify_any([&derived]).unwrap();
        })
    });
}

fn x509(c: &mut Criterion) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Bench Root");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_der = ca.self_signed(&ca_key).unwrap().der().to_vec();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "sensor-000123");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    leaf.not_before = time::OffsetDateTime::from_unix_timestamp(NOW as i64 - 86_400).unwrap();
    leaf.not_after = time::OffsetDateTime::from_unix_timestamp(NOW as i64 + 86_400).unwrap();
    let chain = vec![leaf.signed_by(&leaf_key, &issuer).unwrap().der().to_vec()];
    c.bench_function("x509/check_leaf", |b| {
        b.iter(|| check_leaf(black_box(&chain), "sensor-000123", NOW).unwrap())
    });
    c.bench_function("x509/verify_chain_p256", |b| {
        b.iter(|| verify_chain(black_box(&chain), &ca_der, &[], NOW).unwrap())
    });
}

fn tpm(c: &mut Criterion) {
    use attestation::tpm::soft::SoftTpm;
    use attestation::tpm::{KeyRole, RsaPublic, activation_blob};
    let device = SoftTpm::fixture(0).unwrap();
    let (ek_bytes, srk_bytes) = (device.endorsement_key(), device.storage_root_key());
    let ek = RsaPublic::parse(&ek_bytes, KeyRole::Endorsement).unwrap();
    let srk = RsaPublic::parse(&srk_bytes, KeyRole::StorageRoot).unwrap();
    c.bench_function("tpm/parse_ek_and_srk", |b| {
        b.iter(|| {
            RsaPublic::parse(black_box(&ek_bytes), KeyRole::Endorsement).unwrap();
            RsaPublic::parse(black_box(&srk_bytes), KeyRole::StorageRoot).unwrap();
        })
    });
    c.bench_function("tpm/activation_blob", |b| {
        b.iter(|| activation_blob(black_box(&ek), black_box(&srk)).unwrap())
    });
    let blob = activation_blob(&ek, &srk).unwrap().blob;
    c.bench_function("tpm/soft_device_activate", |b| {
        b.iter(|| device.activate(black_box(&blob)).unwrap())
    });
}

/// What issuing one operational certificate costs with a software CA key: checking the
/// device's request (its signature) and signing the certificate, for a P-384 and a P-256 CA.
fn issuance(c: &mut Criterion) {
    use attestation::issuance::{IssuingCa, KeyType, Profile, check_csr};
    let device = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut request = rcgen::CertificateParams::default();
    request
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sensor-000123");
    let csr = request.serialize_request(&device).unwrap().der().to_vec();
    let profile = Profile {
        validity: std::time::Duration::from_secs(30 * 86_400),
        dns_names: Vec::new(),
    };
    for (name, alg) in [
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Bench Issuing CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let ca = IssuingCa::new(vec![der], key).unwrap();
        c.bench_function(&format!("issuance/check_and_issue_{name}_ca"), |b| {
            b.iter(|| {
                let checked = check_csr(black_box(&csr), "sensor-000123", &KeyType::ALL).unwrap();
                ca.issue(
                    &checked,
                    "sensor-000123",
                    &profile,
                    time::OffsetDateTime::now_utc(),
                )
                .unwrap()
            })
        });
    }
}

criterion_group!(benches, sas, x509, tpm, issuance);
criterion_main!(benches);

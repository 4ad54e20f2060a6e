//! What issuing one operational certificate costs when the CA key is in a PKCS#11 token:
//! checking the device's request and signing the certificate inside the token (one session).
//! Run by `scripts/bench-issuance.sh`, which makes a SoftHSM2 token with the keys and names
//! them in `DPS_BENCH_CA_KEYS` (`name=pkcs11-uri,...`); without it there is nothing to measure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use attestation::issuance::{IssuingCa, KeyType, Profile, certificate_request, check_csr};
use criterion::{Criterion, criterion_group, criterion_main};
use dps_pkcs11::{Pkcs11Uri, PrivateKey, Signer};

fn token_issuance(c: &mut Criterion) {
    let Ok(keys) = std::env::var("DPS_BENCH_CA_KEYS") else {
        eprintln!("DPS_BENCH_CA_KEYS is not set: run scripts/bench-issuance.sh");
        return;
    };
    let device = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = certificate_request(&device, "sensor-000123").unwrap();
    let profile = Profile {
        validity: std::time::Duration::from_secs(30 * 86_400),
        dns_names: Vec::new(),
    };
    for entry in keys.split(',') {
        let (name, uri) = entry.split_once('=').unwrap();
        let key =
            Signer::Token(PrivateKey::open(&Pkcs11Uri::parse(uri).unwrap(), None, 1).unwrap());
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Bench Issuing CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let ca = IssuingCa::new(vec![der], key).unwrap();
        c.bench_function(
            &format!("issuance/check_and_issue_softhsm_{name}_ca"),
            |b| {
                b.iter(|| {
                    let checked =
                        check_csr(black_box(&csr), "sensor-000123", &KeyType::ALL).unwrap();
                    ca.issue(
                        &checked,
                        "sensor-000123",
                        &profile,
                        time::OffsetDateTime::now_utc(),
                    )
                    .unwrap()
                })
            },
        );
    }
}

criterion_group!(benches, token_issuance);
criterion_main!(benches);

//! End to end: the real server and the real device client (`dps-device`) with X.509. Device
//! keys are generated inside SoftHSM2 (ECDSA P-256 and RSA-2048) and sign the TLS handshake in
//! place; certificates come from a test hierarchy (a root and two intermediates). Devices
//! register through an individual enrollment, through a group anchored at a verified
//! intermediate and through a group anchored at a verified root (CA certificates uploaded and
//! proved with the admin CLI). One device keeps its key in a PEM file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use softhsm_tests::{ServerProcess, SoftHsm, TokenPublicKey, device_binary, free_port};

const TOKEN: &str = "device-x509";
const PIN: &str = "4321";

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

fn leaf_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

struct Fixture {
    server: ServerProcess,
    endpoint: String,
    hsm: SoftHsm,
    pin_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn cli(&self, args: &[&str]) -> Value {
        self.server.admin_json(args).unwrap()
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }

    /// Uploads `ca` as `name` and proves possession of its key.
    fn verified_ca(&self, name: &str, ca: &Ca) {
        let file = self.write(&format!("{name}.pem"), &ca.pem);
        let uploaded = self.cli(&["certificate", "upload", name, &file]);
        assert_eq!(uploaded["isVerified"], false);
        let code = self.cli(&["certificate", "verification-code", name])["verificationCode"]
            .as_str()
            .unwrap()
            .to_owned();
        let proof = leaf_params(&code)
            .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
            .unwrap();
        let proof_file = self.write(&format!("{name}-proof.pem"), &proof.pem());
        let verified = self.cli(&["certificate", "verify", name, &proof_file]);
        assert_eq!(verified["isVerified"], true, "{verified}");
    }

    /// A key pair of `kind` in the token and a certificate for it issued by `issuer`; returns
    /// the PEM file (leaf, then `chain`) and the key's pkcs11: URI.
    fn token_device(&self, id: &str, kind: &str, issuer: &Ca, chain: &[&Ca]) -> (String, String) {
        let der = self.hsm.generate_key(TOKEN, PIN, id, kind).unwrap();
        let algorithm = match kind {
            "ec" => &rcgen::PKCS_ECDSA_P256_SHA256,
            _ => &rcgen::PKCS_RSA_SHA256,
        };
        let public = TokenPublicKey { der, algorithm };
        let cert = leaf_params(id).signed_by(&public, &issuer.issuer).unwrap();
        let mut pem = cert.pem();
        for ca in chain {
            pem.push_str(&ca.pem);
        }
        let file = self.write(&format!("{id}.pem"), &pem);
        (
            file,
            format!("pkcs11:token={TOKEN};object={id};type=private"),
        )
    }

    fn register(&self, certificate: &str, key: &str) -> (bool, Value, String) {
        self.register_with(certificate, key, &[])
    }

    /// `register` with `extra` arguments.
    fn register_with(&self, certificate: &str, key: &str, extra: &[&str]) -> (bool, Value, String) {
        let output = Command::new(device_binary().unwrap())
            .args([
                "register",
                "--endpoint",
                &self.endpoint,
                "--id-scope",
                &self.server.id_scope,
                "--certificate",
                certificate,
                "--private-key",
                key,
                "--pin-file",
                self.pin_file.to_str().unwrap(),
                "--state-file",
                self.dir
                    .path()
                    .join(
                        format!("{}.state.json", Path::new(certificate).display())
                            .replace('/', "_"),
                    )
                    .to_str()
                    .unwrap(),
                "--ca-cert",
                self.server.ca_certificate.to_str().unwrap(),
                "--output",
                "json",
                "--timeout",
                "30",
            ])
            .args(extra)
            .env(self.hsm.env().0, self.hsm.env().1)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (
            output.status.success(),
            serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stderr,
        )
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let server =
        ServerProcess::start(dir.path(), &["--listen", &format!("127.0.0.1:{port}")], &[]).unwrap();
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    let hsm = SoftHsm::new().unwrap();
    hsm.init_token(TOKEN, PIN).unwrap();
    let pin_file = hsm.pin_file(PIN).unwrap();
    Fixture {
        server,
        endpoint: format!("https://localhost:{port}"),
        hsm,
        pin_file,
        dir,
    }
}

#[test]
fn token_keys_register_through_individual_enrollments_and_verified_cas() {
    let f = fixture();
    let root = ca("Test Root", None);
    let line_a = ca("Line A", Some(&root));
    let line_b = ca("Line B", Some(&root));
    f.verified_ca("test-root", &root);
    f.verified_ca("line-a", &line_a);
    f.cli(&["group", "create", "by-line-a", "--ca-reference", "line-a"]);
    f.cli(&["group", "create", "by-root", "--ca-reference", "test-root"]);

    for kind in ["ec", "rsa"] {
        // An individual enrollment of the device's own certificate.
        let id = format!("dev-{kind}-individual");
        let (cert, key) = f.token_device(&id, kind, &line_b, &[]);
        f.cli(&["enrollment", "create", &id, "--certificate", &cert]);
        let (ok, done, stderr) = f.register(&cert, &key);
        assert!(
            ok,
            "{kind} individual: {stderr}\n{}",
            f.server.log().join("\n")
        );
        assert_eq!(done["registrationId"], id.as_str());
        assert_eq!(done["assignedHub"], "hub-a.example.com");

        // A group anchored at a verified intermediate: the leaf alone is enough.
        let id = format!("dev-{kind}-line-a");
        let (cert, key) = f.token_device(&id, kind, &line_a, &[]);
        let (ok, _, stderr) = f.register(&cert, &key);
        assert!(ok, "{kind} line-a: {stderr}");
        let state = f.cli(&["registration", "show", &id]);
        assert_eq!(state["enrollmentGroupId"], "by-line-a");

        // A group anchored at a verified root: the device sends its intermediate.
        let id = format!("dev-{kind}-root");
        let (cert, key) = f.token_device(&id, kind, &line_b, &[&line_b]);
        let (ok, _, stderr) = f.register(&cert, &key);
        assert!(ok, "{kind} root: {stderr}");
        let state = f.cli(&["registration", "show", &id]);
        assert_eq!(state["enrollmentGroupId"], "by-root");
        assert_eq!(
            state["x509"]["signingCertificateInfo"]["subjectName"],
            "CN=Test Root"
        );
    }

    // A certificate nobody enrolled: refused, exit code 3.
    let stranger_root = ca("Stranger", None);
    let (cert, key) = f.token_device("dev-stranger", "ec", &stranger_root, &[]);
    let (ok, _, stderr) = f.register(&cert, &key);
    assert!(!ok && stderr.contains("401002"), "{stderr}");
}

#[test]
fn a_key_in_a_pem_file_works_and_a_mismatched_one_is_refused() {
    let f = fixture();
    let root = ca("File Root", None);
    f.cli(&[
        "group",
        "create",
        "files",
        "--certificate",
        &f.write("root.pem", &root.pem),
    ]);
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params("dev-file")
        .signed_by(&key, &root.issuer)
        .unwrap();
    let cert_file = f.write("dev-file.pem", &cert.pem());
    let key_file = f.write("dev-file.key", &key.serialize_pem());
    let (ok, done, stderr) = f.register(&cert_file, &format!("file:{key_file}"));
    assert!(ok, "{stderr}");
    assert_eq!(
        done["registrationId"], "dev-file",
        "the id comes from the CN"
    );
    // The same certificate over MQTT: no password, the certificate in the TLS handshake.
    let mqtt_port = f.server.mqtt_port().unwrap();
    let (ok, done, stderr) = f.register_with(
        &cert_file,
        &format!("file:{key_file}"),
        &["--force", "--transport", "mqtt", "--mqtt-port", &mqtt_port],
    );
    assert!(ok, "{stderr}");
    assert_eq!(done["assignedHub"], "hub-a.example.com");

    let other = f.write("other.key", &KeyPair::generate().unwrap().serialize_pem());
    let (ok, _, stderr) = f.register(&cert_file, &format!("file:{other}"));
    assert!(!ok && stderr.contains("does not match"), "{stderr}");
}

//! End to end: operational certificates signed by issuing CAs whose keys live in SoftHSM2
//! (ECDSA P-384 and RSA 3072, each an intermediate under an offline root), asked for by the
//! real device client (`dps-device register --issue-certificate`) with its new key in a PEM
//! file or generated inside its own token. The chains verify with rustls-webpki and
//! `openssl verify`, the issued certificates then register the devices through X.509 groups
//! anchored at the issuing CAs until the admin CLI revokes them, and the tokens report the CA
//! keys sensitive and never extractable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use softhsm_tests::{ServerProcess, SoftHsm, TokenPublicKey, device_binary, free_port};

const CA_TOKEN: &str = "issuing-cas";
const DEVICE_TOKEN: &str = "device-keys";
/// The default instance's own token: its issuing CAs may use no other.
const INSTANCE_TOKEN: &str = "default";
/// Distinctive, so that the test can look for it in the server's log.
const PIN: &str = "pin-73951";

struct Fixture {
    server: ServerProcess,
    endpoint: String,
    hsm: SoftHsm,
    pin_file: PathBuf,
    dir: tempfile::TempDir,
    root_pem: String,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cli(&self, args: &[&str]) -> Value {
        self.server.admin_json(args).unwrap()
    }

    /// Runs `dps-device register` with `args` and returns (success, JSON output, stderr).
    fn device(&self, args: &[&str]) -> (bool, Value, String) {
        let output = Command::new(device_binary().unwrap())
            .args([
                "register",
                "--endpoint",
                &self.endpoint,
                "--id-scope",
                &self.server.id_scope,
                "--ca-cert",
                self.server.ca_certificate.to_str().unwrap(),
                "--pin-file",
                self.pin_file.to_str().unwrap(),
                "--state-file",
                self.path("state.json").to_str().unwrap(),
                "--force",
                "--output",
                "json",
                "--timeout",
                "30",
            ])
            .args(args)
            .env(self.hsm.env().0, self.hsm.env().1)
            .output()
            .unwrap();
        (
            output.status.success(),
            serde_json::from_slice(&output.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Enrolls `id` with a symmetric key under credential policy `policy`; returns the key's
    /// file for `--symmetric-key`.
    fn onboarding_enrollment(&self, id: &str, policy: &str) -> String {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        self.cli(&[
            "enrollment",
            "create",
            id,
            "--primary-key",
            &key,
            "--credential-policy",
            policy,
        ]);
        let file = self.path(&format!("{id}.key"));
        std::fs::write(&file, &key).unwrap();
        format!("file:{}", file.display())
    }
}

/// An issuing CA whose key is generated in the CA token: its certificate is signed by the
/// offline root; writes `{label}.pem` (the CA certificate) and returns the chain file (CA,
/// then root).
fn token_ca(
    hsm: &SoftHsm,
    dir: &Path,
    label: &str,
    kind: &str,
    root: &Issuer<'static, KeyPair>,
    root_pem: &str,
) -> PathBuf {
    let public = TokenPublicKey {
        der: hsm.generate_key(CA_TOKEN, PIN, label, kind).unwrap(),
        algorithm: match kind {
            "ec384" => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => &rcgen::PKCS_RSA_SHA256,
        },
    };
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Operational CA {label}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.signed_by(&public, root).unwrap().pem();
    std::fs::write(dir.join(format!("{label}.pem")), &pem).unwrap();
    let chain = dir.join(format!("{label}-chain.pem"));
    std::fs::write(&chain, format!("{pem}{root_pem}")).unwrap();
    chain
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new().unwrap();
    hsm.init_token(CA_TOKEN, PIN).unwrap();
    hsm.init_token(DEVICE_TOKEN, PIN).unwrap();
    hsm.init_token(INSTANCE_TOKEN, PIN).unwrap();
    let pin_file = hsm.pin_file(PIN).unwrap();

    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name
        .push(DnType::CommonName, "Offline Root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_pem = root.self_signed(&root_key).unwrap().pem();
    std::fs::write(dir.path().join("root-key.pem"), root_key.serialize_pem()).unwrap();
    let root = Issuer::new(root, root_key);
    std::fs::write(dir.path().join("root.pem"), &root_pem).unwrap();

    // The admin API's issuing CAs may use SoftHSM2, and the instance's PIN file.
    let instance_files = dir.path().join("instance-keys/default");
    std::fs::create_dir_all(&instance_files).unwrap();
    std::fs::copy(&pin_file, instance_files.join("pin")).unwrap();
    let mut config = format!(
        "[issuance]\npkcs11_modules = [\"/usr/lib/softhsm/libsofthsm2.so\"]\nkey_directory = \"{}\"\n",
        dir.path().join("instance-keys").display()
    );
    for (label, kind, policy, key_types) in [
        (
            "ca-p384",
            "ec384",
            "p384-devices",
            r#"["ecP256", "ecP384"]"#,
        ),
        (
            "ca-rsa3072",
            "rsa3072",
            "rsa-devices",
            r#"["ecP384", "rsa2048"]"#,
        ),
    ] {
        let chain = token_ca(&hsm, dir.path(), label, kind, &root, &root_pem);
        config.push_str(&format!(
            "[issuance.certificate_authorities.{label}]\n\
             certificate_chain = \"{}\"\n\
             key = \"pkcs11:token={CA_TOKEN};object={label};type=private?pin-source={}\"\n\
             [issuance.credential_policies.{policy}]\n\
             certificate_authority = \"{label}\"\n\
             validity_days = 7\n\
             key_types = {key_types}\n",
            chain.display(),
            pin_file.display(),
        ));
    }
    let config_file = dir.path().join("dps.toml");
    std::fs::write(&config_file, config).unwrap();

    let port = free_port().unwrap();
    let (conf_var, conf) = hsm.env();
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
            config_file.to_str().unwrap(),
        ],
        &[(conf_var, conf.to_str().unwrap())],
    )
    .unwrap();
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    Fixture {
        server,
        endpoint: format!("https://localhost:{port}"),
        hsm,
        pin_file,
        dir,
        root_pem,
    }
}

/// The certificates of a PEM file, DER.
fn certificates(path: &Path) -> Vec<Vec<u8>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect()
}

/// Checks the issued chain at `path` (leaf, issuing CA, root): it verifies to the root with
/// rustls-webpki and with `openssl verify -purpose sslclient`, and names `id`.
fn check_chain(f: &Fixture, path: &Path, id: &str) {
    let chain = certificates(path);
    assert_eq!(chain.len(), 3, "leaf, issuing CA, root");
    let root = CertificateDer::from_pem_slice(f.root_pem.as_bytes()).unwrap();
    assert_eq!(chain[2], root.to_vec());
    let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap();
    attestation::chain::verify_chain(&chain[..1], &chain[2], &chain[1..2], now).unwrap();
    attestation::chain::check_leaf(&chain, id, now).unwrap();
    let verified = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(f.path("root.pem"))
        .arg("-untrusted")
        .arg(path)
        .arg(path)
        .output()
        .unwrap();
    assert!(verified.status.success(), "openssl verify: {verified:?}");
}

#[test]
fn ca_keys_in_softhsm_issue_certificates_that_then_register_the_devices() {
    let f = fixture();
    // (device, policy, issuing CA, the device's new key, its type)
    let file_key = f.path("dev-file-operational.key");
    let cases = [
        (
            "dev-file",
            "p384-devices",
            "ca-p384",
            format!("file:{}", file_key.display()),
            "ec-p256",
        ),
        (
            "dev-token",
            "rsa-devices",
            "ca-rsa3072",
            format!("pkcs11:token={DEVICE_TOKEN};object=dev-token-operational"),
            "ec-p384",
        ),
    ];
    for (id, policy, ca, key, key_type) in &cases {
        let onboarding = f.onboarding_enrollment(id, policy);
        let issued = f.path(&format!("{id}-issued.pem"));
        let (ok, done, stderr) = f.device(&[
            "--registration-id",
            id,
            "--symmetric-key",
            &onboarding,
            "--issue-certificate",
            issued.to_str().unwrap(),
            "--issued-key",
            key,
            "--issued-key-type",
            key_type,
        ]);
        assert!(ok, "{id}: {stderr}\n{}", f.server.log().join("\n"));
        assert_eq!(done["assignedHub"], "hub-a.example.com");
        assert_eq!(done["issuedCertificate"], issued.to_str().unwrap());
        check_chain(&f, &issued, id);
        // The registration is an event the admin CLI finds by its filters.
        let seen = f.cli(&[
            "event",
            "list",
            "--registration-id",
            id,
            "--kind",
            "registration.assigned",
            "--from",
            "2000-01-01T00:00:00+00:00",
        ]);
        assert_eq!(seen.as_array().map(Vec::len), Some(1), "{seen}");
        assert_eq!(seen[0]["assignedHub"], "hub-a.example.com");
        let issuer = attestation::x509::parse_der(&certificates(&issued)[0]).unwrap();
        assert_eq!(issuer.facts.issuer_name, format!("CN=Operational CA {ca}"));

        // Registering again sends a new request for the same key: a new certificate.
        let renewed = f.path(&format!("{id}-renewed.pem"));
        let (ok, _, stderr) = f.device(&[
            "--registration-id",
            id,
            "--symmetric-key",
            &onboarding,
            "--issue-certificate",
            renewed.to_str().unwrap(),
            "--issued-key",
            key,
        ]);
        assert!(ok, "{id} renewal: {stderr}");
        assert_ne!(certificates(&renewed)[0], certificates(&issued)[0]);

        // The operational certificate admits the device through a group anchored at the
        // issuing CA, once the onboarding enrollment is gone.
        f.cli(&["enrollment", "delete", id]);
        let ca_pem = f.path(&format!("{ca}.pem"));
        f.cli(&[
            "group",
            "create",
            &format!("operational-{ca}"),
            "--certificate",
            ca_pem.to_str().unwrap(),
        ]);
        let (ok, done, stderr) = f.device(&[
            "--certificate",
            renewed.to_str().unwrap(),
            "--private-key",
            key,
        ]);
        assert!(ok, "{id} over X.509: {stderr}");
        assert_eq!(done["registrationId"], *id);
        let state = f.cli(&["registration", "show", id]);
        assert_eq!(state["enrollmentGroupId"], format!("operational-{ca}"));

        // Both certificates are on record; the first, revoked, admits the device no more.
        let listed = f.cli(&["issued-certificate", "list", "--registration-id", id]);
        assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
        let first = attestation::x509::parse_der(&certificates(&issued)[0]).unwrap();
        let revoked = f.cli(&[
            "issued-certificate",
            "revoke",
            &first.facts.serial_number,
            "--reason",
            "superseded",
        ]);
        assert!(revoked["revokedDateTimeUtc"].is_string(), "{revoked}");
        let (ok, _, stderr) = f.device(&[
            "--certificate",
            issued.to_str().unwrap(),
            "--private-key",
            key,
        ]);
        assert!(
            !ok && stderr.contains("401002") && stderr.contains("revoked"),
            "{stderr}"
        );
    }

    // The device's key was made in its token, and the file key with mode 0600.
    let device_key = f
        .hsm
        .key_attributes(DEVICE_TOKEN, PIN, "dev-token-operational")
        .unwrap();
    assert!(device_key.contains("extractable=false"), "{device_key}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file_key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The CA keys never leave their token: the token says so, and refuses their value.
    for label in ["ca-p384", "ca-rsa3072"] {
        let answer = f.hsm.key_attributes(CA_TOKEN, PIN, label).unwrap();
        for line in [
            "sensitive=true",
            "extractable=false",
            "never-extractable=true",
            "value=refused",
        ] {
            assert!(answer.lines().any(|l| l == line), "{label}: {answer}");
        }
    }
    let log = f.server.log().join("\n");
    assert!(!log.contains(PIN), "the PIN is in the server's log");
    assert!(!log.contains("not marked sensitive"), "{log}");
}

/// An instance's issuing CAs made through the admin CLI with keys generated inside the token:
/// a self-signed root, and an intermediate that waits for the offline root to sign its
/// request. The intermediate then issues through an instance credential policy; both keys are
/// sensitive and never extractable, and a second generation under the same URI is refused.
#[test]
fn issuing_cas_generated_in_the_token_through_the_admin_api() {
    let f = fixture();
    // The instance's keys are in its own token; its PIN file is in its directory.
    let uri = |label: &str| format!("pkcs11:token={INSTANCE_TOKEN};object={label}?pin-source=pin");
    let root = f.cli(&[
        "issuing-ca",
        "put",
        "api-root",
        "--key-uri",
        &uri("api-root"),
        "--generate-key",
        "ecP384",
        "--self-signed",
    ]);
    assert_eq!(root["status"], "active", "{root}");
    assert_eq!(root["info"]["subjectName"], "CN=api-root");
    let again = softhsm_tests::admin(
        &[
            "issuing-ca",
            "put",
            "api-root",
            "--key-uri",
            &uri("api-root"),
            "--generate-key",
            "ecP384",
            "--self-signed",
        ],
        &[
            ("DPS_CONNECTION_STRING", f.server.connection_string.as_str()),
            ("DPS_CA_CERT", f.server.ca_certificate.to_str().unwrap()),
        ],
    )
    .unwrap();
    assert!(!again.0 && again.2.contains("409001"), "{again:?}");
    // Nor under a label of its own but an id another key has: both would become ambiguous.
    let with_id =
        |label: &str| format!("pkcs11:token={INSTANCE_TOKEN};object={label};id=%07?pin-source=pin");
    let admin_env = [
        ("DPS_CONNECTION_STRING", f.server.connection_string.as_str()),
        ("DPS_CA_CERT", f.server.ca_certificate.to_str().unwrap()),
    ];
    let generate = |name: &str| {
        softhsm_tests::admin(
            &[
                "issuing-ca",
                "put",
                name,
                "--key-uri",
                &with_id(name),
                "--generate-key",
                "ecP256",
                "--self-signed",
            ],
            &admin_env,
        )
        .unwrap()
    };
    let first = generate("id-a");
    assert!(first.0, "{first:?}");
    let clash = generate("id-b");
    assert!(!clash.0 && clash.2.contains("409001"), "{clash:?}");
    let stored = softhsm_tests::admin(&["issuing-ca", "show", "id-b"], &admin_env).unwrap();
    assert!(!stored.0 && stored.2.contains("404211"), "{stored:?}");

    let pending = f.cli(&[
        "issuing-ca",
        "put",
        "api-inter",
        "--key-uri",
        &uri("api-inter"),
        "--generate-key",
        "rsa3072",
    ]);
    assert_eq!(pending["status"], "pendingCertificate", "{pending}");
    let request = base64::engine::general_purpose::STANDARD
        .decode(pending["certificateSigningRequest"].as_str().unwrap())
        .unwrap();
    // The operator's offline root signs the request.
    std::fs::write(f.path("inter.csr"), request).unwrap();
    std::fs::write(
        f.path("ca.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    let signed = Command::new("openssl")
        .args(["x509", "-req", "-inform", "DER", "-in"])
        .arg(f.path("inter.csr"))
        .arg("-CA")
        .arg(f.path("root.pem"))
        .arg("-CAkey")
        .arg(f.path("root-key.pem"))
        .args(["-days", "30", "-extfile"])
        .arg(f.path("ca.ext"))
        .arg("-out")
        .arg(f.path("inter.pem"))
        .output()
        .unwrap();
    assert!(signed.status.success(), "{signed:?}");
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(f.path("inter.pem")).unwrap(),
        f.root_pem
    );
    std::fs::write(f.path("inter-chain.pem"), chain).unwrap();
    // Issuing under it is refused until it has its certificate.
    f.cli(&[
        "credential-policy",
        "put",
        "api-devices",
        "--ca",
        "api-inter",
        "--key-type",
        "ecP256",
        "--validity-days",
        "3",
    ]);
    let onboarding = f.onboarding_enrollment("dev-api", "api-devices");
    let issued = f.path("dev-api-issued.pem");
    let ask = || {
        f.device(&[
            "--registration-id",
            "dev-api",
            "--symmetric-key",
            &onboarding,
            "--issue-certificate",
            issued.to_str().unwrap(),
            "--issued-key",
            &format!("file:{}", f.path("dev-api-operational.pem").display()),
        ])
    };
    let (ok, _, stderr) = ask();
    assert!(
        !ok && stderr.contains("400210") && stderr.contains("no certificate yet"),
        "{stderr}"
    );

    let active = f.cli(&[
        "issuing-ca",
        "put",
        "api-inter",
        "--key-uri",
        &uri("api-inter"),
        "--chain",
        f.path("inter-chain.pem").to_str().unwrap(),
    ]);
    assert_eq!(active["status"], "active", "{active}");
    let (ok, done, stderr) = ask();
    assert!(ok, "{stderr}\n{}", f.server.log().join("\n"));
    assert_eq!(done["assignedHub"], "hub-a.example.com");
    check_chain(&f, &issued, "dev-api");
    let leaf = attestation::x509::parse_der(&certificates(&issued)[0]).unwrap();
    assert_eq!(leaf.facts.issuer_name, "CN=api-inter");

    for label in ["api-root", "api-inter"] {
        let answer = f.hsm.key_attributes(INSTANCE_TOKEN, PIN, label).unwrap();
        for line in ["sensitive=true", "never-extractable=true", "value=refused"] {
            assert!(answer.lines().any(|l| l == line), "{label}: {answer}");
        }
    }
}

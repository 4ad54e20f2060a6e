//! The service's activation blob against an independent TPM stack: tpm2-tools on a real swtpm
//! activate the credential, import and load the HMAC key, and sign what the service verifies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use attestation::tpm::{KeyRole, RsaPublic, activation_blob, blob_fields};
use softhsm_tests::swtpm::{EK_HANDLE, SRK_HANDLE, Swtpm};

/// The six fields of a blob as TPM2B files (size-prefixed), the form tpm2-tools read.
fn fields(blob: &[u8]) -> Vec<Vec<u8>> {
    blob_fields(blob)
        .unwrap()
        .iter()
        .map(|field| {
            let mut tpm2b = u16::try_from(field.len()).unwrap().to_be_bytes().to_vec();
            tpm2b.extend_from_slice(field);
            tpm2b
        })
        .collect()
}

#[test]
fn tpm2_tools_open_the_blob_and_sign_with_its_key() {
    let tpm = Swtpm::start().unwrap();
    tpm.tool(
        "tpm2_createek",
        &["-c", EK_HANDLE, "-G", "rsa", "-u", "ek.pub"],
    )
    .unwrap();
    tpm.tool(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "rsa2048:aes128cfb",
            "-a",
            "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
            "-c",
            "srk.ctx",
        ],
    )
    .unwrap();
    tpm.tool(
        "tpm2_evictcontrol",
        &["-C", "o", "-c", "srk.ctx", SRK_HANDLE],
    )
    .unwrap();
    tpm.tool("tpm2_flushcontext", &["-t"]).unwrap();
    tpm.tool("tpm2_readpublic", &["-c", SRK_HANDLE, "-o", "srk.pub"])
        .unwrap();

    let dir = tpm.dir();
    let ek = RsaPublic::parse(
        &std::fs::read(dir.join("ek.pub")).unwrap(),
        KeyRole::Endorsement,
    )
    .unwrap();
    let srk = RsaPublic::parse(
        &std::fs::read(dir.join("srk.pub")).unwrap(),
        KeyRole::StorageRoot,
    )
    .unwrap();
    let activation = activation_blob(&ek, &srk).unwrap();
    let f = fields(&activation.blob);
    assert_eq!(f.len(), 6);
    // tpm2_makecredential's file format: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    let mut credential = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
    credential.extend_from_slice(&f[0]);
    credential.extend_from_slice(&f[1]);
    std::fs::write(dir.join("credential.in"), credential).unwrap();
    std::fs::write(dir.join("duplicate.bin"), &f[2]).unwrap();
    std::fs::write(dir.join("seed.bin"), &f[3]).unwrap();
    std::fs::write(dir.join("hmac.pub"), &f[4]).unwrap();

    tpm.tool(
        "tpm2_startauthsession",
        &["--policy-session", "-S", "session.ctx"],
    )
    .unwrap();
    tpm.tool("tpm2_policysecret", &["-S", "session.ctx", "-c", "e"])
        .unwrap();
    tpm.tool(
        "tpm2_activatecredential",
        &[
            "-c",
            SRK_HANDLE,
            "-C",
            EK_HANDLE,
            "-i",
            "credential.in",
            "-o",
            "inner.key",
            "-P",
            "session:session.ctx",
        ],
    )
    .unwrap();
    tpm.tool("tpm2_flushcontext", &["session.ctx"]).unwrap();
    assert_eq!(std::fs::read(dir.join("inner.key")).unwrap().len(), 16);

    tpm.tool(
        "tpm2_import",
        &[
            "-C",
            SRK_HANDLE,
            "-u",
            "hmac.pub",
            "-i",
            "duplicate.bin",
            "-s",
            "seed.bin",
            "-k",
            "inner.key",
            "-r",
            "hmac.priv",
        ],
    )
    .unwrap();
    tpm.tool(
        "tpm2_load",
        &[
            "-C",
            SRK_HANDLE,
            "-u",
            "hmac.pub",
            "-r",
            "hmac.priv",
            "-c",
            "hmac.ctx",
        ],
    )
    .unwrap();
    let message = b"0ne00000001/registrations/device-1\n1700000000";
    std::fs::write(dir.join("message.bin"), message).unwrap();
    tpm.tool(
        "tpm2_hmac",
        &[
            "-c",
            "hmac.ctx",
            "-g",
            "sha256",
            "-o",
            "mac.bin",
            "message.bin",
        ],
    )
    .unwrap();
    let tpm_mac = std::fs::read(dir.join("mac.bin")).unwrap();
    assert_eq!(tpm_mac, activation.key.hmac(message));

    // A credential for another SRK name does not activate (TPM_RC_INTEGRITY).
    let other = attestation::tpm::soft::SoftTpm::fixture(0).unwrap();
    let other_srk = RsaPublic::parse(&other.storage_root_key(), KeyRole::StorageRoot).unwrap();
    let wrong = activation_blob(&ek, &other_srk).unwrap();
    let f = fields(&wrong.blob);
    let mut credential = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
    credential.extend_from_slice(&f[0]);
    credential.extend_from_slice(&f[1]);
    std::fs::write(dir.join("wrong.in"), credential).unwrap();
    tpm.tool(
        "tpm2_startauthsession",
        &["--policy-session", "-S", "session2.ctx"],
    )
    .unwrap();
    tpm.tool("tpm2_policysecret", &["-S", "session2.ctx", "-c", "e"])
        .unwrap();
    let refused = tpm.tool(
        "tpm2_activatecredential",
        &[
            "-c",
            SRK_HANDLE,
            "-C",
            EK_HANDLE,
            "-i",
            "wrong.in",
            "-o",
            "wrong.key",
            "-P",
            "session:session2.ctx",
        ],
    );
    assert!(refused.is_err());
}

//! Test helper: generates a key pair inside a SoftHSM2 token, its private half non-extractable
//! and usable for signing, as a device's secure element would hold it, and prints the public
//! key as base64 of what an X.509 SubjectPublicKeyInfo carries in its bit string: the
//! uncompressed point for EC, the PKCS#1 RSAPublicKey DER for RSA.
//!
//! Usage: `softhsm-generate-key TOKEN-LABEL PIN OBJECT-LABEL ec|ec384|rsa|rsa3072`, with
//! `SOFTHSM2_CONF` naming the token directory's configuration.

use anyhow::bail;
use base64::Engine as _;
use dps_pkcs11::{KeyKind, Pkcs11Uri, PrivateKey};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token, pin, label, kind] = args.as_slice() else {
        bail!("usage: softhsm-generate-key TOKEN-LABEL PIN OBJECT-LABEL ec|ec384|rsa|rsa3072");
    };
    let kind = match kind.as_str() {
        "ec" => KeyKind::EcP256,
        "ec384" => KeyKind::EcP384,
        "rsa" => KeyKind::Rsa(2048),
        "rsa3072" => KeyKind::Rsa(3072),
        other => bail!("unknown key type {other}: ec, ec384, rsa or rsa3072"),
    };
    let uri = Pkcs11Uri::parse(&format!(
        "pkcs11:token={token};object={label}?pin-value={pin}"
    ))?;
    let key = PrivateKey::generate(&uri, None, kind, 1)?;
    println!(
        "{}",
        base64::engine::general_purpose::STANDARD.encode(key.public_key())
    );
    Ok(())
}

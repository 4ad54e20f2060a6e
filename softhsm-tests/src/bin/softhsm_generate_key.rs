//! Test helper: generates a key pair inside a SoftHSM2 token, its private half non-extractable
//! and usable for signing, as a device's secure element would hold it, and prints the public
//! key as base64 of what an X.509 SubjectPublicKeyInfo carries in its bit string: the
//! uncompressed point for EC P-256, the PKCS#1 RSAPublicKey DER for RSA.
//!
//! Usage: `softhsm-generate-key TOKEN-LABEL PIN OBJECT-LABEL ec|rsa`, with `SOFTHSM2_CONF`
//! naming the token directory's configuration.

use anyhow::bail;
use base64::Engine as _;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};

/// DER of the named curve prime256v1.
const P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    public_exponent: der::asn1::UintRef<'a>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token, pin, label, kind] = args.as_slice() else {
        bail!("usage: softhsm-generate-key TOKEN-LABEL PIN OBJECT-LABEL ec|rsa");
    };
    let (_context, session) = softhsm_tests::open_token(token, pin)?;
    let label = Attribute::Label(label.as_bytes().to_vec());
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        label.clone(),
    ];
    let public_key = match kind.as_str() {
        "ec" => {
            let public = [
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::EcParams(P256.to_vec()),
                label,
            ];
            let (public, _) =
                session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
            let point = match session
                .get_attributes(public, &[AttributeType::EcPoint])?
                .first()
            {
                Some(Attribute::EcPoint(point)) => point.clone(),
                _ => bail!("the token returned no EC point"),
            };
            // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
            match point.as_slice() {
                [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
                raw if raw.len() == 65 => raw.to_vec(),
                _ => bail!("unexpected EC point encoding ({} bytes)", point.len()),
            }
        }
        "rsa" => {
            let public = [
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                label,
            ];
            let (public, _) =
                session.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?;
            let attributes = session.get_attributes(
                public,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )?;
            let (Some(Attribute::Modulus(n)), Some(Attribute::PublicExponent(e))) =
                (attributes.first(), attributes.get(1))
            else {
                bail!("the token returned no RSA public key");
            };
            der::Encode::to_der(&RsaPublicKey {
                modulus: der::asn1::UintRef::new(n)?,
                public_exponent: der::asn1::UintRef::new(e)?,
            })?
        }
        other => bail!("unknown key type {other}: ec or rsa"),
    };
    println!(
        "{}",
        base64::engine::general_purpose::STANDARD.encode(public_key)
    );
    Ok(())
}

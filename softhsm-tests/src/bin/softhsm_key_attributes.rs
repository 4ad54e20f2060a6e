//! Test helper: asks a SoftHSM2 token about the private key labelled OBJECT-LABEL and prints
//! one line per question: `sensitive=`, `extractable=`, `never-extractable=` (the token's
//! attributes) and `value=` (`refused` when the token will not give out the key's value, or
//! `read` when it does).
//!
//! Usage: `softhsm-key-attributes TOKEN-LABEL PIN OBJECT-LABEL`, with `SOFTHSM2_CONF` naming
//! the token directory's configuration.

use anyhow::{Context, bail};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token, pin, label] = args.as_slice() else {
        bail!("usage: softhsm-key-attributes TOKEN-LABEL PIN OBJECT-LABEL");
    };
    let (_context, session) = softhsm_tests::open_token(token, pin)?;
    let key = *session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?
        .first()
        .context("no private key with that label")?;
    for attribute in session.get_attributes(
        key,
        &[
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
        ],
    )? {
        match attribute {
            Attribute::Sensitive(v) => println!("sensitive={v}"),
            Attribute::Extractable(v) => println!("extractable={v}"),
            Attribute::NeverExtractable(v) => println!("never-extractable={v}"),
            _ => {}
        }
    }
    // The private value itself (CKA_VALUE for EC, CKA_PRIVATE_EXPONENT for RSA).
    let value =
        session.get_attributes(key, &[AttributeType::Value, AttributeType::PrivateExponent]);
    let read = value.is_ok_and(|attributes| {
        attributes.iter().any(
            |a| matches!(a, Attribute::Value(v) | Attribute::PrivateExponent(v) if !v.is_empty()),
        )
    });
    println!("value={}", if read { "read" } else { "refused" });
    Ok(())
}

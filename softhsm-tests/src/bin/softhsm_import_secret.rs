//! Test helper: imports a base64 secret into a SoftHSM2 token as a non-extractable generic
//! secret usable for CKM_SHA256_HMAC, as a factory would provision a device.
//!
//! Usage: `softhsm-import-secret TOKEN-LABEL PIN OBJECT-LABEL BASE64-VALUE`, with
//! `SOFTHSM2_CONF` naming the token directory's configuration.

use anyhow::{Context, bail};
use base64::Engine as _;
use cryptoki::object::{Attribute, KeyType, ObjectClass};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token, pin, label, value] = args.as_slice() else {
        bail!("usage: softhsm-import-secret TOKEN-LABEL PIN OBJECT-LABEL BASE64-VALUE");
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(value)
        .context("the value is not base64")?;
    let (_context, session) = softhsm_tests::open_token(token, pin)?;
    session.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(secret),
    ])?;
    Ok(())
}

//! Test helper: imports a base64 secret into a SoftHSM2 token as a non-extractable generic
//! secret usable for CKM_SHA256_HMAC, as a factory would provision a device.
//!
//! Usage: `softhsm-import-secret TOKEN-LABEL PIN OBJECT-LABEL BASE64-VALUE`, with
//! `SOFTHSM2_CONF` naming the token directory's configuration.

use anyhow::{Context, bail};
use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [token, pin, label, value] = args.as_slice() else {
        bail!("usage: softhsm-import-secret TOKEN-LABEL PIN OBJECT-LABEL BASE64-VALUE");
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(value)
        .context("the value is not base64")?;
    let context = Pkcs11::new("/usr/lib/softhsm/libsofthsm2.so").context("loading SoftHSM2")?;
    context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = context
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            context
                .get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .with_context(|| format!("no token labelled {token}"))?;
    let session = context.open_rw_session(slot)?;
    session.login(
        UserType::User,
        Some(&AuthPin::new(pin.clone().into_boxed_str())),
    )?;
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

//! Shared access signature tokens, as Azure IoT clients build them:
//! `SharedAccessSignature sr=<resource>&sig=<urlenc(b64(HMAC-SHA256(key, sr + "\n" + se)))>&se=<unix>[&skn=<name>]`.
//!
//! Verification follows the rules that every Azure client satisfies: keys in any order, `sig`
//! percent-encoded in either hex case, the MAC computed over `sr` exactly as received, the
//! resource compared case-insensitively after percent-decoding, `skn` optional.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

use crate::keys::SymmetricKey;

const PREFIX: &str = "SharedAccessSignature ";
/// Characters left as they are by JavaScript's `encodeURIComponent`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Why a token was refused. The messages never contain the token or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The header does not start with `SharedAccessSignature `.
    #[error("the authorization header is not a SharedAccessSignature token")]
    NotSas,
    /// A required field is missing.
    #[error("the token has no '{0}' field")]
    MissingField(&'static str),
    /// A field appears twice.
    #[error("the token has more than one '{0}' field")]
    DuplicateField(String),
    /// `sig` is not percent-encoded base64 of a SHA-256 MAC.
    #[error("the token's signature is not valid base64")]
    BadSignatureEncoding,
    /// `se` is not a number of seconds.
    #[error("the token's expiry 'se' is not a Unix time in seconds")]
    BadExpiry,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The token lives longer than the service accepts.
    #[error("the token's lifetime exceeds the maximum of {0} seconds")]
    LifetimeTooLong(u64),
    /// The signature does not verify with any key.
    #[error("the token's signature does not match")]
    SignatureMismatch,
}

/// A parsed SAS token. `Debug` omits the signature.
#[derive(Clone)]
pub struct SasToken {
    resource_raw: String,
    signature: Vec<u8>,
    expiry_raw: String,
    expiry: u64,
    key_name: Option<String>,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("sr", &self.resource_raw)
            .field("se", &self.expiry)
            .field("skn", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl SasToken {
    /// Parses the value of an `Authorization` header.
    pub fn parse(header: &str) -> Result<Self, SasError> {
        let body = header.trim();
        let body = match body.get(..PREFIX.len()) {
            Some(p) if p.eq_ignore_ascii_case(PREFIX) => &body[PREFIX.len()..],
            _ => return Err(SasError::NotSas),
        };
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in body.trim().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::DuplicateField(key.to_owned()));
            }
        }
        let resource_raw = sr.ok_or(SasError::MissingField("sr"))?.to_owned();
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let expiry_raw = se.ok_or(SasError::MissingField("se"))?.to_owned();
        let sig = percent_decode_str(sig)
            .decode_utf8()
            .map_err(|_| SasError::BadSignatureEncoding)?;
        let signature = STANDARD
            .decode(sig.as_bytes())
            .map_err(|_| SasError::BadSignatureEncoding)?;
        if signature.len() != 32 {
            return Err(SasError::BadSignatureEncoding);
        }
        let expiry = expiry_raw.parse().map_err(|_| SasError::BadExpiry)?;
        let key_name = skn
            .filter(|s| !s.is_empty())
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned());
        Ok(Self {
            resource_raw,
            signature,
            expiry_raw,
            expiry,
            key_name,
        })
    }

    /// `sr` percent-decoded, for comparing with the expected resource.
    pub fn resource(&self) -> String {
        percent_decode_str(&self.resource_raw)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// Whether the decoded resource equals `expected` or lies beneath it (`expected/...`),
    /// ignoring ASCII case.
    pub fn resource_matches(&self, expected: &str) -> bool {
        let resource = self.resource();
        let resource = resource.trim_end_matches('/');
        let expected = expected.trim_end_matches('/');
        match resource.get(..expected.len()) {
            Some(head) if head.eq_ignore_ascii_case(expected) => {
                let rest = &resource[expected.len()..];
                rest.is_empty() || rest.starts_with('/')
            }
            _ => false,
        }
    }

    /// The `skn` field, percent-decoded.
    pub fn key_name(&self) -> Option<&str> {
        self.key_name.as_deref()
    }

    /// The expiry, Unix seconds.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// Checks the expiry against `now`, allowing `skew` seconds either way, and refuses tokens
    /// that expire more than `max_lifetime` seconds from now.
    pub fn check_expiry(&self, now: u64, skew: u64, max_lifetime: u64) -> Result<(), SasError> {
        if self.expiry.saturating_add(skew) < now {
            return Err(SasError::Expired);
        }
        if self.expiry > now.saturating_add(max_lifetime).saturating_add(skew) {
            return Err(SasError::LifetimeTooLong(max_lifetime));
        }
        Ok(())
    }

    /// Verifies the signature with `key`, in constant time.
    pub fn verify(&self, key: &SymmetricKey) -> Result<(), SasError> {
        let mac = signing_mac(key, &self.resource_raw, &self.expiry_raw);
        mac.verify_slice(&self.signature)
            .map_err(|_| SasError::SignatureMismatch)
    }

    /// Verifies with any of `keys` (primary, then secondary).
    pub fn verify_any<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k SymmetricKey>,
    ) -> Result<(), SasError> {
        if keys.into_iter().any(|k| self.verify(k).is_ok()) {
            Ok(())
        } else {
            Err(SasError::SignatureMismatch)
        }
    }
}

fn signing_mac(key: &SymmetricKey, resource: &str, expiry: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(resource.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.as_bytes());
    mac
}

/// Builds a token for `resource` (used verbatim as `sr`), expiring at `expiry` (Unix seconds),
/// in the field order of the Node service client: `sr`, `sig`, `se`, `skn`.
pub fn sign(resource: &str, key: &SymmetricKey, expiry: u64, key_name: Option<&str>) -> String {
    let signed: Result<String, std::convert::Infallible> =
        sign_with(resource, expiry, key_name, |message| Ok(key.hmac(message)));
    match signed {
        Ok(token) => token,
        Err(never) => match never {},
    }
}

/// Builds a token whose HMAC-SHA256 is computed by `mac` over `sr + "\n" + se`: for keys that
/// stay inside a token or TPM.
pub fn sign_with<E>(
    resource: &str,
    expiry: u64,
    key_name: Option<&str>,
    mac: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let expiry = expiry.to_string();
    let message = format!("{resource}\n{expiry}");
    let tag = mac(message.as_bytes())?;
    let sig = utf8_percent_encode(&STANDARD.encode(tag), URI_COMPONENT).to_string();
    let mut token = format!("{PREFIX}sr={resource}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&utf8_percent_encode(name, URI_COMPONENT).to_string());
    }
    Ok(token)
}

/// Percent-encodes like JavaScript's `encodeURIComponent` (what the Node clients do to `sr`).
pub fn encode_uri_component(value: &str) -> String {
    utf8_percent_encode(value, URI_COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SymmetricKey {
        SymmetricKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
    }

    #[test]
    fn signed_token_verifies_and_a_tampered_one_does_not() {
        let token = sign("myhost.example.com", &key(), 2_000_000_000, Some("owner"));
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.verify(&key()), Ok(()));
        assert_eq!(parsed.key_name(), Some("owner"));
        let tampered = token.replace("sr=myhost", "sr=otherhost");
        let parsed = SasToken::parse(&tampered).unwrap();
        assert_eq!(parsed.verify(&key()), Err(SasError::SignatureMismatch));
    }

    #[test]
    fn any_key_order_and_either_hex_case_are_accepted() {
        let token = sign("scope%2Fregistrations%2Fdev", &key(), 2_000_000_000, None);
        let body = token.strip_prefix(PREFIX).unwrap();
        let mut fields: Vec<&str> = body.split('&').collect();
        fields.reverse();
        let lower_hex = fields.join("&").replace("%2B", "%2b").replace("%3D", "%3d");
        let parsed = SasToken::parse(&format!("{PREFIX}{lower_hex}")).unwrap();
        assert_eq!(parsed.verify(&key()), Ok(()));
        assert!(parsed.resource_matches("SCOPE/registrations/DEV"));
        assert!(!parsed.resource_matches("scope/registrations/de"));
    }

    #[test]
    fn mac_is_over_sr_as_received_not_decoded() {
        let token = sign("a%2Fb", &key(), 2_000_000_000, None);
        let decoded_form = token.replace("sr=a%2Fb", "sr=a/b");
        let parsed = SasToken::parse(&decoded_form).unwrap();
        assert_eq!(parsed.verify(&key()), Err(SasError::SignatureMismatch));
    }

    #[test]
    fn expiry_is_enforced_with_skew_and_a_lifetime_bound() {
        let parsed = SasToken::parse(&sign("h", &key(), 1000, None)).unwrap();
        assert_eq!(parsed.check_expiry(1000, 0, 3600), Ok(()));
        assert_eq!(parsed.check_expiry(1200, 300, 3600), Ok(()));
        assert_eq!(parsed.check_expiry(1400, 300, 3600), Err(SasError::Expired));
        assert_eq!(
            parsed.check_expiry(0, 0, 100),
            Err(SasError::LifetimeTooLong(100))
        );
    }

    #[test]
    fn malformed_tokens_are_refused_without_panicking() {
        for bad in [
            "",
            "Bearer x",
            "SharedAccessSignature ",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sr=a&sig=%%%&se=1",
            "SharedAccessSignature sr=a&sig=AAAA&se=1",
            "SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1",
            "SharedAccessSignature sr=a&sig=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8%3D&se=soon",
        ] {
            assert!(SasToken::parse(bad).is_err(), "{bad}");
        }
    }
}

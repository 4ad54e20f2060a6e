//! Keys held in a PKCS#11 token (SoftHSM2, a hardware HSM), selected by an RFC 7512 URI and
//! used in place: the secret never leaves the token. A secret key computes CKM_SHA256_HMAC
//! (SAS tokens); a private key signs TLS handshakes as the client certificate's key (ECDSA
//! P-256, or RSA with PSS for TLS 1.3 and PKCS#1 v1.5 for TLS 1.2).
//!
//! The URI parser covers what a device needs: `token`, `object`, `id`, `type` in the path;
//! `module-path`, `pin-value`, `pin-source` (a file) in the query. The `pkcs11-uri` crate
//! depends on a different PKCS#11 binding, so this small parser is our own.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use percent_encoding::percent_decode_str;

/// Where SoftHSM2 installs its module on Debian; used when the URI names no module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Why a token key could not be used. Never contains the PIN.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// The URI is not a usable `pkcs11:` URI.
    #[error("invalid PKCS#11 URI: {0}")]
    Uri(String),
    /// The PIN could not be read.
    #[error("cannot read the PIN: {0}")]
    Pin(String),
    /// The module, token or object is missing, or the token refused an operation.
    #[error("PKCS#11: {0}")]
    Token(String),
}

/// A parsed `pkcs11:` URI.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token label.
    pub token: Option<String>,
    /// `object=`: the object label.
    pub object: Option<String>,
    /// `id=`: the object id (bytes).
    pub id: Option<Vec<u8>>,
    /// `module-path=`: the PKCS#11 module.
    pub module_path: Option<PathBuf>,
    /// `pin-value=`: the PIN itself (prefer `pin-source`).
    pin_value: Option<String>,
    /// `pin-source=`: a file holding the PIN.
    pub pin_source: Option<PathBuf>,
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Uri")
            .field("token", &self.token)
            .field("object", &self.object)
            .field("module_path", &self.module_path)
            .field("pin_source", &self.pin_source)
            .finish_non_exhaustive()
    }
}

fn decode(value: &str) -> Result<String, Pkcs11Error> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| Pkcs11Error::Uri("a value is not percent-encoded UTF-8".into()))
}

impl Pkcs11Uri {
    /// Parses `pkcs11:path-attributes[?query-attributes]`.
    pub fn parse(uri: &str) -> Result<Self, Pkcs11Error> {
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| Pkcs11Error::Uri("it must start with 'pkcs11:'".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut parsed = Pkcs11Uri {
            token: None,
            object: None,
            id: None,
            module_path: None,
            pin_value: None,
            pin_source: None,
        };
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| Pkcs11Error::Uri("a path attribute is not name=value".into()))?;
            match name {
                "token" => parsed.token = Some(decode(value)?),
                "object" => parsed.object = Some(decode(value)?),
                "id" => {
                    parsed.id = Some(percent_decode_str(value).collect());
                }
                // Accepted and not needed to find a secret key by label or id.
                "type"
                | "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {}
                other => {
                    return Err(Pkcs11Error::Uri(format!(
                        "unknown path attribute '{other}'"
                    )));
                }
            }
        }
        for attribute in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| Pkcs11Error::Uri("a query attribute is not name=value".into()))?;
            let value = decode(value)?;
            match name {
                "module-path" => parsed.module_path = Some(PathBuf::from(value)),
                "pin-value" => parsed.pin_value = Some(value),
                "pin-source" => {
                    let path = value.strip_prefix("file:").unwrap_or(&value).to_owned();
                    parsed.pin_source = Some(PathBuf::from(path));
                }
                "module-name" => {}
                other => {
                    return Err(Pkcs11Error::Uri(format!(
                        "unknown query attribute '{other}'"
                    )));
                }
            }
        }
        if parsed.token.is_none() {
            return Err(Pkcs11Error::Uri(
                "it must name the token (token=...)".into(),
            ));
        }
        if parsed.object.is_none() && parsed.id.is_none() {
            return Err(Pkcs11Error::Uri(
                "it must name the key (object=... or id=...)".into(),
            ));
        }
        Ok(parsed)
    }

    /// The PIN from the URI, else from `fallback` (a file path or the value of an environment
    /// variable given on the command line).
    fn pin(&self, fallback: Option<&PinSource>) -> Result<Option<String>, Pkcs11Error> {
        if let Some(value) = &self.pin_value {
            return Ok(Some(value.clone()));
        }
        let from_file = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|p| p.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| Pkcs11Error::Pin(format!("{}: {e}", path.display())))
        };
        if let Some(path) = &self.pin_source {
            return from_file(path).map(Some);
        }
        match fallback {
            Some(PinSource::File(path)) => from_file(path).map(Some),
            Some(PinSource::Env(name)) => std::env::var(name)
                .map(Some)
                .map_err(|_| Pkcs11Error::Pin(format!("environment variable {name} is not set"))),
            None => Ok(None),
        }
    }
}

/// Where a PIN comes from when the URI does not say.
#[derive(Debug, Clone)]
pub enum PinSource {
    /// A file holding the PIN.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

/// A secret key inside a token, logged in and ready to compute HMACs.
pub struct TokenKey {
    // Keep the module loaded for as long as the session lives.
    _context: Pkcs11,
    session: Mutex<Session>,
    key: ObjectHandle,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey").finish_non_exhaustive()
    }
}

fn token_err(context: &str) -> impl Fn(cryptoki::error::Error) -> Pkcs11Error + '_ {
    move |e| Pkcs11Error::Token(format!("{context}: {e}"))
}

/// Loads the module, opens the token the URI names and logs in.
fn open_session(
    uri: &Pkcs11Uri,
    pin: Option<&PinSource>,
) -> Result<(Pkcs11, Session), Pkcs11Error> {
    let module = uri
        .module_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    let context = Pkcs11::new(&module)
        .map_err(|e| Pkcs11Error::Token(format!("loading {}: {e}", module.display())))?;
    context
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(token_err("initialising the module"))?;
    let label = uri.token.as_deref().unwrap_or_default();
    let slot = context
        .get_slots_with_token()
        .map_err(token_err("listing slots"))?
        .into_iter()
        .find(|slot| {
            context
                .get_token_info(*slot)
                .is_ok_and(|info| info.label().trim_end() == label)
        })
        .ok_or_else(|| Pkcs11Error::Token(format!("no token labelled '{label}'")))?;
    let session = context
        .open_ro_session(slot)
        .map_err(token_err("opening a session"))?;
    if let Some(pin) = uri.pin(pin)? {
        session
            .login(UserType::User, Some(&AuthPin::new(pin.into_boxed_str())))
            .map_err(token_err("logging in"))?;
    }
    Ok((context, session))
}

/// The one object of `class` the URI names.
fn find_one(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
    what: &str,
) -> Result<ObjectHandle, Pkcs11Error> {
    let mut template = vec![Attribute::Class(class)];
    if let Some(object) = &uri.object {
        template.push(Attribute::Label(object.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    match session
        .find_objects(&template)
        .map_err(token_err("finding the key"))?
        .as_slice()
    {
        [one] => Ok(*one),
        [] => Err(Pkcs11Error::Token(format!("no {what} matches the URI"))),
        _ => Err(Pkcs11Error::Token(format!(
            "more than one {what} matches the URI"
        ))),
    }
}

impl TokenKey {
    /// Opens the token the URI names, logs in and finds the secret key.
    pub fn open(uri: &Pkcs11Uri, pin: Option<&PinSource>) -> Result<Self, Pkcs11Error> {
        let (context, session) = open_session(uri, pin)?;
        let key = find_one(&session, uri, ObjectClass::SECRET_KEY, "secret key")?;
        Ok(Self {
            _context: context,
            session: Mutex::new(session),
            key,
        })
    }

    /// HMAC-SHA256 of `data`, computed inside the token.
    pub fn hmac_sha256(&self, data: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let session = self
            .session
            .lock()
            .map_err(|_| Pkcs11Error::Token("the session lock is poisoned".into()))?;
        session
            .sign(&Mechanism::Sha256Hmac, self.key, data)
            .map_err(token_err("CKM_SHA256_HMAC"))
    }
}

/// DER of the named curve prime256v1 (P-256), as CKA_EC_PARAMS holds it.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// What kind of private key a token holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrivateKind {
    EcP256,
    Rsa,
}

/// A private key inside a token, logged in; shared by the signers rustls asks for.
struct TokenPrivate {
    _context: Pkcs11,
    session: Mutex<Session>,
    key: ObjectHandle,
    kind: PrivateKind,
}

/// A token's private key as a rustls client signing key: the TLS handshake is signed inside the
/// token.
#[derive(Clone)]
pub struct TokenSigningKey {
    inner: Arc<TokenPrivate>,
}

impl fmt::Debug for TokenSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigningKey")
            .field("kind", &self.inner.kind)
            .finish_non_exhaustive()
    }
}

impl TokenSigningKey {
    /// Opens the token the URI names, logs in and finds the private key (ECDSA P-256 or RSA).
    pub fn open(uri: &Pkcs11Uri, pin: Option<&PinSource>) -> Result<Self, Pkcs11Error> {
        let (context, session) = open_session(uri, pin)?;
        let key = find_one(&session, uri, ObjectClass::PRIVATE_KEY, "private key")?;
        let attributes = session
            .get_attributes(key, &[AttributeType::KeyType])
            .map_err(token_err("reading the key type"))?;
        let kind = match attributes.first() {
            Some(Attribute::KeyType(t)) if *t == KeyType::RSA => PrivateKind::Rsa,
            Some(Attribute::KeyType(t)) if *t == KeyType::EC => {
                let params = session
                    .get_attributes(key, &[AttributeType::EcParams])
                    .map_err(token_err("reading the curve"))?;
                match params.first() {
                    Some(Attribute::EcParams(p)) if p.as_slice() == P256_PARAMS => {
                        PrivateKind::EcP256
                    }
                    _ => {
                        return Err(Pkcs11Error::Token(
                            "the EC key is not on P-256, the curve this client supports".into(),
                        ));
                    }
                }
            }
            _ => {
                return Err(Pkcs11Error::Token(
                    "the private key is neither RSA nor EC".into(),
                ));
            }
        };
        Ok(Self {
            inner: Arc::new(TokenPrivate {
                _context: context,
                session: Mutex::new(session),
                key,
                kind,
            }),
        })
    }
}

impl rustls::sign::SigningKey for TokenSigningKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        use rustls::SignatureScheme as S;
        let preference: &[S] = match self.inner.kind {
            PrivateKind::EcP256 => &[S::ECDSA_NISTP256_SHA256],
            // TLS 1.3 offers only PSS for RSA; TLS 1.2 servers may offer either.
            PrivateKind::Rsa => &[S::RSA_PSS_SHA256, S::RSA_PKCS1_SHA256],
        };
        let scheme = preference.iter().find(|s| offered.contains(s))?;
        Some(Box::new(TokenSigner {
            key: self.inner.clone(),
            scheme: *scheme,
        }))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.inner.kind {
            PrivateKind::EcP256 => rustls::SignatureAlgorithm::ECDSA,
            PrivateKind::Rsa => rustls::SignatureAlgorithm::RSA,
        }
    }
}

/// One signature scheme of a token key.
struct TokenSigner {
    key: Arc<TokenPrivate>,
    scheme: rustls::SignatureScheme,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// An ECDSA signature as TLS carries it.
#[derive(der::Sequence)]
struct EcdsaSignature<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

impl rustls::sign::Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use sha2::Digest as _;
        let failed = |e: String| rustls::Error::General(format!("PKCS#11 signing: {e}"));
        let session = self
            .key
            .session
            .lock()
            .map_err(|_| failed("the session lock is poisoned".into()))?;
        match self.scheme {
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256 => {
                // CKM_ECDSA signs a digest and returns r || s.
                let digest = sha2::Sha256::digest(message);
                let raw = session
                    .sign(&Mechanism::Ecdsa, self.key.key, &digest)
                    .map_err(|e| failed(e.to_string()))?;
                if raw.len() != 64 {
                    return Err(failed(format!("unexpected signature length {}", raw.len())));
                }
                let uint =
                    |bytes| der::asn1::UintRef::new(bytes).map_err(|e| failed(e.to_string()));
                let signature = EcdsaSignature {
                    r: uint(&raw[..32])?,
                    s: uint(&raw[32..])?,
                };
                der::Encode::to_der(&signature).map_err(|e| failed(e.to_string()))
            }
            rustls::SignatureScheme::RSA_PSS_SHA256 => session
                .sign(
                    &Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                        hash_alg: MechanismType::SHA256,
                        mgf: PkcsMgfType::MGF1_SHA256,
                        s_len: 32.into(),
                    }),
                    self.key.key,
                    message,
                )
                .map_err(|e| failed(e.to_string())),
            rustls::SignatureScheme::RSA_PKCS1_SHA256 => session
                .sign(&Mechanism::Sha256RsaPkcs, self.key.key, message)
                .map_err(|e| failed(e.to_string())),
            other => Err(failed(format!("scheme {other:?} was not offered"))),
        }
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_bad_ones_are_refused() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=dev%20token;object=dps-key;type=secret-key?module-path=/opt/p11.so&pin-source=file:/run/pin",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("dev token"));
        assert_eq!(uri.object.as_deref(), Some("dps-key"));
        assert_eq!(uri.module_path, Some(PathBuf::from("/opt/p11.so")));
        assert_eq!(uri.pin_source, Some(PathBuf::from("/run/pin")));
        assert!(!format!("{uri:?}").contains("pin_value"));
        for bad in [
            "file:/x",
            "pkcs11:object=k",
            "pkcs11:token=t",
            "pkcs11:token=t;object=k;color=red",
            "pkcs11:token=t;object",
            "pkcs11:token=%ff;object=k",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
    }
}

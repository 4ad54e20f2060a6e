//! Keys held in a PKCS#11 token (SoftHSM2, a hardware HSM), selected by an RFC 7512 URI and
//! used in place: the secret never leaves the token. A secret key computes CKM_SHA256_HMAC
//! (a device's SAS tokens); a private key signs (a device's TLS handshakes, an issuing CA's
//! certificates): ECDSA on P-256 or P-384, RSA with PKCS#1 v1.5 or PSS. A key pair can also be
//! generated inside the token, its private half sensitive and not extractable.
//!
//! The URI parser covers what devices and CAs need: `token`, `object`, `id`, `type` in the
//! path; `module-path`, `pin-value`, `pin-source` (a file) in the query. The `pkcs11-uri` crate
//! depends on a different PKCS#11 binding, so this small parser is our own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
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
    /// The module or token is missing, or the token refused an operation.
    #[error("PKCS#11: {0}")]
    Token(String),
    /// The token holds no object the URI names.
    #[error("PKCS#11: {0}")]
    NotFound(String),
    /// A key cannot be generated: the token holds an object of its label or id.
    #[error("PKCS#11: {0}")]
    Exists(String),
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

    /// Whether the URI carries the PIN itself (`pin-value`).
    pub fn has_pin_value(&self) -> bool {
        self.pin_value.is_some()
    }

    /// The PIN from the URI, else from `fallback` (a file path or the value of an environment
    /// variable given on the command line).
    fn pin(&self, fallback: Option<&PinSource>) -> Result<Option<String>, Pkcs11Error> {
        if let Some(value) = &self.pin_value {
            return Ok(Some(value.clone()));
        }
        let from_file = |path: &PathBuf| read_pin(path);
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

/// The longest PIN file read (PINs are short; a device or a huge file must not be read).
const MAX_PIN_FILE_BYTES: u64 = 256;

/// Reads a PIN file: a regular file, at most [`MAX_PIN_FILE_BYTES`], its line ending dropped.
fn read_pin(path: &Path) -> Result<String, Pkcs11Error> {
    use std::io::Read as _;
    let failed = |e: String| Pkcs11Error::Pin(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| failed(e.to_string()))?;
    if !metadata.is_file() || metadata.len() > MAX_PIN_FILE_BYTES {
        return Err(failed(format!(
            "not a regular file of at most {MAX_PIN_FILE_BYTES} bytes"
        )));
    }
    let mut text = String::new();
    file.take(MAX_PIN_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| failed(e.to_string()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// Where a PIN comes from when the URI does not say.
#[derive(Debug, Clone)]
pub enum PinSource {
    /// A file holding the PIN.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

fn token_err(context: &str) -> impl Fn(cryptoki::error::Error) -> Pkcs11Error + '_ {
    move |e| Pkcs11Error::Token(format!("{context}: {e}"))
}

/// The module at `path`, loaded and initialised once per process: a second `C_Initialize`
/// fails, and two keys may well live in one module.
fn module(path: &Path) -> Result<Pkcs11, Pkcs11Error> {
    static MODULES: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut modules = MODULES
        .lock()
        .map_err(|_| Pkcs11Error::Token("the module table lock is poisoned".into()))?;
    if let Some((_, context)) = modules.iter().find(|(p, _)| p == path) {
        return Ok(context.clone());
    }
    let context = Pkcs11::new(path)
        .map_err(|e| Pkcs11Error::Token(format!("loading {}: {e}", path.display())))?;
    context
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(token_err("initialising the module"))?;
    modules.push((path.to_owned(), context.clone()));
    Ok(context)
}

/// Whether a session may create objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    ReadWrite,
}

/// Opens `count` sessions on the token the URI names and logs in (once: a login holds for
/// every session of the process on that token).
fn open_sessions(
    uri: &Pkcs11Uri,
    pin: Option<&PinSource>,
    access: Access,
    count: usize,
) -> Result<Vec<Session>, Pkcs11Error> {
    let path = uri
        .module_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    let context = module(&path)?;
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
    let sessions = (0..count.max(1))
        .map(|_| match access {
            Access::ReadOnly => context.open_ro_session(slot),
            Access::ReadWrite => context.open_rw_session(slot),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(token_err("opening a session"))?;
    if let (Some(pin), Some(session)) = (uri.pin(pin)?, sessions.first()) {
        match session.login(UserType::User, Some(&AuthPin::new(pin.into_boxed_str()))) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(token_err("logging in")(e)),
        }
    }
    Ok(sessions)
}

/// Logged-in sessions shared by the callers of one key; a caller takes a free one, or waits
/// for one when all are busy.
struct Sessions {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
}

impl Sessions {
    fn new(sessions: Vec<Session>) -> Self {
        Self {
            sessions: sessions.into_iter().map(Mutex::new).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `operation` on a free session.
    fn with<T>(
        &self,
        what: &str,
        operation: impl FnOnce(&Session) -> cryptoki::error::Result<T>,
    ) -> Result<T, Pkcs11Error> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.sessions.len();
        let free =
            (0..count).find_map(|i| self.sessions[start.wrapping_add(i) % count].try_lock().ok());
        let session = match free {
            Some(session) => session,
            None => self.sessions[start % count]
                .lock()
                .map_err(|_| Pkcs11Error::Token("a session lock is poisoned".into()))?,
        };
        operation(&session).map_err(token_err(what))
    }
}

/// The label and id attributes the URI gives.
fn names(uri: &Pkcs11Uri) -> Vec<Attribute> {
    let mut names = Vec::new();
    if let Some(object) = &uri.object {
        names.push(Attribute::Label(object.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        names.push(Attribute::Id(id.clone()));
    }
    names
}

/// The object template that finds what the URI names, of `class`.
fn template(uri: &Pkcs11Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut template = vec![Attribute::Class(class)];
    template.extend(names(uri));
    template
}

/// The objects of `class` the URI names.
fn find(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
    session
        .find_objects(&template(uri, class))
        .map_err(token_err("finding the key"))
}

/// The one object of `class` the URI names.
fn find_one(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
    what: &str,
) -> Result<ObjectHandle, Pkcs11Error> {
    match find(session, uri, class)?.as_slice() {
        [one] => Ok(*one),
        [] => Err(Pkcs11Error::NotFound(format!("no {what} matches the URI"))),
        _ => Err(Pkcs11Error::Token(format!(
            "more than one {what} matches the URI"
        ))),
    }
}

/// A secret key inside a token, logged in and ready to compute HMACs.
pub struct SecretKey {
    sessions: Sessions,
    key: ObjectHandle,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey").finish_non_exhaustive()
    }
}

impl SecretKey {
    /// Opens the token the URI names, logs in and finds the secret key.
    pub fn open(uri: &Pkcs11Uri, pin: Option<&PinSource>) -> Result<Self, Pkcs11Error> {
        let sessions = open_sessions(uri, pin, Access::ReadOnly, 1)?;
        let key = match sessions.first() {
            Some(session) => find_one(session, uri, ObjectClass::SECRET_KEY, "secret key")?,
            None => return Err(Pkcs11Error::Token("no session".into())),
        };
        Ok(Self {
            sessions: Sessions::new(sessions),
            key,
        })
    }

    /// HMAC-SHA256 of `data`, computed inside the token.
    pub fn hmac_sha256(&self, data: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        self.sessions.with("CKM_SHA256_HMAC", |session| {
            session.sign(&Mechanism::Sha256Hmac, self.key, data)
        })
    }
}

/// DER of the named curve prime256v1 (P-256), as CKA_EC_PARAMS holds it.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// DER of the named curve secp384r1 (P-384).
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];

/// What kind of private key a token holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on NIST P-256 (signs SHA-256 digests).
    EcP256,
    /// ECDSA on NIST P-384 (signs SHA-384 digests).
    EcP384,
    /// RSA with a modulus of this many bits.
    Rsa(u32),
}

impl From<attestation::issuance::KeyType> for KeyKind {
    fn from(key_type: attestation::issuance::KeyType) -> Self {
        use attestation::issuance::KeyType;
        match key_type {
            KeyType::EcP256 => KeyKind::EcP256,
            KeyType::EcP384 => KeyKind::EcP384,
            KeyType::Rsa2048 => KeyKind::Rsa(2048),
            KeyType::Rsa3072 => KeyKind::Rsa(3072),
        }
    }
}

impl KeyKind {
    /// The curve's field size in bytes (an ECDSA signature is twice this), or `None` for RSA.
    fn field_bytes(self) -> Option<usize> {
        match self {
            KeyKind::EcP256 => Some(32),
            KeyKind::EcP384 => Some(48),
            KeyKind::Rsa(_) => None,
        }
    }
}

/// An ECDSA signature as X.509 and TLS carry it.
#[derive(der::Sequence)]
struct EcdsaSignature<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

/// An RSA public key as a SubjectPublicKeyInfo's bit string carries it (PKCS#1).
#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    public_exponent: der::asn1::UintRef<'a>,
}

/// A private key inside a token, logged in and ready to sign.
pub struct PrivateKey {
    sessions: Sessions,
    key: ObjectHandle,
    kind: KeyKind,
    public_key: Vec<u8>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Opens the token the URI names, logs in with `sessions` sessions (callers that sign at
    /// once each take one) and finds the private key (ECDSA P-256/P-384 or RSA) and its public
    /// half.
    pub fn open(
        uri: &Pkcs11Uri,
        pin: Option<&PinSource>,
        sessions: usize,
    ) -> Result<Self, Pkcs11Error> {
        let sessions = open_sessions(uri, pin, Access::ReadOnly, sessions)?;
        let session = sessions
            .first()
            .ok_or_else(|| Pkcs11Error::Token("no session".into()))?;
        let key = find_one(session, uri, ObjectClass::PRIVATE_KEY, "private key")?;
        let kind = match session
            .get_attributes(key, &[AttributeType::KeyType])
            .map_err(token_err("reading the key type"))?
            .first()
        {
            Some(Attribute::KeyType(t)) if *t == KeyType::RSA => KeyKind::Rsa(0),
            Some(Attribute::KeyType(t)) if *t == KeyType::EC => {
                match session
                    .get_attributes(key, &[AttributeType::EcParams])
                    .map_err(token_err("reading the curve"))?
                    .first()
                {
                    Some(Attribute::EcParams(p)) if p.as_slice() == P256_PARAMS => KeyKind::EcP256,
                    Some(Attribute::EcParams(p)) if p.as_slice() == P384_PARAMS => KeyKind::EcP384,
                    _ => {
                        return Err(Pkcs11Error::Token(
                            "the EC key is on neither P-256 nor P-384".into(),
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
        let (kind, public_key) = public_key(session, uri, key, kind)?;
        Ok(Self {
            sessions: Sessions::new(sessions),
            key,
            kind,
            public_key,
        })
    }

    /// Generates a key pair inside the token the URI names, labelled and identified as the URI
    /// says: the private half is a token object that is sensitive, not extractable and can
    /// only sign. Refused when the token already holds an object of the URI's label, or of its
    /// id (a second key under either would make both ambiguous). Generations in this process
    /// take turns, so two cannot both find the name free.
    pub fn generate(
        uri: &Pkcs11Uri,
        pin: Option<&PinSource>,
        kind: KeyKind,
        sessions: usize,
    ) -> Result<Self, Pkcs11Error> {
        static GENERATING: Mutex<()> = Mutex::new(());
        let _turn = GENERATING
            .lock()
            .map_err(|_| Pkcs11Error::Token("the generation lock is poisoned".into()))?;
        {
            let opened = open_sessions(uri, pin, Access::ReadWrite, 1)?;
            let session = opened
                .first()
                .ok_or_else(|| Pkcs11Error::Token("no session".into()))?;
            let names = names(uri);
            for name in &names {
                let taken = session
                    .find_objects(std::slice::from_ref(name))
                    .map_err(token_err("finding objects"))?;
                if !taken.is_empty() {
                    return Err(Pkcs11Error::Exists(
                        "the token already holds an object of the URI's label or id".into(),
                    ));
                }
            }
            let mut private = vec![
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                // SoftHSM's defaults would let the key decrypt and unwrap too.
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ];
            private.extend(names.iter().cloned());
            let mut public = vec![Attribute::Token(true), Attribute::Verify(true)];
            public.extend(names);
            let mechanism = match kind {
                KeyKind::EcP256 | KeyKind::EcP384 => {
                    let params = if kind == KeyKind::EcP256 {
                        P256_PARAMS
                    } else {
                        P384_PARAMS
                    };
                    public.push(Attribute::EcParams(params.to_vec()));
                    Mechanism::EccKeyPairGen
                }
                KeyKind::Rsa(bits) => {
                    public.push(Attribute::ModulusBits(u64::from(bits).into()));
                    public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                    Mechanism::RsaPkcsKeyPairGen
                }
            };
            session
                .generate_key_pair(&mechanism, &public, &private)
                .map_err(token_err("generating the key pair"))?;
        }
        Self::open(uri, pin, sessions)
    }

    /// Deletes the key pair from the token (a key generated for something that then failed).
    pub fn destroy(self, uri: &Pkcs11Uri, pin: Option<&PinSource>) -> Result<(), Pkcs11Error> {
        drop(self.sessions);
        let opened = open_sessions(uri, pin, Access::ReadWrite, 1)?;
        let session = opened
            .first()
            .ok_or_else(|| Pkcs11Error::Token("no session".into()))?;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for object in find(session, uri, class)? {
                session
                    .destroy_object(object)
                    .map_err(token_err("deleting the key"))?;
            }
        }
        Ok(())
    }

    /// What kind of key it is.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The public key as a SubjectPublicKeyInfo's bit string carries it: the uncompressed EC
    /// point, or the PKCS#1 RSAPublicKey DER.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// An ECDSA signature of `message` (hashed with SHA-256 on P-256, SHA-384 on P-384), DER
    /// encoded as X.509 and TLS carry it.
    pub fn sign_ecdsa(&self, message: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        use sha2::Digest as _;
        let failed = |e: &str| Pkcs11Error::Token(format!("CKM_ECDSA: {e}"));
        let (digest, field) = match self.kind {
            KeyKind::EcP256 => (sha2::Sha256::digest(message).to_vec(), 32),
            KeyKind::EcP384 => (sha2::Sha384::digest(message).to_vec(), 48),
            KeyKind::Rsa(_) => return Err(failed("the key is RSA")),
        };
        // CKM_ECDSA signs a digest and returns r || s.
        let raw = self.sessions.with("CKM_ECDSA", |session| {
            session.sign(&Mechanism::Ecdsa, self.key, &digest)
        })?;
        if raw.len() != 2 * field {
            return Err(failed(&format!(
                "unexpected signature length {}",
                raw.len()
            )));
        }
        let (r, s) = raw.split_at(field);
        let uint = |bytes| der::asn1::UintRef::new(bytes).map_err(|e| failed(&e.to_string()));
        der::Encode::to_der(&EcdsaSignature {
            r: uint(r)?,
            s: uint(s)?,
        })
        .map_err(|e| failed(&e.to_string()))
    }

    /// An RSASSA-PKCS1-v1_5 signature of `message` with SHA-256.
    pub fn sign_rsa_pkcs1_sha256(&self, message: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        self.sessions.with("CKM_SHA256_RSA_PKCS", |session| {
            session.sign(&Mechanism::Sha256RsaPkcs, self.key, message)
        })
    }

    /// An RSASSA-PSS signature of `message` with SHA-256 and a 32-byte salt.
    pub fn sign_rsa_pss_sha256(&self, message: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        self.sessions.with("CKM_SHA256_RSA_PKCS_PSS", |session| {
            session.sign(
                &Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
                self.key,
                message,
            )
        })
    }

    /// Whether the token keeps the private key to itself: sensitive, not extractable and never
    /// extractable, as the token itself reports.
    pub fn is_protected(&self) -> Result<bool, Pkcs11Error> {
        let attributes = self
            .sessions
            .with("reading the key's attributes", |session| {
                session.get_attributes(
                    self.key,
                    &[
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::NeverExtractable,
                    ],
                )
            })?;
        let flag = |wanted: AttributeType| {
            attributes.iter().find_map(|a| match (a, wanted) {
                (Attribute::Sensitive(v), AttributeType::Sensitive)
                | (Attribute::Extractable(v), AttributeType::Extractable)
                | (Attribute::NeverExtractable(v), AttributeType::NeverExtractable) => Some(*v),
                _ => None,
            })
        };
        Ok(flag(AttributeType::Sensitive) == Some(true)
            && flag(AttributeType::Extractable) == Some(false)
            && flag(AttributeType::NeverExtractable) == Some(true))
    }
}

impl rcgen::PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.kind {
            KeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

/// Signs certificates and certificate requests inside the token (ECDSA with the curve's hash,
/// RSA with PKCS#1 v1.5 and SHA-256).
impl rcgen::SigningKey for PrivateKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self.kind {
            KeyKind::EcP256 | KeyKind::EcP384 => self.sign_ecdsa(message),
            KeyKind::Rsa(_) => self.sign_rsa_pkcs1_sha256(message),
        }
        .map_err(|e| {
            tracing::warn!(error = %e, "the token did not sign");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A key that signs certificates or requests: in memory (read from a file) or in a token.
#[derive(Debug)]
pub enum Signer {
    /// A key in memory.
    Memory(Box<rcgen::KeyPair>),
    /// A key inside a token.
    Token(PrivateKey),
}

impl Signer {
    /// A PKCS#8 PEM key file, read into memory. The key's text is never part of an error.
    pub fn from_pem_file(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        rcgen::KeyPair::from_pem(&pem)
            .map(|key| Signer::Memory(Box::new(key)))
            .map_err(|_| {
                format!(
                    "{} is not a PKCS#8 PEM private key of ECDSA P-256/P-384 or RSA",
                    path.display()
                )
            })
    }
}

impl rcgen::PublicKeyData for Signer {
    fn der_bytes(&self) -> &[u8] {
        match self {
            Signer::Memory(key) => key.der_bytes(),
            Signer::Token(key) => key.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Signer::Memory(key) => key.algorithm(),
            Signer::Token(key) => key.algorithm(),
        }
    }
}

impl rcgen::SigningKey for Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            Signer::Memory(key) => key.sign(message),
            Signer::Token(key) => key.sign(message),
        }
    }
}

/// The public half of `key`, from the public key object the URI names (or, for RSA, from the
/// private key's own modulus and exponent), with the RSA key's size filled in.
fn public_key(
    session: &Session,
    uri: &Pkcs11Uri,
    key: ObjectHandle,
    kind: KeyKind,
) -> Result<(KeyKind, Vec<u8>), Pkcs11Error> {
    let public = find(session, uri, ObjectClass::PUBLIC_KEY)?;
    let public = match public.as_slice() {
        [one] => Some(*one),
        [] => None,
        _ => {
            return Err(Pkcs11Error::Token(
                "more than one public key matches the URI".into(),
            ));
        }
    };
    match kind.field_bytes() {
        Some(field) => {
            let Some(public) = public else {
                return Err(Pkcs11Error::Token(
                    "the token holds no public key for the EC private key".into(),
                ));
            };
            let point = match session
                .get_attributes(public, &[AttributeType::EcPoint])
                .map_err(token_err("reading the EC point"))?
                .first()
            {
                Some(Attribute::EcPoint(point)) => point.clone(),
                _ => return Err(Pkcs11Error::Token("the token returned no EC point".into())),
            };
            // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point (some tokens
            // give the bare point).
            let length = 1 + 2 * field;
            match point.as_slice() {
                [0x04, n, rest @ ..] if usize::from(*n) == length && rest.len() == length => {
                    Ok((kind, rest.to_vec()))
                }
                [0x04, ..] if point.len() == length => Ok((kind, point)),
                _ => Err(Pkcs11Error::Token(format!(
                    "unexpected EC point encoding ({} bytes)",
                    point.len()
                ))),
            }
        }
        None => {
            let attributes = session
                .get_attributes(
                    public.unwrap_or(key),
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(token_err("reading the RSA public key"))?;
            let (Some(Attribute::Modulus(n)), Some(Attribute::PublicExponent(e))) =
                (attributes.first(), attributes.get(1))
            else {
                return Err(Pkcs11Error::Token(
                    "the token returned no RSA public key".into(),
                ));
            };
            let uint = |bytes| {
                der::asn1::UintRef::new(bytes)
                    .map_err(|e| Pkcs11Error::Token(format!("the RSA public key: {e}")))
            };
            let modulus = uint(n)?;
            let der = der::Encode::to_der(&RsaPublicKey {
                modulus,
                public_exponent: uint(e)?,
            })
            .map_err(|e| Pkcs11Error::Token(format!("the RSA public key: {e}")))?;
            let bits = u32::try_from(modulus.as_bytes().len() * 8).unwrap_or(u32::MAX);
            Ok((KeyKind::Rsa(bits), der))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PIN file is read only when it is a small regular file: a directory, a device or a
    /// huge file (which would hang or exhaust the server) is refused.
    #[test]
    fn pin_files_are_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        assert_eq!(read_pin(&pin).unwrap(), "1234");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'1'; 4096]).unwrap();
        for refused in [big.as_path(), dir.path(), Path::new("/dev/zero")] {
            assert!(
                matches!(read_pin(refused), Err(Pkcs11Error::Pin(_))),
                "{}",
                refused.display()
            );
        }
    }

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

//! Console sessions: sign-in turns a shared access policy into a SAS token of
//! [`SESSION_SECS`] (or `limits.max_token_lifetime_secs`, when shorter), kept in the
//! `dps_console` cookie (HttpOnly, Secure, SameSite=Strict) with the instance's name and a
//! random nonce. Every request checks the token against that instance's policies, as
//! the admin API does, so a cookie opens only the instance whose policy signed it, a changed
//! key ends every session made with the old one, and any replica serves any session. Forms
//! carry a token derived from the cookie ([`Session::csrf`]); the sign-in form one from a
//! cookie of its own.

use std::collections::BTreeSet;

use askama::Template;
use attestation::{ConnectionString, SymmetricKey};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use dps_protocol::admin::Right;
use sha2::Digest as _;

use super::Console;
use crate::domain::{access, instances};

/// How long a session lasts.
pub const SESSION_SECS: u64 = 1800;
/// The session cookie.
const COOKIE: &str = "dps_console";
/// The sign-in form's cookie.
const SIGN_IN_COOKIE: &str = "dps_console_sign_in";

/// A signed-in admin.
#[derive(Debug, Clone)]
pub struct Session {
    /// The instance.
    pub instance: String,
    /// The SAS token the pages call the API with.
    pub token: String,
    /// The policy's name.
    pub policy: String,
    /// Its rights.
    pub rights: BTreeSet<Right>,
    /// What its forms must carry.
    pub csrf: String,
}

/// A request the console refuses before any page: to the sign-in page, forgetting the cookie
/// it sent, if any (a request without one, such as a cross-site navigation, which a strict
/// cookie does not go with, leaves the browser's session alone).
pub struct SignInFirst {
    forget: bool,
}

impl IntoResponse for SignInFirst {
    fn into_response(self) -> Response {
        let mut response = Redirect::to("/console").into_response();
        if self.forget {
            response
                .headers_mut()
                .insert(header::SET_COOKIE, expired(COOKIE));
        }
        response
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn set_cookie(name: &str, value: &str, max_age: u64) -> HeaderValue {
    // The value is an instance name, `~` and base64url: nothing a header cannot carry.
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/console; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    ))
    .unwrap_or_else(|_| expired(name))
}

fn expired(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}=; Path=/console; Max-Age=0; HttpOnly; Secure; SameSite=Strict"
    ))
    .unwrap_or(HeaderValue::from_static(""))
}

/// A form token bound to `secret` (a cookie's value): whoever cannot read the cookie cannot
/// make it.
fn form_token(secret: &str) -> String {
    let digest = sha2::Sha256::digest(format!("dps-console-form\0{secret}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Whether `sent` is the form token of `secret`, compared as digests (no early exit on the
/// secret-bound value itself).
fn form_token_matches(secret: &str, sent: &str) -> bool {
    let expected = sha2::Sha256::digest(form_token(secret).as_bytes());
    let got = sha2::Sha256::digest(sent.as_bytes());
    expected == got
}

/// Whether the browser says the request comes from another site (`Sec-Fetch-Site`).
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| site.eq_ignore_ascii_case("cross-site"))
}

impl FromRequestParts<Console> for Session {
    type Rejection = SignInFirst;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, SignInFirst> {
        Session::of(console, &parts.headers).await
    }
}

impl Session {
    /// The session of a request's cookie, checked against its instance's policies.
    async fn of(console: &Console, headers: &HeaderMap) -> Result<Self, SignInFirst> {
        let value = cookie(headers, COOKIE).ok_or(SignInFirst { forget: false })?;
        let refused = || SignInFirst { forget: true };
        // `<instance>~<nonce>~<token>`: the nonce makes two sessions of one policy in one
        // second two sessions (and two form tokens).
        let (instance, rest) = value.split_once('~').ok_or_else(refused)?;
        let (_, encoded) = rest.split_once('~').ok_or_else(refused)?;
        let token =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, encoded)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(refused)?;
        let found = instances::load_instance(console.state.store.as_ref(), instance)
            .await
            .map_err(|_| refused())?;
        let caller = access::caller(&console.state, &found, Some(&token))
            .await
            .map_err(|_| refused())?;
        Ok(Session {
            instance: found.name,
            token,
            policy: caller.policy,
            rights: caller.rights,
            csrf: form_token(value),
        })
    }

    /// Checks a form's token (and that the browser does not call it cross-site).
    fn check_form(&self, headers: &HeaderMap, sent: &str) -> Result<(), FormRefused> {
        let value = cookie(headers, COOKIE).unwrap_or_default();
        if cross_site(headers) || !form_token_matches(value, sent) {
            return Err(FormRefused);
        }
        Ok(())
    }
}

/// A form that carries the session's token (field `csrf`).
pub trait WithToken {
    /// The token it carries.
    fn csrf(&self) -> &str;
}

/// A signed-in admin's form whose token was checked: the only way a page handler gets a
/// form, so that none can forget the check.
pub struct Checked<T> {
    /// Who sent it.
    pub session: Session,
    /// What it says.
    pub form: T,
}

/// Why a form was not taken.
pub enum FormRefusal {
    /// No session.
    SignIn(SignInFirst),
    /// Its token is missing or wrong.
    Token(FormRefused),
    /// Not a form of this page.
    Body(axum::extract::rejection::FormRejection),
}

impl IntoResponse for FormRefusal {
    fn into_response(self) -> Response {
        match self {
            FormRefusal::SignIn(refused) => refused.into_response(),
            FormRefusal::Token(refused) => refused.into_response(),
            FormRefusal::Body(refused) => refused.into_response(),
        }
    }
}

impl<T> axum::extract::FromRequest<Console> for Checked<T>
where
    T: serde::de::DeserializeOwned + WithToken + Send,
{
    type Rejection = FormRefusal;

    async fn from_request(
        request: axum::extract::Request,
        console: &Console,
    ) -> Result<Self, FormRefusal> {
        let (parts, body) = request.into_parts();
        let session = Session::of(console, &parts.headers)
            .await
            .map_err(FormRefusal::SignIn)?;
        let headers = parts.headers.clone();
        let request = axum::extract::Request::from_parts(parts, body);
        let axum::Form(form) = axum::Form::<T>::from_request(request, console)
            .await
            .map_err(FormRefusal::Body)?;
        session
            .check_form(&headers, form.csrf())
            .map_err(FormRefusal::Token)?;
        Ok(Checked { session, form })
    }
}

/// A form without its token (or sent cross-site): 403, nothing done.
#[derive(Debug)]
pub struct FormRefused;

impl IntoResponse for FormRefused {
    fn into_response(self) -> Response {
        (
            StatusCode::FORBIDDEN,
            Html("<!doctype html><title>Refused</title><p>The form's token is missing or wrong: reload the page and try again.</p>"),
        )
            .into_response()
    }
}

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    error: Option<String>,
    csrf: String,
}

/// A fresh random value, hex.
fn random_hex() -> String {
    let bytes: [u8; 16] = attestation::keys::random_bytes().unwrap_or_default();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sign_in_form(status: StatusCode, error: Option<String>) -> Response {
    let secret = random_hex();
    let page = SignInPage {
        error,
        csrf: form_token(&secret),
    };
    let mut response = (status, super::pages::html(&page)).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(SIGN_IN_COOKIE, &secret, 3600),
    );
    response
}

/// `GET /console`: the sign-in form, or the overview for a signed-in admin.
pub async fn sign_in_page(State(console): State<Console>, headers: HeaderMap) -> Response {
    match Session::of(&console, &headers).await {
        Ok(_) => Redirect::to("/console/overview").into_response(),
        Err(_) => sign_in_form(StatusCode::OK, None),
    }
}

/// The sign-in form's fields.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    connection_string: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    key: String,
}

/// `POST /console/sign-in`: checks the policy's key against the instance and starts a session.
pub async fn sign_in(
    State(console): State<Console>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    axum::Form(form): axum::Form<SignInForm>,
) -> Response {
    let secret = cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if secret.is_empty() || cross_site(&headers) || !form_token_matches(secret, &form.csrf) {
        return FormRefused.into_response();
    }
    let failed = || {
        sign_in_form(
            StatusCode::UNAUTHORIZED,
            Some("Sign-in failed: no policy of this instance has that name and key.".into()),
        )
    };
    let state = &console.state;
    let (host, policy, key) = if form.connection_string.trim().is_empty() {
        // HTTP/2 clients name the host in the URI, not in a Host header.
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| uri.authority().map(|a| a.to_string()))
            .map(|h| h.to_ascii_lowercase());
        let Ok(key) = SymmetricKey::from_base64(form.key.trim()) else {
            return failed();
        };
        (host, form.policy.trim().to_owned(), key)
    } else {
        let Ok(parsed) = ConnectionString::parse(form.connection_string.trim()) else {
            return failed();
        };
        (
            Some(parsed.host_name.to_ascii_lowercase()),
            parsed.key_name,
            parsed.key,
        )
    };
    let Ok(instance) = instances::instance_for_host(state.store.as_ref(), host).await else {
        return failed();
    };
    let audience = instance
        .host_names
        .first()
        .cloned()
        .or_else(|| state.server_names.first().cloned())
        .unwrap_or_default();
    let lifetime = SESSION_SECS.min(state.limits.max_token_lifetime_secs);
    let expiry = crate::domain::unix_now().saturating_add(lifetime);
    let token = attestation::sas::sign(&audience, &key, expiry, Some(&policy));
    if access::caller(state, &instance, Some(&token))
        .await
        .is_err()
    {
        return failed();
    }
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &token);
    let mut response = Redirect::to("/console/overview").into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(
            COOKIE,
            &format!("{}~{}~{encoded}", instance.name, random_hex()),
            lifetime,
        ),
    );
    headers.append(header::SET_COOKIE, expired(SIGN_IN_COOKIE));
    response
}

/// The fields of a form that carries only its token.
#[derive(Debug, serde::Deserialize)]
pub struct TokenOnly {
    /// The form's token.
    #[serde(default)]
    pub csrf: String,
}

impl WithToken for TokenOnly {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /console/sign-out`: forgets the session's cookie.
pub async fn sign_out(_: Checked<TokenOnly>) -> Response {
    let mut response = Redirect::to("/console").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, expired(COOKIE));
    response
}

//! Attacks on the admin console (`/console`): sessions are strict cookies that a wrong key
//! never gets and that open only their own instance; every form needs its token; text an
//! attacker chose renders inert under a strict Content-Security-Policy; a read-only policy is
//! offered no write and its writes are refused with nothing changed; a key read is audited.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, TestServer, enroll, expect_json, policy_with};
use reqwest::Method;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

/// A browser without a cookie jar: redirects are not followed, cookies are sent by hand.
fn browser(t: &TestServer) -> reqwest::Client {
    let ca = std::fs::read(&t.running().ca_certificate).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[derive(Debug)]
struct Page {
    status: u16,
    headers: HeaderMap,
    body: String,
}

async fn get(t: &TestServer, cookie: &str, path: &str) -> Page {
    let response = browser(t)
        .get(format!("{}{path}", t.base))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    page(response).await
}

async fn post(t: &TestServer, cookie: &str, path: &str, form: &[(&str, &str)]) -> Page {
    post_with(t, cookie, path, form, &[]).await
}

async fn post_with(
    t: &TestServer,
    cookie: &str,
    path: &str,
    form: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Page {
    let body: Vec<String> = form
        .iter()
        .map(|(name, value)| {
            let value =
                percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC);
            format!("{name}={value}")
        })
        .collect();
    let mut request = browser(t)
        .post(format!("{}{path}", t.base))
        .header("Cookie", cookie)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.join("&"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    page(request.send().await.unwrap()).await
}

async fn page(response: reqwest::Response) -> Page {
    Page {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

fn cookies(page: &Page) -> Vec<String> {
    page.headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The `name=value` of the cookie `name` the page set.
fn cookie_of(page: &Page, name: &str) -> Option<String> {
    cookies(page)
        .into_iter()
        .filter_map(|c| c.split(';').next().map(str::to_owned))
        .find(|pair| pair.starts_with(&format!("{name}=")) && pair.len() > name.len() + 1)
}

/// Whether the page clears the session cookie.
fn clears_session(page: &Page) -> bool {
    cookies(page)
        .iter()
        .any(|c| c.starts_with("dps_console=;") && c.contains("Max-Age=0"))
}

/// The form token in a page.
fn csrf(body: &str) -> String {
    let start = body.find("name=\"csrf\" value=\"").unwrap() + 19;
    body[start..start + 32].to_owned()
}

/// Signs in with `fields` (a connection string, or a policy's name and key); the session
/// cookie (`dps_console=...`) or the refusal.
async fn sign_in(t: &TestServer, fields: &[(&str, &str)]) -> Result<String, Page> {
    let form = get(t, "", "/console").await;
    assert_eq!(form.status, 200);
    let pre = cookie_of(&form, "dps_console_sign_in").unwrap();
    let token = csrf(&form.body);
    let mut all = vec![("csrf", token.as_str())];
    all.extend_from_slice(fields);
    let answer = post(t, &pre, "/console/sign-in", &all).await;
    match cookie_of(&answer, "dps_console") {
        Some(cookie) if answer.status == 303 => Ok(cookie),
        _ => Err(answer),
    }
}

async fn owner_session(t: &TestServer) -> String {
    let connection = t.owner.reveal();
    sign_in(t, &[("connectionString", connection.as_str())])
        .await
        .unwrap()
}

/// A wrong key gets no session; a right one a strict cookie; pages need it; every answer has
/// the strict policy.
async fn sessions_are_strict_cookies_that_a_wrong_key_never_gets(backend: Backend) {
    let t = TestServer::start(backend).await;
    let wrong = sign_in(
        &t,
        &[
            ("policy", t.owner.key_name.as_str()),
            ("key", "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(wrong.status, 401);
    assert!(
        cookie_of(&wrong, "dps_console").is_none(),
        "{:?}",
        cookies(&wrong)
    );
    assert!(wrong.body.contains("Sign-in failed"), "{}", wrong.body);
    // Without the sign-in form's own cookie, even the right key is refused.
    let form = get(&t, "", "/console").await;
    let connection = t.owner.reveal();
    let forged = post(
        &t,
        "",
        "/console/sign-in",
        &[
            ("csrf", &csrf(&form.body)),
            ("connectionString", &connection),
        ],
    )
    .await;
    assert_eq!(forged.status, 403);
    assert!(cookie_of(&forged, "dps_console").is_none());

    // By name and key, then by connection string.
    let key = t.owner.key.to_base64();
    let by_key = sign_in(&t, &[("policy", t.owner.key_name.as_str()), ("key", &key)])
        .await
        .unwrap();
    assert!(
        !by_key.contains(&key),
        "the cookie holds a token, not the key"
    );
    let form = get(&t, "", "/console").await;
    let pre = cookie_of(&form, "dps_console_sign_in").unwrap();
    let answer = post(
        &t,
        &pre,
        "/console/sign-in",
        &[
            ("csrf", &csrf(&form.body)),
            ("connectionString", &connection),
        ],
    )
    .await;
    assert_eq!(answer.status, 303);
    assert_eq!(answer.headers[LOCATION], "/console/overview");
    let set = cookies(&answer)
        .into_iter()
        .find(|c| c.starts_with("dps_console="))
        .unwrap();
    for flag in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=1800",
    ] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    let session = cookie_of(&answer, "dps_console").unwrap();
    let overview = get(&t, &session, "/console/overview").await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.body.contains("Overview"));
    let policy = overview.headers["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"));
    assert!(!policy.contains("unsafe"), "{policy}");
    assert_eq!(overview.headers["x-frame-options"], "DENY");
    assert_eq!(overview.headers["cache-control"], "no-store");

    // No cookie, a forged one, a tampered token: back to the sign-in page.
    let mut tampered = session.clone().into_bytes();
    let at = tampered.len() - 12;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for cookie in [
        "",
        "dps_console=default~00~AAAA",
        "dps_console=garbage",
        tampered.as_str(),
    ] {
        let refused = get(&t, cookie, "/console/enrollments").await;
        assert_eq!(refused.status, 303, "{cookie}");
        assert_eq!(refused.headers[LOCATION], "/console", "{cookie}");
        assert!(!refused.body.contains("Enrollments"));
        // Only a cookie that was sent is forgotten: a request without one (a cross-site
        // navigation, which a strict cookie does not go with) leaves the browser's session.
        assert_eq!(clears_session(&refused), !cookie.is_empty(), "{cookie}");
    }
}

/// Script in fields an attacker can set (tags, twin, ids in the query) is text, not markup.
async fn attacker_text_renders_inert(backend: Backend) {
    let t = TestServer::start(backend).await;
    let script = "<script>alert(1)</script>";
    let image = "\"><img src=x onerror=alert(2)>";
    enroll(
        &t,
        json!({ "registrationId": "dev-xss", "attestation": { "type": "symmetricKey" },
            "initialTwin": { "tags": { "owner": script, "site": image },
                "properties": { "desired": { "note": script } } } }),
    )
    .await;
    let session = owner_session(&t).await;
    for path in [
        "/console/enrollments",
        "/console/enrollments/dev-xss",
        "/console/enrollments?q=%3Cscript%3E",
        "/console/registrations?id=%22%3E%3Cscript%3Ealert(3)%3C%2Fscript%3E",
        "/console/audit?policy=%3Cscript%3Ealert(4)%3C%2Fscript%3E",
    ] {
        let page = get(&t, &session, path).await;
        assert!(page.status < 500, "{path}: {}", page.status);
        for raw in ["<script>alert", "<img src=x", "\"><script"] {
            assert!(
                !page.body.contains(raw),
                "{path} renders {raw}: {}",
                page.body
            );
        }
        // The only script is the console's own.
        assert_eq!(page.body.matches("<script").count(), 1, "{path}");
    }
    let detail = get(&t, &session, "/console/enrollments/dev-xss").await;
    assert!(
        detail
            .body
            .contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{}",
        detail.body
    );
}

/// A form without its token, with another's, or sent cross-site is refused, and nothing
/// changes.
async fn forms_without_their_token_are_refused(backend: Backend) {
    let t = TestServer::start(backend).await;
    enroll(
        &t,
        json!({ "registrationId": "dev-csrf", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let session = owner_session(&t).await;
    let detail = get(&t, &session, "/console/enrollments/dev-csrf").await;
    let token = csrf(&detail.body);
    let other = owner_session(&t).await;
    let other_token = csrf(&get(&t, &other, "/console/overview").await.body);
    assert_ne!(token, other_token, "tokens are per session");
    for (form, headers) in [
        (vec![("etag", "*")], vec![]),
        (vec![("csrf", ""), ("etag", "*")], vec![]),
        (vec![("csrf", other_token.as_str()), ("etag", "*")], vec![]),
        (
            vec![("csrf", token.as_str()), ("etag", "*")],
            vec![("Sec-Fetch-Site", "cross-site")],
        ),
    ] {
        for action in ["delete", "status"] {
            let refused = post_with(
                &t,
                &session,
                &format!("/console/enrollments/dev-csrf/{action}"),
                &form,
                &headers,
            )
            .await;
            assert_eq!(refused.status, 403, "{action} {form:?} {headers:?}");
        }
    }
    let created = post(
        &t,
        &session,
        "/console/enrollments",
        &[("id", "dev-forged")],
    )
    .await;
    assert_eq!(created.status, 403);
    let signed_out = post(&t, &session, "/console/sign-out", &[]).await;
    assert_eq!(signed_out.status, 403);
    // Nothing changed.
    let stored = expect_json(
        t.owner(Method::GET, "/enrollments/dev-csrf")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(stored["provisioningStatus"], "enabled");
    let absent = t
        .owner(Method::GET, "/enrollments/dev-forged")
        .send()
        .await
        .unwrap();
    assert_eq!(absent.status(), 404);
    let audit = expect_json(
        t.owner(
            Method::GET,
            "/auditLog?resourceKind=enrollment&resourceId=dev-csrf",
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        audit.as_array().unwrap().len(),
        1,
        "only its creation: {audit}"
    );

    // With its token the same form works: one audited write, the keys kept.
    let keys = || async {
        expect_json(
            t.owner(Method::POST, "/enrollments/dev-csrf/attestationmechanism")
                .send()
                .await
                .unwrap(),
            200,
        )
        .await
    };
    let keys_before = keys().await;
    let disabled = post(
        &t,
        &session,
        "/console/enrollments/dev-csrf/status",
        &[
            ("csrf", &token),
            ("etag", stored["etag"].as_str().unwrap()),
            ("status", "disabled"),
        ],
    )
    .await;
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    assert!(
        disabled.body.contains("id=\"status\">disabled<"),
        "{}",
        disabled.body
    );
    assert_eq!(keys().await, keys_before);
    let audit = expect_json(
        t.owner(
            Method::GET,
            "/auditLog?resourceKind=enrollment&resourceId=dev-csrf",
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["create", "readKeys", "update", "readKeys"],
        "{audit}"
    );
    assert_eq!(
        audit[2]["changes"][0]["field"], "provisioningStatus",
        "{audit}"
    );
}

/// A session cookie names its instance, but only that instance's policy key verifies it.
async fn a_cookie_opens_only_its_own_instance(backend: Backend) {
    let t = TestServer::start(backend).await;
    let factory = expect_json(
        t.owner(Method::PUT, "/instances/factory")
            .json(&json!({ "name": "factory", "hostNames": ["factory.example.com"] }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    enroll(
        &t,
        json!({ "registrationId": "default-only", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let factory_connection = format!(
        "HostName=factory.example.com;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}",
        factory["ownerPolicy"]["primaryKey"].as_str().unwrap()
    );
    let factory_session = sign_in(&t, &[("connectionString", &factory_connection)])
        .await
        .unwrap();
    assert!(
        factory_session.starts_with("dps_console=factory~"),
        "{factory_session}"
    );
    let own = get(&t, &factory_session, "/console/enrollments").await;
    assert_eq!(own.status, 200);
    assert!(!own.body.contains("default-only"), "{}", own.body);
    // The same token presented for the default instance (same policy name there).
    let swapped = factory_session.replace("dps_console=factory~", "dps_console=default~");
    let refused = get(&t, &swapped, "/console/enrollments").await;
    assert_eq!(refused.status, 303);
    assert!(!refused.body.contains("default-only"));
    let default_session = owner_session(&t).await;
    let swapped = default_session.replace("dps_console=default~", "dps_console=factory~");
    assert_eq!(get(&t, &swapped, "/console/overview").await.status, 303);

    // An ID scope that is the console's path (or another route's) would make its devices'
    // `/{idScope}/registrations/...` reach that route: refused, nothing stored.
    for scope in ["console", "Console", "auditLog"] {
        let refused = t
            .owner(Method::PUT, "/instances/clash")
            .json(&json!({ "name": "clash", "idScope": scope }))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 400, "{scope}");
    }
    let absent = t
        .owner(Method::GET, "/instances/clash")
        .send()
        .await
        .unwrap();
    assert_eq!(absent.status(), 404);
}

/// A policy with EnrollmentRead only sees no write forms; its writes are refused by the API,
/// with nothing changed; a key read needs EnrollmentWrite, and the owner's is audited.
async fn a_read_only_policy_cannot_write(backend: Backend) {
    let t = TestServer::start(backend).await;
    enroll(
        &t,
        json!({ "registrationId": "dev-ro", "attestation": { "type": "symmetricKey" } }),
    )
    .await;
    let key = policy_with(&t, "reader", &["EnrollmentRead"]).await;
    let session = sign_in(&t, &[("policy", "reader"), ("key", &key)])
        .await
        .unwrap();
    let detail = get(&t, &session, "/console/enrollments/dev-ro").await;
    assert_eq!(detail.status, 200);
    for button in [
        "id=\"delete\"",
        "id=\"disable\"",
        "id=\"show-keys\"",
        "id=\"save\"",
    ] {
        assert!(!detail.body.contains(button), "{button}: {}", detail.body);
    }
    let list = get(&t, &session, "/console/enrollments").await;
    assert!(list.body.contains("dev-ro") && !list.body.contains("id=\"create\""));
    let token = csrf(&detail.body);
    let stored = expect_json(
        t.owner(Method::GET, "/enrollments/dev-ro")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let etag = stored["etag"].as_str().unwrap();
    for (action, form) in [
        ("delete", vec![("csrf", token.as_str()), ("etag", etag)]),
        (
            "status",
            vec![
                ("csrf", token.as_str()),
                ("etag", etag),
                ("status", "disabled"),
            ],
        ),
        ("keys", vec![("csrf", token.as_str())]),
    ] {
        let refused = post(
            &t,
            &session,
            &format!("/console/enrollments/dev-ro/{action}"),
            &form,
        )
        .await;
        assert!(
            refused.body.contains("403 403001"),
            "{action}: {}",
            refused.body
        );
        assert!(!refused.body.contains("primaryKey"), "{action}");
    }
    let created = post(
        &t,
        &session,
        "/console/enrollments",
        &[("csrf", &token), ("id", "dev-ro-2")],
    )
    .await;
    assert!(created.body.contains("403 403001"), "{}", created.body);
    let after = expect_json(
        t.owner(Method::GET, "/enrollments/dev-ro")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(after["etag"], stored["etag"], "nothing changed");
    assert_eq!(
        t.owner(Method::GET, "/enrollments/dev-ro-2")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // The owner's key read shows the keys and is in the audit log.
    let owner = owner_session(&t).await;
    let token = csrf(&get(&t, &owner, "/console/enrollments/dev-ro").await.body);
    let keys = post(
        &t,
        &owner,
        "/console/enrollments/dev-ro/keys",
        &[("csrf", &token)],
    )
    .await;
    let primary = stored["attestation"]["symmetricKey"]["primaryKey"].clone();
    assert!(primary.is_null(), "GET hides the key");
    assert!(keys.body.contains("primaryKey"), "{}", keys.body);
    let audit: Value = expect_json(
        t.owner(
            Method::GET,
            "/auditLog?resourceKind=enrollment&resourceId=dev-ro",
        )
        .send()
        .await
        .unwrap(),
        200,
    )
    .await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "readKeys"], "{audit}");
}

/// The proof-of-possession flow through the console's forms: upload a CA certificate, get a
/// verification code, upload a certificate of that name signed by the CA's key: verified.
async fn ca_certificates_are_verified_through_the_forms(backend: Backend) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let t = TestServer::start(backend).await;
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Console Root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = params.self_signed(&key).unwrap().pem();
    let issuer = Issuer::new(params, key);
    let session = owner_session(&t).await;
    let token = csrf(&get(&t, &session, "/console/certificates").await.body);
    let uploaded = post(
        &t,
        &session,
        "/console/certificates",
        &[
            ("csrf", &token),
            ("name", "console-root"),
            ("certificate", &root),
        ],
    )
    .await;
    assert!(
        uploaded.body.contains("Uploaded console-root."),
        "{}",
        uploaded.body
    );
    let stored = expect_json(
        t.owner(Method::GET, "/certificates/console-root")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(stored["isVerified"], false);
    let coded = post(
        &t,
        &session,
        "/console/certificates/console-root/code",
        &[("csrf", &token), ("etag", stored["etag"].as_str().unwrap())],
    )
    .await;
    let start = coded.body.find("<code>CN=").unwrap() + 9;
    let code = &coded.body[start..start + 32];
    let etag_at = coded.body.rfind("name=\"etag\" value=\"").unwrap() + 20;
    let etag_end = coded.body[etag_at..].find('"').unwrap() + etag_at;
    let etag = coded.body[etag_at..etag_end].replace("&#34;", "\"");
    let mut proof = CertificateParams::default();
    proof.distinguished_name.push(DnType::CommonName, code);
    let proof = proof
        .signed_by(&KeyPair::generate().unwrap(), &issuer)
        .unwrap()
        .pem();
    let verified = post(
        &t,
        &session,
        "/console/certificates/console-root/verify",
        &[("csrf", &token), ("etag", &etag), ("certificate", &proof)],
    )
    .await;
    assert!(
        verified.body.contains("console-root is verified."),
        "{}",
        verified.body
    );
    let stored = expect_json(
        t.owner(Method::GET, "/certificates/console-root")
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(stored["isVerified"], true);
}

/// The enrollment list reads one page at a time: a prefix search starts at its first match and
/// stops at its last, and a long list pages through `next` links.
async fn lists_search_by_prefix_and_page(backend: Backend) {
    let t = TestServer::start(backend).await;
    let items: Vec<Value> = ["alpha-1", "beta-1", "beta-2", "gamma-1"]
        .iter()
        .map(|id| json!({ "registrationId": id, "attestation": { "type": "symmetricKey" } }))
        .chain((0..55).map(|i| {
            json!({ "registrationId": format!("page-{i:02}"), "attestation": { "type": "symmetricKey" } })
        }))
        .collect();
    let created = expect_json(
        t.owner(Method::POST, "/enrollments")
            .json(&json!({ "mode": "create", "enrollments": items }))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(created["isSuccessful"], true, "{created}");
    let session = owner_session(&t).await;
    let found = get(&t, &session, "/console/enrollments?q=BETA").await;
    for (id, shown) in [
        ("alpha-1", false),
        ("beta-1", true),
        ("beta-2", true),
        ("gamma-1", false),
    ] {
        assert_eq!(
            found.body.contains(&format!(">{id}</a>")),
            shown,
            "{id}: {}",
            found.body
        );
    }
    assert!(!found.body.contains("id=\"next\""), "one page of matches");

    let first = get(&t, &session, "/console/enrollments?q=page-").await;
    assert_eq!(first.body.matches(">page-").count(), 50, "{}", first.body);
    let start = first.body.find("id=\"next\" href=\"").unwrap() + 16;
    let end = first.body[start..].find('"').unwrap() + start;
    let next = first.body[start..end].replace("&amp;", "&");
    let second = get(&t, &session, &next).await;
    assert_eq!(second.body.matches(">page-").count(), 5, "{}", second.body);
    assert!(second.body.contains(">page-54</a>") && !second.body.contains(">page-49</a>"));
    assert!(!second.body.contains("id=\"next\""));
}

on_both_backends!(
    lists_search_by_prefix_and_page,
    ca_certificates_are_verified_through_the_forms,
    sessions_are_strict_cookies_that_a_wrong_key_never_gets,
    attacker_text_renders_inert,
    forms_without_their_token_are_refused,
    a_cookie_opens_only_its_own_instance,
    a_read_only_policy_cannot_write,
);

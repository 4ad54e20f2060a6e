//! The console's pages: each reads what it shows from the admin API as the session's policy
//! and renders it through an askama template (every value escaped); each form posts back here,
//! is checked for its token, and becomes one API call. What the policy may not do is not
//! offered, and the API refuses it anyway.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dps_protocol::admin::Right;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::session::{Checked, Session, TokenOnly, WithToken};
use super::{Answer, Console, encode};
use crate::domain::instances;

/// Rows a listing page shows.
const PAGE: usize = 50;
/// Events the overview counts at most (pages of 1,000).
const OVERVIEW_EVENTS: usize = 10_000;

/// What every page's frame shows.
pub struct Chrome {
    title: String,
    instance: String,
    policy: String,
    csrf: String,
    messages: Vec<String>,
    errors: Vec<String>,
    can_write_enrollments: bool,
    can_write_config: bool,
}

impl Chrome {
    fn new(session: &Session, title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            instance: session.instance.clone(),
            policy: session.policy.clone(),
            csrf: session.csrf.clone(),
            messages: Vec::new(),
            errors: Vec::new(),
            can_write_enrollments: session.rights.contains(&Right::EnrollmentWrite),
            can_write_config: session.rights.contains(&Right::ServiceConfig),
        }
    }

    /// Shows the refusal of `answer`, if it is one; whether it succeeded.
    fn check(&mut self, answer: &Answer) -> bool {
        if !answer.ok() {
            self.errors.push(answer.error());
        }
        answer.ok()
    }
}

/// A rendered template (a render failure is a 500 that says nothing of the data).
pub fn html(page: &impl Template) -> Response {
    match page.render() {
        Ok(text) => Html(text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "a console page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn items(answer: &Answer) -> &[Value] {
    answer
        .json
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The paging headers of the page after `after` (a key; any text is a lower bound).
fn paging(size: usize, after: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("x-ms-max-item-count", size.to_string())];
    if let Some(after) = after.filter(|a| !a.is_empty()) {
        headers.push(("x-ms-continuation", URL_SAFE_NO_PAD.encode(after)));
    }
    headers
}

/// Whether another page follows `answer`.
fn more(answer: &Answer) -> bool {
    answer.headers.contains_key("x-ms-continuation")
}

fn time_ago(seconds: i64) -> String {
    (OffsetDateTime::now_utc() - time::Duration::seconds(seconds))
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The page forms: each carries its token in `csrf`.
macro_rules! with_token {
    ($($form:ty),*) => {
        $(impl WithToken for $form {
            fn csrf(&self) -> &str {
                &self.csrf
            }
        })*
    };
}
with_token!(CreateForm, VersionedForm, UploadForm, SimulateForm);

// ---- overview ---------------------------------------------------------------------------

struct HubRow {
    host_name: String,
    devices: String,
    health: &'static str,
    weight: String,
    applies: String,
    region: String,
    connector: String,
}

fn hub_rows(console: &Console, answer: &Answer) -> Vec<HubRow> {
    items(answer)
        .iter()
        .map(|hub| {
            let host = text(&hub["hostName"]);
            HubRow {
                health: if console.state.hub_health.is_healthy(&host) {
                    "healthy"
                } else {
                    "failing"
                },
                devices: text(&hub["deviceCount"]),
                weight: text(&hub["allocationWeight"]),
                applies: text(&hub["applyAllocationPolicy"]),
                region: text(&hub["region"]),
                connector: text(&hub["connector"]["type"]),
                host_name: host,
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    chrome: Chrome,
    id_scope: String,
    host_names: String,
    hubs: Vec<HubRow>,
    assigned: usize,
    failed: usize,
    per_minute: String,
    capped: bool,
}

/// `GET /console/overview`: the instance, its hubs, and the last hour's registrations.
pub async fn overview(State(console): State<Console>, session: Session) -> Response {
    let mut chrome = Chrome::new(&session, "Overview");
    let (id_scope, host_names) =
        match instances::load_instance(console.state.store.as_ref(), &session.instance).await {
            Ok(instance) => (
                instance.id_scope.clone().unwrap_or_default(),
                instance.host_names.join(", "),
            ),
            Err(_) => {
                chrome.errors.push("the instance could not be read".into());
                (String::new(), String::new())
            }
        };
    let hubs = console
        .call(
            &session,
            Method::GET,
            "/linkedHubs",
            &paging(1000, None),
            None,
        )
        .await;
    let hubs = if chrome.check(&hubs) {
        hub_rows(&console, &hubs)
    } else {
        Vec::new()
    };
    let (mut assigned, mut failed, mut seen, mut after) = (0, 0, 0, None::<String>);
    let path = format!("/events?from={}", encode(&time_ago(3600)));
    let capped = loop {
        let page = console
            .call(
                &session,
                Method::GET,
                &path,
                &paging(1000, after.as_deref()),
                None,
            )
            .await;
        if !chrome.check(&page) {
            break false;
        }
        for event in items(&page) {
            match event["kind"].as_str() {
                Some("registration.assigned" | "registration.moved") => assigned += 1,
                Some("registration.failed" | "registration.disabled") => failed += 1,
                _ => {}
            }
        }
        seen += items(&page).len();
        after = items(&page).last().map(|e| text(&e["id"]));
        if !more(&page) {
            break false;
        }
        if seen >= OVERVIEW_EVENTS {
            break true;
        }
    };
    let page = OverviewPage {
        chrome,
        id_scope,
        host_names,
        hubs,
        per_minute: format!("{:.1}", assigned as f64 / 60.0),
        assigned,
        failed,
        capped,
    };
    html(&page)
}

// ---- enrollments and groups -------------------------------------------------------------

/// Individual enrollments or enrollment groups, by the path's `{kind}`.
#[derive(Clone, Copy)]
struct Kind {
    path: &'static str,
    id_field: &'static str,
    noun: &'static str,
    title: &'static str,
}

const KINDS: [Kind; 2] = [
    Kind {
        path: "enrollments",
        id_field: "registrationId",
        noun: "enrollment",
        title: "Enrollments",
    },
    Kind {
        path: "enrollmentGroups",
        id_field: "enrollmentGroupId",
        noun: "enrollment group",
        title: "Enrollment groups",
    },
];

fn kind_of(path: &str) -> Option<Kind> {
    KINDS.into_iter().find(|k| k.path == path)
}

fn no_such_page() -> Response {
    (StatusCode::NOT_FOUND, "no such page").into_response()
}

struct EnrollmentRow {
    id: String,
    link: String,
    attestation: String,
    status: String,
    hubs: String,
    policy: String,
}

#[derive(Template)]
#[template(path = "console/enrollments.html")]
struct EnrollmentsPage {
    chrome: Chrome,
    kind: &'static str,
    noun: &'static str,
    q: String,
    rows: Vec<EnrollmentRow>,
    next: Option<String>,
}

/// The query of a listing page.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    after: String,
}

/// The key just below every key that starts with `prefix` (ids are ASCII below DEL), so
/// that a listing after it starts at the first match.
fn before_prefix(prefix: &str) -> Option<String> {
    let mut bytes = prefix.to_ascii_lowercase().into_bytes();
    let last = bytes.pop()?;
    bytes.push(last.checked_sub(1)?);
    bytes.push(0x7f);
    String::from_utf8(bytes).ok()
}

/// `GET /console/{kind}?q=&after=`: a page of ids in order, from the first that starts with
/// `q` (a search that reads one page, whatever the number of enrollments).
pub async fn enrollment_list(
    State(console): State<Console>,
    session: Session,
    Path(kind): Path<String>,
    Query(query): Query<ListQuery>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let mut chrome = Chrome::new(&session, kind.title);
    let after = match (query.after.is_empty(), query.q.is_empty()) {
        (false, _) => Some(query.after.clone()),
        (true, false) => before_prefix(&query.q),
        (true, true) => None,
    };
    let answer = console
        .call(
            &session,
            Method::POST,
            &format!("/{}/query", kind.path),
            &paging(PAGE, after.as_deref()),
            Some(&json!({ "query": "SELECT * FROM enrollments" })),
        )
        .await;
    let mut rows = Vec::new();
    let mut ended = !more(&answer);
    if chrome.check(&answer) {
        let prefix = query.q.to_ascii_lowercase();
        for item in items(&answer) {
            let id = text(&item[kind.id_field]);
            if !id.to_ascii_lowercase().starts_with(&prefix) {
                ended = true;
                break;
            }
            let hubs: Vec<String> = item["iotHubs"]
                .as_array()
                .map(|h| h.iter().map(text).collect())
                .unwrap_or_default();
            rows.push(EnrollmentRow {
                link: encode(&id),
                attestation: text(&item["attestation"]["type"]),
                status: text(&item["provisioningStatus"]),
                hubs: hubs.join(", "),
                policy: text(&item["allocationPolicy"]),
                id,
            });
        }
    }
    let next = match (ended, rows.last()) {
        (false, Some(last)) => Some(last.id.to_ascii_lowercase()),
        _ => None,
    };
    html(&EnrollmentsPage {
        chrome,
        kind: kind.path,
        noun: kind.noun,
        q: query.q,
        rows,
        next,
    })
}

/// The create form's fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateForm {
    #[serde(default)]
    csrf: String,
    id: String,
    #[serde(default)]
    hubs: String,
    #[serde(default)]
    allocation_policy: String,
}

/// `POST /console/{kind}`: a new symmetric-key enrollment or group (keys generated).
pub async fn enrollment_create(
    State(console): State<Console>,
    Path(kind): Path<String>,
    Checked { session, form }: Checked<CreateForm>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let id = form.id.trim().to_owned();
    let mut body = json!({ kind.id_field: id, "attestation": { "type": "symmetricKey" } });
    let hubs: Vec<&str> = form
        .hubs
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if !hubs.is_empty() {
        body["iotHubs"] = json!(hubs);
    }
    if !form.allocation_policy.is_empty() {
        body["allocationPolicy"] = json!(form.allocation_policy);
    }
    let answer = console
        .call(
            &session,
            Method::PUT,
            &format!("/{}/{}", kind.path, encode(&id)),
            &[],
            Some(&body),
        )
        .await;
    if answer.ok() {
        return Redirect::to(&format!("/console/{}/{}", kind.path, encode(&id))).into_response();
    }
    let mut chrome = Chrome::new(&session, kind.title);
    chrome.errors.push(answer.error());
    html(&EnrollmentsPage {
        chrome,
        kind: kind.path,
        noun: kind.noun,
        q: String::new(),
        rows: Vec::new(),
        next: None,
    })
}

#[derive(Template)]
#[template(path = "console/enrollment.html")]
struct EnrollmentPage {
    chrome: Chrome,
    kind: &'static str,
    noun: &'static str,
    id: String,
    link: String,
    etag: String,
    status: String,
    document: String,
    keys: Option<String>,
}

/// Reads an enrollment and renders its page, with `chrome`'s messages and, when given, its
/// keys.
async fn enrollment_view(
    console: &Console,
    session: &Session,
    kind: Kind,
    id: &str,
    mut chrome: Chrome,
    keys: Option<String>,
) -> Response {
    let answer = console
        .call(
            session,
            Method::GET,
            &format!("/{}/{}", kind.path, encode(id)),
            &[],
            None,
        )
        .await;
    let status = answer.status;
    chrome.check(&answer);
    let mut document = answer.json.clone();
    let etag = text(&document["etag"]);
    if let Value::Object(fields) = &mut document {
        for bookkeeping in ["etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc"] {
            fields.remove(bookkeeping);
        }
    }
    let provisioning = match text(&answer.json["provisioningStatus"]) {
        s if s.is_empty() => "enabled".to_owned(),
        s => s,
    };
    let page = EnrollmentPage {
        chrome,
        kind: kind.path,
        noun: kind.noun,
        link: encode(id),
        id: id.to_owned(),
        etag,
        status: provisioning,
        document: if status.is_success() {
            pretty(&document)
        } else {
            String::new()
        },
        keys,
    };
    let mut response = html(&page);
    if !status.is_success() {
        *response.status_mut() = status;
    }
    response
}

/// `GET /console/{kind}/{id}`: the enrollment (without keys), with its actions.
pub async fn enrollment_page(
    State(console): State<Console>,
    session: Session,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let chrome = Chrome::new(&session, format!("{} {id}", kind.noun));
    enrollment_view(&console, &session, kind, &id, chrome, None).await
}

/// The fields of a form that acts on a version of a record.
#[derive(Debug, Deserialize)]
pub struct VersionedForm {
    #[serde(default)]
    csrf: String,
    etag: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    document: String,
}

/// `POST /console/{kind}/{id}/status`: enables or disables it (the etag the page showed must
/// still be the stored one).
pub async fn enrollment_status(
    State(console): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    Checked { session, form }: Checked<VersionedForm>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let mut chrome = Chrome::new(&session, format!("{} {id}", kind.noun));
    let path = format!("/{}/{}", kind.path, encode(&id));
    let current = console.call(&session, Method::GET, &path, &[], None).await;
    if chrome.check(&current) {
        let mut document = current.json;
        let status = if form.status == "disabled" {
            "disabled"
        } else {
            "enabled"
        };
        document["provisioningStatus"] = json!(status);
        let saved = console
            .call(
                &session,
                Method::PUT,
                &path,
                &[("if-match", form.etag)],
                Some(&document),
            )
            .await;
        if chrome.check(&saved) {
            chrome.messages.push(format!("Now {status}."));
        }
    }
    enrollment_view(&console, &session, kind, &id, chrome, None).await
}

/// `POST /console/{kind}/{id}/edit`: replaces it with the edited document, at the version
/// the page showed.
pub async fn enrollment_edit(
    State(console): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    Checked { session, form }: Checked<VersionedForm>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let mut chrome = Chrome::new(&session, format!("{} {id}", kind.noun));
    match serde_json::from_str::<Value>(&form.document) {
        Ok(document) => {
            let saved = console
                .call(
                    &session,
                    Method::PUT,
                    &format!("/{}/{}", kind.path, encode(&id)),
                    &[("if-match", form.etag)],
                    Some(&document),
                )
                .await;
            if chrome.check(&saved) {
                chrome.messages.push("Saved.".into());
            }
        }
        Err(e) => chrome.errors.push(format!("The document is not JSON: {e}")),
    }
    enrollment_view(&console, &session, kind, &id, chrome, None).await
}

/// `POST /console/{kind}/{id}/keys`: the page with its attestation and keys (the read is in
/// the audit log).
pub async fn enrollment_keys(
    State(console): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    Checked { session, .. }: Checked<TokenOnly>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let mut chrome = Chrome::new(&session, format!("{} {id}", kind.noun));
    let answer = console
        .call(
            &session,
            Method::POST,
            &format!("/{}/{}/attestationmechanism", kind.path, encode(&id)),
            &[],
            None,
        )
        .await;
    let keys = chrome.check(&answer).then(|| pretty(&answer.json));
    enrollment_view(&console, &session, kind, &id, chrome, keys).await
}

/// `POST /console/{kind}/{id}/delete`: deletes it, at the version the page showed.
pub async fn enrollment_delete(
    State(console): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    Checked { session, form }: Checked<VersionedForm>,
) -> Response {
    let Some(kind) = kind_of(&kind) else {
        return no_such_page();
    };
    let answer = console
        .call(
            &session,
            Method::DELETE,
            &format!("/{}/{}", kind.path, encode(&id)),
            &[("if-match", form.etag)],
            None,
        )
        .await;
    if answer.ok() {
        return Redirect::to(&format!("/console/{}", kind.path)).into_response();
    }
    let mut chrome = Chrome::new(&session, format!("{} {id}", kind.noun));
    chrome.errors.push(answer.error());
    enrollment_view(&console, &session, kind, &id, chrome, None).await
}

// ---- registrations, hubs, certificates ---------------------------------------------------

struct RegistrationRow {
    id: String,
    status: String,
    hub: String,
    device: String,
    error: String,
    updated: String,
}

fn registration_row(state: &Value) -> RegistrationRow {
    let error = match state["errorCode"].as_i64() {
        Some(code) => format!("{code} {}", text(&state["errorMessage"])),
        None => String::new(),
    };
    RegistrationRow {
        id: text(&state["registrationId"]),
        status: text(&state["status"]),
        hub: text(&state["assignedHub"]),
        device: text(&state["deviceId"]),
        error,
        updated: text(&state["lastUpdatedDateTimeUtc"]),
    }
}

#[derive(Template)]
#[template(path = "console/registrations.html")]
struct RegistrationsPage {
    chrome: Chrome,
    id: String,
    group: String,
    rows: Vec<RegistrationRow>,
    next: Option<String>,
}

/// The query of the registrations page.
#[derive(Debug, Default, Deserialize)]
pub struct RegistrationQuery {
    #[serde(default)]
    id: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    after: String,
}

/// `GET /console/registrations?id=` or `?group=`: one device's registration state, or a page
/// of a group's.
pub async fn registrations(
    State(console): State<Console>,
    session: Session,
    Query(query): Query<RegistrationQuery>,
) -> Response {
    let mut chrome = Chrome::new(&session, "Registrations");
    let mut rows = Vec::new();
    let mut next = None;
    if !query.id.trim().is_empty() {
        let answer = console
            .call(
                &session,
                Method::GET,
                &format!("/registrations/{}", encode(query.id.trim())),
                &[],
                None,
            )
            .await;
        if chrome.check(&answer) {
            rows.push(registration_row(&answer.json));
        }
    } else if !query.group.trim().is_empty() {
        let answer = console
            .call(
                &session,
                Method::POST,
                &format!("/registrations/{}/query", encode(query.group.trim())),
                &paging(PAGE, Some(&query.after)),
                Some(&json!({ "query": "*" })),
            )
            .await;
        if chrome.check(&answer) {
            rows = items(&answer).iter().map(registration_row).collect();
            if more(&answer) {
                next = rows.last().map(|r| r.id.to_ascii_lowercase());
            }
        }
    }
    html(&RegistrationsPage {
        chrome,
        id: query.id,
        group: query.group,
        rows,
        next,
    })
}

#[derive(Template)]
#[template(path = "console/hubs.html")]
struct HubsPage {
    chrome: Chrome,
    hubs: Vec<HubRow>,
}

/// `GET /console/hubs`: the linked hubs with their device counts and health.
pub async fn hubs(State(console): State<Console>, session: Session) -> Response {
    let mut chrome = Chrome::new(&session, "Linked hubs");
    let answer = console
        .call(
            &session,
            Method::GET,
            "/linkedHubs",
            &paging(1000, None),
            None,
        )
        .await;
    let hubs = if chrome.check(&answer) {
        hub_rows(&console, &answer)
    } else {
        Vec::new()
    };
    html(&HubsPage { chrome, hubs })
}

struct CertificateRow {
    name: String,
    link: String,
    subject: String,
    verified: &'static str,
    is_verified: bool,
    expiry: String,
    etag: String,
}

struct PendingCode {
    name: String,
    link: String,
    code: String,
    etag: String,
}

#[derive(Template)]
#[template(path = "console/certificates.html")]
struct CertificatesPage {
    chrome: Chrome,
    rows: Vec<CertificateRow>,
    code: Option<PendingCode>,
}

async fn certificates_view(
    console: &Console,
    session: &Session,
    mut chrome: Chrome,
    code: Option<PendingCode>,
) -> Response {
    let answer = console
        .call(
            session,
            Method::GET,
            "/certificates",
            &paging(1000, None),
            None,
        )
        .await;
    let rows = if chrome.check(&answer) {
        items(&answer)
            .iter()
            .map(|c| {
                let name = text(&c["name"]);
                let verified = c["isVerified"].as_bool().unwrap_or(false);
                CertificateRow {
                    link: encode(&name),
                    subject: text(&c["info"]["subjectName"]),
                    verified: if verified { "yes" } else { "no" },
                    is_verified: verified,
                    expiry: text(&c["info"]["notAfterUtc"]),
                    etag: text(&c["etag"]),
                    name,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    html(&CertificatesPage { chrome, rows, code })
}

/// `GET /console/certificates`: CA certificates for `caReferences`, with proof of possession.
pub async fn certificates(State(console): State<Console>, session: Session) -> Response {
    let chrome = Chrome::new(&session, "CA certificates");
    certificates_view(&console, &session, chrome, None).await
}

/// The upload form's fields.
#[derive(Debug, Deserialize)]
pub struct UploadForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    certificate: String,
    #[serde(default)]
    etag: String,
}

/// `POST /console/certificates`: uploads a CA certificate (it starts unverified).
pub async fn certificate_upload(
    State(console): State<Console>,
    Checked { session, form }: Checked<UploadForm>,
) -> Response {
    let mut chrome = Chrome::new(&session, "CA certificates");
    let name = form.name.trim();
    let answer = console
        .call(
            &session,
            Method::PUT,
            &format!("/certificates/{}", encode(name)),
            &[],
            Some(&json!({ "name": name, "certificate": form.certificate })),
        )
        .await;
    if chrome.check(&answer) {
        chrome.messages.push(format!("Uploaded {name}."));
    }
    certificates_view(&console, &session, chrome, None).await
}

/// `POST /console/certificates/{name}/code`: a verification code for proof of possession.
pub async fn certificate_code(
    State(console): State<Console>,
    Path(name): Path<String>,
    Checked { session, form }: Checked<VersionedForm>,
) -> Response {
    let mut chrome = Chrome::new(&session, "CA certificates");
    let answer = console
        .call(
            &session,
            Method::POST,
            &format!("/certificates/{}/generateVerificationCode", encode(&name)),
            &[("if-match", form.etag)],
            None,
        )
        .await;
    let code = chrome.check(&answer).then(|| PendingCode {
        link: encode(&name),
        code: text(&answer.json["verificationCode"]),
        etag: text(&answer.json["etag"]),
        name: name.clone(),
    });
    certificates_view(&console, &session, chrome, code).await
}

/// `POST /console/certificates/{name}/verify`: proves possession with a certificate whose
/// subject is the code, signed by the CA's key.
pub async fn certificate_verify(
    State(console): State<Console>,
    Path(name): Path<String>,
    Checked { session, form }: Checked<UploadForm>,
) -> Response {
    let mut chrome = Chrome::new(&session, "CA certificates");
    let answer = console
        .call(
            &session,
            Method::POST,
            &format!("/certificates/{}/verify", encode(&name)),
            &[("if-match", form.etag)],
            Some(&json!({ "certificate": form.certificate })),
        )
        .await;
    if chrome.check(&answer) {
        chrome.messages.push(format!("{name} is verified."));
    }
    certificates_view(&console, &session, chrome, None).await
}

// ---- dry-run, events, audit --------------------------------------------------------------

#[derive(Template)]
#[template(path = "console/simulate.html")]
struct SimulatePage {
    chrome: Chrome,
    registration_id: String,
    group_id: String,
    result: Option<String>,
}

/// `GET /console/simulate`: the allocation dry-run's form.
pub async fn simulate_form(session: Session) -> Response {
    html(&SimulatePage {
        chrome: Chrome::new(&session, "Allocation dry-run"),
        registration_id: String::new(),
        group_id: String::new(),
        result: None,
    })
}

/// The dry-run form's fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulateForm {
    #[serde(default)]
    csrf: String,
    registration_id: String,
    #[serde(default)]
    enrollment_group_id: String,
}

/// `POST /console/simulate`: which hub each policy would choose for the device, and why.
pub async fn simulate(
    State(console): State<Console>,
    Checked { session, form }: Checked<SimulateForm>,
) -> Response {
    let mut chrome = Chrome::new(&session, "Allocation dry-run");
    let mut body = json!({ "registrationId": form.registration_id.trim() });
    if !form.enrollment_group_id.trim().is_empty() {
        body["enrollmentGroupId"] = json!(form.enrollment_group_id.trim());
    }
    let answer = console
        .call(
            &session,
            Method::POST,
            "/allocations:simulate",
            &[],
            Some(&body),
        )
        .await;
    let result = chrome.check(&answer).then(|| pretty(&answer.json));
    html(&SimulatePage {
        chrome,
        registration_id: form.registration_id,
        group_id: form.enrollment_group_id,
        result,
    })
}

struct EventRow {
    time: String,
    kind: String,
    registration_id: String,
    hub: String,
    error: String,
}

#[derive(Template)]
#[template(path = "console/events.html")]
struct EventsPage {
    chrome: Chrome,
    rows: Vec<EventRow>,
}

/// `GET /console/events`: the last quarter hour's events, and the new ones as they come.
pub async fn events(State(console): State<Console>, session: Session) -> Response {
    let mut chrome = Chrome::new(&session, "Registration events");
    let path = format!("/events?from={}", encode(&time_ago(900)));
    let answer = console
        .call(&session, Method::GET, &path, &paging(200, None), None)
        .await;
    let mut rows: Vec<EventRow> = if chrome.check(&answer) {
        items(&answer)
            .iter()
            .map(|e| EventRow {
                time: text(&e["time"]),
                kind: text(&e["kind"]),
                registration_id: text(&e["registrationId"]),
                hub: text(&e["assignedHub"]),
                error: match e["errorCode"].as_i64() {
                    Some(code) => format!("{code} {}", text(&e["errorMessage"])),
                    None => String::new(),
                },
            })
            .collect()
    } else {
        Vec::new()
    };
    rows.reverse();
    html(&EventsPage { chrome, rows })
}

/// `GET /console/events/stream`: the API's live stream, for the page's `EventSource` (which
/// cannot send an `Authorization` header).
pub async fn event_stream(State(console): State<Console>, session: Session) -> Response {
    match console
        .send(&session, Method::GET, "/events/stream", &[], None)
        .await
    {
        Ok(response) => response,
        Err(status) => status.into_response(),
    }
}

struct AuditRow {
    time: String,
    action: String,
    kind: String,
    id: String,
    policy: String,
    request: String,
    changes: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    chrome: Chrome,
    resource_kind: String,
    resource_id: String,
    policy: String,
    from: String,
    rows: Vec<AuditRow>,
    next: Option<String>,
}

/// The audit page's filters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditQuery {
    #[serde(default)]
    resource_kind: String,
    #[serde(default)]
    resource_id: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    after: String,
}

/// `GET /console/audit`: the audit log from `from` (the last day by default), filtered, paged.
pub async fn audit(
    State(console): State<Console>,
    session: Session,
    Query(mut query): Query<AuditQuery>,
) -> Response {
    let mut chrome = Chrome::new(&session, "Audit log");
    if query.from.trim().is_empty() {
        query.from = time_ago(86_400);
    }
    let filters: Vec<String> = [
        ("resourceKind", &query.resource_kind),
        ("resourceId", &query.resource_id),
        ("policy", &query.policy),
        ("from", &query.from),
    ]
    .into_iter()
    .filter(|(_, value)| !value.trim().is_empty())
    .map(|(name, value)| format!("{name}={}", encode(value.trim())))
    .collect();
    let answer = console
        .call(
            &session,
            Method::GET,
            &format!("/auditLog?{}", filters.join("&")),
            &paging(PAGE, Some(&query.after)),
            None,
        )
        .await;
    let mut rows = Vec::new();
    let mut next = None;
    if chrome.check(&answer) {
        rows = items(&answer)
            .iter()
            .map(|e| AuditRow {
                time: text(&e["time"]),
                action: text(&e["action"]),
                kind: text(&e["resourceKind"]),
                id: text(&e["resourceId"]),
                policy: text(&e["policy"]),
                request: text(&e["requestId"]),
                changes: e["changes"]
                    .as_array()
                    .map(|changes| {
                        changes
                            .iter()
                            .map(|c| {
                                format!(
                                    "{}: {} → {}",
                                    text(&c["field"]),
                                    text(&c["old"]),
                                    text(&c["new"])
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default(),
            })
            .collect();
        if more(&answer)
            && let Some(last) = items(&answer).last()
        {
            next = Some(format!(
                "/console/audit?{}&after={}",
                filters.join("&"),
                encode(&text(&last["id"]))
            ));
        }
    }
    html(&AuditPage {
        chrome,
        resource_kind: query.resource_kind,
        resource_id: query.resource_id,
        policy: query.policy,
        from: query.from,
        rows,
        next,
    })
}

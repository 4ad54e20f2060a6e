//! Registration events: each outcome of a registration (assigned, moved to another hub,
//! failed, disabled) becomes an event, written in the transaction that records the outcome, so
//! that there is no event of an outcome that rolled back and no outcome without its event.
//! Admins read them with filters (`GET /events`); they are swept after
//! `events.retention_days`.

use dps_protocol::admin::Event;
use dps_protocol::device::OperationStatus;
use dps_protocol::ids::{EnrollmentGroupId, RegistrationId};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::records::{EnrollmentRef, OperationRecord};
use super::validate::field_error;
use super::{DomainError, to_doc};
use crate::state::AppState;
use crate::store::{
    Columns, EventFilter, Kind, Precondition, Stored, Write, event_key_at, new_log_key,
};

/// The storage form of an enrollment an event names.
fn enrollment_column(enrollment: &EnrollmentRef) -> String {
    match enrollment {
        EnrollmentRef::Individual(id) => format!("enrollment:{}", id.to_ascii_lowercase()),
        EnrollmentRef::Group(id) => format!("group:{}", id.to_ascii_lowercase()),
    }
}

/// The event of operation `op`'s outcome, for the transaction that records it; `None` when
/// events are off or the operation has not ended. `previous_hub` is where the device was
/// assigned before.
pub fn of_outcome(
    retention: Option<i64>,
    ns: &str,
    op: &OperationRecord,
    previous_hub: Option<&str>,
) -> Result<Option<Write>, DomainError> {
    let Some(retention) = retention else {
        return Ok(None);
    };
    let empty = Default::default();
    let state: &dps_protocol::enrollment::DeviceRegistrationState =
        op.registration_state.as_ref().unwrap_or(&empty);
    let moved = match (previous_hub, state.assigned_hub.as_deref()) {
        (Some(before), Some(now)) => !before.eq_ignore_ascii_case(now),
        _ => false,
    };
    let kind = match op.status {
        OperationStatus::Assigned if moved => "registration.moved",
        OperationStatus::Assigned => "registration.assigned",
        OperationStatus::Failed => "registration.failed",
        OperationStatus::Disabled => "registration.disabled",
        _ => return Ok(None),
    };
    let now = OffsetDateTime::now_utc();
    let key = new_log_key(now);
    let (enrollment_id, enrollment_group_id) = match &op.enrollment {
        EnrollmentRef::Individual(id) => (Some(id.clone()), None),
        EnrollmentRef::Group(id) => (None, Some(id.clone())),
    };
    let assigned = op.status == OperationStatus::Assigned;
    let event = Event {
        id: key.clone(),
        kind: kind.to_owned(),
        time: now.format(&Rfc3339).unwrap_or_default(),
        registration_id: op.registration_id.clone(),
        operation_id: Some(op.operation_id.clone()),
        enrollment_id,
        enrollment_group_id,
        attestation_type: op.attestation.clone(),
        transport: op.transport.clone(),
        assigned_hub: state.assigned_hub.clone().filter(|_| assigned),
        previous_hub: previous_hub.filter(|_| moved).map(str::to_owned),
        substatus: state.substatus.clone().filter(|_| assigned),
        error_code: state.error_code.filter(|_| !assigned),
        error_message: state.error_message.clone().filter(|_| !assigned),
    };
    Ok(Some(Write::Put {
        ns: ns.to_owned(),
        kind: Kind::Event,
        key,
        columns: Columns::Event {
            kind: kind.to_owned(),
            registration: Some(op.registration_id.to_ascii_lowercase()),
            enrollment: Some(enrollment_column(&op.enrollment)),
            expires_at: now.unix_timestamp().saturating_add(retention),
        },
        doc: to_doc(&event)?,
        precondition: Precondition::MustNotExist,
        etag: None,
    }))
}

/// What an admin filters events by (each given one must match): the query parameters of
/// `GET /events`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Query {
    /// The event kind.
    pub kind: Option<String>,
    /// The device.
    pub registration_id: Option<String>,
    /// The individual enrollment.
    pub enrollment_id: Option<String>,
    /// The enrollment group.
    pub enrollment_group_id: Option<String>,
    /// From this time on (RFC 3339).
    pub from: Option<String>,
    /// Before this time (RFC 3339).
    pub to: Option<String>,
    /// Sent by Azure's clients with every request; ignored.
    #[serde(default, rename = "api-version")]
    pub api_version: Option<String>,
}

/// The kinds of events.
pub const KINDS: [&str; 4] = [
    "registration.assigned",
    "registration.moved",
    "registration.failed",
    "registration.disabled",
];

/// The start of the millisecond `text` (RFC 3339) names, as an event key.
pub fn time_key(field: &str, text: &str) -> Result<String, DomainError> {
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| field_error(field, "an RFC 3339 time, e.g. 2026-12-01T12:00:00Z"))?;
    // Keys are 13 digits of milliseconds: up to the year 2286.
    let millis = i64::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .ok()
        .filter(|ms| (0..=9_999_999_999_999).contains(ms))
        .ok_or_else(|| field_error(field, "a time between 1970 and 2286"))?;
    Ok(event_key_at(millis))
}

/// A page of the events of instance `ns` that match `query`, after `after`.
pub async fn list(
    state: &AppState,
    ns: &str,
    query: &Query,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Stored>, DomainError> {
    let filter = filter_of(query)?;
    Ok(state.store.list_events(ns, &filter, after, limit).await?)
}

/// The storage filter of `query`, its values checked.
pub fn filter_of(query: &Query) -> Result<EventFilter, DomainError> {
    if let Some(kind) = &query.kind
        && !KINDS.contains(&kind.as_str())
    {
        return Err(field_error("kind", format!("one of {}", KINDS.join(", "))));
    }
    let registration = query
        .registration_id
        .as_deref()
        .map(|id| {
            RegistrationId::parse(id)
                .map(|r| r.key())
                .map_err(|e| field_error("registrationId", e.to_string()))
        })
        .transpose()?;
    let enrollment = match (&query.enrollment_id, &query.enrollment_group_id) {
        (Some(_), Some(_)) => {
            return Err(field_error(
                "enrollmentId",
                "give enrollmentId or enrollmentGroupId, not both",
            ));
        }
        (Some(id), None) => Some(enrollment_column(&EnrollmentRef::Individual(
            RegistrationId::parse(id)
                .map_err(|e| field_error("enrollmentId", e.to_string()))?
                .as_str()
                .to_owned(),
        ))),
        (None, Some(id)) => Some(enrollment_column(&EnrollmentRef::Group(
            EnrollmentGroupId::parse(id)
                .map_err(|e| field_error("enrollmentGroupId", e.to_string()))?
                .as_str()
                .to_owned(),
        ))),
        (None, None) => None,
    };
    Ok(EventFilter {
        kind: query.kind.clone(),
        registration,
        enrollment,
        from: query
            .from
            .as_deref()
            .map(|t| time_key("from", t))
            .transpose()?,
        to: query.to.as_deref().map(|t| time_key("to", t)).transpose()?,
    })
}

/// Whether `id` has the shape of an event id (13 digits of milliseconds, `-`, 12 hex digits).
pub fn is_event_id(id: &str) -> bool {
    let (millis, suffix) = id.split_once('-').unwrap_or((id, ""));
    millis.len() == 13
        && millis.bytes().all(|b| b.is_ascii_digit())
        && suffix.len() == 12
        && suffix
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key of the millisecond `delay` before now.
pub fn key_before_now(delay: std::time::Duration) -> String {
    let now = OffsetDateTime::now_utc() - delay;
    let millis = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    event_key_at(millis)
}

/// The key after which a live stream starts: the event a reconnecting client saw last
/// (`Last-Event-ID`), else the filter's `from`, else now (only new events).
pub fn stream_start(last_seen: Option<&str>, filter: &EventFilter) -> String {
    match (last_seen, &filter.from) {
        (Some(id), _) => id.to_owned(),
        // Every key of `from`'s millisecond sorts after this one.
        (None, Some(from)) => from.clone(),
        (None, None) => key_before_now(std::time::Duration::ZERO),
    }
}

/// A stored event.
pub fn render(stored: &Stored) -> Result<Event, DomainError> {
    stored.doc_json()
}

/// Checks `events.webhook_url`: an absolute http or https URL.
pub fn webhook_url(url: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        url.starts_with("https://") || url.starts_with("http://"),
        "events.webhook_url must be an http(s) URL"
    );
    Ok(url.to_owned())
}

/// Hands the events among `writes`, a transaction that committed, to the webhook.
pub fn committed(state: &AppState, writes: &[Write]) {
    if let Some(webhook) = &state.event_webhook {
        webhook.committed(writes);
    }
}

//! The audit log of admin writes. The admin edge names who is calling ([`identify`], inside
//! [`serving`]); from then on every write the request makes through the [`Store`] adds an
//! audit entry to its own transaction: which record, created, updated or deleted, and what
//! changed field by field, with secrets replaced by [`SECRET`]. No write path can forget it,
//! and an entry commits or rolls back with its change. Key reads are recorded with
//! [`super::Write::KeysRead`].
//!
//! [`Store`]: super::Store

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use dps_protocol::admin::{AuditChange, AuditEntry};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Columns, Kind, SERVER_NS, new_log_key};

/// What a secret's value is shown as.
pub const SECRET: &str = "***";
/// Strings longer than this (certificates, large tags) are shown by their length and hash.
const LONGEST_VALUE: usize = 256;
/// Fields that change with every write and say nothing an entry's own time does not.
const BOOKKEEPING: [&str; 3] = ["etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc"];
/// Field names (lower-case) whose values are secrets wherever they appear.
const SECRET_FIELDS: [&str; 7] = [
    "primarykey",
    "secondarykey",
    "connectionstring",
    "authenticationkey",
    "sharedaccesskey",
    "privatekey",
    "pin",
];

/// Who makes the writes of a request: the shared access policy that signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The instance the policy belongs to: its entries go there (and those of server-wide
    /// records, instances, too).
    pub instance: String,
    /// The policy's key name.
    pub policy: String,
    /// The request's id.
    pub request_id: Option<String>,
}

tokio::task_local! {
    static ACTOR: Arc<OnceLock<Actor>>;
}

/// Runs `request` able to name its actor: the writes it makes after [`identify`] are audited.
pub async fn serving<F: Future>(request: F) -> F::Output {
    ACTOR.scope(Arc::new(OnceLock::new()), request).await
}

/// Names the caller of the request being served (the first one named stays); outside
/// [`serving`], nothing.
pub fn identify(actor: Actor) {
    let _ = ACTOR.try_with(|slot| slot.set(actor));
}

/// The caller of the request being served, once identified.
pub(super) fn actor() -> Option<Actor> {
    ACTOR.try_with(|slot| slot.get().cloned()).ok().flatten()
}

/// What an entry says was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Create,
    Update,
    Delete,
    /// Written in bulk without reading what was there (created or replaced).
    Import,
    ReadKeys,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Import => "import",
            Action::ReadKeys => "readKeys",
        }
    }

    /// The action of a write that found `old` and left `new`; `None` when nothing was there
    /// and nothing is (a purge of nothing).
    pub(super) fn of(old: Option<&str>, new: Option<&str>) -> Option<Action> {
        match (old, new) {
            (None, Some(_)) => Some(Action::Create),
            (Some(_), Some(_)) => Some(Action::Update),
            (Some(_), None) => Some(Action::Delete),
            (None, None) => None,
        }
    }
}

/// An audit entry, ready to insert: its namespace, key, columns and document.
pub(super) struct Row {
    pub ns: String,
    pub key: String,
    pub columns: Columns,
    pub doc: String,
}

/// The entry of `actor`'s `action` on record (`ns`, `kind`, `key`), which held `old` and now
/// holds `new` (JSON documents).
pub(super) fn entry(
    actor: &Actor,
    ns: &str,
    kind: Kind,
    key: &str,
    action: Action,
    old: Option<&str>,
    new: Option<&str>,
) -> Row {
    let now = OffsetDateTime::now_utc();
    let id = new_log_key(now);
    let doc = AuditEntry {
        id: id.clone(),
        time: now.format(&Rfc3339).unwrap_or_default(),
        action: action.as_str().to_owned(),
        resource_kind: kind.as_str().to_owned(),
        resource_id: key.to_owned(),
        policy: actor.policy.clone(),
        policy_instance: actor.instance.clone(),
        request_id: actor.request_id.clone(),
        changes: changes(old, new),
    };
    Row {
        // Server-wide records (instances) are the admin instance's to audit.
        ns: if ns == SERVER_NS {
            actor.instance.clone()
        } else {
            ns.to_owned()
        },
        key: id,
        columns: Columns::Audit {
            resource_kind: kind.as_str().to_owned(),
            resource_id: key.to_owned(),
            policy: actor.policy.to_ascii_lowercase(),
        },
        // Serialising plain strings and JSON values cannot fail.
        doc: serde_json::to_string(&doc).unwrap_or_default(),
    }
}

/// The fields that differ between two documents, by dotted path, their values masked.
fn changes(old: Option<&str>, new: Option<&str>) -> Vec<AuditChange> {
    let fields = |doc: Option<&str>| {
        let mut out = BTreeMap::new();
        if let Some(value) = doc.and_then(|d| serde_json::from_str::<Value>(d).ok()) {
            flatten("", &value, &mut out);
        }
        out
    };
    let (mut before, mut after) = (fields(old), fields(new));
    let paths: std::collections::BTreeSet<String> =
        before.keys().chain(after.keys()).cloned().collect();
    paths
        .into_iter()
        .filter_map(|field| {
            let (old, new) = (before.remove(&field), after.remove(&field));
            (old != new).then(|| AuditChange {
                old: old.map(|v| shown(&field, v)),
                new: new.map(|v| shown(&field, v)),
                field,
            })
        })
        .collect()
}

/// The leaves of `value` by dotted path: objects are walked, anything else (arrays too) is a
/// leaf; bookkeeping fields are left out.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (name, value) in fields {
                if BOOKKEEPING.contains(&name.as_str()) {
                    continue;
                }
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&path, value, out);
            }
        }
        Value::Null => {}
        leaf => {
            out.insert(prefix.to_owned(), leaf.clone());
        }
    }
}

/// Whether the field at `path` holds a secret.
fn is_secret_field(path: &str) -> bool {
    let name = path.rsplit('.').next().unwrap_or(path).to_ascii_lowercase();
    SECRET_FIELDS.contains(&name.as_str())
        || ["secret", "password", "token"]
            .iter()
            .any(|word| name.contains(word))
}

/// What an entry shows of the value at `path`.
fn shown(path: &str, value: Value) -> Value {
    if is_secret_field(path) {
        return Value::String(SECRET.to_owned());
    }
    match value {
        Value::String(text) => Value::String(shown_text(&text)),
        // Each element masked as a value of the same field; then a long list by its hash.
        Value::Array(items) => {
            let items: Vec<Value> = items.into_iter().map(|item| shown(path, item)).collect();
            let text = Value::Array(items.clone()).to_string();
            if text.len() > LONGEST_VALUE {
                Value::String(long_value(&text))
            } else {
                Value::Array(items)
            }
        }
        // Objects inside lists (leaves of the diff): their fields masked by name.
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(name, v)| {
                    let shown = shown(&format!("{path}.{name}"), v);
                    (name, shown)
                })
                .collect(),
        ),
        other => other,
    }
}

/// A string value, with what may be a secret in it masked: a connection string's key, a URL's
/// query (webhook keys travel there) and user information.
fn shown_text(text: &str) -> String {
    if carries_secret(text) {
        return SECRET.to_owned();
    }
    let text = match text.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphabetic()) =>
        {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let authority = match authority.rsplit_once('@') {
                Some((_, host)) => format!("{SECRET}@{host}"),
                None => authority.to_owned(),
            };
            let path = match path.split_once('?') {
                Some((path, _)) => format!("{path}?{SECRET}"),
                None => path.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        _ => text.to_owned(),
    };
    if text.len() > LONGEST_VALUE {
        long_value(&text)
    } else {
        text
    }
}

/// Whether `text` looks like it holds a key (an Azure connection string or SAS token).
fn carries_secret(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["sharedaccesskey=", "sharedaccesssignature", "sig="]
        .iter()
        .any(|marker| lower.contains(marker))
}

/// A long value, by its length and a hash (enough to tell two versions apart).
fn long_value(text: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("<{} characters, sha256 {hex}...>", text.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn changes_list_fields_with_their_secrets_masked() {
        let old = r#"{"registrationId":"d","etag":"\"1\"","attestation":{"type":"symmetricKey",
            "symmetricKey":{"primaryKey":"c2VjcmV0MQ==","secondaryKey":"c2VjcmV0Mg=="}},
            "iotHubs":["a.example.com"],
            "customAllocationDefinition":{"webhookUrl":"https://f.example.com/api/x?code=abc"}}"#;
        let new = r#"{"registrationId":"d","etag":"\"2\"","attestation":{"type":"symmetricKey",
            "symmetricKey":{"primaryKey":"c2VjcmV0Mw==","secondaryKey":"c2VjcmV0Mg=="}},
            "iotHubs":["b.example.com"],"connector":{"connectionString":"HostName=h;SharedAccessKey=k"},
            "customAllocationDefinition":{"webhookUrl":"https://u:p@f.example.com/api/y?code=def"}}"#;
        let changes = changes(Some(old), Some(new));
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "attestation.symmetricKey.primaryKey",
                "connector.connectionString",
                "customAllocationDefinition.webhookUrl",
                "iotHubs"
            ]
        );
        let text = serde_json::to_string(&changes).unwrap();
        for secret in [
            "c2VjcmV0",
            "SharedAccessKey=k",
            "code=abc",
            "code=def",
            "u:p",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(changes[0].old, Some(Value::String(SECRET.into())));
        assert_eq!(
            changes[2].new,
            Some(Value::String("https://***@f.example.com/api/y?***".into()))
        );
        assert_eq!(changes[3].old, Some(serde_json::json!(["a.example.com"])));
    }

    #[test]
    fn lists_are_masked_element_by_element() {
        let new = r#"{"urls":["https://f.example.com/api?code=KEY1"],
            "hooks":[{"name":"a","secret":"KEY2","url":"https://u:KEY3@h.example.com/"}],
            "notes":["HostName=h;SharedAccessKey=KEY4"]}"#;
        let text = serde_json::to_string(&changes(None, Some(new))).unwrap();
        for secret in ["KEY1", "KEY2", "KEY3", "KEY4"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("https://f.example.com/api?***"), "{text}");
    }

    #[test]
    fn long_values_are_shown_by_length_and_hash() {
        let long = "A".repeat(2000);
        let new = serde_json::json!({ "certificate": long }).to_string();
        let changes = changes(None, Some(&new));
        let shown = changes[0].new.as_ref().unwrap().as_str().unwrap();
        assert!(shown.starts_with("<2000 characters, sha256 "), "{shown}");
    }

    #[test]
    fn actions_follow_what_was_there() {
        assert_eq!(Action::of(None, Some("{}")), Some(Action::Create));
        assert_eq!(Action::of(Some("{}"), Some("{}")), Some(Action::Update));
        assert_eq!(Action::of(Some("{}"), None), Some(Action::Delete));
        assert_eq!(Action::of(None, None), None);
    }
}

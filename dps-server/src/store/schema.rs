//! The tables behind each [`Kind`] and their statements, built once. Every table has a `key`
//! (the record's case-folded id), its JSON `doc`, `etag`, `created_at` and `updated_at`; those of
//! an instance's records also an `instance`; some have typed columns beside the document
//! ([`Columns`]): what is filtered, counted, unique or swept on.

use std::sync::LazyLock;

use super::{Columns, Kind};

/// A typed column's value, bound in the order the table lists its columns.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    OptInt(Option<i64>),
}

/// A table and the statements on it.
#[derive(Debug)]
pub(super) struct Table {
    pub name: &'static str,
    /// Whether rows belong to an instance (`instance` column).
    pub scoped: bool,
    /// Typed columns, in binding order.
    pub columns: &'static [&'static str],
    /// The column [`super::Page::parent`] filters on, and its index.
    pub parent: Option<(&'static str, &'static str)>,
    /// The column [`super::Store::count_by`] counts by.
    pub counted: Option<&'static str>,
    pub sql: Statements,
}

/// The statements of a table. Parameters: `$1` instance (scoped tables only), then key, doc,
/// etag, time, then the typed columns, then (conditional writes) the expected etag.
#[derive(Debug, Default)]
pub(super) struct Statements {
    pub get: String,
    pub list: String,
    pub list_after: String,
    pub list_parent: String,
    pub list_parent_after: String,
    /// The parent listings naming their index: without statistics SQLite's planner prefers the
    /// primary key (it gives the order) and reads every row of the instance to filter on the
    /// parent, a cost that grows with every device ever registered.
    pub list_parent_sqlite: String,
    pub list_parent_after_sqlite: String,
    pub upsert: String,
    pub insert: String,
    /// The insert that fails on a taken key (instead of writing nothing) and returns the
    /// row's creation time: for a statement that must abort whole.
    pub insert_or_fail: String,
    pub update_if_match: String,
    pub delete: String,
    pub delete_if_match: String,
    pub count_by: String,
}

const fn table(
    name: &'static str,
    scoped: bool,
    columns: &'static [&'static str],
    parent: Option<(&'static str, &'static str)>,
    counted: Option<&'static str>,
) -> Table {
    Table {
        name,
        scoped,
        columns,
        parent,
        counted,
        sql: Statements {
            get: String::new(),
            list: String::new(),
            list_after: String::new(),
            list_parent: String::new(),
            list_parent_after: String::new(),
            list_parent_sqlite: String::new(),
            list_parent_after_sqlite: String::new(),
            upsert: String::new(),
            insert: String::new(),
            insert_or_fail: String::new(),
            update_if_match: String::new(),
            delete: String::new(),
            delete_if_match: String::new(),
            count_by: String::new(),
        },
    }
}

impl Table {
    fn with_statements(mut self) -> Self {
        let t = self.name;
        // `$n` numbering: the instance (scoped tables) comes first.
        let first = if self.scoped { 2 } else { 1 };
        let p = |n: usize| format!("${}", first + n);
        let scope = if self.scoped {
            "instance = $1 AND "
        } else {
            ""
        };
        let fields = "key, doc, etag, created_at, updated_at";
        let conflict = if self.scoped {
            "(instance, key)"
        } else {
            "(key)"
        };
        let mut names: Vec<&str> = Vec::new();
        let mut values: Vec<String> = Vec::new();
        if self.scoped {
            names.push("instance");
            values.push("$1".into());
        }
        names.extend(["key", "doc", "etag", "created_at", "updated_at"]);
        values.extend([p(0), p(1), p(2), p(3), p(3)]);
        for (i, column) in self.columns.iter().enumerate() {
            names.push(column);
            values.push(p(4 + i));
        }
        let expected = p(4 + self.columns.len());
        let assignments: Vec<String> = ["doc", "etag", "updated_at"]
            .iter()
            .chain(self.columns)
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let updates: Vec<String> = [("doc", p(1)), ("etag", p(2)), ("updated_at", p(3))]
            .into_iter()
            .chain(self.columns.iter().enumerate().map(|(i, c)| (*c, p(4 + i))))
            .map(|(c, v)| format!("{c} = {v}"))
            .collect();
        let insert = format!(
            "INSERT INTO {t} ({}) VALUES ({})",
            names.join(", "),
            values.join(", ")
        );
        let s = &mut self.sql;
        s.get = format!("SELECT {fields} FROM {t} WHERE {scope}key = {}", p(0));
        let all = if self.scoped {
            "WHERE instance = $1"
        } else {
            "WHERE 1 = 1"
        };
        s.list = format!("SELECT {fields} FROM {t} {all} ORDER BY key LIMIT {}", p(0));
        s.list_after = format!(
            "SELECT {fields} FROM {t} {all} AND key > {} ORDER BY key LIMIT {}",
            p(0),
            p(1)
        );
        if let Some((parent, index)) = self.parent {
            let by_parent = |from: &str| {
                (
                    format!(
                        "SELECT {fields} FROM {from} WHERE {scope}{parent} = {} ORDER BY key LIMIT {}",
                        p(0),
                        p(1)
                    ),
                    format!(
                        "SELECT {fields} FROM {from} WHERE {scope}{parent} = {} AND key > {} \
                         ORDER BY key LIMIT {}",
                        p(0),
                        p(1),
                        p(2)
                    ),
                )
            };
            (s.list_parent, s.list_parent_after) = by_parent(t);
            (s.list_parent_sqlite, s.list_parent_after_sqlite) =
                by_parent(&format!("{t} INDEXED BY {index}"));
        }
        s.upsert = format!(
            "{insert} ON CONFLICT {conflict} DO UPDATE SET {} RETURNING created_at",
            assignments.join(", ")
        );
        s.insert = format!("{insert} ON CONFLICT {conflict} DO NOTHING");
        s.insert_or_fail = format!("{insert} RETURNING created_at");
        s.update_if_match = format!(
            "UPDATE {t} SET {} WHERE {scope}key = {} AND etag = {expected} RETURNING created_at",
            updates.join(", "),
            p(0)
        );
        s.delete = format!("DELETE FROM {t} WHERE {scope}key = {}", p(0));
        s.delete_if_match = format!(
            "DELETE FROM {t} WHERE {scope}key = {} AND etag = {}",
            p(0),
            p(1)
        );
        if let Some(counted) = self.counted {
            s.count_by = format!(
                "SELECT {counted} AS value, COUNT(*) AS n FROM {t} \
                 WHERE {scope}{counted} IS NOT NULL GROUP BY {counted} ORDER BY {counted}"
            );
        }
        self
    }
}

/// Every table, built once.
static TABLES: LazyLock<Vec<(Kind, Table)>> = LazyLock::new(|| {
    [
        (
            Kind::Instance,
            table("instances", false, &["id_scope"], None, None),
        ),
        (
            Kind::AccessPolicy,
            table("access_policies", true, &[], None, None),
        ),
        (Kind::LinkedHub, table("linked_hubs", true, &[], None, None)),
        (
            Kind::CaCertificate,
            table("ca_certificates", true, &[], None, None),
        ),
        (
            Kind::IndividualEnrollment,
            table(
                "individual_enrollments",
                true,
                &["attestation_type"],
                None,
                None,
            ),
        ),
        (
            Kind::EnrollmentGroup,
            table(
                "enrollment_groups",
                true,
                &["attestation_type"],
                None,
                Some("attestation_type"),
            ),
        ),
        (
            Kind::RegistrationState,
            table(
                "registrations",
                true,
                &["group_id", "assigned_hub"],
                Some(("group_id", "registrations_by_group")),
                Some("assigned_hub"),
            ),
        ),
        (
            Kind::Operation,
            table(
                "operations",
                true,
                &["registration_id", "expires_at"],
                Some(("registration_id", "operations_by_registration")),
                None,
            ),
        ),
        (
            Kind::TpmChallenge,
            table("tpm_challenges", true, &["expires_at"], None, None),
        ),
        (
            Kind::IssuedCertificate,
            table(
                "issued_certificates",
                true,
                &["registration_id", "expires_at"],
                Some(("registration_id", "issued_certificates_by_registration")),
                None,
            ),
        ),
        (
            Kind::RevokedCertificate,
            table("revoked_certificates", true, &["expires_at"], None, None),
        ),
        (
            Kind::CertificateAuthority,
            table("certificate_authorities", true, &[], None, None),
        ),
        (
            Kind::CredentialPolicy,
            table("credential_policies", true, &[], None, None),
        ),
        (
            Kind::Event,
            table(
                "events",
                true,
                &["kind", "registration_id", "enrollment", "expires_at"],
                Some(("registration_id", "events_by_registration")),
                None,
            ),
        ),
        (
            Kind::AuditEntry,
            table(
                "audit_log",
                true,
                &["resource_kind", "resource_id", "policy"],
                None,
                None,
            ),
        ),
        (Kind::Owner, table("owners", true, &[], None, None)),
        (
            Kind::OwnershipRecord,
            table(
                "ownership_records",
                true,
                &["owner"],
                Some(("owner", "ownership_records_by_owner")),
                Some("owner"),
            ),
        ),
    ]
    .into_iter()
    .map(|(kind, table)| (kind, table.with_statements()))
    .collect()
});

/// The table of `kind`; `None` for the credentials version, a column of `instances`.
pub(super) fn of(kind: Kind) -> Option<&'static Table> {
    TABLES.iter().find(|(k, _)| *k == kind).map(|(_, t)| t)
}

/// The values of `columns` in `table`'s binding order. `None` when they are not the columns of
/// `table` (a caller's mistake, refused rather than stored wrong).
pub(super) fn values<'a>(table: &Table, columns: &'a Columns) -> Option<Vec<Value<'a>>> {
    let values = match columns {
        Columns::None => Vec::new(),
        Columns::Instance { id_scope, .. } => vec![Value::Text(id_scope)],
        Columns::Attestation { attestation_type } => vec![Value::Text(attestation_type)],
        Columns::Registration { group, hub } => {
            vec![
                Value::OptText(group.as_deref()),
                Value::OptText(hub.as_deref()),
            ]
        }
        Columns::Operation {
            registration,
            expires_at,
        } => vec![Value::Text(registration), Value::OptInt(*expires_at)],
        Columns::Issued {
            registration,
            expires_at,
        } => vec![Value::Text(registration), Value::OptInt(Some(*expires_at))],
        Columns::Event {
            kind,
            registration,
            enrollment,
            expires_at,
        } => vec![
            Value::Text(kind),
            Value::OptText(registration.as_deref()),
            Value::OptText(enrollment.as_deref()),
            Value::OptInt(Some(*expires_at)),
        ],
        Columns::Audit {
            resource_kind,
            resource_id,
            policy,
        } => vec![
            Value::Text(resource_kind),
            Value::Text(resource_id),
            Value::Text(policy),
        ],
        Columns::Expires { at } => vec![Value::OptInt(Some(*at))],
        Columns::Owned { owner } => vec![Value::Text(owner)],
    };
    (values.len() == table.columns.len()).then_some(values)
}

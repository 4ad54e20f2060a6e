//! Instances: one server serves many. An instance's ID scope and host names are unique across
//! the server (each claimed by a record written in the same transaction as the instance),
//! creating one creates its owner policy, and deleting one deletes everything in it. A request
//! finds its instance by name or by the host name it reached.

use allocation_policies::PolicyName;
use dps_protocol::ErrorCode;
use dps_protocol::admin::{AccessPolicy, Instance};
use dps_protocol::ids::{IdScope, check_host_name, check_resource_name};

use super::validate::field_error;
use super::{DomainError, load, to_doc};
use crate::domain::access_policies::owner_policy;
use crate::domain::resources::{Resource, render};
use crate::state::AppState;
use crate::store::{
    Columns, Kind, Page, Precondition, SERVER_NS, Store, StoreError, Stored, Unique, Write,
};

/// A stored instance with its etag and timestamps.
pub fn from_stored(stored: &Stored) -> Result<Instance, DomainError> {
    let mut instance: Instance = stored.doc_json()?;
    instance.etag = Some(stored.etag.clone());
    instance.created_date_time_utc = Some(stored.created.clone());
    instance.last_updated_date_time_utc = Some(stored.updated.clone());
    Ok(instance)
}

pub fn instance_key(name: &str) -> Result<String, DomainError> {
    check_resource_name("instance name", name)
        .map(|()| name.to_ascii_lowercase())
        .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
}

/// A new ID scope in the Azure shape: `0ne` and eight upper-case hex digits.
/// First path segments of the server's own routes: a device's `/{idScope}/registrations/...`
/// under one of them would reach that route instead.
const RESERVED_SCOPES: [&str; 18] = [
    "console",
    "instances",
    "enrollments",
    "enrollmentgroups",
    "registrations",
    "linkedhubs",
    "accesspolicies",
    "healthz",
    "readyz",
    "metrics",
    "owners",
    "ownershiprecords",
    "certificates",
    "certificateauthorities",
    "credentialpolicies",
    "issuedcertificates",
    "events",
    "auditlog",
];

/// Whether `scope` names one of the server's routes (see [`RESERVED_SCOPES`]).
pub fn is_reserved_scope(scope: &str) -> bool {
    RESERVED_SCOPES
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(scope))
}

fn generate_id_scope() -> Result<String, DomainError> {
    let bytes: [u8; 4] = attestation::keys::random_bytes()
        .map_err(|e| DomainError::internal("generating an ID scope", &e))?;
    Ok(format!("0ne{}", attestation::x509::upper_hex(&bytes)))
}

/// Creates or updates an instance under `precondition`, with its ID scope and host-name
/// records, in one transaction. Returns the stored instance and, on creation, the new owner
/// policy (with keys).
pub async fn save(
    store: &dyn Store,
    mut instance: Instance,
    precondition: Precondition,
) -> Result<Instance, DomainError> {
    let key = instance_key(&instance.name)?;
    let existing = store.get(SERVER_NS, Kind::Instance, &key).await?;
    let previous = existing.as_ref().map(from_stored).transpose()?;
    // The name is the instance's identity, matched without regard to case, and its data lives
    // under the spelling it was created with: a PUT in another case keeps that spelling
    // (security review item 11).
    if let Some(previous) = &previous {
        instance.name = previous.name.clone();
    }

    let scope = match (&instance.id_scope, &previous) {
        (Some(scope), _) if is_reserved_scope(scope) => {
            return Err(field_error(
                "idScope",
                format!("'{scope}' is the first segment of a server route (reserved)"),
            ));
        }
        (Some(scope), _) => IdScope::parse(scope)
            .map_err(|e| field_error("idScope", e.to_string()))?
            .as_str()
            .to_owned(),
        (None, Some(previous)) => previous.id_scope.clone().unwrap_or_default(),
        (None, None) => generate_id_scope()?,
    };
    instance.id_scope = Some(scope.clone());
    let mut hosts = Vec::new();
    for host in &instance.host_names {
        check_host_name(host).map_err(|e| field_error("hostNames", e.to_string()))?;
        let host = host.to_ascii_lowercase();
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    instance.host_names = hosts;
    let policy = match &instance.default_allocation_policy {
        None => PolicyName::Hashed,
        Some(name) => PolicyName::parse(name)
            .filter(|p| p.can_be_instance_default())
            .ok_or_else(|| {
                field_error(
                    "defaultAllocationPolicy",
                    format!("'{name}' cannot be an instance default; use hashed or geoLatency"),
                )
            })?,
    };
    instance.default_allocation_policy = Some(policy.as_str().to_owned());
    instance.etag = None;
    instance.created_date_time_utc = None;
    instance.last_updated_date_time_utc = None;
    instance.owner_policy = None;

    let effective = match (&precondition, &existing) {
        (Precondition::Always, Some(found)) => Precondition::IfMatch(found.etag.clone()),
        (Precondition::Always, None) => Precondition::MustNotExist,
        (other, _) => other.clone(),
    };
    let mut writes = vec![Write::Put {
        ns: SERVER_NS.to_owned(),
        kind: Kind::Instance,
        key: key.clone(),
        columns: Columns::Instance {
            id_scope: scope.to_ascii_lowercase(),
            host_names: instance.host_names.clone(),
        },
        doc: to_doc(&instance)?,
        precondition: effective,
        etag: None,
    }];
    let created_policy = match previous {
        None => {
            let policy = owner_policy()?;
            writes.push(Write::Put {
                ns: instance.name.clone(),
                kind: Kind::AccessPolicy,
                key: AccessPolicy::key_of(&policy.key_name)?,
                columns: Columns::None,
                doc: to_doc(&policy)?,
                precondition: Precondition::Always,
                etag: None,
            });
            // A new version, so that no cache of a deleted instance of the same name counts.
            writes.push(crate::domain::credentials::credentials_changed(
                &instance.name,
            ));
            Some(policy)
        }
        Some(_) => None,
    };
    let written = store.write(&writes).await.map_err(|e| match e {
        StoreError::Taken {
            what: Unique::IdScope,
            value,
        } => DomainError::new(
            ErrorCode::Conflict,
            format!("ID scope '{value}' belongs to another instance"),
        ),
        StoreError::Taken {
            what: Unique::HostName,
            value,
        } => DomainError::new(
            ErrorCode::Conflict,
            format!("host name '{value}' belongs to another instance"),
        ),
        other => other.into(),
    })?;
    let stored = written
        .first()
        .cloned()
        .flatten()
        .ok_or_else(|| DomainError::internal("storing an instance", &"no result"))?;
    let mut saved = from_stored(&stored)?;
    saved.owner_policy = created_policy;
    Ok(saved)
}

/// The owner policy of an instance with its keys, for the start-up connection string.
pub async fn owner_keys(
    store: &dyn Store,
    instance: &str,
) -> Result<Option<AccessPolicy>, DomainError> {
    let key = AccessPolicy::key_of(crate::domain::access_policies::OWNER_POLICY)?;
    let stored = store.get(instance, Kind::AccessPolicy, &key).await?;
    stored
        .as_ref()
        .map(|s| render::<AccessPolicy>(s, true))
        .transpose()
}

/// Deletes instance `name` and everything in it (not the admin instance).
pub async fn delete(
    state: &AppState,
    name: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    let key = instance_key(name)?;
    if key == state.admin_instance.to_ascii_lowercase() {
        return Err(DomainError::new(
            ErrorCode::ConflictWithState,
            "the admin instance cannot be deleted",
        ));
    }
    let instance = load_instance(state.store.as_ref(), name).await?;
    // Its ID scope, host names and every record in it go with it (the database cascades).
    let writes = [Write::Delete {
        ns: SERVER_NS.to_owned(),
        kind: Kind::Instance,
        key,
        precondition,
    }];
    let deleted = state.store.write(&writes).await;
    state.instances.clear();
    state.credentials.forget(&instance.name);
    deleted?;
    Ok(())
}

/// The instance an ID scope selects; an unknown scope is answered like a failed proof.
pub async fn of_scope(state: &AppState, scope: &IdScope) -> Result<String, DomainError> {
    let key = scope.key();
    let name = match state.instances.scopes.get(&key) {
        Some(name) => name,
        None => {
            let name = state
                .store
                .instance_by_scope(&key)
                .await?
                .ok_or_else(DomainError::device_denied)?;
            state.instances.scopes.insert(key, name.clone());
            name
        }
    };
    tracing::Span::current().record("instance", name.as_str());
    Ok(name)
}

/// Loads an instance by name, or 404.
pub async fn load_instance(store: &dyn Store, name: &str) -> Result<Instance, DomainError> {
    let stored = load(store, SERVER_NS, Kind::Instance, &name.to_ascii_lowercase()).await?;
    from_stored(&stored)
}

/// The instance whose host names include `host` (with or without its port); on a server with
/// exactly one instance, that instance.
pub async fn instance_for_host(
    store: &dyn Store,
    host: Option<String>,
) -> Result<Instance, DomainError> {
    if let Some(host) = &host {
        let without_port = host.rsplit_once(':').map(|(name, _)| name.to_owned());
        for candidate in std::iter::once(host.clone()).chain(without_port) {
            if let Some(name) = store
                .instance_by_host(&candidate.to_ascii_lowercase())
                .await?
            {
                return load_instance(store, &name).await;
            }
        }
    }
    let page = Page {
        limit: 2,
        ..Default::default()
    };
    match store
        .list(SERVER_NS, Kind::Instance, page)
        .await?
        .as_slice()
    {
        [only] => from_stored(only),
        _ => Err(DomainError::new(
            ErrorCode::InstanceNotFound,
            format!(
                "no instance serves host '{}'; use /instances/{{name}}/... or one of the instance's host names",
                host.unwrap_or_default()
            ),
        )),
    }
}

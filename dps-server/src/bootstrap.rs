//! Start-up: apply the instances the configuration declares, or make sure the default instance
//! exists, and gather what the server prints (ID scope, connection string).

use anyhow::Context;
use attestation::{ConnectionString, SymmetricKey};
use dps_protocol::admin::{AccessPolicy, Instance, Right};

use crate::config::{Config, DEFAULT_INSTANCE, InstanceConfig};
use crate::domain::error::DomainError;
use crate::domain::instances::load_instance;
use crate::domain::instances::{self, owner_keys};
use crate::domain::resources::{render, store_resource};
use crate::state::AppState;
use crate::store::{Kind, Page, Precondition, SERVER_NS};

/// What an admin needs to start using the admin instance.
#[derive(Debug)]
pub struct AdminAccess {
    /// The admin instance's ID scope.
    pub id_scope: String,
    /// A connection string with `ServiceConfig` for the admin instance.
    pub connection_string: ConnectionString,
}

fn describe(e: DomainError) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

/// Applies the configuration's instances (or the default instance) and returns the admin
/// instance's access.
pub async fn bootstrap(state: &AppState, config: &Config) -> anyhow::Result<AdminAccess> {
    if config.instances.is_empty() {
        ensure_default_instance(state, config).await?;
    }
    for declared in &config.instances {
        apply_instance(state, declared).await.with_context(|| {
            format!(
                "applying instance '{}' from the configuration",
                declared.name
            )
        })?;
    }
    let admin = load_instance(state.store.as_ref(), &state.admin_instance)
        .await
        .map_err(describe)
        .with_context(|| format!("admin instance '{}'", state.admin_instance))?;
    admin_access(state, config, &admin).await
}

async fn ensure_default_instance(state: &AppState, config: &Config) -> anyhow::Result<()> {
    let host = config.default_host_name();
    let existing = state
        .store
        .get(SERVER_NS, Kind::Instance, DEFAULT_INSTANCE)
        .await?;
    let instance = match existing {
        None => Instance {
            name: DEFAULT_INSTANCE.into(),
            id_scope: None,
            host_names: vec![host],
            default_allocation_policy: None,
            etag: None,
            created_date_time_utc: None,
            last_updated_date_time_utc: None,
            owner_policy: None,
        },
        Some(stored) => {
            let mut instance = instances::from_stored(&stored).map_err(describe)?;
            if instance.host_names.contains(&host) {
                return Ok(());
            }
            // The listen port changed: the printed connection string must name it.
            instance.host_names.push(host);
            instance
        }
    };
    instances::save(state.store.as_ref(), instance, Precondition::Always)
        .await
        .map_err(describe)?;
    Ok(())
}

async fn apply_instance(state: &AppState, declared: &InstanceConfig) -> anyhow::Result<()> {
    let existing = load_instance(state.store.as_ref(), &declared.name)
        .await
        .ok();
    let wanted = Instance {
        name: declared.name.clone(),
        id_scope: declared
            .id_scope
            .clone()
            .or_else(|| existing.as_ref().and_then(|e| e.id_scope.clone())),
        host_names: declared.host_names.clone(),
        default_allocation_policy: declared.default_allocation_policy.clone(),
        etag: None,
        created_date_time_utc: None,
        last_updated_date_time_utc: None,
        owner_policy: None,
    };
    let unchanged = existing.as_ref().is_some_and(|e| {
        e.id_scope == wanted.id_scope
            && e.host_names == lower(&wanted.host_names)
            && (wanted.default_allocation_policy.is_none()
                || e.default_allocation_policy == wanted.default_allocation_policy)
    });
    if !unchanged {
        instances::save(state.store.as_ref(), wanted, Precondition::Always)
            .await
            .map_err(describe)?;
    }
    for hub in &declared.linked_hubs {
        store_resource(state, &declared.name, hub.clone(), Precondition::Always)
            .await
            .map_err(describe)
            .with_context(|| format!("linked hub '{}'", hub.host_name))?;
    }
    for policy in &declared.access_policies {
        store_resource(state, &declared.name, policy.clone(), Precondition::Always)
            .await
            .map_err(describe)
            .with_context(|| format!("access policy '{}'", policy.key_name))?;
    }
    Ok(())
}

fn lower(names: &[String]) -> Vec<String> {
    names.iter().map(|n| n.to_ascii_lowercase()).collect()
}

async fn admin_access(
    state: &AppState,
    config: &Config,
    admin: &Instance,
) -> anyhow::Result<AdminAccess> {
    let policy = match owner_keys(state.store.as_ref(), &admin.name)
        .await
        .map_err(describe)?
    {
        Some(policy) => policy,
        None => any_service_config_policy(state, &admin.name).await?,
    };
    let key = policy
        .primary_key
        .as_deref()
        .map(SymmetricKey::from_base64)
        .transpose()?
        .context("the admin policy has no key")?;
    Ok(AdminAccess {
        id_scope: admin.id_scope.clone().unwrap_or_default(),
        connection_string: ConnectionString {
            host_name: admin
                .host_names
                .first()
                .cloned()
                .unwrap_or_else(|| config.default_host_name()),
            key_name: policy.key_name,
            key,
        },
    })
}

async fn any_service_config_policy(state: &AppState, ns: &str) -> anyhow::Result<AccessPolicy> {
    let rows = state
        .store
        .list(
            ns,
            Kind::AccessPolicy,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    for row in &rows {
        let policy: AccessPolicy = render(row, true).map_err(describe)?;
        if policy
            .rights
            .iter()
            .any(|r| Right::parse(r) == Some(Right::ServiceConfig))
        {
            return Ok(policy);
        }
    }
    anyhow::bail!(
        "instance '{ns}' has no shared access policy with ServiceConfig ({} policies)",
        rows.len()
    )
}

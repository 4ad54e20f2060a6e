//! An instance's configuration documents (linked hubs, shared access policies, CA certificates,
//! owners): stored under the etag rules, read without secrets, deleted unless that would leave
//! the instance unusable.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DomainError, to_doc};
use crate::state::AppState;
use crate::store::{Columns, Kind, Page, Precondition, Stored, Write};

/// A configuration document of an instance.
pub trait Resource: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Storage kind.
    const KIND: Kind;
    /// `x-ms-item-type` of listings.
    const ITEM_TYPE: &'static str;

    /// Checks an id from the path and returns its storage key.
    fn key_of(id: &str) -> Result<String, DomainError>;
    /// The id in the body.
    fn id(&self) -> &str;
    /// Sets the etag shown to clients.
    fn set_etag(&mut self, etag: String);
    /// Validates and normalises; secrets the request omits are taken from `previous`, or
    /// generated.
    fn prepare(&mut self, previous: Option<&Self>) -> Result<(), DomainError>;
    /// Removes secrets for reads.
    fn hide_secrets(&mut self);
    /// Removes, from the answer to a PUT, the secrets the request did not send (those kept
    /// from the stored version); secrets generated for a new resource stay, shown once.
    fn hide_unsent_secrets(&mut self, sent: &Self, previous: Option<&Self>);
    /// Refuses a change (`new` is `None` for a delete) that would leave the instance unusable.
    fn check_change(_others: &[Self], _new: Option<&Self>) -> Result<(), DomainError> {
        Ok(())
    }

    /// Counts reads show beside the stored documents (by the document's key).
    fn counts(
        _state: &AppState,
        _ns: &str,
    ) -> impl std::future::Future<Output = Result<Counts, DomainError>> + Send {
        async { Ok(Counts::new()) }
    }

    /// Adds the counts to a document about to be shown.
    fn annotate(&mut self, _counts: &Counts) {}
}

/// Read-only counts by document key (for example devices per hub).
pub type Counts = std::collections::HashMap<String, i64>;

/// The stored document with its etag, secrets hidden unless `reveal`.
pub fn render<R: Resource>(stored: &Stored, reveal: bool) -> Result<R, DomainError> {
    let mut resource: R = stored.doc_json()?;
    resource.set_etag(stored.etag.clone());
    if !reveal {
        resource.hide_secrets();
    }
    Ok(resource)
}

/// Loads every document of the kind except `key` (configuration lists are small).
async fn others<R: Resource>(state: &AppState, ns: &str, key: &str) -> Result<Vec<R>, DomainError> {
    let rows = state
        .store
        .list(
            ns,
            R::KIND,
            Page {
                limit: usize::MAX,
                ..Page::default()
            },
        )
        .await?;
    rows.iter()
        .filter(|row| row.key != key)
        .map(|row| row.doc_json())
        .collect()
}

/// Stores `resource` in `ns` under the etag rules; shared with the configuration file.
/// Returns what was stored, and the version it replaced.
pub async fn store_resource<R: Resource>(
    state: &AppState,
    ns: &str,
    mut resource: R,
    precondition: Precondition,
) -> Result<(Stored, Option<R>), DomainError> {
    let key = R::key_of(resource.id())?;
    let existing = state.store.get(ns, R::KIND, &key).await?;
    let previous: Option<R> = existing.as_ref().map(|s| s.doc_json()).transpose()?;
    resource.prepare(previous.as_ref())?;
    R::check_change(&others::<R>(state, ns, &key).await?, Some(&resource))?;
    let effective = match (&precondition, &existing) {
        (Precondition::Always, Some(found)) => Precondition::IfMatch(found.etag.clone()),
        (Precondition::Always, None) => Precondition::MustNotExist,
        (other, _) => other.clone(),
    };
    let put = Write::Put {
        ns: ns.to_owned(),
        kind: R::KIND,
        key,
        columns: Columns::None,
        doc: to_doc(&resource)?,
        precondition: effective,
        etag: None,
    };
    let stored = state
        .store
        .write(&with_credentials::<R>(ns, put))
        .await?
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| DomainError::internal("storing a resource", &"no result"))?;
    Ok((stored, previous))
}

/// Loads one document or 404.
pub async fn load<R: Resource>(
    state: &AppState,
    ns: &str,
    id: &str,
) -> Result<Stored, DomainError> {
    super::load(state.store.as_ref(), ns, R::KIND, &R::key_of(id)?).await
}

/// `write`, and for the kinds device requests cache (CA certificates, linked hubs, issuing CAs,
/// credential policies) the change of
/// the instance's credentials version in the same transaction.
pub fn with_credentials<R: Resource>(ns: &str, write: Write) -> Vec<Write> {
    let mut writes = vec![write];
    if matches!(
        R::KIND,
        Kind::CaCertificate | Kind::LinkedHub | Kind::CertificateAuthority | Kind::CredentialPolicy
    ) {
        writes.push(crate::domain::credentials::credentials_changed(ns));
    }
    writes
}

/// Deletes `id`, unless the instance would be left unusable ([`Resource::check_change`]).
pub async fn delete<R: Resource>(
    state: &AppState,
    ns: &str,
    id: &str,
    precondition: Precondition,
) -> Result<(), DomainError> {
    let key = R::key_of(id)?;
    R::check_change(&others::<R>(state, ns, &key).await?, None)?;
    let delete = Write::Delete {
        ns: ns.to_owned(),
        kind: R::KIND,
        key,
        precondition,
    };
    state
        .store
        .write(&with_credentials::<R>(ns, delete))
        .await?;
    Ok(())
}

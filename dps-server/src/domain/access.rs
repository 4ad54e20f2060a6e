//! Who an admin is: the rights of the shared access policy whose key signed the request's token.

use std::collections::BTreeSet;

use attestation::{SasToken, SymmetricKey};
use dps_protocol::ErrorCode;
use dps_protocol::admin::{AccessPolicy, Instance, Right};

use super::DomainError;
use crate::domain::unix_now;
use crate::state::AppState;
use crate::store::Kind;

/// Who signed an admin request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The shared access policy's key name, as stored.
    pub policy: String,
    /// Its rights.
    pub rights: BTreeSet<Right>,
}

/// Verifies the `Authorization` SAS token against the instance's shared access policies and
/// returns the policy that signed it.
pub async fn caller(
    state: &AppState,
    instance: &Instance,
    authorization: Option<&str>,
) -> Result<Caller, DomainError> {
    let header = authorization.ok_or_else(|| {
        DomainError::unauthorized("the request has no ASCII Authorization header")
    })?;
    let token = SasToken::parse(header).map_err(|e| DomainError::unauthorized(e.to_string()))?;
    token
        .check_expiry(
            unix_now(),
            state.limits.clock_skew_secs,
            state.limits.max_token_lifetime_secs,
        )
        .map_err(|e| DomainError::unauthorized(e.to_string()))?;
    let audience_ok = instance
        .host_names
        .iter()
        .chain(state.server_names.iter())
        .any(|host| token.resource_matches(host));
    // Not the request's Host: that is the caller's to choose, so it would bind nothing
    // (security review item 10).
    if !audience_ok {
        return Err(DomainError::unauthorized(
            "the token's resource (sr) is not a host name of this instance",
        ));
    }
    let key_name = token.key_name().ok_or_else(|| {
        DomainError::unauthorized("the token names no shared access policy (skn)")
    })?;
    let failed =
        || DomainError::unauthorized("the token does not verify with the named policy's keys");
    let stored = state
        .store
        .get(
            &instance.name,
            Kind::AccessPolicy,
            &key_name.to_ascii_lowercase(),
        )
        .await?
        .ok_or_else(failed)?;
    let policy: AccessPolicy = stored.doc_json()?;
    let keys = [&policy.primary_key, &policy.secondary_key]
        .into_iter()
        .flatten()
        .filter_map(|k| SymmetricKey::from_base64(k).ok())
        .collect::<Vec<_>>();
    token.verify_any(&keys).map_err(|_| failed())?;
    Ok(Caller {
        rights: policy
            .rights
            .iter()
            .filter_map(|r| Right::parse(r))
            .collect(),
        policy: policy.key_name,
    })
}

/// Names `caller` of `instance` as the author of the writes the request makes from now on (its
/// audit entries).
pub fn identify(instance: &Instance, caller: &Caller) {
    crate::store::audit::identify(crate::store::audit::Actor {
        instance: instance.name.clone(),
        policy: caller.policy.clone(),
        request_id: crate::observability::current_request_id(),
    });
}

/// The refusal of a caller whose policy lacks `right`.
pub fn lacks(right: Right) -> DomainError {
    DomainError::new(
        ErrorCode::Forbidden,
        format!(
            "the shared access policy lacks the {} right",
            right.as_str()
        ),
    )
}

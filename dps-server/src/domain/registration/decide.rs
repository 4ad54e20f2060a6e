//! The registration decision, as pure functions: where a returning device may go under its
//! reprovision policy, in which order the hubs are tried, which twin a hub is given, what the
//! registration state says once a hub took the device (or none could), and what a disabled
//! enrollment answers. `provision` does the I/O around them (policies, hub connectors); these
//! only decide, so every case is a table row in the tests below.

use dps_protocol::ErrorCode;
use dps_protocol::admin::LinkedHub;
use dps_protocol::device::OperationStatus;
use dps_protocol::enrollment::{
    AttestationType, DeviceRegistrationState, EnrollmentGroup, IndividualEnrollment,
    ReprovisionPolicy, SymmetricKeyRegistrationResult, TpmRegistrationResult,
    X509CertificateWithInfo, X509RegistrationResult,
};
use dps_protocol::ids::RegistrationId;
use serde_json::Value;

use crate::domain::DomainError;
use crate::domain::records::{EnrollmentRef, OperationRecord, RegistrationRecord};
use crate::hubs::HubAuth;

/// Why an assignment failed: a code and a message for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub ErrorCode, pub String);

impl From<DomainError> for Failure {
    fn from(e: DomainError) -> Self {
        Failure(e.code(), e.message().to_owned())
    }
}

/// What the reprovision policy makes of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The device has no hub yet: the policy chooses.
    First,
    /// The device stays on its hub (`updateHubAssignment: false`).
    Stay(String),
    /// The device had a hub and may move: the policy chooses again.
    Reallocate(String),
}

impl Route {
    /// The hub the device had, if any.
    pub fn previous_hub(&self) -> Option<&str> {
        match self {
            Route::First => None,
            Route::Stay(hub) | Route::Reallocate(hub) => Some(hub),
        }
    }
}

/// The route of a device that had `previous_hub`, under `reprovision`.
pub fn route(previous_hub: Option<&str>, reprovision: &ReprovisionPolicy) -> Route {
    match previous_hub {
        None => Route::First,
        Some(hub) if !reprovision.update_hub_assignment => Route::Stay(hub.to_owned()),
        Some(hub) => Route::Reallocate(hub.to_owned()),
    }
}

/// Whether the allocation policy `policy` runs on `route`: always, except that a device that
/// stays asks only a custom webhook (Azure calls it for a new payload; the hub stays).
pub fn asks_policy(route: &Route, policy: &str) -> bool {
    !matches!(route, Route::Stay(_)) || policy == "custom"
}

/// The message of a registration no linked hub can take.
pub const NO_HUB: &str =
    "no linked hub is available for this device: link a hub, or name one on the enrollment";

/// The hubs to try, in the policy's order: each ranked host name that is a candidate, once.
pub fn order(ranked: &[String], candidates: &[LinkedHub]) -> Result<Vec<LinkedHub>, Failure> {
    let mut order: Vec<LinkedHub> = Vec::new();
    for host in ranked {
        if let Some(hub) = candidates
            .iter()
            .find(|c| c.host_name.eq_ignore_ascii_case(host))
            && !order.iter().any(|h| h.host_name == hub.host_name)
        {
            order.push(hub.clone());
        }
    }
    if order.is_empty() {
        return Err(Failure(ErrorCode::NoHubAvailable, NO_HUB.into()));
    }
    Ok(order)
}

/// The failure of a device whose hub is no longer linked and may not move.
pub fn hub_gone(hub: &str) -> Failure {
    Failure(
        ErrorCode::NoHubAvailable,
        format!(
            "the device's hub '{hub}' is no longer linked and its enrollment does not allow moving it"
        ),
    )
}

/// The twin a new identity starts with: the custom webhook's when it chose one, else the
/// enrollment's.
pub fn initial_twin(from_webhook: Option<&Value>, enrollment: Option<&Value>) -> Option<Value> {
    from_webhook.or(enrollment).cloned()
}

/// The twin `hub` is given: none when the device stays (its live twin is kept); on a move, the
/// old hub's twin when the policy migrates data and it could be read, else the initial twin.
pub fn twin_for(
    staying: bool,
    migrate: bool,
    migrated: Option<&Value>,
    initial: Option<&Value>,
) -> Option<Value> {
    if staying {
        return None;
    }
    match (migrate, migrated) {
        (true, Some(twin)) => Some(twin.clone()),
        _ => initial.cloned(),
    }
}

/// Where the device ended up and how that is described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Azure's substatus.
    pub substatus: Option<String>,
    /// The hub of the first assignment.
    pub initial_hub: String,
    /// The hub the device left, which removes it.
    pub moved_from: Option<String>,
}

/// The substatus of landing on `chosen`, given where the device was (Azure's values).
pub fn settle(
    chosen: &str,
    previous_hub: Option<&str>,
    previous: Option<&RegistrationRecord>,
    migrate: bool,
) -> Decision {
    let Some(old) = previous_hub else {
        return Decision {
            substatus: Some("initialAssignment".into()),
            initial_hub: chosen.to_owned(),
            moved_from: None,
        };
    };
    let initial_hub = previous
        .and_then(|p| p.initial_hub.clone())
        .unwrap_or_else(|| old.to_owned());
    if chosen.eq_ignore_ascii_case(old) {
        return Decision {
            substatus: previous.and_then(|p| p.state.substatus.clone()),
            initial_hub,
            moved_from: None,
        };
    }
    let substatus = if chosen.eq_ignore_ascii_case(&initial_hub) {
        "reprovisionedToInitialAssignment"
    } else if migrate {
        "deviceDataMigrated"
    } else {
        "deviceDataReset"
    };
    Decision {
        substatus: Some(substatus.into()),
        initial_hub,
        moved_from: Some(old.to_owned()),
    }
}

/// The hub credentials of a device of an individual enrollment: its symmetric keys, else its
/// certificates' SHA-1 thumbprints.
pub fn individual_hub_auth(enrollment: &IndividualEnrollment) -> HubAuth {
    let keys = enrollment
        .attestation
        .symmetric_key
        .as_ref()
        .and_then(|k| Some((k.primary_key.clone()?, k.secondary_key.clone()?)));
    let thumbprints = enrollment
        .attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
        .map(|certs| {
            let sha1 = |c: &Option<X509CertificateWithInfo>| {
                c.as_ref()
                    .and_then(|c| c.info.as_ref())
                    .map(|i| i.sha1_thumbprint.clone())
            };
            (sha1(&certs.primary), sha1(&certs.secondary))
        });
    match (keys, thumbprints) {
        (Some((primary_key, secondary_key)), _) => HubAuth::Sas {
            primary_key,
            secondary_key,
        },
        (None, Some((Some(primary_thumbprint), secondary_thumbprint))) => HubAuth::SelfSigned {
            primary_thumbprint,
            secondary_thumbprint,
        },
        _ => HubAuth::None,
    }
}

/// The hub credentials of a group member `id`: keys derived from the group's, or the CA for
/// X.509 groups.
pub fn group_hub_auth(group: &EnrollmentGroup, id: &RegistrationId) -> HubAuth {
    let keys = group.attestation.symmetric_key.as_ref().and_then(|k| {
        let derive = |key: &Option<String>| {
            attestation::SymmetricKey::from_base64(key.as_deref()?)
                .ok()
                .map(|k| k.derive_device_key(id.as_str()).to_base64())
        };
        Some((derive(&k.primary_key)?, derive(&k.secondary_key)?))
    });
    match keys {
        Some((primary_key, secondary_key)) => HubAuth::Sas {
            primary_key,
            secondary_key,
        },
        None if group.attestation.kind == AttestationType::X509 => HubAuth::CertificateAuthority,
        None => HubAuth::None,
    }
}

/// The hub credentials of the operation's device: its issued certificate when the operation
/// issued one (the hub trusts the issuing CA), else the key a TPM's second activation blob
/// carries, else `enrollment`'s.
pub fn operation_hub_auth(enrollment: HubAuth, op: &OperationRecord) -> HubAuth {
    if op.issued_certificate_chain.is_some() {
        return HubAuth::CertificateAuthority;
    }
    match &op.tpm {
        Some(tpm) => HubAuth::Sas {
            primary_key: tpm.hub_key.clone(),
            secondary_key: tpm.hub_key.clone(),
        },
        None => enrollment,
    }
}

/// What an assigned registration says.
#[derive(Debug, Clone)]
pub struct Assignment<'a> {
    /// The device.
    pub id: &'a RegistrationId,
    /// The operation that assigned it.
    pub op: &'a OperationRecord,
    /// The hub that took it.
    pub hub: &'a str,
    /// Its id there.
    pub device_id: String,
    /// The group it came through.
    pub group_id: Option<String>,
    /// What a custom webhook returned for the device.
    pub payload: Option<Value>,
    /// How the assignment is described.
    pub decision: Decision,
}

/// The registration state of an assignment.
pub fn assigned(a: Assignment<'_>) -> RegistrationRecord {
    let op = a.op;
    RegistrationRecord {
        state: DeviceRegistrationState {
            registration_id: a.id.as_str().to_owned(),
            assigned_hub: Some(a.hub.to_owned()),
            device_id: Some(a.device_id),
            status: Some(OperationStatus::Assigned.as_str().to_owned()),
            substatus: a.decision.substatus,
            payload: a.payload,
            enrollment_group_id: a.group_id.clone(),
            symmetric_key: (op.x509.is_none() && op.tpm.is_none()).then(|| {
                SymmetricKeyRegistrationResult {
                    enrollment_group_id: a.group_id.clone(),
                }
            }),
            tpm: op.tpm.as_ref().map(|t| TpmRegistrationResult {
                authentication_key: t.authentication_key.clone(),
            }),
            x509: op.x509.clone().map(|x| X509RegistrationResult {
                enrollment_group_id: a.group_id,
                ..x
            }),
            ..DeviceRegistrationState::default()
        },
        initial_hub: Some(a.decision.initial_hub),
        device_payload: op.device_payload.clone(),
    }
}

/// The registration state of a failed assignment: the previous state (the device keeps its
/// hub), marked failed with the code and message.
pub fn failed(
    id: &RegistrationId,
    op: &OperationRecord,
    previous: Option<&RegistrationRecord>,
    Failure(code, message): Failure,
) -> RegistrationRecord {
    let mut record = previous.cloned().unwrap_or_default();
    record.state.registration_id = id.as_str().to_owned();
    record.state.status = Some(OperationStatus::Failed.as_str().to_owned());
    record.state.error_code = Some(i64::from(code.number()));
    record.state.error_message = Some(message);
    if let EnrollmentRef::Group(group) = &op.enrollment {
        record.state.enrollment_group_id = Some(group.clone());
    }
    record.device_payload = op.device_payload.clone();
    record
}

/// What an operation of a disabled enrollment answers: `disabled`, with the reason, and
/// nothing else (the registration state is left as it is).
pub fn disabled(id: &RegistrationId, reason: &str) -> DeviceRegistrationState {
    ended_at_start(
        id,
        OperationStatus::Disabled,
        Failure(ErrorCode::EnrollmentDisabled, reason.to_owned()),
    )
}

/// What an operation refused before anything was assigned answers (a certificate signing
/// request that cannot be served): `failed`, with the code and message, and nothing else (the
/// registration state is left as it is).
pub fn refused(id: &RegistrationId, failure: Failure) -> DeviceRegistrationState {
    ended_at_start(id, OperationStatus::Failed, failure)
}

fn ended_at_start(
    id: &RegistrationId,
    status: OperationStatus,
    Failure(code, message): Failure,
) -> DeviceRegistrationState {
    DeviceRegistrationState {
        registration_id: id.as_str().to_owned(),
        status: Some(status.as_str().to_owned()),
        error_code: Some(i64::from(code.number())),
        error_message: Some(message),
        ..DeviceRegistrationState::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hub(host: &str) -> LinkedHub {
        serde_json::from_value(json!({ "hostName": host })).unwrap()
    }

    fn policy(update_hub_assignment: bool, migrate_device_data: bool) -> ReprovisionPolicy {
        ReprovisionPolicy {
            update_hub_assignment,
            migrate_device_data,
        }
    }

    fn previous(hub: &str, initial: &str, substatus: &str) -> RegistrationRecord {
        RegistrationRecord {
            state: DeviceRegistrationState {
                registration_id: "dev".into(),
                assigned_hub: Some(hub.into()),
                substatus: Some(substatus.into()),
                ..DeviceRegistrationState::default()
            },
            initial_hub: Some(initial.into()),
            device_payload: None,
        }
    }

    fn operation() -> OperationRecord {
        serde_json::from_value(json!({
            "operationId": "5.x.y", "registrationId": "dev", "status": "assigning",
            "enrollment": { "kind": "group", "id": "fleet" }, "devicePayload": { "n": 1 } }))
        .unwrap()
    }

    /// Every reprovision policy against every kind of previous hub: the route, and whether the
    /// policy runs (only a custom webhook runs for a device that stays).
    #[test]
    fn the_reprovision_policy_chooses_the_route() {
        let cases = [
            // (previous hub, updateHubAssignment, policy, route, asks the policy)
            (None, true, "hashed", Route::First, true),
            (None, false, "hashed", Route::First, true),
            (
                Some("a"),
                true,
                "hashed",
                Route::Reallocate("a".into()),
                true,
            ),
            (Some("a"), false, "hashed", Route::Stay("a".into()), false),
            (Some("a"), false, "custom", Route::Stay("a".into()), true),
            (
                Some("a"),
                true,
                "custom",
                Route::Reallocate("a".into()),
                true,
            ),
            (
                Some("a"),
                false,
                "ownership",
                Route::Stay("a".into()),
                false,
            ),
        ];
        for (previous_hub, update, name, expected, asks) in cases {
            for migrate in [true, false] {
                let got = route(previous_hub, &policy(update, migrate));
                assert_eq!(got, expected, "{previous_hub:?} {update} {migrate}");
                assert_eq!(asks_policy(&got, name), asks, "{got:?} {name}");
                assert_eq!(got.previous_hub(), previous_hub);
            }
        }
    }

    /// (chosen, previous hub, previous record, migrate, substatus, initial hub, moved from)
    type Landing<'a> = (
        &'a str,
        Option<&'a str>,
        Option<&'a RegistrationRecord>,
        bool,
        Option<&'a str>,
        &'a str,
        Option<&'a str>,
    );

    /// Where a device lands and what its registration state then says, for every move.
    #[test]
    fn landing_is_described_with_azure_s_substatus() {
        let was_on_b_first_a = previous("b", "a", "deviceDataMigrated");
        let cases: [Landing<'_>; 6] = [
            // (chosen, previous hub, previous record, migrate, substatus, initial hub, moved from)
            ("a", None, None, true, Some("initialAssignment"), "a", None),
            // Staying keeps the substatus it had.
            (
                "b",
                Some("b"),
                Some(&was_on_b_first_a),
                true,
                Some("deviceDataMigrated"),
                "a",
                None,
            ),
            (
                "B",
                Some("b"),
                Some(&was_on_b_first_a),
                false,
                Some("deviceDataMigrated"),
                "a",
                None,
            ),
            // Back to the first hub, whatever the migration setting.
            (
                "a",
                Some("b"),
                Some(&was_on_b_first_a),
                false,
                Some("reprovisionedToInitialAssignment"),
                "a",
                Some("b"),
            ),
            (
                "c",
                Some("b"),
                Some(&was_on_b_first_a),
                true,
                Some("deviceDataMigrated"),
                "a",
                Some("b"),
            ),
            (
                "c",
                Some("b"),
                Some(&was_on_b_first_a),
                false,
                Some("deviceDataReset"),
                "a",
                Some("b"),
            ),
        ];
        for (chosen, previous_hub, record, migrate, substatus, initial, moved) in cases {
            let decision = settle(chosen, previous_hub, record, migrate);
            assert_eq!(
                decision.substatus.as_deref(),
                substatus,
                "{chosen} from {previous_hub:?}"
            );
            assert_eq!(decision.initial_hub, initial);
            assert_eq!(decision.moved_from.as_deref(), moved);
        }
        // A state from before initial hubs were recorded: the previous hub counts as initial.
        let old = RegistrationRecord {
            initial_hub: None,
            ..previous("b", "-", "initialAssignment")
        };
        let decision = settle("c", Some("b"), Some(&old), true);
        assert_eq!(decision.initial_hub, "b");
    }

    /// The twin each hub is given, and the custom webhook's twin over the enrollment's.
    #[test]
    fn twins_follow_the_move_and_the_migration_setting() {
        let (migrated, initial) = (
            json!({ "tags": { "from": "old hub" } }),
            json!({ "tags": {} }),
        );
        let cases = [
            // (staying, migrate, migrated twin read, expected)
            (true, true, Some(&migrated), None),
            (true, false, None, None),
            (false, true, Some(&migrated), Some(&migrated)),
            (false, true, None, Some(&initial)),
            (false, false, Some(&migrated), Some(&initial)),
        ];
        for (staying, migrate, read, expected) in cases {
            assert_eq!(
                twin_for(staying, migrate, read, Some(&initial)).as_ref(),
                expected,
                "staying {staying}, migrate {migrate}"
            );
        }
        let webhook = json!({ "tags": { "from": "webhook" } });
        assert_eq!(initial_twin(Some(&webhook), Some(&initial)), Some(webhook));
        assert_eq!(initial_twin(None, Some(&initial)), Some(initial));
        assert_eq!(initial_twin(None, None), None);
    }

    /// Hubs are tried in the policy's order, each once, only among the candidates; none left
    /// is a 400208 failure.
    #[test]
    fn the_order_keeps_ranked_candidates_once() {
        let candidates = [hub("a.example.com"), hub("b.example.com")];
        let ranked: Vec<String> = [
            "B.example.com",
            "z.example.com",
            "b.example.com",
            "a.example.com",
        ]
        .map(String::from)
        .into();
        let order = order(&ranked, &candidates).unwrap();
        let hosts: Vec<&str> = order.iter().map(|h| h.host_name.as_str()).collect();
        assert_eq!(hosts, ["b.example.com", "a.example.com"]);
        let none = super::order(&["z.example.com".into()], &candidates).unwrap_err();
        assert_eq!(none.0, ErrorCode::NoHubAvailable);
        assert_eq!(
            super::order(&[], &[]).unwrap_err().0,
            ErrorCode::NoHubAvailable
        );
        assert_eq!(hub_gone("a.example.com").0, ErrorCode::NoHubAvailable);
    }

    /// Failures keep the device's previous hub and say why; disabled enrollments answer
    /// `disabled` with 403002; assignments carry what the webhook returned.
    #[test]
    fn failures_disabled_and_assigned_states() {
        let id = RegistrationId::parse("dev").unwrap();
        let op = operation();
        let was = previous("b.example.com", "a.example.com", "initialAssignment");
        let failure = Failure(ErrorCode::ServiceUnavailable, "no hub could take it".into());
        let record = failed(&id, &op, Some(&was), failure.clone());
        assert_eq!(record.state.status.as_deref(), Some("failed"));
        assert_eq!(record.state.error_code, Some(503001));
        assert_eq!(record.state.assigned_hub.as_deref(), Some("b.example.com"));
        assert_eq!(record.state.enrollment_group_id.as_deref(), Some("fleet"));
        assert_eq!(record.device_payload, Some(json!({ "n": 1 })));
        let fresh = failed(&id, &op, None, failure);
        assert_eq!(fresh.state.assigned_hub, None);
        let from_store: Failure =
            DomainError::new(ErrorCode::ServiceUnavailable, "the database is down").into();
        assert_eq!(from_store.0, ErrorCode::ServiceUnavailable);

        let off = disabled(&id, "the enrollment group 'fleet' is disabled");
        assert_eq!(off.status.as_deref(), Some("disabled"));
        assert_eq!(off.error_code, Some(403002));
        assert_eq!(off.assigned_hub, None);

        let record = assigned(Assignment {
            id: &id,
            op: &op,
            hub: "c.example.com",
            device_id: "dev".into(),
            group_id: Some("fleet".into()),
            payload: Some(json!({ "greeting": "hello" })),
            decision: settle("c.example.com", Some("b.example.com"), Some(&was), false),
        });
        assert_eq!(record.state.status.as_deref(), Some("assigned"));
        assert_eq!(record.state.substatus.as_deref(), Some("deviceDataReset"));
        assert_eq!(record.state.payload, Some(json!({ "greeting": "hello" })));
        assert_eq!(record.initial_hub.as_deref(), Some("a.example.com"));
        assert!(
            record.state.symmetric_key.is_some(),
            "a symmetric-key device"
        );
    }

    /// The credentials each hub is given: an individual enrollment's keys or thumbprints, a
    /// group member's derived keys or its CA, a TPM device's hub key, an issued certificate.
    #[test]
    fn hubs_get_the_device_s_credentials() {
        let keyed: IndividualEnrollment = serde_json::from_value(json!({
            "registrationId": "dev", "attestation": { "type": "symmetricKey",
                "symmetricKey": { "primaryKey": "cA==", "secondaryKey": "cw==" } } }))
        .unwrap();
        assert_eq!(
            individual_hub_auth(&keyed),
            HubAuth::Sas {
                primary_key: "cA==".into(),
                secondary_key: "cw==".into()
            }
        );
        let certified: IndividualEnrollment = serde_json::from_value(json!({
            "registrationId": "dev", "attestation": { "type": "x509", "x509": {
                "clientCertificates": { "primary": { "info": { "sha1Thumbprint": "AB", "sha256Thumbprint": "CD",
                    "subjectName": "CN=dev", "issuerName": "CN=dev", "notBeforeUtc": "", "notAfterUtc": "",
                    "serialNumber": "01", "version": 3 } } } } } }))
        .unwrap();
        assert_eq!(
            individual_hub_auth(&certified),
            HubAuth::SelfSigned {
                primary_thumbprint: "AB".into(),
                secondary_thumbprint: None
            }
        );
        let key = attestation::SymmetricKey::generate().unwrap();
        let group: EnrollmentGroup = serde_json::from_value(json!({
            "enrollmentGroupId": "fleet", "attestation": { "type": "symmetricKey",
                "symmetricKey": { "primaryKey": key.to_base64(), "secondaryKey": key.to_base64() } } }))
        .unwrap();
        let id = RegistrationId::parse("dev-7").unwrap();
        let derived = key.derive_device_key("dev-7").to_base64();
        assert_eq!(
            group_hub_auth(&group, &id),
            HubAuth::Sas {
                primary_key: derived.clone(),
                secondary_key: derived
            }
        );
        let ca_group: EnrollmentGroup = serde_json::from_value(json!({
            "enrollmentGroupId": "line", "attestation": { "type": "x509" } }))
        .unwrap();
        assert_eq!(
            group_hub_auth(&ca_group, &id),
            HubAuth::CertificateAuthority
        );
        let mut op = operation();
        assert_eq!(operation_hub_auth(HubAuth::None, &op), HubAuth::None);
        op.tpm = Some(crate::domain::records::TpmOperation {
            authentication_key: "blob".into(),
            hub_key: "aHVi".into(),
            ek_hash: "00".into(),
        });
        assert_eq!(
            operation_hub_auth(HubAuth::None, &op),
            HubAuth::Sas {
                primary_key: "aHVi".into(),
                secondary_key: "aHVi".into()
            }
        );
        // A device that was issued a certificate connects with it, whatever else it has.
        op.issued_certificate_chain = Some(vec!["MIIB".into()]);
        assert_eq!(
            operation_hub_auth(individual_hub_auth(&keyed), &op),
            HubAuth::CertificateAuthority
        );
    }
}

//! Linked hubs: the hubs an instance assigns devices to, with their weight, location and
//! connector. A connector's connection string is kept only for the same destination.

use attestation::ConnectionString;
use dps_protocol::ErrorCode;
use dps_protocol::admin::{HubConnector, LinkedHub};
use dps_protocol::ids::{check_host_name, check_resource_name};

use super::DomainError;
use super::resources::{Counts, Resource};
use super::validate::{check_endpoint_url, field_error};
use crate::state::AppState;
use crate::store::Kind;

impl Resource for LinkedHub {
    const KIND: Kind = Kind::LinkedHub;
    const ITEM_TYPE: &'static str = "LinkedHub";

    fn key_of(id: &str) -> Result<String, DomainError> {
        check_host_name(id)
            .map(|()| id.to_ascii_lowercase())
            .map_err(|e| DomainError::new(ErrorCode::InvalidPathParameter, e.to_string()))
    }

    fn id(&self) -> &str {
        &self.host_name
    }

    fn set_etag(&mut self, etag: String) {
        self.etag = Some(etag);
    }

    fn prepare(&mut self, previous: Option<&Self>) -> Result<(), DomainError> {
        self.host_name = self.host_name.to_ascii_lowercase();
        self.etag = None;
        self.device_count = None;
        let weight = self.allocation_weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            return Err(field_error(
                "allocationWeight",
                "allocationWeight must be 1 to 1000",
            ));
        }
        self.allocation_weight = Some(weight);
        self.apply_allocation_policy = Some(self.apply_allocation_policy.unwrap_or(true));
        if let Some(region) = &self.region {
            check_resource_name("region", region)
                .map_err(|e| field_error("region", e.to_string()))?;
        }
        match (self.latitude, self.longitude) {
            (None, None) => {}
            (Some(lat), Some(lon))
                if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {}
            (Some(_), Some(_)) => {
                return Err(field_error(
                    "latitude",
                    "latitude must be -90 to 90 and longitude -180 to 180",
                ));
            }
            _ => {
                return Err(field_error(
                    "latitude",
                    "give latitude and longitude together",
                ));
            }
        }
        // The stored connection string is reused only for the same destination: a new
        // endpoint, or a change of connector type, needs it sent again, so that a stored key
        // is never sent somewhere new (security review item 3).
        let previous_secret = previous.and_then(|p| match (&p.connector, &self.connector) {
            (
                Some(HubConnector::AzureIotHub {
                    connection_string,
                    endpoint: before,
                }),
                Some(HubConnector::AzureIotHub {
                    endpoint: after, ..
                }),
            ) if before == after => connection_string.clone(),
            _ => None,
        });
        match self.connector.get_or_insert(HubConnector::None) {
            HubConnector::None => {}
            HubConnector::AzureIotHub {
                connection_string,
                endpoint,
            } => {
                let text = connection_string
                    .clone()
                    .or(previous_secret)
                    .ok_or_else(|| {
                        field_error(
                            "connector.connectionString",
                            "the azure-iot-hub connector needs the hub's connection string (again when its endpoint or type changes)",
                        )
                    })?;
                let parsed = ConnectionString::parse(&text)
                    .map_err(|e| field_error("connector.connectionString", e.to_string()))?;
                *connection_string = Some(parsed.reveal());
                if let Some(url) = endpoint {
                    check_endpoint_url("connector.endpoint", url)?;
                }
            }
            HubConnector::Webhook { url } => check_endpoint_url("connector.url", url)?,
        }
        Ok(())
    }

    async fn counts(state: &AppState, ns: &str) -> Result<Counts, DomainError> {
        Ok(state
            .store
            .count_by(ns, Kind::RegistrationState)
            .await?
            .into_iter()
            .collect())
    }

    fn annotate(&mut self, counts: &Counts) {
        let assigned = counts.get(&self.host_name).copied().unwrap_or(0);
        self.device_count = Some(u64::try_from(assigned).unwrap_or(0));
    }

    fn hide_secrets(&mut self) {
        if let Some(HubConnector::AzureIotHub {
            connection_string, ..
        }) = &mut self.connector
        {
            *connection_string = None;
        }
    }

    fn hide_unsent_secrets(&mut self, sent: &Self, _previous: Option<&Self>) {
        let sent_secret = matches!(
            &sent.connector,
            Some(HubConnector::AzureIotHub {
                connection_string: Some(_),
                ..
            })
        );
        if !sent_secret {
            self.hide_secrets();
        }
    }
}

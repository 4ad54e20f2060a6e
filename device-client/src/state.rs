//! The state file: the last assignment, so a device registers only on first boot, when asked,
//! or when its identity (scope, registration id, endpoint) changed.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::register::Assignment;

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceState {
    /// The service the device registered with.
    pub endpoint: String,
    /// The ID scope it registered in.
    pub id_scope: String,
    /// The assignment it received.
    #[serde(flatten)]
    pub assignment: Assignment,
}

/// Reads the state file; `None` when it is missing or unreadable (the device registers again).
pub fn load(path: &Path) -> Option<DeviceState> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the state file atomically (a temporary file renamed over the old one).
pub fn save(path: &Path, state: &DeviceState) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_a_missing_or_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(load(&path), None);
        let state = DeviceState {
            endpoint: "https://dps.example.com".into(),
            id_scope: "0ne00000001".into(),
            assignment: Assignment {
                registration_id: "dev-1".into(),
                assigned_hub: "hub-a.example.com".into(),
                device_id: "dev-1".into(),
                substatus: Some("initialAssignment".into()),
                registered_at: "2026-11-24T05:00:00Z".into(),
                hub_key_handle: Some("0x81000100".into()),
                issued_certificate_chain: None,
            },
        };
        save(&path, &state).unwrap();
        assert_eq!(load(&path), Some(state));
        std::fs::write(&path, "{ not json").unwrap();
        assert_eq!(load(&path), None);
    }
}

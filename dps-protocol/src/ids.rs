//! Identifiers that arrive from outside, parsed once at the edge.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// What was being parsed.
        kind: &'static str,
    },
    /// The identifier is longer than allowed.
    #[error("{kind} is longer than {max} characters")]
    TooLong {
        /// What was being parsed.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// The identifier holds a character outside the allowed set.
    #[error("{kind} may contain only {allowed}")]
    BadCharacter {
        /// What was being parsed.
        kind: &'static str,
        /// A description of the allowed set.
        allowed: &'static str,
    },
}

const REGISTRATION_ID_MAX: usize = 128;
const REGISTRATION_ID_ALLOWED: &str =
    "letters, digits and '-', '.', '_', ':', ending in a letter, digit or '-'";

fn parse_registration_style(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > REGISTRATION_ID_MAX {
        return Err(IdError::TooLong {
            kind,
            max: REGISTRATION_ID_MAX,
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
    let last_ok = value
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
    if !value.chars().all(allowed) || !last_ok {
        return Err(IdError::BadCharacter {
            kind,
            allowed: REGISTRATION_ID_ALLOWED,
        });
    }
    Ok(())
}

/// A device's registration id: up to 128 characters of `[A-Za-z0-9-._:]`, case-insensitive
/// (Azure DPS rules). Keeps the spelling it arrived with; compare through [`RegistrationId::key`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RegistrationId(String);

impl RegistrationId {
    /// Parses a registration id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        parse_registration_style("registration id", value)?;
        Ok(Self(value.to_owned()))
    }

    /// The id as it was sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-folded form used for lookups and uniqueness.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistrationId({})", self.0)
    }
}

/// An enrollment group's id: the same syntax as a registration id, case-insensitive.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EnrollmentGroupId(String);

impl EnrollmentGroupId {
    /// Parses an enrollment group id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        parse_registration_style("enrollment group id", value)?;
        Ok(Self(value.to_owned()))
    }

    /// The id as it was sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-folded form used for lookups and uniqueness.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Debug for EnrollmentGroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnrollmentGroupId({})", self.0)
    }
}

/// Checks an IoT Hub device id: up to 128 ASCII characters, letters, digits and
/// `- . + % _ # * ? ! ( ) , : = @ $ '` (the IoT Hub rules).
pub fn check_device_id(value: &str) -> Result<(), IdError> {
    const KIND: &str = "device id";
    if value.is_empty() {
        return Err(IdError::Empty { kind: KIND });
    }
    if value.len() > 128 {
        return Err(IdError::TooLong {
            kind: KIND,
            max: 128,
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-.+%_#*?!(),:=@$'".contains(c);
    if !value.chars().all(allowed) {
        return Err(IdError::BadCharacter {
            kind: KIND,
            allowed: "letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '",
        });
    }
    Ok(())
}

/// Checks a name we choose ourselves (instances, access policies): 1 to 64 characters of
/// `[A-Za-z0-9-_.]`, starting with a letter or digit.
pub fn check_resource_name(kind: &'static str, value: &str) -> Result<(), IdError> {
    check_name(kind, value, 64)
}

/// Checks a name of that alphabet of at most `max` characters (`credentialPolicyName` and the
/// certificate names of enrollments take 128).
pub fn check_name(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !first_ok || !value.chars().all(allowed) {
        return Err(IdError::BadCharacter {
            kind,
            allowed: "letters, digits, '-', '_' and '.', starting with a letter or digit",
        });
    }
    Ok(())
}

/// Checks a host name as devices are told it (`name` or `name:port`): DNS labels of letters,
/// digits and '-', separated by dots, at most 253 characters.
pub fn check_host_name(value: &str) -> Result<(), IdError> {
    const KIND: &str = "host name";
    if value.is_empty() {
        return Err(IdError::Empty { kind: KIND });
    }
    if value.len() > 253 {
        return Err(IdError::TooLong {
            kind: KIND,
            max: 253,
        });
    }
    let bad = IdError::BadCharacter {
        kind: KIND,
        allowed: "DNS labels (letters, digits, '-') separated by '.', optionally followed by ':port'",
    };
    let (name, port) = match value.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (value, None),
    };
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad);
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(bad)
    }
}

/// An ID scope: what a device sends to select an instance, `0ne` plus hex digits in Azure.
/// We accept 1 to 64 characters of letters and digits, compared case-insensitively.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdScope(String);

impl IdScope {
    /// Parses an ID scope.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        const KIND: &str = "ID scope";
        if value.is_empty() {
            return Err(IdError::Empty { kind: KIND });
        }
        if value.len() > 64 {
            return Err(IdError::TooLong {
                kind: KIND,
                max: 64,
            });
        }
        if !value.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(IdError::BadCharacter {
                kind: KIND,
                allowed: "letters and digits",
            });
        }
        Ok(Self(value.to_owned()))
    }

    /// The scope as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-folded form used for lookups.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdScope({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_ids_follow_azure_rules() {
        for ok in [
            "dev-01",
            "a",
            "Device.1_x:y",
            "ends-with-dash-",
            &"a".repeat(128),
        ] {
            assert!(RegistrationId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "has space",
            "ends.",
            "ends_",
            "sl/ash",
            "é",
            &"a".repeat(129),
        ] {
            assert!(RegistrationId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            RegistrationId::parse("Dev-01").map(|r| r.key()),
            Ok("dev-01".into())
        );
    }

    #[test]
    fn host_names_accept_ports_and_refuse_junk() {
        for ok in [
            "hub-a.example.com",
            "localhost",
            "localhost:8443",
            "a.b-c.d",
        ] {
            assert!(check_host_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a.com",
            "a..b",
            "a.com:0",
            "a.com:99999",
            "a b",
            "https://a.com",
        ] {
            assert!(check_host_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_ids_follow_hub_rules() {
        assert!(check_device_id("dev(1)@site$'").is_ok());
        assert!(check_device_id("dev/1").is_err());
        assert!(check_device_id("").is_err());
    }
}

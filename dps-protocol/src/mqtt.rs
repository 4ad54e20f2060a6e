//! The MQTT side of the device protocol (reference sections 3 and 10.1): the topics of requests
//! and answers, and the CONNECT user name, as the Azure SDKs write them. The JSON bodies are the
//! HTTPS ones.

use crate::ids::{IdScope, RegistrationId};

/// The one topic filter devices subscribe to.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// Register requests: this, then `$rid={rid}`.
pub const REGISTER_TOPIC: &str = "$dps/registrations/PUT/iotdps-register/?";
/// Polls: this, then `$rid={rid}&operationId={operationId}`.
pub const POLL_TOPIC: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";
const ANSWER_PREFIX: &str = "$dps/registrations/res/";
/// The longest request id taken. The SDKs send a counter or a UUID; an answer's topic echoes
/// it, and a topic must stay under MQTT's 65,535 bytes.
pub const MAX_RID: usize = 128;

/// A register or poll publish, read from its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request id, exactly as sent (answers echo it byte for byte).
    pub rid: String,
    /// The operation a poll names (percent-decoded); none for a register.
    pub operation: Option<String>,
}

impl Request {
    /// The request a publish to `topic` makes, if it is one of DPS's.
    pub fn of_topic(topic: &str) -> Option<Self> {
        let (query, poll) = if let Some(query) = topic.strip_prefix(REGISTER_TOPIC) {
            (query, false)
        } else {
            (topic.strip_prefix(POLL_TOPIC)?, true)
        };
        let mut rid = None;
        let mut operation = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("$rid", value)) => rid = Some(value.to_owned()),
                Some(("operationId", value)) => operation = Some(percent_decode(value)?),
                _ => {}
            }
        }
        // Echoed in the answer's topic, where wildcards and NUL are not allowed.
        let rid =
            rid.filter(|r| !r.is_empty() && r.len() <= MAX_RID && !r.contains(['#', '+', '\0']))?;
        match (poll, operation) {
            (false, _) => Some(Self {
                rid,
                operation: None,
            }),
            (true, Some(operation)) if !operation.is_empty() => Some(Self {
                rid,
                operation: Some(operation),
            }),
            (true, _) => None,
        }
    }

    /// The topic of this request (the operation id percent-encoded by the caller).
    pub fn topic(rid: &str, encoded_operation: Option<&str>) -> String {
        match encoded_operation {
            None => format!("{REGISTER_TOPIC}$rid={rid}"),
            Some(operation) => format!("{POLL_TOPIC}$rid={rid}&operationId={operation}"),
        }
    }
}

/// An answer's topic: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`, `$rid`
/// first (the Python and C# clients parse it so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status the answer stands for.
    pub status: u16,
    /// The request id it answers.
    pub rid: String,
    /// When to ask again, seconds.
    pub retry_after: Option<u64>,
}

impl Answer {
    /// The topic the answer is published on.
    pub fn topic(&self) -> String {
        let mut topic = format!("{ANSWER_PREFIX}{}/?$rid={}", self.status, self.rid);
        if let Some(seconds) = self.retry_after {
            topic.push_str(&format!("&retry-after={seconds}"));
        }
        topic
    }

    /// The answer an answer topic stands for.
    pub fn of_topic(topic: &str) -> Option<Self> {
        let (status, query) = topic.strip_prefix(ANSWER_PREFIX)?.split_once("/?")?;
        let status = status.parse().ok()?;
        let mut rid = None;
        let mut retry_after = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("$rid", value)) if rid.is_none() => rid = Some(value.to_owned()),
                Some(("retry-after", value)) => retry_after = value.parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            status,
            rid: rid?,
            retry_after,
        })
    }
}

/// The device a CONNECT names in its user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName {
    /// The instance's ID scope.
    pub scope: IdScope,
    /// The device's registration id.
    pub id: RegistrationId,
    /// The `api-version` it names (`2019-03-31` when it names none).
    pub api_version: String,
}

impl UserName {
    /// `{idScope}/registrations/{registrationId}/api-version=...&ClientVersion=...`, read
    /// leniently: anything after the id is optional.
    pub fn parse(username: &str) -> Option<Self> {
        let mut parts = username.splitn(4, '/');
        let scope = IdScope::parse(parts.next()?).ok()?;
        if parts.next()? != "registrations" {
            return None;
        }
        let id = RegistrationId::parse(parts.next()?).ok()?;
        let api_version = parts
            .next()
            .and_then(|rest| {
                rest.split('&')
                    .find_map(|pair| pair.strip_prefix("api-version="))
            })
            .filter(|v| v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            .unwrap_or("2019-03-31")
            .to_owned();
        Some(Self {
            scope,
            id,
            api_version,
        })
    }

    /// The user name as the SDKs write it, with `client_version` (already percent-encoded).
    pub fn format(scope: &str, id: &str, api_version: &str, client_version: &str) -> String {
        format!(
            "{scope}/registrations/{id}/api-version={api_version}&ClientVersion={client_version}"
        )
    }
}

/// Percent-decoding of a topic's query value (the Python client quotes the operation id).
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = value.get(at + 1..at + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_of_every_client_name_the_device() {
        for username in [
            "0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device%2F1.9.1",
            "0ne00000001/registrations/dev-1/api-version=2021-06-01&ClientVersion=c%2F1.0",
            "0ne00000001/registrations/dev-1/api-version=2019-03-31",
            "0ne00000001/registrations/dev-1",
        ] {
            let name = UserName::parse(username).unwrap();
            assert_eq!(name.scope.as_str(), "0ne00000001", "{username}");
            assert_eq!(name.id.as_str(), "dev-1", "{username}");
        }
        for bad in [
            "",
            "0ne1",
            "0ne1/devices/dev-1",
            "0ne1/registrations/bad id",
            "a b/registrations/x",
        ] {
            assert!(UserName::parse(bad).is_none(), "{bad}");
        }
        let written = UserName::format("0ne1", "dev-1", "2021-06-01", "dps-device%2F1");
        assert_eq!(UserName::parse(&written).unwrap().api_version, "2021-06-01");
    }

    #[test]
    fn request_topics_keep_the_rid_as_sent() {
        assert_eq!(
            Request::of_topic("$dps/registrations/PUT/iotdps-register/?$rid=5d0f%2Dab"),
            Some(Request {
                rid: "5d0f%2Dab".into(),
                operation: None
            })
        );
        assert_eq!(
            Request::of_topic(&Request::topic("7", Some("5.abc%2Edef"))),
            Some(Request {
                rid: "7".into(),
                operation: Some("5.abc.def".into())
            })
        );
        for bad in [
            "devices/x/messages/events/",
            "$dps/registrations/PUT/iotdps-register/",
            "$dps/registrations/PUT/iotdps-register/?$rid=",
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=%zz",
            "$dps/registrations/PUT/iotdps-register/?$rid=1#",
            "$dps/registrations/PUT/iotdps-register/?$rid=+",
            &format!("{REGISTER_TOPIC}$rid={}", "1".repeat(MAX_RID + 1)),
        ] {
            assert_eq!(Request::of_topic(bad), None, "{bad}");
        }
    }

    #[test]
    fn answer_topics_round_trip() {
        let answer = Answer {
            status: 202,
            rid: "3".into(),
            retry_after: Some(2),
        };
        assert_eq!(
            answer.topic(),
            "$dps/registrations/res/202/?$rid=3&retry-after=2"
        );
        assert_eq!(Answer::of_topic(&answer.topic()), Some(answer));
        assert_eq!(
            Answer::of_topic("$dps/registrations/res/200/?$rid=4"),
            Some(Answer {
                status: 200,
                rid: "4".into(),
                retry_after: None
            })
        );
        assert_eq!(Answer::of_topic("elsewhere"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_topics_and_user_names_never_panic(text in ".{0,200}") {
            let _ = Request::of_topic(&text);
            let _ = Answer::of_topic(&text);
            let _ = UserName::parse(&text);
            let _ = Request::of_topic(&format!("{REGISTER_TOPIC}{text}"));
            let _ = Request::of_topic(&format!("{POLL_TOPIC}$rid=1&operationId={text}"));
        }

        #[test]
        fn answers_read_back_what_was_written(
            status in 100u16..600,
            rid in "[A-Za-z0-9%.-]{1,24}",
            retry_after in proptest::option::of(0u64..100_000),
        ) {
            let answer = Answer { status, rid, retry_after };
            proptest::prop_assert_eq!(Answer::of_topic(&answer.topic()), Some(answer));
        }
    }
}

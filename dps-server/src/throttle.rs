//! Throttling of the device API: per registration id (registrations and polls counted
//! separately, as Azure DPS does) and per source address. A throttled request gets 429 with
//! `Retry-After`. Limits are per server process; a setting of 0 turns a limit off.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use dps_protocol::ErrorCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Throttling limits, each per minute with a burst of the same size.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// `PUT register` per registration id.
    pub registrations_per_device_per_minute: u32,
    /// Operation polls and status lookups per registration id.
    pub polls_per_device_per_minute: u32,
    /// Device requests of any kind per source address.
    pub requests_per_address_per_minute: u32,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        // Generous: the Node HTTP client treats a 429 as fatal, so throttle only abuse.
        Self {
            registrations_per_device_per_minute: 30,
            polls_per_device_per_minute: 120,
            requests_per_address_per_minute: 60_000,
        }
    }
}

/// What is being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `PUT register`.
    Register,
    /// Operation poll or status lookup.
    Poll,
}

/// The limiters of one server process.
#[derive(Debug)]
pub struct Throttle {
    register: Option<DefaultKeyedRateLimiter<String>>,
    poll: Option<DefaultKeyedRateLimiter<String>>,
    address: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_minute: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

impl Throttle {
    /// Limiters for `config`.
    pub fn new(config: &ThrottleConfig) -> Self {
        Self {
            register: limiter(config.registrations_per_device_per_minute),
            poll: limiter(config.polls_per_device_per_minute),
            address: limiter(config.requests_per_address_per_minute),
        }
    }

    /// Counts a request; a 429 answer when a limit is exceeded.
    pub fn check(
        &self,
        action: Action,
        device_key: &str,
        address: Option<IpAddr>,
    ) -> Result<(), Throttled> {
        let clock = DefaultClock::default();
        if let (Some(limiter), Some(ip)) = (&self.address, address)
            && let Err(not_until) = limiter.check_key(&ip)
        {
            return Err(Throttled(not_until.wait_time_from(clock.now())));
        }
        let per_device = match action {
            Action::Register => &self.register,
            Action::Poll => &self.poll,
        };
        if let Some(limiter) = per_device
            && let Err(not_until) = limiter.check_key(&device_key.to_owned())
        {
            return Err(Throttled(not_until.wait_time_from(clock.now())));
        }
        Ok(())
    }

    /// Forgets keys that have been idle long enough to be full again (bounded memory).
    pub fn forget_idle(&self) {
        if let Some(l) = &self.register {
            l.retain_recent();
        }
        if let Some(l) = &self.poll {
            l.retain_recent();
        }
        if let Some(l) = &self.address {
            l.retain_recent();
        }
    }
}

/// A throttled request: 429 with `Retry-After` in whole seconds (at least 1).
#[derive(Debug)]
pub struct Throttled(pub Duration);

impl IntoResponse for Throttled {
    fn into_response(self) -> Response {
        let seconds = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        let seconds = seconds.clamp(1, 300);
        let mut response = ApiError::new(
            ErrorCode::Throttled,
            format!("too many requests; retry after {seconds} s"),
        )
        .into_response();
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_per_device_and_per_action() {
        let throttle = Throttle::new(&ThrottleConfig {
            registrations_per_device_per_minute: 2,
            polls_per_device_per_minute: 0,
            requests_per_address_per_minute: 0,
        });
        assert!(throttle.check(Action::Register, "a", None).is_ok());
        assert!(throttle.check(Action::Register, "a", None).is_ok());
        let Err(Throttled(wait)) = throttle.check(Action::Register, "a", None) else {
            panic!("the third registration within a minute is throttled");
        };
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60));
        assert!(
            throttle.check(Action::Register, "b", None).is_ok(),
            "other devices are not"
        );
        for _ in 0..100 {
            assert!(
                throttle.check(Action::Poll, "a", None).is_ok(),
                "0 turns a limit off"
            );
        }
    }

    #[test]
    fn addresses_are_limited_across_devices() {
        let throttle = Throttle::new(&ThrottleConfig {
            registrations_per_device_per_minute: 0,
            polls_per_device_per_minute: 0,
            requests_per_address_per_minute: 3,
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for device in ["a", "b", "c"] {
            assert!(throttle.check(Action::Register, device, Some(ip)).is_ok());
        }
        assert!(throttle.check(Action::Poll, "d", Some(ip)).is_err());
        assert!(
            throttle
                .check(Action::Poll, "d", Some("127.0.0.2".parse().unwrap()))
                .is_ok()
        );
    }
}

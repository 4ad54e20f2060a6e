//! Throttling of the device API. A device's own quotas (registrations and polls per
//! registration id, counted separately, as Azure DPS does) are charged only after it proved
//! who it is, so that nobody else can use them up. What is done before any proof (failed
//! proofs, TPM challenges) is charged to the source address and, with a much higher bound, to
//! the registration id; once either is spent, further requests from that address (or for that
//! id) are refused before any proof is checked, until the budget refills. Every request also
//! counts against a per-address limit. A throttled request gets 429 with `Retry-After`. Limits
//! are per server process; a setting of 0 turns a limit off.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// Throttling limits, each per minute with a burst of the same size.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// `PUT register` per registration id, once authenticated.
    pub registrations_per_device_per_minute: u32,
    /// Operation polls and status lookups per registration id, once authenticated.
    pub polls_per_device_per_minute: u32,
    /// Device requests of any kind per source address.
    pub requests_per_address_per_minute: u32,
    /// Unauthenticated work per source address: failed proofs and TPM challenges.
    pub unauthenticated_per_address_per_minute: u32,
    /// Unauthenticated work per registration id, from all addresses together.
    pub unauthenticated_per_device_per_minute: u32,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        // Generous: the Node HTTP client treats a 429 as fatal, so throttle only abuse.
        Self {
            registrations_per_device_per_minute: 30,
            polls_per_device_per_minute: 120,
            requests_per_address_per_minute: 60_000,
            unauthenticated_per_address_per_minute: 60,
            unauthenticated_per_device_per_minute: 600,
        }
    }
}

/// What a device's own quota is charged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `PUT register`.
    Register,
    /// Operation poll or status lookup.
    Poll,
}

/// Most keys a penalty box remembers; past it, a spent key is still refused when its next
/// failure is counted, only not before its proof is checked.
const MAX_BLOCKED: usize = 100_000;

/// Keys refused until a moment: those whose unauthenticated budget is spent.
#[derive(Debug)]
struct Blocked<K> {
    until: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> Blocked<K> {
    fn new() -> Self {
        Self {
            until: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, Instant>> {
        // Only timestamps: a poisoned map is still usable.
        self.until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `key` stays blocked, if it is.
    fn remaining(&self, key: &K) -> Option<Duration> {
        let until = *self.entries().get(key)?;
        until.checked_duration_since(Instant::now())
    }

    fn block(&self, key: K, wait: Duration) {
        let mut entries = self.entries();
        if entries.len() >= MAX_BLOCKED {
            let now = Instant::now();
            entries.retain(|_, until| *until > now);
            if entries.len() >= MAX_BLOCKED {
                return;
            }
        }
        entries.insert(key, Instant::now() + wait);
    }

    fn forget_expired(&self) {
        let now = Instant::now();
        self.entries().retain(|_, until| *until > now);
    }
}

/// A limiter and the keys it has refused.
#[derive(Debug)]
struct Budget<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    blocked: Blocked<K>,
}

impl<K: Hash + Eq + Clone> Budget<K> {
    fn new(per_minute: u32) -> Option<Self> {
        Some(Self {
            limiter: limiter(per_minute)?,
            blocked: Blocked::new(),
        })
    }

    /// Refuses a spent key without charging it.
    fn check_open(&self, key: &K) -> Result<(), Throttled> {
        match self.blocked.remaining(key) {
            Some(wait) => Err(Throttled(wait)),
            None => Ok(()),
        }
    }

    /// Charges one unit; a spent budget blocks the key until it refills.
    fn charge(&self, key: K) -> Result<(), Throttled> {
        match self.limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                self.blocked.block(key, wait);
                Err(Throttled(wait))
            }
        }
    }

    fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.blocked.forget_expired();
    }
}

/// The limiters of one server process.
#[derive(Debug)]
pub struct Throttle {
    register: Option<DefaultKeyedRateLimiter<String>>,
    poll: Option<DefaultKeyedRateLimiter<String>>,
    address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    unauthenticated_address: Option<Budget<IpAddr>>,
    unauthenticated_device: Option<Budget<String>>,
}

fn limiter<K: Hash + Eq + Clone>(per_minute: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

fn charge<K: Hash + Eq + Clone>(
    limiter: &Option<DefaultKeyedRateLimiter<K>>,
    key: &K,
) -> Result<(), Throttled> {
    match limiter {
        Some(limiter) => limiter.check_key(key).map_err(|not_until| {
            Throttled(not_until.wait_time_from(DefaultClock::default().now()))
        }),
        None => Ok(()),
    }
}

impl Throttle {
    /// Limiters for `config`.
    pub fn new(config: &ThrottleConfig) -> Self {
        Self {
            register: limiter(config.registrations_per_device_per_minute),
            poll: limiter(config.polls_per_device_per_minute),
            address: limiter(config.requests_per_address_per_minute),
            unauthenticated_address: Budget::new(config.unauthenticated_per_address_per_minute),
            unauthenticated_device: Budget::new(config.unauthenticated_per_device_per_minute),
        }
    }

    /// Before anything is checked: counts the request against its address, and refuses an
    /// address or registration id whose unauthenticated budget is spent.
    pub fn enter(&self, device_key: &str, address: Option<IpAddr>) -> Result<(), Throttled> {
        if let Some(ip) = address {
            charge(&self.address, &ip)?;
            if let Some(budget) = &self.unauthenticated_address {
                budget.check_open(&ip)?;
            }
        }
        if let Some(budget) = &self.unauthenticated_device {
            budget.check_open(&device_key.to_owned())?;
        }
        Ok(())
    }

    /// Charges unauthenticated work (a failed proof, a TPM challenge) to the address and the
    /// registration id; a 429 once either budget is spent.
    pub fn unauthenticated(
        &self,
        device_key: &str,
        address: Option<IpAddr>,
    ) -> Result<(), Throttled> {
        let by_address = match (&self.unauthenticated_address, address) {
            (Some(budget), Some(ip)) => budget.charge(ip),
            _ => Ok(()),
        };
        let by_device = match &self.unauthenticated_device {
            Some(budget) => budget.charge(device_key.to_owned()),
            None => Ok(()),
        };
        by_address.and(by_device)
    }

    /// Charges an authenticated device's own quota for `action`.
    pub fn authenticated(&self, action: Action, device_key: &str) -> Result<(), Throttled> {
        let per_device = match action {
            Action::Register => &self.register,
            Action::Poll => &self.poll,
        };
        charge(per_device, &device_key.to_owned())
    }

    /// Forgets keys that have been idle long enough to be full again (bounded memory).
    pub fn forget_idle(&self) {
        for limiter in [&self.register, &self.poll].into_iter().flatten() {
            limiter.retain_recent();
        }
        if let Some(l) = &self.address {
            l.retain_recent();
        }
        if let Some(b) = &self.unauthenticated_address {
            b.forget_idle();
        }
        if let Some(b) = &self.unauthenticated_device {
            b.forget_idle();
        }
    }
}

/// A throttled request: 429 with `Retry-After` in whole seconds (at least 1).
#[derive(Debug)]
pub struct Throttled(pub Duration);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(
        register: u32,
        address: u32,
        unauth_address: u32,
        unauth_device: u32,
    ) -> ThrottleConfig {
        ThrottleConfig {
            registrations_per_device_per_minute: register,
            polls_per_device_per_minute: 0,
            requests_per_address_per_minute: address,
            unauthenticated_per_address_per_minute: unauth_address,
            unauthenticated_per_device_per_minute: unauth_device,
        }
    }

    #[test]
    fn a_device_quota_applies_per_device_and_per_action() {
        let throttle = Throttle::new(&config(2, 0, 0, 0));
        assert!(throttle.authenticated(Action::Register, "a").is_ok());
        assert!(throttle.authenticated(Action::Register, "a").is_ok());
        let Err(Throttled(wait)) = throttle.authenticated(Action::Register, "a") else {
            panic!("the third registration within a minute is throttled");
        };
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60));
        assert!(
            throttle.authenticated(Action::Register, "b").is_ok(),
            "other devices are not"
        );
        for _ in 0..100 {
            assert!(
                throttle.authenticated(Action::Poll, "a").is_ok(),
                "0 turns a limit off"
            );
        }
    }

    #[test]
    fn addresses_are_limited_across_devices() {
        let throttle = Throttle::new(&config(0, 3, 0, 0));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for device in ["a", "b", "c"] {
            assert!(throttle.enter(device, Some(ip)).is_ok());
        }
        assert!(throttle.enter("d", Some(ip)).is_err());
        assert!(
            throttle
                .enter("d", Some("127.0.0.2".parse().unwrap()))
                .is_ok()
        );
    }

    #[test]
    fn spent_unauthenticated_budgets_block_before_any_proof() {
        let throttle = Throttle::new(&config(0, 0, 2, 100));
        let (ip, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // The per-address budget, then 429 and a block.
        assert!(throttle.unauthenticated("x", Some(ip)).is_ok());
        assert!(throttle.unauthenticated("x", Some(ip)).is_ok());
        assert!(throttle.unauthenticated("x", Some(ip)).is_err());
        assert!(
            throttle.enter("y", Some(ip)).is_err(),
            "the address is blocked for every id"
        );
        assert!(throttle.enter("x", Some(other)).is_ok(), "the id is not");
        // Nothing unauthenticated touches a device's own quota.
        assert!(throttle.authenticated(Action::Register, "x").is_ok());
    }
}

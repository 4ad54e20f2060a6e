//! What a run measured: throughput over the whole run, latency percentiles of successful
//! registrations (first request to `assigned`) and of the first request alone, and failures
//! by code.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1000.0
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `service` or `ceiling`.
    pub target: String,
    /// `individual`, `group` or `x509`.
    pub mode: String,
    /// Devices that tried.
    pub devices: usize,
    /// How many at once.
    pub concurrency: usize,
    /// Devices assigned.
    pub assigned: usize,
    /// Failures by code (`http-401/401002`, `status-failed/400208`, `connect`, ...).
    pub errors: BTreeMap<String, usize>,
    /// Wall time of the run, seconds.
    pub elapsed_secs: f64,
    /// Assigned devices per second.
    pub throughput_per_sec: f64,
    /// First request to `assigned`.
    pub registration_ms: Percentiles,
    /// The first request (`PUT .../register`) alone, including the TLS handshake.
    pub first_request_ms: Percentiles,
    /// CPU of the processes named by `--cpu-pid` and `--cpu-command` during the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpu: Vec<crate::cpu::Spent>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                p.p50, p.p90, p.p99, p.max
            )
        };
        writeln!(
            f,
            "{} ({} mode): {}/{} assigned in {:.2} s with concurrency {}: {:.1} registrations/s",
            self.target,
            self.mode,
            self.assigned,
            self.devices,
            self.elapsed_secs,
            self.concurrency,
            self.throughput_per_sec
        )?;
        writeln!(f, "  registration:  {}", p(&self.registration_ms))?;
        write!(f, "  first request: {}", p(&self.first_request_ms))?;
        for spent in &self.cpu {
            write!(
                f,
                "\n  cpu of {}: {:.2} s, {:.0} µs per registration",
                spent.of, spent.cpu_secs, spent.us_per_registration
            )?;
        }
        for (code, count) in &self.errors {
            write!(f, "\n  error {code}: {count}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(Percentiles::of(&mut one).p50, 7.0);
        assert_eq!(Percentiles::of(&mut []).max, 0.0);
    }
}

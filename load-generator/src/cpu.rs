//! CPU time of other processes, read from `/proc` before and after a run, so that a report can
//! say what each server spent per registration. Rates drift on a shared machine; CPU per
//! registration does not depend on how fast the load arrived.

use std::path::Path;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on every Linux architecture the
/// service runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// Processes whose CPU a run reports.
#[derive(Debug, Clone)]
pub enum Target {
    /// One process (all its threads).
    Pid(u32),
    /// Every process whose command name is this (PostgreSQL's backends, say), with the CPU of
    /// the children they reaped.
    Command(String),
}

impl Target {
    fn label(&self) -> String {
        match self {
            Target::Pid(pid) => format!("pid {pid}"),
            Target::Command(name) => name.clone(),
        }
    }

    /// Ticks of CPU used so far.
    fn ticks(&self) -> std::io::Result<u64> {
        match self {
            Target::Pid(pid) => Ok(stat_ticks(&Path::new("/proc").join(pid.to_string()))?.0),
            Target::Command(name) => {
                let mut total = 0;
                for entry in std::fs::read_dir("/proc")?.flatten() {
                    let is_pid = entry
                        .file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit());
                    // Processes may exit between listing and reading: skip them.
                    if let (true, Ok((own, reaped, command))) = (is_pid, stat_ticks(&entry.path()))
                        && command == *name
                    {
                        total += own + reaped;
                    }
                }
                Ok(total)
            }
        }
    }
}

/// A process's own CPU ticks (user and system, all threads), those of its reaped children, and
/// its command name, from `/proc/PID/stat`.
fn stat_ticks(dir: &Path) -> std::io::Result<(u64, u64, String)> {
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected /proc stat");
    // `PID (command) state ...`: the command may hold spaces and parentheses, so split at the
    // last ')'.
    let open = stat.find('(').ok_or_else(invalid)?;
    let close = stat.rfind(')').ok_or_else(invalid)?;
    let command = stat.get(open + 1..close).ok_or_else(invalid)?.to_owned();
    let fields: Vec<&str> = stat
        .get(close + 1..)
        .ok_or_else(invalid)?
        .split_whitespace()
        .collect();
    // After the command: state is field 3 of the man page, utime 14, stime 15, cutime 16,
    // cstime 17.
    let field = |n: usize| -> std::io::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(invalid)
    };
    Ok((field(14)? + field(15)?, field(16)? + field(17)?, command))
}

/// CPU a target spent during a run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spent {
    /// `pid N` or a command name.
    pub of: String,
    /// Seconds of CPU during the run.
    pub cpu_secs: f64,
    /// Microseconds of CPU per assigned device.
    pub us_per_registration: f64,
}

/// Readings taken before a run.
#[derive(Debug)]
pub struct Before(Vec<(Target, u64)>);

/// Reads every target now.
pub fn before(targets: &[Target]) -> std::io::Result<Before> {
    targets
        .iter()
        .map(|t| Ok((t.clone(), t.ticks()?)))
        .collect::<std::io::Result<_>>()
        .map(Before)
}

impl Before {
    /// What each target spent since, per assigned device.
    pub fn spent(&self, assigned: usize) -> std::io::Result<Vec<Spent>> {
        self.0
            .iter()
            .map(|(target, then)| {
                let secs = target.ticks()?.saturating_sub(*then) as f64 / TICKS_PER_SEC;
                Ok(Spent {
                    of: target.label(),
                    cpu_secs: secs,
                    us_per_registration: secs * 1e6 / assigned.max(1) as f64,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn this_process_spends_cpu_and_is_found_by_pid_and_by_name() {
        let me = std::process::id();
        let (_, _, command) = stat_ticks(&Path::new("/proc").join(me.to_string())).unwrap();
        let targets = [Target::Pid(me), Target::Command(command)];
        let before = before(&targets).unwrap();
        // Burn about 50 ms of CPU (five ticks).
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = before.spent(10).unwrap();
        for s in &spent {
            assert!(s.cpu_secs >= 0.02, "{s:?}");
            assert!(
                (s.us_per_registration - s.cpu_secs * 1e5).abs() < 1e-6,
                "{s:?}"
            );
        }
        assert_eq!(spent[0].of, format!("pid {me}"));
    }
}

//! The accept loop out of file descriptors: it must back off instead of spinning on the
//! listener (which stays readable while connections wait in the backlog), and serve again once
//! descriptors are free. Alone in its own test binary, because it lowers the process's
//! descriptor limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use dps_listener::{ConnectionLimits, serve};

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on every Linux architecture).
const TICKS_PER_SECOND: u64 = 100;

/// The CPU time this process has used (user and system, all threads), read from `stat`, an
/// open `/proc/self/stat` (opened beforehand: reading it must not need a descriptor).
fn cpu_time(stat: &mut std::fs::File) -> Duration {
    use std::io::Seek;
    stat.rewind().unwrap();
    let mut text = String::new();
    stat.read_to_string(&mut text).unwrap();
    let stat = text;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The soft and hard limits on open files, as `/proc/self/limits` gives them.
fn descriptor_limit() -> (String, String) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let values: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (values[0].to_owned(), values[1].to_owned())
}

/// Sets this process's limits on open files with util-linux's `prlimit`.
fn set_descriptor_limit(soft: &str, hard: &str) {
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_loop_backs_off_and_recovers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // Clients that the kernel completes in the backlog before the loop runs.
    let mut waiting: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    for stream in &waiting {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    let mut stat = std::fs::File::open("/proc/self/stat").unwrap();
    let (soft, hard) = descriptor_limit();
    // Room for a couple of accepted connections, then `accept` fails with EMFILE.
    set_descriptor_limit(&(open_descriptors() + 2).to_string(), &hard);

    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let router = Router::new().route("/", get(|| async { "served" }));
    let limits = ConnectionLimits {
        max_connections: 1000,
        ..ConnectionLimits::default()
    };
    tokio::spawn(serve(
        listener,
        None,
        router,
        limits,
        stopped,
        Duration::from_secs(1),
    ));

    // With descriptors exhausted and clients still waiting, a loop that retried at once
    // would keep a core busy.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_time(&mut stat);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_time(&mut stat) - before;
    assert!(
        spent < Duration::from_millis(300),
        "the accept loop used {spent:?} of CPU in 2 s while out of descriptors"
    );

    // The loop really is out of descriptors: the last client waiting is not served.
    let mut last = waiting.pop().unwrap();
    last.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    last.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let unserved = last.read(&mut byte);
    assert!(
        matches!(&unserved, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "a client was served while the loop should have been out of descriptors: {unserved:?}"
    );

    // Descriptors free again: the clients that waited are served.
    set_descriptor_limit(&soft, &hard);
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let answer = tokio::task::spawn_blocking(move || {
        let mut answer = String::new();
        last.read_to_string(&mut answer).map(|_| answer)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("served"), "{answer}");
}

//! Security review item 8: no connection can be held open for free. Every phase has a deadline
//! (TLS handshake, request headers, request body, idle keep-alive on HTTP/1.1 and HTTP/2) and
//! the number of connections is capped, so slow or silent clients cannot exhaust the server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, TestServer};
use reqwest::Method;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server() -> TestServer {
    TestServer::start_with(Backend::Sqlite, |c| {
        c.limits.tls_handshake_timeout_secs = 1;
        c.limits.request_header_timeout_secs = 1;
        c.limits.request_body_timeout_secs = 1;
        c.limits.idle_timeout_secs = 1;
        c.limits.max_connections = 3;
    })
    .await
}

/// A TLS connection to the server, offering `alpn`.
async fn tls(t: &TestServer, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&t.running().ca_certificate).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(t.running().local_addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads until the peer closes (or an error), and how long that took; panics after 10 s.
async fn closed_after(stream: &mut (impl AsyncReadExt + Unpin)) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
            Err(_) => panic!("the server kept the connection open: {seen:?}"),
            Ok(Ok(0) | Err(_)) => return (started.elapsed(), seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_of_a_connection_has_a_deadline() {
    let t = server().await;

    // A TCP connection that never starts TLS.
    let mut silent = TcpStream::connect(t.running().local_addr).await.unwrap();
    let (took, _) = closed_after(&mut silent).await;
    assert!(took < Duration::from_secs(4), "{took:?}");

    // TLS done, then no request (HTTP/1.1, and HTTP/2 before its preface).
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let mut idle = tls(&t, alpn).await;
        let (took, _) = closed_after(&mut idle).await;
        assert!(took < Duration::from_secs(4), "{alpn:?}: {took:?}");
    }

    // Headers sent a byte at a time, never finished.
    let mut slow = tls(&t, b"http/1.1").await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let (took, _) = closed_after(&mut slow).await;
    assert!(took < Duration::from_secs(4), "{took:?}");

    // A body that never arrives in full (a device request, whose body is read first).
    let mut body = tls(&t, b"http/1.1").await;
    let head = format!(
        "PUT /{}/registrations/dev-1/register HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"a\":",
        t.running().admin.id_scope
    );
    body.write_all(head.as_bytes()).await.unwrap();
    let (took, answer) = closed_after(&mut body).await;
    assert!(took < Duration::from_secs(4), "{took:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("408001"), "{answer}");

    // HTTP/2: the preface and settings, then silence: closed once idle.
    let mut h2 = tls(&t, b"h2").await;
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (took, _) = closed_after(&mut h2).await;
    assert!(took < Duration::from_secs(4), "{took:?}");

    // A keep-alive connection that served a request is closed once idle.
    let mut kept = tls(&t, b"http/1.1").await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (took, answer) = closed_after(&mut kept).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(took < Duration::from_secs(4), "{took:?}");

    // The server still serves.
    let health = t.anonymous(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_freed() {
    let t = TestServer::start_with(Backend::Sqlite, |c| {
        c.limits.max_connections = 3;
        c.limits.idle_timeout_secs = 30;
        c.limits.request_header_timeout_secs = 30;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls(&t, b"http/1.1").await);
    }
    // A fourth client waits: nothing is accepted past the cap.
    let fresh = || {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(
                &std::fs::read(&t.running().ca_certificate).unwrap(),
            )
            .unwrap()])
            .timeout(Duration::from_millis(1500))
            .build()
            .unwrap()
    };
    let url = format!("{}/healthz", t.base);
    assert!(
        fresh().get(&url).send().await.is_err(),
        "served past the cap"
    );
    // One held connection goes away: the next client is served.
    drop(held.pop());
    let served = fresh().get(&url).send().await.unwrap();
    assert_eq!(served.status(), 200);
}

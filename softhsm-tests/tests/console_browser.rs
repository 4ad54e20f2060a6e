//! The admin console in a real browser: Debian's headless Chromium driven over WebDriver by
//! `interop/console/browser.py` (selenium, installed by scripts/test-deps.sh with chromium and
//! chromium-driver). Signs in, creates an enrollment, reads its keys, registers the device,
//! sees the registration in the live events, disables the enrollment and finds it all in the
//! audit log. The screenshots of every page are kept in `target/console-screenshots`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use softhsm_tests::{ServerProcess, free_port};

#[test]
fn the_console_works_in_a_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("interop/console/.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test-deps.sh",
        python.display()
    );
    for binary in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: run scripts/test-deps.sh"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let server =
        ServerProcess::start(dir.path(), &["--listen", &format!("127.0.0.1:{port}")], &[]).unwrap();
    server
        .admin_json(&["hub", "set", "hub-a.example.com"])
        .unwrap();
    let shots = root.join("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let output = Command::new("timeout")
        .args(["--kill-after=5", "240"])
        .arg(&python)
        .arg(root.join("interop/console/browser.py"))
        .args(["--base", &format!("https://localhost:{port}")])
        .args(["--connection-string", &server.connection_string])
        .args(["--id-scope", &server.id_scope])
        .arg("--ca")
        .arg(&server.ca_certificate)
        .arg("--shots")
        .arg(&shots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser run failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        server.log().join("\n")
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(summary["ok"], true, "{stdout}");
    let taken = summary["shots"].as_array().unwrap();
    assert!(taken.len() >= 12, "{taken:?}");
    for shot in taken {
        let bytes = std::fs::read(shot.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot} is a PNG");
    }
    // What the browser did, seen through the API: the device registered, the enrollment is
    // disabled.
    let state = server
        .admin_json(&["registration", "show", "console-dev-1"])
        .unwrap();
    assert_eq!(state["assignedHub"], "hub-a.example.com");
    let enrollment = server
        .admin_json(&["enrollment", "show", "console-dev-1"])
        .unwrap();
    assert_eq!(enrollment["provisioningStatus"], "disabled");
}

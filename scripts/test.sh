#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine with Rust: installs and starts what the
# tests need (PostgreSQL, Node.js and the npm packages of the interop tests), builds the binaries
# the black-box tests run, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/test-deps.sh)"
# The device client's TPM support is a cargo feature (it links tpm2-tss, which test-deps.sh
# installs); the black-box TPM tests need it.
cargo build -j2 --workspace --bins --features device-client/tpm
cargo test -j2 --workspace --features device-client/tpm

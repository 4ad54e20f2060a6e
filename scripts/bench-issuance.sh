#!/usr/bin/env bash
# What issuing one operational certificate costs (checking the device's CSR and signing the
# certificate), with the CA key in software and with it inside a SoftHSM2 token (ECDSA P-384 and
# RSA 3072, one session), in one run on this machine. Needs softhsm2 (apt-get install softhsm2,
# or scripts/test-deps.sh).
# Usage: scripts/bench-issuance.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p softhsm-tests --bin softhsm-generate-key
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" \
  >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"
softhsm2-util --init-token --free --label bench-ca --so-pin 12345678 --pin 1234 >/dev/null
target/release/softhsm-generate-key bench-ca 1234 ca-p384 ec384 >/dev/null
target/release/softhsm-generate-key bench-ca 1234 ca-rsa3072 rsa3072 >/dev/null
uri() { echo "pkcs11:token=bench-ca;object=$1?pin-value=1234"; }
export DPS_BENCH_CA_KEYS="p384=$(uri ca-p384),rsa3072=$(uri ca-rsa3072)"
cargo bench -p attestation --bench attestation -- issuance
cargo bench -p softhsm-tests --bench token_issuance

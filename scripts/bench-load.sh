#!/usr/bin/env bash
# Registration throughput and latency of a release build, each mode against the service and
# against the ceiling (the same TLS stack and accept loop with canned answers) in one run.
# Usage: scripts/bench-load.sh [DEVICES] [CONCURRENCY]   (defaults 2000 and 64)
# Set DPS_BENCH_DATABASE_URL to measure on PostgreSQL instead of SQLite, and DPS_BENCH_MODES to
# run some of the modes (default: individual group x509 tpm).
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-2000}"
concurrency="${2:-64}"
cargo build -j2 --release -p dps-server -p load-generator --bins
work="$(mktemp -d)"
port=18443
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
(
  cd "$work"
  # One address sends every request, so the per-address and per-device throttles are off.
  export DPS_THROTTLE__REQUESTS_PER_ADDRESS_PER_MINUTE=0
  export DPS_THROTTLE__REGISTRATIONS_PER_DEVICE_PER_MINUTE=0
  export DPS_THROTTLE__POLLS_PER_DEVICE_PER_MINUTE=0
  export DPS_LOG__FILTER=warn
  if [ -n "${DPS_BENCH_DATABASE_URL:-}" ]; then export DPS_DATABASE_URL="$DPS_BENCH_DATABASE_URL"; fi
  exec "$OLDPWD/target/release/dps-server" serve --listen "127.0.0.1:$port" >server.out 2>server.err
) &
server=$!
for _ in $(seq 100); do grep -q '^listening:' "$work/server.out" 2>/dev/null && break; sleep 0.2; done
connection="$(sed -n 's/^service-connection-string: //p' "$work/server.out")"
scope="$(sed -n 's/^id-scope: //p' "$work/server.out")"
ca="$(sed -n 's/^ca-certificate: //p' "$work/server.out")"
target/release/dps-server admin --connection-string "$connection" --endpoint "https://localhost:$port" \
  --ca-cert "$ca" hub set hub-a.example.com >/dev/null
rss() { awk -v key="$1:" '$1 == key { printf "%.1f MB", $2 / 1024 }' "/proc/$server/status"; }
sleep 2
echo "server RSS at idle: $(rss VmRSS)"
for mode in ${DPS_BENCH_MODES:-individual group x509 tpm}; do
  # Devices poll every 10 ms instead of the 1 s Retry-After, so that the run measures the
  # service rather than the devices' patience.
  target/release/dps-load run --endpoint "https://localhost:$port" --connection-string "$connection" \
    --id-scope "$scope" --ca-cert "$ca" --devices "$devices" --concurrency "$concurrency" \
    --mode "$mode" --poll-ms 10 --compare-ceiling 2>/dev/null
  echo
done
echo "server peak RSS (VmHWM) after the runs: $(rss VmHWM)"

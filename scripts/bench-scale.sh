#!/usr/bin/env bash
# The scale benchmark: registration throughput and latency of a release build with few
# enrollments, then after importing many (1,000,000 by default) through the bulk admin API,
# whose rate is reported too. Same machine, same run, same load.
# Usage: scripts/bench-scale.sh [ENROLLMENTS] [DEVICES] [CONCURRENCY]   (1000000, 2000, 64)
set -euo pipefail
cd "$(dirname "$0")/.."
enrollments="${1:-1000000}"
devices="${2:-2000}"
concurrency="${3:-64}"
cargo build -j2 --release -p dps-server -p load-generator --bins
work="$(mktemp -d)"
port=18444
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
(
  cd "$work"
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
server_args=(--endpoint "https://localhost:$port" --connection-string "$connection" --ca-cert "$ca")
target/release/dps-server admin "${server_args[@]}" hub set hub-a.example.com >/dev/null
run() {
  target/release/dps-load run "${server_args[@]}" --id-scope "$scope" --devices "$devices" \
    --concurrency "$concurrency" --mode individual --poll-ms 10 2>/dev/null
}
echo "== with $devices enrollments (the run's own)"
run
echo "== importing $enrollments more"
target/release/dps-load import "${server_args[@]}" --enrollments "$enrollments" --concurrency 4
echo "== with $((enrollments + 2 * devices)) enrollments"
run

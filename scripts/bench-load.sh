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
source scripts/bench-server.sh 18443
rss() { awk -v key="$1:" '$1 == key { printf "%.1f MB", $2 / 1024 }' "/proc/$server/status"; }
sleep 2
echo "server RSS at idle: $(rss VmRSS)"
for mode in ${DPS_BENCH_MODES:-individual group x509 tpm}; do
  # Devices poll every 10 ms instead of the 1 s Retry-After, so that the run measures the
  # service rather than the devices' patience.
  target/release/dps-load run "${server_args[@]}" --id-scope "$scope" --devices "$devices" \
    --concurrency "$concurrency" --mode "$mode" --poll-ms 10 --compare-ceiling 2>/dev/null
  echo
done
echo "server peak RSS (VmHWM) after the runs: $(rss VmHWM)"

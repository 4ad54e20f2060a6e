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
source scripts/bench-server.sh 18444
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

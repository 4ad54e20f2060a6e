#!/usr/bin/env bash
# The scale benchmark: registration throughput and latency of a release build with few
# enrollments and no enrollment group, then after importing many enrollments (1,000,000 by
# default) through the bulk admin API, whose rate is reported too, and adding GROUPS
# symmetric-key groups (1,000 by default; the script raises the instance's bound to allow
# them). Same machine, same run, same load (individual enrollments).
# Usage: scripts/bench-scale.sh [ENROLLMENTS] [DEVICES] [CONCURRENCY] [GROUPS]
#   (1000000, 2000, 64, 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
enrollments="${1:-1000000}"
devices="${2:-2000}"
concurrency="${3:-64}"
groups="${4:-1000}"
export DPS_LIMITS__MAX_SYMMETRIC_KEY_GROUPS="$groups"
source scripts/bench-server.sh 18444
run() {
  target/release/dps-load run "${server_args[@]}" --id-scope "$scope" --devices "$devices" \
    --concurrency "$concurrency" --mode individual --poll-ms 10 2>/dev/null
}
echo "== with $devices enrollments (the run's own) and no group"
run
echo "== importing $enrollments more"
target/release/dps-load import "${server_args[@]}" --enrollments "$enrollments" --concurrency 4
echo "== adding $groups groups"
add_filler_groups "$groups"
echo "== with $((enrollments + 2 * devices)) enrollments and $groups groups"
run

#!/usr/bin/env bash
# Group registrations as the instance's symmetric-key groups grow: the server's CPU per
# registration (read from /proc) with 1 group and with GROUPS groups, the devices in the last
# one, and per unauthenticated request (an unknown id with a wrong key).
# Usage: scripts/bench-groups.sh [GROUPS] [DEVICES]   (defaults 100, the default bound of
# limits.max_symmetric_key_groups, which the script raises to GROUPS, and 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
groups="${1:-100}"
devices="${2:-1000}"
# Each run adds its own group: room for the second one too.
export DPS_LIMITS__MAX_SYMMETRIC_KEY_GROUPS=$((groups + 1))
source scripts/bench-server.sh 18444
ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }
per_request() { # START END COUNT: microseconds of server CPU per request
  awk -v a="$1" -v b="$2" -v n="$3" -v t="$ticks" 'BEGIN { printf "%.0f", (b - a) * 1e6 / t / n }'
}
run() {
  local before after
  before=$(cpu)
  target/release/dps-load run "${server_args[@]}" --id-scope "$scope" --devices "$devices" \
    --concurrency 32 --mode group --poll-ms 10 2>/dev/null \
    | grep -o '[0-9]*/[0-9]* assigned.*registrations/s' | tr '\n' ' '
  after=$(cpu)
  echo "$(per_request "$before" "$after" "$devices") us of server CPU per registration"
}
junk() {
  # Unknown ids with a wrong key: the server tries every symmetric-key group before it says 401.
  local before after se config
  se=$(($(date +%s) + 3600))
  config="$work/junk.curl"
  : >"$config"
  for ((i = 0; i < devices; i++)); do
    [ "$i" -gt 0 ] && echo next >>"$config"
    printf 'url = "https://localhost:18444/%s/registrations/nobody-%d/register?api-version=2021-10-01"\ncacert = "%s"\n-X PUT\n-o /dev/null\n-H "Content-Type: application/json"\n-H "Authorization: SharedAccessSignature sr=%s%%2Fregistrations%%2Fnobody-%d&sig=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA%%3D&se=%s&skn=registration"\n-d "{}"\n' \
      "$scope" "$i" "$ca" "$scope" "$i" "$se" >>"$config"
  done
  before=$(cpu)
  curl -sS --no-progress-meter --parallel --parallel-max 16 -K "$config" >/dev/null
  after=$(cpu)
  echo "$(per_request "$before" "$after" "$devices") us of server CPU per unauthenticated request"
}
ca=$(sed -n 's/^ca-certificate: //p' "$work/server.out")
echo "1 group:"
run
junk
add_filler_groups $((groups - 1))
echo "$groups groups:"
run
junk

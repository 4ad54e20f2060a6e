# Sourced by the benchmark scripts: builds the release binaries, starts the server on PORT
# (the first argument) with a fresh data directory and the throttles off (one address sends
# every request), links one hub, and sets `server` (its PID), `scope` and `server_args` (the
# endpoint, connection string and CA options of dps-load and the admin CLI; the MQTT listener is
# on PORT + 1000, `mqtt_port`). The server is
# stopped and its directory removed when the script exits.
# Set DPS_BENCH_DATABASE_URL to run it on PostgreSQL instead of SQLite.
port="$1"
mqtt_port=$((port + 1000))
cargo build -j2 --release -p dps-server -p load-generator --bins
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
(
  cd "$work"
  export DPS_THROTTLE__REQUESTS_PER_ADDRESS_PER_MINUTE=0
  export DPS_THROTTLE__REGISTRATIONS_PER_DEVICE_PER_MINUTE=0
  export DPS_THROTTLE__POLLS_PER_DEVICE_PER_MINUTE=0
  export DPS_THROTTLE__UNAUTHENTICATED_PER_ADDRESS_PER_MINUTE=0
  export DPS_THROTTLE__UNAUTHENTICATED_PER_DEVICE_PER_MINUTE=0
  export DPS_METRICS_LISTEN=127.0.0.1:0
  export DPS_MQTT_LISTEN="127.0.0.1:$((port + 1000))"
  export DPS_LOG__FILTER=warn
  if [ -n "${DPS_BENCH_DATABASE_URL:-}" ]; then export DPS_DATABASE_URL="$DPS_BENCH_DATABASE_URL"; fi
  exec "$OLDPWD/target/release/dps-server" serve --listen "127.0.0.1:$port" >server.out 2>server.err
) &
server=$!
for _ in $(seq 100); do grep -q '^listening:' "$work/server.out" 2>/dev/null && break; sleep 0.2; done
if ! grep -q '^listening:' "$work/server.out"; then
  echo "the server did not start:" >&2
  cat "$work/server.err" >&2
  exit 1
fi
scope="$(sed -n 's/^id-scope: //p' "$work/server.out")"
server_args=(--endpoint "https://localhost:$port"
  --connection-string "$(sed -n 's/^service-connection-string: //p' "$work/server.out")"
  --ca-cert "$(sed -n 's/^ca-certificate: //p' "$work/server.out")")
target/release/dps-server admin "${server_args[@]}" hub set hub-a.example.com >/dev/null
# add_filler_groups N: adds N symmetric-key enrollment groups (500 per bulk request) whose ids
# sort before the load generator's, so that a group device's group is tried last. The server
# must allow them (DPS_LIMITS__MAX_SYMMETRIC_KEY_GROUPS, set before sourcing this script).
add_filler_groups() {
  local token ca body start end
  token=$(target/release/dps-server admin "${server_args[@]}" token)
  ca=$(sed -n 's/^ca-certificate: //p' "$work/server.out")
  for ((start = 0; start < $1; start += 500)); do
    end=$((start + 500 < $1 ? start + 500 : $1))
    body=$(seq "$start" $((end - 1)) | awk 'BEGIN { printf "{\"mode\":\"create\",\"enrollmentGroups\":[" }
      { printf "%s{\"enrollmentGroupId\":\"aaa-filler-%05d\",\"attestation\":{\"type\":\"symmetricKey\"}}", (NR > 1 ? "," : ""), $1 }
      END { printf "]}" }')
    curl -sf --cacert "$ca" -H "Authorization: $token" -H 'Content-Type: application/json' \
      -d "$body" "https://localhost:$port/enrollmentGroups?api-version=2021-10-01" >/dev/null
  done
}

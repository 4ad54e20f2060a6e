#!/usr/bin/env bash
# What a registration costs a release build of the service, against the ceiling (the service's
# TLS configuration and accept loop with canned answers, `dps-load serve-ceiling`) measured in
# the same run. Both servers are processes of their own, and each one's CPU is read from
# /proc/PID/stat before and after its run, so the figures are CPU per registration, which does not
# depend on how fast the (light) load generator could send.
# Usage: scripts/bench-load.sh [DEVICES] [CONCURRENCY]   (defaults 3000 and 64)
# Set DPS_BENCH_DATABASE_URL to measure on PostgreSQL instead of SQLite (the CPU of the machine's
# `postgres` processes is then reported too), and DPS_BENCH_MODES to run some of the modes
# (default: individual group x509 tpm individual-mqtt group-mqtt x509-mqtt; a -mqtt mode
# registers over MQTT, against the ceiling's MQTT sessions). Needs python3 for the table.
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-3000}"
concurrency="${2:-64}"
source scripts/bench-server.sh 18443
target/release/dps-load serve-ceiling --listen 127.0.0.1:18444 --mqtt-listen 127.0.0.1:19444 \
  --dir "$work/ceiling" >"$work/ceiling.out" &
ceiling=$!
trap 'kill "$server" "$ceiling" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q '^ca-certificate:' "$work/ceiling.out" 2>/dev/null && break; sleep 0.1; done
rss() { awk -v key="$1:" '$1 == key { printf "%.1f MB", $2 / 1024 }' "/proc/$server/status"; }
sleep 2
echo "server RSS at idle: $(rss VmRSS)"
database=()
if [ -n "${DPS_BENCH_DATABASE_URL:-}" ]; then database=(--cpu-command postgres); fi
# Devices poll every 10 ms instead of the 1 s Retry-After, so that the run measures the service
# rather than the devices' patience; polls reuse the device's connection.
load=(--devices "$devices" --concurrency "$concurrency" --poll-ms 10 --light --output json)
modes=${DPS_BENCH_MODES:-individual group x509 tpm individual-mqtt group-mqtt x509-mqtt}
for mode in $modes; do
  attestation="${mode%-mqtt}"
  ceiling_mqtt=() service_mqtt=()
  if [ "$attestation" != "$mode" ]; then
    ceiling_mqtt=(--mqtt-port 19444) service_mqtt=(--mqtt-port "$mqtt_port")
  fi
  target/release/dps-load ceiling --endpoint https://localhost:18444 --mode "$attestation" \
    "${load[@]}" "${ceiling_mqtt[@]}" --cpu-pid "$ceiling" >"$work/ceiling-$mode.json" 2>/dev/null
  target/release/dps-load run "${server_args[@]}" --id-scope "$scope" --mode "$attestation" \
    "${load[@]}" "${service_mqtt[@]}" --cpu-pid "$server" "${database[@]}" \
    >"$work/service-$mode.json" 2>/dev/null
done
echo "server peak RSS (VmHWM) after the runs: $(rss VmHWM)"
python3 - "$work" $modes <<'EOF'
import json, sys
work, modes = sys.argv[1], sys.argv[2:]
print("| mode | ceiling/s | service/s | rate ratio | ceiling µs/reg | service µs/reg | CPU ratio | database µs/reg | service p50 / p99 ms | errors |")
print("|---|---|---|---|---|---|---|---|---|---|")
for mode in modes:
    c = json.load(open(f"{work}/ceiling-{mode}.json"))
    s = json.load(open(f"{work}/service-{mode}.json"))
    c_us = c["cpu"][0]["usPerRegistration"]
    s_us = s["cpu"][0]["usPerRegistration"]
    db = f'{s["cpu"][1]["usPerRegistration"]:,.0f}' if len(s["cpu"]) > 1 else "-"
    errors = sum(s["errors"].values()) + sum(c["errors"].values())
    print(f'| {mode} | {c["throughputPerSec"]:,.0f} | {s["throughputPerSec"]:,.0f} | '
          f'{s["throughputPerSec"] / c["throughputPerSec"]:.2f} | {c_us:,.0f} | {s_us:,.0f} | '
          f'{s_us / c_us:.2f} | {db} | {s["registrationMs"]["p50"]:.0f} / {s["registrationMs"]["p99"]:.0f} | {errors} |')
EOF

#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian 12 machine with Rust:
# PostgreSQL (a local cluster with a `dps` superuser), SoftHSM2, swtpm with tpm2-tools and the
# tpm2-tss libraries, Node.js with the npm packages of the interop tests, and Python virtual
# environments with schemathesis (the admin API's fuzz test), azure-iot-device (the Python
# interop test) and selenium (the console's browser test, with Chromium and chromium-driver).
# Safe to run again.
# Prints the exports the tests read.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v pg_ctlcluster >/dev/null 2>&1 || packages+=(postgresql)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v softhsm2-util >/dev/null 2>&1 || packages+=(softhsm2)
# The issuance tests verify chains with `openssl verify` too.
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
# TPM: swtpm (and swtpm_setup for EK certificates), tpm2-tools for the compatibility test, and
# the tpm2-tss libraries that tss-esapi links against.
command -v swtpm >/dev/null 2>&1 || packages+=(swtpm)
command -v swtpm_setup >/dev/null 2>&1 || packages+=(swtpm-tools)
command -v tpm2_activatecredential >/dev/null 2>&1 || packages+=(tpm2-tools)
pkg-config --exists tss2-esys 2>/dev/null || packages+=(libtss2-dev pkg-config)
# Python with venv for the fuzz test's schemathesis.
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
# The console's browser test: headless Chromium and its WebDriver (and a font to render with).
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
[ -d /usr/share/fonts/truetype/dejavu ] || packages+=(fonts-dejavu-core)
# The black-box tests signal the server with the kill program (not the shell builtin).
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || packages+=(procps)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "installing: ${packages[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
fi

# PostgreSQL: start the packaged cluster and make sure our role exists.
version=$(ls /etc/postgresql | sort -V | tail -n 1)
if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
    pg_ctlcluster "$version" main start >&2
fi
for _ in $(seq 1 50); do
    su postgres -c "pg_isready -q -h 127.0.0.1 -p 5432" && break
    sleep 0.2
done
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'dps'\"" | grep -q 1 ||
    su postgres -c "psql -qc \"CREATE ROLE dps LOGIN SUPERUSER PASSWORD 'dps'\"" >&2

# Node packages of the interop tests (versions pinned by package-lock.json).
if [ -f interop/node/package.json ]; then
    (cd interop/node && npm ci --no-audit --no-fund --loglevel=error) >&2
fi

# Python packages of the tests, each set in its own virtual environment (versions pinned by
# its requirements.txt), reinstalled when the pins change: schemathesis for the admin API's
# fuzz test, azure-iot-device for the Python interop test, selenium for the console's browser
# test.
python_env() {
    local dir="$1" venv="$1/.venv"
    if ! cmp -s "$dir/requirements.txt" "$venv/requirements.txt" 2>/dev/null; then
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install -q --disable-pip-version-check -r "$dir/requirements.txt" >&2
        cp "$dir/requirements.txt" "$venv/requirements.txt"
    fi
}
python_env interop/schemathesis
python_env interop/python
python_env interop/console

echo "export DPS_TEST_DATABASE_URL=postgres://dps:dps@127.0.0.1:5432/postgres"

#!/usr/bin/env bash
# Prepare a machine for rtpipe: OS packages, Java/Maven check, the .venv with locked deps.
# Idempotent and quick when everything is in place: apt runs only if a package is missing,
# pip only if pyproject.toml or infra/constraints.txt changed since the last install.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# openssl: the secure stack's CA and certificates (rtpipe stack up --secure).
PACKAGES=(redis-server prometheus kcat docker-compose openssl)
VENV=.venv
STAMP="$VENV/.rtpipe-deps.sha256"

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# --- Debian packages ---------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        die "missing Debian packages: ${missing[*]}; install them as root: apt-get install -y ${missing[*]}"
    fi
    say "installing ${missing[*]}"
    # The stack runs its own Redis and Prometheus on its own ports: keep the packages' system
    # services from starting during install (a running system Redis would hold port 6379).
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "Debian packages present: ${PACKAGES[*]}"
fi

# --- Java and Maven (Kafka's jars come from Maven Central) ---------------------------------
command -v java >/dev/null || die "java not found: install a JDK/JRE 17 (apt-get install -y openjdk-17-jre-headless)"
command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install -y maven)"
say "java and mvn present"

# --- Python venv -------------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    command -v python3.11 >/dev/null || die "python3.11 not found: install Python 3.11 (apt-get install -y python3.11 python3.11-venv)"
    say "creating $VENV with python3.11"
    python3.11 -m venv "$VENV"
fi
want=$(cat pyproject.toml infra/constraints.txt | sha256sum | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ $want != "$have" ]]; then
    say "installing rtpipe and its locked dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet -c infra/constraints.txt -e '.[dev,spark]'
    printf '%s\n' "$want" >"$STAMP"
else
    say "$VENV up to date with pyproject.toml and infra/constraints.txt"
fi
say "ready"

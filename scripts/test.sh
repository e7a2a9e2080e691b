#!/usr/bin/env bash
# pgfront's test suite: unit and property tests, then integration tests against real etcd 3.4,
# Patroni 3.0 and PostgreSQL 15 from Debian. Installs what is missing (needs root, as do the
# tests that start Patroni as the postgres user).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(protobuf-compiler libprotobuf-dev etcd-server etcd-client patroni postgresql-15 postgresql-client-15
      python3-etcd python3-psycopg2 haproxy keepalived iproute2 util-linux openssl systemd binutils chromium strace
      repmgr postgresql-15-repmgr)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "== installing: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "the integration tests start Patroni as the postgres user and need root: run with sudo" >&2
  exit 1
fi

cargo test --locked --all-targets -- --nocapture 2>&1

# The benches' smoke runs (benches/reload.rs, benches/datapath.rs, benches/scale.rs,
# benches/idle_memory.rs: a round of a few seconds per figure, about two minutes in all), so that they cannot rot. They fail on a broken
# run (a lost connection, a failed pgbench, a short COPY), never on a slow one.
PGFRONT_BENCH_QUICK=1 cargo test --locked --benches -- --nocapture 2>&1

# The io_uring relay experiment (src/uring_relay.rs, issue 10), built only with its feature: its
# unit test, so that it cannot rot either (the lib's tests compiled once more, about a minute).
cargo test --locked --features uring-experiment --lib uring_relay 2>&1

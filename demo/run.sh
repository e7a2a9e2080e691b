#!/usr/bin/env bash
# pgfront local demo: etcd + a 3-member Patroni cluster (PostgreSQL 15) + pgfront, all on
# loopback. Installs what is missing (Debian 12), builds pgfront, starts everything, prints how
# to connect and how to trigger a switchover, and runs pgfront in the foreground.
# Ctrl-C stops everything it started (by PID) and keeps nothing running.
#
#   ./demo/run.sh            # or: DEMO_DIR=/tmp/x ./demo/run.sh
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DEMO_DIR:-/tmp/pgfront-demo}
SCOPE=demo
ETCD_CLIENT=23790
ETCD_PEER=23800
PG_PORTS=(5501 5502 5503)
API_PORTS=(8101 8102 8103)
PRIMARY_PORT=6432
REPLICA_PORT=6433
ADMIN_PORT=7000
PGBIN=/usr/lib/postgresql/15/bin

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v patroni >/dev/null || need+=(patroni)
[ -x $PGBIN/postgres ] || need+=(postgresql-15)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v protoc >/dev/null || need+=(protobuf-compiler libprotobuf-dev)
/usr/bin/python3 -c 'import etcd' 2>/dev/null || need+=(python3-etcd)
/usr/bin/python3 -c 'import psycopg2' 2>/dev/null || need+=(python3-psycopg2)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

echo "== building pgfront (release)"
(cd "$here" && cargo build --release -q)
PGFRONT="$here/target/release/pgfront"

tail_pid=""
cleanup() {
  trap - EXIT INT TERM
  echo; echo "== stopping the demo"
  # The log follower is ours too: it must not outlive the demo.
  [ -n "$tail_pid" ] && kill "$tail_pid" 2>/dev/null || true
  for f in "$DIR"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    # Patroni and etcd run in their own process groups: stop each group, not by name.
    $SUDO kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 100); do
    alive=0
    for f in "$DIR"/*.pid; do [ -f "$f" ] && $SUDO kill -0 -- "-$(cat "$f")" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for f in "$DIR"/*.pid; do [ -f "$f" ] && { $SUDO kill -KILL -- "-$(cat "$f")" 2>/dev/null || true; rm -f "$f"; }; done
  echo "   stopped; data and logs are in $DIR"
}
trap cleanup EXIT INT TERM

if [ -d "$DIR" ]; then
  for f in "$DIR"/*.pid; do
    [ -f "$f" ] && { echo "a demo seems to be running ($f); stop it first" >&2; trap - EXIT; exit 1; }
  done
  $SUDO rm -rf "$DIR"
fi
mkdir -p "$DIR"
$SUDO chown postgres: "$DIR" 2>/dev/null || true
$SUDO chmod 0755 "$DIR"
# Children started as postgres must be able to enter their working directory (the checkout may be
# in a directory only root can enter, e.g. /root).
cd "$DIR"

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else $SUDO runuser -u postgres -- "$@"; fi
}

# run_bg NAME USER CMD…: runs CMD in its own process group, logging to $DIR/NAME.log; the
# group id goes to $DIR/NAME.pid so cleanup can stop exactly what it started.
run_bg() {
  local name=$1 user=$2; shift 2
  if [ "$user" = "$(id -un)" ]; then
    setsid "$@" >"$DIR/$name.log" 2>&1 &
  else
    setsid $SUDO runuser -u "$user" -- "$@" >"$DIR/$name.log" 2>&1 &
  fi
  echo $! >"$DIR/$name.pid"
}

echo "== starting etcd on 127.0.0.1:$ETCD_CLIENT (v3 API, v2 enabled)"
as_postgres mkdir -p "$DIR/etcd"
as_postgres chmod 0700 "$DIR/etcd"
run_bg etcd postgres etcd --name demo-etcd --data-dir "$DIR/etcd" \
  --listen-client-urls http://127.0.0.1:$ETCD_CLIENT --advertise-client-urls http://127.0.0.1:$ETCD_CLIENT \
  --listen-peer-urls http://127.0.0.1:$ETCD_PEER --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER \
  --initial-cluster demo-etcd=http://127.0.0.1:$ETCD_PEER --enable-v2=true
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$ETCD_CLIENT endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done
ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$ETCD_CLIENT endpoint health >/dev/null || { echo "etcd did not start: $DIR/etcd.log" >&2; exit 1; }

for i in 0 1 2; do
  n=pg$((i + 1))
  cat >"$DIR/$n.yml" <<EOF
scope: $SCOPE
namespace: /service/
name: $n
restapi:
  listen: 127.0.0.1:${API_PORTS[$i]}
  connect_address: 127.0.0.1:${API_PORTS[$i]}
etcd3:
  hosts: 127.0.0.1:$ETCD_CLIENT
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 200
        wal_log_hints: "on"
  initdb:
  - encoding: UTF8
  pg_hba:
  - local all all trust
  - host replication all 127.0.0.1/32 trust
  - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:${PG_PORTS[$i]}
  connect_address: 127.0.0.1:${PG_PORTS[$i]}
  data_dir: $DIR/$n/data
  bin_dir: $PGBIN
  pgpass: $DIR/$n/pgpass
  authentication:
    superuser: {username: postgres, password: postgres}
    replication: {username: replicator, password: replicator}
    rewind: {username: postgres, password: postgres}
  parameters:
    unix_socket_directories: $DIR/$n
EOF
  as_postgres mkdir -p "$DIR/$n"
  as_postgres chmod 0700 "$DIR/$n"
  echo "== starting Patroni member $n (PostgreSQL on ${PG_PORTS[$i]}, REST on ${API_PORTS[$i]})"
  run_bg "$n" postgres patroni "$DIR/$n.yml"
done

echo "== waiting for the cluster to elect a leader and start its replicas (about 15 s)"
ok=0
for _ in $(seq 1 600); do
  n=$(patronictl -c "$DIR/pg1.yml" list -f json 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for m in json.load(sys.stdin) if m.get("State") in ("running","streaming")))' 2>/dev/null || echo 0)
  [ "$n" = 3 ] && { ok=1; break; }
  sleep 0.1
done
[ $ok = 1 ] || { echo "the cluster did not come up; logs: $DIR/pg*.log" >&2; patronictl -c "$DIR/pg1.yml" list || true; exit 1; }
patronictl -c "$DIR/pg1.yml" list

cat >"$DIR/pgfront.toml" <<EOF
[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[cluster]]
name = "demo"
scope = "$SCOPE"
namespace = "/service/"
etcd_endpoints = ["http://127.0.0.1:$ETCD_CLIENT"]
check_user = "postgres"

[[listener]]
name = "demo-rw"
cluster = "demo"
bind = "127.0.0.1:$PRIMARY_PORT"
role = "primary"

[[listener]]
name = "demo-ro"
cluster = "demo"
bind = "127.0.0.1:$REPLICA_PORT"
role = "replica"
max_replica_lag = "16MB"
EOF
"$PGFRONT" config check -c "$DIR/pgfront.toml"

cat <<EOF

== pgfront is starting in front of the cluster. In another terminal:

  psql -h 127.0.0.1 -p $PRIMARY_PORT -U postgres -c 'select inet_server_port(), pg_is_in_recovery()'   # the primary
  psql -h 127.0.0.1 -p $REPLICA_PORT -U postgres -c 'select inet_server_port(), pg_is_in_recovery()'   # a replica
  $PGFRONT status --admin http://127.0.0.1:$ADMIN_PORT                                    # clusters, members, listeners
  curl -s http://127.0.0.1:$ADMIN_PORT/metrics | grep ^pgfront_                                    # Prometheus metrics

  # a planned switchover: watch pgfront log "primary takes no new connections" then "primary routed"
  patronictl -c $DIR/pg1.yml switchover --force

  # a writer that keeps going through the switchover:
  while sleep 0.1; do psql -qAt -h 127.0.0.1 -p $PRIMARY_PORT -U postgres -c 'select now()::time(2), inet_server_port()'; done

Logs of etcd and Patroni: $DIR/*.log. Ctrl-C here stops everything.

EOF
run_bg pgfront "$(id -un)" "$PGFRONT" proxy -c "$DIR/pgfront.toml"
# --pid: the follower also ends by itself when pgfront does.
tail -n +1 --pid="$(cat "$DIR/pgfront.pid")" -f "$DIR/pgfront.log" &
tail_pid=$!
while kill -0 "$(cat "$DIR/pgfront.pid")" 2>/dev/null; do sleep 1; done

#!/usr/bin/env bash
# Runs the whole test suite: installs and starts what it needs (idempotent), then one
# `cargo test` invocation over every suite. Usage: scripts/test.sh [extra cargo test args]
#
# Servers are found through PG_URL and REDIS_URL (local defaults below). A backend whose server
# is unreachable fails its tests loudly, unless MQTT_PERSIST_SKIP names it (e.g. "pgsql,redis").
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
command -v mosquitto_sub >/dev/null || need_pkgs+=(mosquitto-clients)
command -v pg_ctlcluster >/dev/null || need_pkgs+=(postgresql)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v sqlite3 >/dev/null || need_pkgs+=(sqlite3)
command -v openssl >/dev/null || need_pkgs+=(openssl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  echo "service on port $1 did not come up" >&2; return 1
}

skip="${MQTT_PERSIST_SKIP:-}"
skipping() { [[ ",$skip," == *",$1,"* ]]; }

if ! skipping pgsql; then
  if ! port_open 5432; then
    log "starting PostgreSQL"
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    wait_port 5432
  fi
  # Trust auth on a fresh install is local only: make sure role and database exist.
  if ! psql -h 127.0.0.1 -U root -d test -c 'select 1' >/dev/null 2>&1; then
    log "creating PostgreSQL role root and database test"
    as_root su postgres -c "psql -c \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END\\\$\\\$;\"" >/dev/null
    as_root su postgres -c "psql -tc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb -O root test"
    hba=$(as_root su postgres -c "psql -tAc 'show hba_file'")
    if ! as_root grep -q "mqtt-persist" "$hba"; then
      as_root sed -i '1i host all all 127.0.0.1/32 trust # mqtt-persist tests' "$hba"
      as_root su postgres -c "psql -c 'select pg_reload_conf()'" >/dev/null
    fi
  fi
  export PG_URL="${PG_URL:-postgres://root@127.0.0.1:5432/test}"
fi

if ! skipping redis; then
  if ! port_open 6379; then
    log "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    wait_port 6379
  fi
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
fi

[ -n "$skip" ] && log "skipping backends: $skip"
log "cargo test"
status=0
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "${TMPDIR:-/tmp}/mqtt-persist-test.log" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "${TMPDIR:-/tmp}/mqtt-persist-test.log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "${TMPDIR:-/tmp}/mqtt-persist-test.log" | awk '{s+=$1} END {print s+0}')
[ "$status" -ne 0 ] && [ "$failed" -eq 0 ] && failed=1
if [ -n "$skip" ]; then
  echo "total: $passed passed, $failed failed (backends skipped: $skip)"
else
  echo "total: $passed passed, $failed failed"
fi
exit "$status"

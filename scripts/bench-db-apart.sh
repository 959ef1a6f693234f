#!/usr/bin/env bash
# Benchmarks (the latency one unless scenarios are given) with the database servers on a vCPU of their own, as a stand-in for a
# database on its own host (these machines have no second host): a throwaway PostgreSQL and a
# throwaway Redis are pinned to the last CPU, the benchmark process (load generator and both
# brokers) to the others. Both sides of every ratio run on the same CPUs, so the ratio is the
# broker's cost of persisting, without the database server's own CPU on the broker's cores.
#
#   scripts/bench-db-apart.sh            # the latency benchmark, pgsql and redis
#   BENCH_LAT_DB=pgsql scripts/bench-db-apart.sh
#   BENCH_DB=pgsql,redis scripts/bench-db-apart.sh matrix   # any scenarios, e.g. the matrix
#
# Needs PostgreSQL's server binaries and redis-server (scripts/test.sh installs both) and root
# or the postgres user (initdb refuses to run as root, so it runs as postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
cpus=$(nproc)
if [ "$cpus" -lt 2 ]; then
    echo "bench-db-apart: needs at least 2 CPUs, this machine has $cpus" >&2
    exit 1
fi
db_cpu=$((cpus - 1))
bench_cpus="0-$((cpus - 2))"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/mp-bench-XXXXXX)
pg_port=$(free_port)
redis_port=$(free_port)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    as_pg "$pgbin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
    [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres:postgres "$work"

# PostgreSQL with its defaults (fsync and synchronous_commit on), as a user would run it.
as_pg "$pgbin/initdb" -A trust -U root -E UTF8 -D "$work/pg" >/dev/null
as_pg taskset -c "$db_cpu" "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
    -o "-p $pg_port -k $work -c listen_addresses=127.0.0.1" start >/dev/null
taskset -c "$db_cpu" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"

export PG_URL="postgres://root@127.0.0.1:$pg_port/postgres"
export REDIS_URL="redis://127.0.0.1:$redis_port/"
export BENCH_LAT_DB="${BENCH_LAT_DB:-pgsql,redis}"
cargo bench --bench bench --no-run >/dev/null 2>&1 || cargo bench --bench bench --no-run
echo "database servers on CPU $db_cpu, benchmark on CPUs $bench_cpus"
taskset -c "$bench_cpus" cargo bench --bench bench -- "${@:-latency}"

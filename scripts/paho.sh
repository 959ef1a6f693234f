#!/usr/bin/env bash
# Runs Eclipse Paho's MQTT interoperability suites (eclipse/paho.mqtt.testing,
# interoperability/client_test.py for 3.1.1 and client_test5.py for 5) against mqtt-persist on
# the shipped etc/, plus an ACL that refuses test/nosubscribe as the suites expect. The suite
# is fetched into a cache outside the repository, never copied into it.
#
#   scripts/paho.sh                # both suites, every test
#   scripts/paho.sh 5 test_will_delay test_flow_control1   # some tests of one suite
#   PAHO_BROKER=mosquitto scripts/paho.sh   # the same run against a throwaway Mosquitto
#
# Env: PAHO_DIR (checkout, default ~/.cache/mqtt-persist/paho.mqtt.testing), PAHO_GIT (where to
# clone it from, default GitHub), PAHO_TIMEOUT (seconds per suite, default 600), PAHO_PROFILE
# (release, the default, or debug).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dir=${PAHO_DIR:-$HOME/.cache/mqtt-persist/paho.mqtt.testing}
if [ ! -f "$dir/interoperability/client_test5.py" ]; then
    git clone -q "${PAHO_GIT:-https://github.com/eclipse/paho.mqtt.testing}" "$dir"
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

if [ "${PAHO_BROKER:-mqtt-persist}" = mosquitto ]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
    mosquitto -c "$work/mosquitto.conf" > "$work/broker.log" 2>&1 &
else
    profile=${PAHO_PROFILE:-release}
    if [ "$profile" = release ]; then cargo build --release -q; else cargo build -q; profile=debug; fi
    cp -r etc "$work/etc"
    printf 'topic deny test/nosubscribe\ntopic readwrite #\ntopic readwrite $SYS/#\n' > "$work/etc/acl"
    printf '\nacl.file = acl\n' >> "$work/etc/mqtt-persist.conf"
    "${CARGO_TARGET_DIR:-$root/target}/$profile/mqtt-persist" --etc "$work/etc" --data-dir "$work/data" --listen "127.0.0.1:$port" > "$work/broker.log" 2>&1 &
fi
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
done

# The suites read the host and port with getopt, then hand sys.argv to unittest, which would
# reject those options: give each side its own arguments.
run() {
    local script=$1; shift
    (cd "$dir/interoperability" && timeout "${PAHO_TIMEOUT:-600}" python3 - "$script" "$port" "$@" <<'PY'
import os, runpy, sys, unittest
script, port, names = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, os.getcwd())
sys.argv = [script, "--hostname", "127.0.0.1", "-p", port]
main = unittest.main
unittest.main = lambda *a, **k: main(argv=[script, "-v"] + ["Test." + n for n in names], **k)
runpy.run_path(script, run_name="__main__")
PY
    ) 2>&1 | if [ -n "${PAHO_VERBOSE:-}" ]; then cat; else grep -E "^(test|Ran|OK|FAILED)|\.\.\. (ok|FAIL|ERROR)$|^(FAIL|ERROR):" || true; fi || true
}

suite=${1:-all}
[ $# -gt 0 ] && shift
if [ "$suite" = all ] || [ "$suite" = 3 ]; then
    echo "== MQTT 3.1.1: client_test.py"
    run client_test.py "$@"
fi
if [ "$suite" = all ] || [ "$suite" = 5 ]; then
    echo "== MQTT 5: client_test5.py"
    # test_flow_control2 never ends against a broker that does not disconnect it: run it alone,
    # bounded, after the others.
    if [ $# -eq 0 ]; then
        mapfile -t names < <(grep -o 'def test_[a-z0-9_]*' "$dir/interoperability/client_test5.py" | sed 's/def //' | grep -v '^test_flow_control2$')
        run client_test5.py "${names[@]}"
        PAHO_TIMEOUT=60 run client_test5.py test_flow_control2
    else
        run client_test5.py "$@"
    fi
fi

#!/usr/bin/env bash
# A Rust service and a Python django-outbox-pattern service exchanging events both ways.
#
#   bash examples/django_interop.sh
#
# Needs RabbitMQ (with its STOMP plugin, which the Python library speaks), PostgreSQL and
# Python >= 3.10; tests/interop/setup.sh starts the services if they are down and builds a
# virtual environment with django-outbox-pattern 3.2.1 in target/interop-venv.
#
#   Rust "orders" service (examples/django_interop.rs, its own database)
#     saves 3 orders → outbox → relay → /topic/django_interop.orders.created.v1
#                                                      → Python `manage.py subscribe` (records them)
#   Python "billing" service (tests/interop/dop_project, its own database)
#     emits 3 invoices → outbox → `manage.py publish` → /topic/django_interop.invoices
#                                                      → Rust #[callback] on_invoice (stores them)
#
# Exits 0 only if every message arrived once on each side. EXAMPLE_TIMEOUT (default 120 s) bounds
# every wait; EXAMPLE_KEEP=1 keeps the work directory with the logs.
set -euo pipefail
# Job control: background jobs then keep the default SIGINT handling, which the Python
# publisher needs (it stops on SIGINT only; a non-interactive shell's `cmd &` ignores SIGINT).
set -m

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T="${EXAMPLE_TIMEOUT:-120}"
N=3

RUST_DB=outbox_django_interop                    # the Rust service's database
export DOP_DATABASE_NAME=dop_django_interop      # the Python service's database
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$RUST_DB"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

ORDERS=/topic/django_interop.orders.created.v1   # Rust → Python (version v1 is in the name)
PY_QUEUE=django_interop_python_orders            # the Python subscriber's queue
INVOICES=/topic/django_interop.invoices          # Python → Rust
RUST_QUEUE=django_interop_rust_invoices          # the Rust consumer's queue (see django_interop.rs)

say() { printf '[script] %s\n' "$*"; }
fail() {
  printf '[script] FAILED: %s\n' "$*" >&2
  for log in "${WORK:-/nonexistent}"/*.log; do
    [[ -f $log ]] && printf -- '--- last lines of %s\n' "$log" >&2 && tail -n 20 "$log" >&2
  done
  exit 1
}

# ----------------------------------------------------------------------------- 1. the Python side
say "setting up the Python side (tests/interop/setup.sh: services, virtualenv, database $DOP_DATABASE_NAME)"
bash "$ROOT/tests/interop/setup.sh" >/dev/null
source "$ROOT/tests/interop/env.sh"              # INTEROP_PYTHON, INTEROP_MANAGE, PATH with rabbitmqctl
manage() { "$INTEROP_PYTHON" "$INTEROP_MANAGE" "$@"; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/django_interop.XXXXXX")"
SUB_PID="" PUB_PID="" RUST_PID=""
cleanup() { # stop whatever still runs: gently, then for good
  local pid
  [[ -n $PUB_PID ]] && kill -INT "$PUB_PID" 2>/dev/null
  for pid in $SUB_PID $RUST_PID; do kill -TERM "$pid" 2>/dev/null; done
  for pid in $PUB_PID $SUB_PID $RUST_PID; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ ${EXAMPLE_KEEP:-0} == 1 ]]; then say "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_until() { # what, then a command that succeeds when done
  local what="$1" deadline=$(($(date +%s) + T))
  shift
  until "$@"; do
    (($(date +%s) < deadline)) || fail "timed out after ${T}s waiting for $what"
    sleep 0.3
  done
}
has_consumer() { # queue
  rabbitmqctl -q list_queues --no-table-headers name consumers 2>/dev/null | grep -qE "^$1[[:space:]]+[1-9]"
}
stop() { # pid signal name: ask a process to stop, wait for it (bounded), expect exit status 0
  local status=0
  kill "-$2" "$1"
  wait_until "$3 to stop on SIG$2" not_running "$1"
  wait "$1" || status=$?
  [[ $status == 0 ]] || fail "$3 exited with status $status after SIG$2"
}
not_running() { ! kill -0 "$1" 2>/dev/null; }
psql_rust() { psql -X -q -t -A -h 127.0.0.1 -U postgres -d "$RUST_DB" -v ON_ERROR_STOP=1 -c "$1"; }

# A clean slate, so the story can be told again: both databases, the four queues.
manage reset_outbox >/dev/null
for q in "$PY_QUEUE" "DLQ.$PY_QUEUE" "$RUST_QUEUE" "DLQ.$RUST_QUEUE"; do
  rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
done
psql -X -q -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" \
  -c "DROP DATABASE IF EXISTS $RUST_DB WITH (FORCE)" -c "CREATE DATABASE $RUST_DB"

# ----------------------------------------------------------------------------- 2. the Rust service
say "building the Rust service (cargo build --example django_interop)"
(cd "$ROOT" && "${CARGO:-cargo}" build -q -p outbox-examples --example django_interop) || fail "cargo build"

# ----------------------------------------------------------------------------- 3. run both
say "Python: manage.py subscribe interop_app.callbacks.record $ORDERS $PY_QUEUE"
DOP_RECORD_FILE="$WORK/python_received.jsonl" \
  "$INTEROP_PYTHON" "$INTEROP_MANAGE" subscribe interop_app.callbacks.record "$ORDERS" "$PY_QUEUE" \
  >"$WORK/python_subscribe.log" 2>&1 &
SUB_PID=$!
wait_until "the Python subscriber on $PY_QUEUE" has_consumer "$PY_QUEUE"

say "Rust: cargo run --example django_interop"
(cd "$ROOT" && exec "${CARGO:-cargo}" run -q -p outbox-examples --example django_interop) &
RUST_PID=$!
wait_until "the Rust consumer on $RUST_QUEUE" has_consumer "$RUST_QUEUE"

say "Python: manage.py emit --destination $INVOICES --count $N, then manage.py publish"
manage emit --destination "$INVOICES" --count "$N" >"$WORK/python_emitted.tsv"
# `publish` stops only on KeyboardInterrupt. Started with SIGINT ignored (a caller that runs this
# script as a background job of a non-interactive shell passes that on; job control cannot undo
# it), Python never raises one: give the publisher the default SIGINT handling back.
env --default-signal=INT "$INTEROP_PYTHON" "$INTEROP_MANAGE" publish >"$WORK/python_publish.log" 2>&1 &
PUB_PID=$!

rust_status=0
wait "$RUST_PID" || rust_status=$?
RUST_PID=""
[[ $rust_status == 0 ]] || fail "the Rust service exited with status $rust_status"
records() { [[ -f $WORK/python_received.jsonl ]] && wc -l <"$WORK/python_received.jsonl" || echo 0; }
python_received_all() { (($(records) >= N)); }
python_sent_all() { [[ $(manage count_published --status succeeded) == "$N" ]]; }
wait_until "$N records from the Python subscriber" python_received_all
wait_until "the Python outbox to be sent" python_sent_all

stop "$PUB_PID" INT "manage.py publish" && PUB_PID=""
stop "$SUB_PID" TERM "manage.py subscribe" && SUB_PID=""

# ----------------------------------------------------------------------------- 4. the story
sorted() { sort | tr '\n' ' '; }
rust_sent="$(psql_rust "SELECT id FROM published" | sorted)"
python_got="$("$INTEROP_PYTHON" -c 'import json, sys
for line in open(sys.argv[1]): print(json.loads(line)["msg_id"])' "$WORK/python_received.jsonl" | sorted)"
python_sent="$(cut -f1 "$WORK/python_emitted.tsv" | sorted)"
rust_got="$(psql_rust "SELECT msg_id FROM received" | sorted)"

echo
echo "=== Rust → Python ($ORDERS)"
echo "  Rust saved $(psql_rust 'SELECT count(*) FROM orders') orders; each save wrote its event in the same transaction"
echo "  the Rust relay sent $(psql_rust 'SELECT count(*) FROM published WHERE status = 2') events (publisher confirms)"
echo "  django-outbox-pattern received $(records) of them ($(manage count_received) rows in its 'received' table)"
"$INTEROP_PYTHON" -c 'import json, sys
r = json.loads(open(sys.argv[1]).readline())
print("  sample, as the Python callback saw it: msg_id", r["msg_id"])
print("    body   ", json.dumps(r["body"]))
print("    headers", ", ".join(f"{k}={v}" for k, v in sorted(r["headers"].items()) if k.startswith("dop-")))' \
  "$WORK/python_received.jsonl"
echo
echo "=== Python → Rust ($INVOICES)"
echo "  Django emitted $N invoices (Published rows); manage.py publish sent $(manage count_published --status succeeded)"
echo "  the Rust #[callback] stored $(psql_rust 'SELECT count(*) FROM invoices') invoices ($(psql_rust 'SELECT count(*) FROM received') rows in its 'received' table)"
psql_rust "SELECT '  sample, as the Rust service stored it: msg_id ' || msg_id || E'\n    body    ' || body::text
           || E'\n    headers dop-correlation-id=' || (headers->>'dop-correlation-id')
           || ', dop-msg-sent-time=' || (headers->>'dop-msg-sent-time')
           FROM received ORDER BY added LIMIT 1"
echo

[[ -n $rust_sent && $python_got == "$rust_sent" ]] \
  || fail "Python received msg ids [$python_got], the Rust outbox holds [$rust_sent]"
[[ $(manage count_received) == "$N" ]] || fail "Python's received table should have $N rows"
[[ -n $python_sent && $rust_got == "$python_sent" ]] \
  || fail "Rust received msg ids [$rust_got], Python emitted [$python_sent]"
say "OK: $N events each way, every one received exactly once, with the sender's outbox id as msg_id"

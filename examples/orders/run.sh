#!/usr/bin/env bash
# The orders example: an order service and a shipment service, two binaries over one RabbitMQ,
# each with its own PostgreSQL database.
#
#   bash examples/orders/run.sh
#
#   order_service (database orders_demo_orders)
#     place / cancel-line → orders + order_lines + outbox rows, one transaction each
#     order_service publish (the relay) → /topic/orders.created.v1, /topic/orders.line_cancelled.v1
#   shipment_service (database orders_demo_shipments)
#     subscribe …on_order_created   /topic/orders.created.v1        (queue orders_demo.shipments.order_created)
#     subscribe …on_line_cancelled  /topic/orders.line_cancelled.v1 (queue orders_demo.shipments.line_cancelled)
#     → shipments, shipment_items, shipment_log + `received`, one transaction per message
#
# Then one event is sent a second time (its outbox row is reset to "schedule", so the relay
# publishes it again): the shipment service recognises its message id and skips it.
#
# Exits 0 only if the shipment log shows 3 shipments, the cancelled line and the repeated event
# processed once, and every process stopped cleanly (exit 0) on SIGTERM. EXAMPLE_TIMEOUT
# (default 60 s) bounds every wait; EXAMPLE_KEEP=1 keeps the work directory with the logs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
T="${EXAMPLE_TIMEOUT:-60}"
PG_HOST=127.0.0.1 PG_PORT=5432 PG_USER=postgres
ORDERS_DB=orders_demo_orders
SHIPMENTS_DB=orders_demo_shipments
ORDERS_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$ORDERS_DB"
SHIPMENTS_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$SHIPMENTS_DB"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export RUST_LOG="${RUST_LOG:-info,sqlx=warn}"
export NO_COLOR=1                                     # plain logs, for grep (also for outbox-cli itself)
export PATH="$PATH:/usr/sbin:/sbin"                   # rabbitmqctl

CREATED=/topic/orders.created.v1
CANCELLED=/topic/orders.line_cancelled.v1
CREATED_QUEUE=orders_demo.shipments.order_created
CANCELLED_QUEUE=orders_demo.shipments.line_cancelled
QUEUES=("$CREATED_QUEUE" "DLQ.$CREATED_QUEUE" "$CANCELLED_QUEUE" "DLQ.$CANCELLED_QUEUE")

say() { printf '[orders] %s\n' "$*"; }
fail() {
  printf '[orders] FAILED: %s\n' "$*" >&2
  for log in "${WORK:-/nonexistent}"/*.log; do
    [[ -f $log ]] && printf -- '--- last lines of %s\n' "$log" >&2 && tail -n 20 "$log" >&2
  done
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/orders_demo.XXXXXX")"
CREATED_PID="" CANCELLED_PID="" RELAY_PID=""
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo -n "$@"; fi; }
delete_queues() { # in parallel: rabbitmqctl takes half a second per call
  local q
  for q in "${QUEUES[@]}"; do as_root rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 & done
  wait
}
cleanup() { # whatever still runs: SIGTERM, then SIGKILL after 10 s; then the queues and the logs
  local pid
  for pid in $RELAY_PID $CREATED_PID $CANCELLED_PID; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $RELAY_PID $CREATED_PID $CANCELLED_PID; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  delete_queues
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
    all_running
    sleep 0.2
  done
}
not_running() { ! kill -0 "$1" 2>/dev/null; }
all_running() { # the background processes must not die on their own
  local var
  for var in RELAY_PID CREATED_PID CANCELLED_PID; do
    [[ -z ${!var} || $var == "$STOPPING" ]] || kill -0 "${!var}" 2>/dev/null ||
      fail "$(name_of "$var") exited on its own"
  done
}
name_of() {
  case $1 in
    RELAY_PID) echo "order_service publish" ;;
    CREATED_PID) echo "shipment_service subscribe (created)" ;;
    CANCELLED_PID) echo "shipment_service subscribe (line_cancelled)" ;;
  esac
}
STOPPING=""
stop() { # the variable holding the pid: SIGTERM, wait (bounded), expect exit status 0
  local var="$1" pid="${!1}" status=0
  STOPPING="$var"
  kill -TERM "$pid" 2>/dev/null || true
  wait_until "$(name_of "$var") to stop on SIGTERM" not_running "$pid"
  wait "$pid" || status=$?
  printf -v "$var" '%s' ""
  STOPPING=""
  [[ $status == 0 ]] || fail "$(name_of "$var") exited with status $status after SIGTERM"
  say "  $(name_of "$var") stopped on SIGTERM, exit status 0"
}
in_log() { grep -F -- "$2" "$WORK/$1.log" | grep -F -- "$3" >/dev/null; } # log, text, more text on that line
sql() { # database, query
  psql -X -q -t -A -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$1" -v ON_ERROR_STOP=1 -c "$2"
}
orders() { DATABASE_URL="$ORDERS_URL" "$BIN/order_service" "$@"; }
shipments() { DATABASE_URL="$SHIPMENTS_URL" "$BIN/shipment_service" "$@"; }
count_is() { [[ $(sql "$1" "$2") == "$3" ]]; }

# ----------------------------------------------------------------------------- 1. services, build
say "services: PostgreSQL and RabbitMQ (scripts/services.sh)"
bash "$ROOT/scripts/services.sh" postgres
bash "$ROOT/scripts/services.sh" rabbitmq

say "building the examples (cargo build -p outbox-examples --examples)"
started=$(date +%s)
(cd "$ROOT" && "${CARGO:-cargo}" build -q -p outbox-examples --examples) || fail "cargo build"
TARGET="$(cd "$ROOT" && "${CARGO:-cargo}" metadata -q --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
BIN="${TARGET:-$ROOT/target}/debug/examples"
say "  built in $(($(date +%s) - started)) s: $BIN/order_service, $BIN/shipment_service"

# ----------------------------------------------------------------------------- 2. a clean slate
say "fresh databases $ORDERS_DB and $SHIPMENTS_DB; fresh queues"
for db in "$ORDERS_DB" "$SHIPMENTS_DB"; do
  psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 \
    -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
done
delete_queues
say "  order_service migrate; order_service setup; shipment_service migrate; shipment_service setup"
orders migrate 2>>"$WORK/setup.log" && orders setup | sed 's/^/  /'
shipments migrate 2>>"$WORK/setup.log" && shipments setup | sed 's/^/  /'

# ----------------------------------------------------------------------------- 3. the processes
say "starting: shipment_service subscribe shipment_service::handlers::on_order_created $CREATED $CREATED_QUEUE"
# Started directly (not through the functions above), so that $! is the service's own pid.
DATABASE_URL="$SHIPMENTS_URL" "$BIN/shipment_service" \
  subscribe shipment_service::handlers::on_order_created "$CREATED" "$CREATED_QUEUE" \
  >"$WORK/subscribe_created.log" 2>&1 &
CREATED_PID=$!
say "starting: shipment_service subscribe shipment_service::handlers::on_line_cancelled $CANCELLED $CANCELLED_QUEUE"
DATABASE_URL="$SHIPMENTS_URL" "$BIN/shipment_service" \
  subscribe shipment_service::handlers::on_line_cancelled "$CANCELLED" "$CANCELLED_QUEUE" \
  >"$WORK/subscribe_cancelled.log" 2>&1 &
CANCELLED_PID=$!
# The queues must be bound before the relay publishes, or the events are unroutable.
wait_until "the consumer of $CREATED_QUEUE" in_log subscribe_created "waiting for messages" "$CREATED_QUEUE"
wait_until "the consumer of $CANCELLED_QUEUE" in_log subscribe_cancelled "waiting for messages" "$CANCELLED_QUEUE"

say "starting: order_service publish (the relay)"
DATABASE_URL="$ORDERS_URL" "$BIN/order_service" publish >"$WORK/publish.log" 2>&1 &
RELAY_PID=$!

# ----------------------------------------------------------------------------- 4. the story
say "placing 3 orders"
orders place --customer ada --item BOOK-1:2:12.50 --item PEN-2:1:3.20 | sed 's/^/  /'
orders place --customer grace --item MUG-7:1:8.00 --item TEA-3:3:4.50 | sed 's/^/  /'
orders place --customer linus --item LAPTOP-9:1:999.00 | sed 's/^/  /'
wait_until "3 shipments" count_is "$SHIPMENTS_DB" "SELECT count(*) FROM shipments" 3
say "  the shipment service prepared 3 shipments"

GRACE="$(sql "$ORDERS_DB" "SELECT id FROM orders WHERE customer = 'grace'")"
TEA="$(sql "$ORDERS_DB" "SELECT id FROM order_lines WHERE order_id = $GRACE AND sku = 'TEA-3'")"
say "cancelling line $TEA (TEA-3) of order $GRACE"
orders cancel-line --order "$GRACE" --line "$TEA" | sed 's/^/  /'
wait_until "the cancellation in the shipment log" count_is "$SHIPMENTS_DB" "SELECT count(*) FROM shipment_log" 4

ADA="$(sql "$ORDERS_DB" "SELECT id FROM orders WHERE customer = 'ada'")"
RESENT="$(sql "$ORDERS_DB" "SELECT id FROM published WHERE destination = '$CREATED' AND status = 2
                            AND (body->>'id')::int = $ADA")"
[[ -n $RESENT ]] || fail "no sent $CREATED event for order $ADA in the outbox"
say "sending order $ADA's $CREATED event again: outbox row $RESENT back to status 1 (schedule)"
sql "$ORDERS_DB" "UPDATE published SET status = 1, next_attempt_at = now() WHERE id = '$RESENT'"
sent_again() { count_is "$ORDERS_DB" "SELECT count(*) FROM published WHERE id = '$RESENT' AND status = 2" 1; }
wait_until "the relay to send $RESENT again" sent_again
say "  the relay sent it again"
wait_until "the consumer to see $RESENT again" in_log subscribe_created "message already received" "$RESENT"
say "  the shipment service recognised it: $(grep -F "$RESENT" "$WORK/subscribe_created.log" |
  grep -F 'already received' | sed 's/.*INFO [^ ]* //; s/ msg_id=.*//')"

# ----------------------------------------------------------------------------- 5. stop, show, check
say "stopping the background processes with SIGTERM"
stop RELAY_PID
stop CREATED_PID
stop CANCELLED_PID
grep -h 'consumer stopped' "$WORK/subscribe_created.log" "$WORK/subscribe_cancelled.log" |
  sed 's/.*consumer stopped /  consumer stopped: /'

echo
shipments log
echo

entries="$(sql "$SHIPMENTS_DB" "SELECT count(*) FROM shipment_log")"
distinct="$(sql "$SHIPMENTS_DB" "SELECT count(DISTINCT msg_id) FROM shipment_log")"
resent_entries="$(sql "$SHIPMENTS_DB" "SELECT count(*) FROM shipment_log WHERE msg_id = '$RESENT'")"
received="$(sql "$SHIPMENTS_DB" "SELECT count(*) FROM received")"
shipped="$(sql "$SHIPMENTS_DB" "SELECT count(*) FROM shipments")"
cancelled="$(sql "$SHIPMENTS_DB" "SELECT string_agg(line_id::text, ',') FROM shipment_items WHERE status = 'cancelled'")"
to_ship="$(sql "$SHIPMENTS_DB" "SELECT count(*) FROM shipment_items WHERE status = 'to_ship'")"
sent="$(sql "$ORDERS_DB" "SELECT count(*) FROM published WHERE status = 2")"
[[ $shipped == 3 ]] || fail "expected 3 shipments, found $shipped"
[[ $cancelled == "$TEA" ]] || fail "expected line $TEA (only) cancelled, found [$cancelled]"
[[ $to_ship == 4 ]] || fail "expected 4 items to ship, found $to_ship"
[[ $entries == 4 && $distinct == 4 ]] || fail "expected 4 log entries of 4 messages, found $entries of $distinct"
[[ $resent_entries == 1 ]] || fail "the event sent twice ($RESENT) has $resent_entries log entries, expected 1"
[[ $received == 4 ]] || fail "expected 4 rows in the shipment service's received table, found $received"
[[ $sent == 4 ]] || fail "expected 4 sent events in the order service's outbox, found $sent"
grep -q 'saved=3 duplicates=1 dead_lettered=0' "$WORK/subscribe_created.log" ||
  fail "the orders.created consumer should report saved=3 duplicates=1 dead_lettered=0"
say "OK: 3 orders → 3 shipments, line $TEA cancelled, event $RESENT delivered twice and processed once"

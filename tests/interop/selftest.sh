#!/usr/bin/env bash
# End-to-end self-test of the Python side alone (django-outbox-pattern 3.2.1 on the real broker).
#
#   bash tests/interop/setup.sh      # once
#   bash tests/interop/selftest.sh   # exits 0 on success
#
# What it does (every wait is bounded, every process it starts is stopped on exit):
#  0. deletes the broker queues of previous runs and empties the published/received tables
#  1. emit: 5 outbox rows on /topic/interop.selftest, 1 on /topic/interop.selftest.fail,
#     1 on /topic/interop.selftest.probe with --version v1 (routing key interop.selftest.probe.v1)
#  2. declares a plain probe queue bound to amq.topic/interop.selftest.probe.v1 (nobody consumes it)
#  3. subscribe interop_app.callbacks.record /topic/interop.selftest interop_selftest        (bg)
#     subscribe interop_app.callbacks.fail   /topic/interop.selftest.fail interop_selftest_fail (bg)
#     and waits until both queues have one consumer
#  4. publish (bg) until the 7 rows are SUCCEEDED
#  5. checks: record file has exactly the 5 emitted dop-msg-ids; count_received = 5 (and 5 distinct);
#     the failed message sits in DLQ.interop_selftest_fail; the probe message's AMQP properties
#  6. stops the subscribers with SIGTERM and the publisher with SIGINT (it ignores SIGTERM)
#  7. compares `rabbitmqctl list_queues` / `list_bindings` with the declarations documented in
#     README.md (the Rust side must declare identically)
#
# Env: SELFTEST_TIMEOUT (per wait, default 60 s), SELFTEST_KEEP=1 keeps the work dir and the
# fail/probe queues. Logs go to $SELFTEST_WORKDIR (default: a fresh mktemp dir).
set -euo pipefail
# Job control: without it bash starts background jobs with SIGINT ignored, and the dop
# publisher (which only reacts to SIGINT/KeyboardInterrupt) could not be stopped cleanly.
set -m

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

T="${SELFTEST_TIMEOUT:-60}"
WORK="${SELFTEST_WORKDIR:-$(mktemp -d /tmp/interop-selftest.XXXXXX)}"
mkdir -p "$WORK"
export DOP_RECORD_FILE="$WORK/record.jsonl"
export DOP_FAIL_RECORD_FILE="$WORK/fail.jsonl"
: >"$DOP_RECORD_FILE"
: >"$DOP_FAIL_RECORD_FILE"

DEST=/topic/interop.selftest
QUEUE=interop_selftest
FAIL_DEST=/topic/interop.selftest.fail
FAIL_QUEUE=interop_selftest_fail
PROBE_DEST=/topic/interop.selftest.probe
PROBE_RK=interop.selftest.probe.v1
PROBE_QUEUE=interop.selftest.probe
N=5

START_TS=$(date +%s)
log()  { printf '[selftest %3ss] %s\n' "$(($(date +%s) - START_TS))" "$*"; }
FAILED=0
fail() { printf '[selftest] FAIL: %s\n' "$*" >&2; FAILED=1; exit 1; }
manage() { timeout "$T" "$INTEROP_PYTHON" "$INTEROP_MANAGE" "$@"; }
rmq() { timeout "$T" rabbitmqctl -q "$@"; }

SUB_PID="" FAIL_SUB_PID="" PUB_PID=""

stop_pid() { # pid signal name
  local pid="$1" sig="$2" name="$3" i
  [[ -n $pid ]] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  log "$name (pid $pid) still alive 15 s after SIG$sig, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  stop_pid "$PUB_PID" INT publisher
  stop_pid "$SUB_PID" TERM subscriber
  stop_pid "$FAIL_SUB_PID" TERM fail-subscriber
  wait 2>/dev/null || true
  if [[ ${SELFTEST_KEEP:-0} != 1 ]]; then
    "$HERE/amqp_probe.sh" delete "$PROBE_QUEUE" >/dev/null 2>&1 || true
    rmq delete_queue "$FAIL_QUEUE" >/dev/null 2>&1 || true
    rmq delete_queue "DLQ.$FAIL_QUEUE" >/dev/null 2>&1 || true
  fi
  if [[ $rc != 0 || $FAILED == 1 ]]; then
    for f in "$WORK"/*.log; do
      [[ -f $f ]] || continue
      printf '\n----- %s (last 40 lines) -----\n' "$f" >&2
      tail -n 40 "$f" >&2
    done
    printf '\n[selftest] FAILED (rc=%s); logs kept in %s\n' "$rc" "$WORK" >&2
  else
    log "PASSED"
    [[ ${SELFTEST_KEEP:-0} == 1 ]] && log "work dir kept: $WORK" || rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_until() { # description, then a command that succeeds when done
  local what="$1" deadline=$(($(date +%s) + T))
  shift
  while :; do
    if "$@"; then return 0; fi
    (($(date +%s) < deadline)) || fail "timeout after ${T}s waiting for: $what"
    sleep 0.5
  done
}

alive() { # pid name
  kill -0 "$1" 2>/dev/null || fail "$2 (pid $1) exited early"
}

# ------------------------------------------------------------------------------- preflight
[[ -x $INTEROP_PYTHON ]] || fail "$INTEROP_PYTHON not found: run tests/interop/setup.sh first"
(exec 3<>"/dev/tcp/$DOP_STOMP_HOST/$DOP_STOMP_PORT") 2>/dev/null \
  || fail "STOMP does not answer on $DOP_STOMP_HOST:$DOP_STOMP_PORT: run tests/interop/setup.sh"
pg_isready -q -h "$DOP_DATABASE_HOST" -p "$DOP_DATABASE_PORT" || fail "PostgreSQL is down: run tests/interop/setup.sh"
log "work dir: $WORK (database $DOP_DATABASE_NAME)"

# ------------------------------------------------------------------------------- 0. reset
for q in "$QUEUE" "DLQ.$QUEUE" "$FAIL_QUEUE" "DLQ.$FAIL_QUEUE"; do
  rmq delete_queue "$q" >/dev/null 2>&1 || true
done
"$HERE/amqp_probe.sh" delete "$PROBE_QUEUE" >/dev/null
reset_out="$(manage reset_outbox)" || fail "manage.py reset_outbox failed (did setup.sh migrate $DOP_DATABASE_NAME?)"
log "reset: $reset_out"

# ------------------------------------------------------------------------------- 1. emit
manage emit --destination "$DEST" --count "$N" >"$WORK/emitted.tsv"
manage emit --destination "$FAIL_DEST" --count 1 --start 100 >"$WORK/emitted_fail.tsv"
manage emit --destination "$PROBE_DEST" --version v1 --count 1 --start 200 >"$WORK/emitted_probe.tsv"
[[ $(wc -l <"$WORK/emitted.tsv") == "$N" ]] || fail "emit did not print $N rows"
log "emitted $N rows on $DEST, 1 on $FAIL_DEST, 1 on $PROBE_DEST (version v1)"
[[ $(manage count_published --status schedule) == $((N + 2)) ]] || fail "expected $((N + 2)) SCHEDULE rows"

# ------------------------------------------------------------------------------- 2. probe queue
"$HERE/amqp_probe.sh" declare "$PROBE_QUEUE" "$PROBE_RK" >/dev/null
log "declared probe queue $PROBE_QUEUE bound to amq.topic with key $PROBE_RK"

# ------------------------------------------------------------------------------- 3. subscribers
"$INTEROP_PYTHON" "$INTEROP_MANAGE" subscribe interop_app.callbacks.record "$DEST" "$QUEUE" \
  >"$WORK/subscribe.log" 2>&1 &
SUB_PID=$!
"$INTEROP_PYTHON" "$INTEROP_MANAGE" subscribe interop_app.callbacks.fail "$FAIL_DEST" "$FAIL_QUEUE" \
  >"$WORK/subscribe_fail.log" 2>&1 &
FAIL_SUB_PID=$!
log "started subscribers (pids $SUB_PID, $FAIL_SUB_PID)"

consumers_ready() {
  alive "$SUB_PID" subscriber
  alive "$FAIL_SUB_PID" fail-subscriber
  local out
  out="$(rmq list_queues --no-table-headers name consumers 2>/dev/null)" || return 1
  grep -qE "^$QUEUE[[:space:]]+1\$" <<<"$out" && grep -qE "^$FAIL_QUEUE[[:space:]]+1\$" <<<"$out"
}
wait_until "both subscriber queues to have 1 consumer" consumers_ready
log "queues $QUEUE and $FAIL_QUEUE have their consumer"

# ------------------------------------------------------------------------------- 4. publisher
"$INTEROP_PYTHON" "$INTEROP_MANAGE" publish >"$WORK/publish.log" 2>&1 &
PUB_PID=$!
log "started publisher (pid $PUB_PID)"
all_sent() {
  alive "$PUB_PID" publisher
  [[ $(manage count_published --status succeeded) == $((N + 2)) ]]
}
wait_until "all $((N + 2)) outbox rows to be SUCCEEDED" all_sent
log "publisher marked all $((N + 2)) rows SUCCEEDED"

# ------------------------------------------------------------------------------- 5. checks
all_received() {
  alive "$SUB_PID" subscriber
  [[ $(wc -l <"$DOP_RECORD_FILE") -ge $N && $(manage count_received) -ge $N ]]
}
wait_until "$N received rows and $N record lines" all_received
sleep 1 # let any (wrong) extra delivery show up before counting exactly
lines=$(wc -l <"$DOP_RECORD_FILE")
received=$(manage count_received)
distinct=$(manage count_received --distinct)
log "record file: $lines lines; count_received: $received; distinct msg ids: $distinct"
[[ $lines == "$N" ]] || fail "record file has $lines lines, expected $N"
[[ $received == "$N" ]] || fail "count_received says $received, expected $N"
[[ $distinct == "$N" ]] || fail "count_received --distinct says $distinct, expected $N"

"$INTEROP_PYTHON" - "$WORK/emitted.tsv" "$DOP_RECORD_FILE" "$DEST" <<'PY' || fail "record file content check"
import json, sys
emitted = [l.split("\t")[0] for l in open(sys.argv[1]).read().splitlines()]
recs = [json.loads(l) for l in open(sys.argv[2])]
dest = sys.argv[3]
assert sorted(r["msg_id"] for r in recs) == sorted(emitted), (emitted, [r["msg_id"] for r in recs])
for r in recs:
    h = r["headers"]
    assert h["dop-msg-id"] == r["msg_id"], h
    assert h["dop-msg-destination"] == dest, h
    assert h["dop-msg-type"] == "Published", h
    assert h["destination"] == dest, h
    assert h["dop-correlation-id"] and h["dop-msg-sent-time"].endswith("Z"), h
    assert r["body"]["source"] == "python" and r["body"]["price"] == "1.50", r["body"]
    assert h["message-id"] != r["msg_id"]
assert sorted(r["body"]["id"] for r in recs) == list(range(1, len(emitted) + 1))
print("record file OK: msg ids == emitted dop-msg-ids; headers:", ", ".join(sorted(recs[0]["headers"])))
PY

dlq_has_one() {
  alive "$FAIL_SUB_PID" fail-subscriber
  rmq list_queues --no-table-headers name messages 2>/dev/null | grep -qE "^DLQ\.$FAIL_QUEUE[[:space:]]+1\$"
}
wait_until "the failed message to reach DLQ.$FAIL_QUEUE" dlq_has_one
[[ $(wc -l <"$DOP_FAIL_RECORD_FILE") == 1 ]] || fail "fail callback should have run exactly once"
[[ $(manage count_received) == "$N" ]] || fail "the fail callback must not create a received row"
log "fail callback: message NACKed and dead-lettered into DLQ.$FAIL_QUEUE (1 message)"
"$HERE/amqp_probe.sh" peek "DLQ.$FAIL_QUEUE" 1 >"$WORK/dlq_message.txt"
grep -qF '    {<<"x-death">>,array,' "$WORK/dlq_message.txt" || fail "DLQ message has no x-death header"
grep -qF '    {<<"x-first-death-reason">>,longstr,<<"rejected">>}' "$WORK/dlq_message.txt" || fail "DLQ message not rejected"
grep -qF '  routing_key: <<"DLQ.'"$FAIL_QUEUE"'">>' "$WORK/dlq_message.txt" || fail "DLQ message routing key"

"$HERE/amqp_probe.sh" peek "$PROBE_QUEUE" 1 >"$WORK/probe_message.txt"
for pat in '  exchange: <<"amq.topic">>' "  routing_key: <<\"$PROBE_RK\">>" '  content_type: undefined' \
  '  delivery_mode: undefined' '  message_id: undefined' '    {<<"dop-msg-id">>,longstr,<<"' \
  '    {<<"dop-msg-type">>,longstr,<<"Published">>}' "    {<<\"dop-msg-destination\">>,longstr,<<\"$PROBE_DEST.v1\">>}" \
  '    {<<"dop-msg-sent-time">>,longstr,<<"' '    {<<"dop-correlation-id">>,longstr,<<"' '    {<<"content-length">>,longstr,<<"48">>}' \
  '  body: <<"{\"id\": 200, \"price\": \"1.50\", \"source\": \"python\"}">>'; do
  grep -qF -- "$pat" "$WORK/probe_message.txt" || fail "probe message lacks line '$pat' (see $WORK/probe_message.txt)"
done
# Only the 5 dop-* headers + content-length, nothing else, all longstr.
[[ $(grep -c '^    {<<"' "$WORK/probe_message.txt") == 6 ]] || fail "probe message should carry exactly 6 headers"
[[ $(grep -c '^    {<<"[^"]*">>,longstr,' "$WORK/probe_message.txt") == 6 ]] || fail "probe headers should all be longstr"
log "AMQP view of a dop-published message (queue $PROBE_QUEUE):"
sed 's/^/    /' "$WORK/probe_message.txt"

# ------------------------------------------------------------------------------- 6. stop
stop_and_check() { # pid signal name
  local pid="$1" sig="$2" name="$3" rc=0 i
  kill -0 "$pid" 2>/dev/null || fail "$name (pid $pid) exited before it was asked to stop"
  kill "-$sig" "$pid"
  for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && fail "$name did not exit within 30 s of SIG$sig"
  wait "$pid" || rc=$?
  [[ $rc == 0 ]] || fail "$name exited with status $rc after SIG$sig"
  log "$name stopped by SIG$sig (exit 0)"
}
stop_and_check "$PUB_PID" INT publisher;             PUB_PID=""
stop_and_check "$SUB_PID" TERM subscriber;           SUB_PID=""
stop_and_check "$FAIL_SUB_PID" TERM fail-subscriber; FAIL_SUB_PID=""

# ------------------------------------------------------------------------------- 7. declarations
queues="$(rmq list_queues --no-table-headers name durable auto_delete exclusive arguments | grep -E "^(DLQ\.)?$QUEUE[[:space:]]" | sort)"
bindings="$(rmq list_bindings --no-table-headers source_name source_kind destination_name destination_kind routing_key arguments | grep -E "[[:space:]](DLQ\.)?$QUEUE[[:space:]]" | sort)"
log "rabbitmqctl list_queues name durable auto_delete exclusive arguments:"
sed 's/^/    /' <<<"$queues"
log "rabbitmqctl list_bindings source_name source_kind destination_name destination_kind routing_key arguments:"
sed 's/^/    /' <<<"$bindings"

TAB=$'\t'
# NB: rabbitmqctl prints the empty longstr "" as []. The DLQ's own dead-letter routing key is
# DLQ.DLQ.DLQ.<Q> (three prefixes: dop 3.2.1 prefixes the already-prefixed DLQ name twice).
expected_queues="DLQ.$QUEUE${TAB}true${TAB}false${TAB}false${TAB}[{\"x-dead-letter-exchange\",[]},{\"x-dead-letter-routing-key\",\"DLQ.DLQ.DLQ.$QUEUE\"}]
$QUEUE${TAB}true${TAB}false${TAB}false${TAB}[{\"x-dead-letter-exchange\",[]},{\"x-dead-letter-routing-key\",\"DLQ.$QUEUE\"}]"
expected_bindings="${TAB}exchange${TAB}DLQ.$QUEUE${TAB}queue${TAB}DLQ.$QUEUE${TAB}[]
${TAB}exchange${TAB}$QUEUE${TAB}queue${TAB}$QUEUE${TAB}[]
amq.topic${TAB}exchange${TAB}$QUEUE${TAB}queue${TAB}interop.selftest${TAB}[]"
[[ $queues == "$expected_queues" ]] || fail "queue declarations differ from README.md; expected:
$expected_queues"
[[ $bindings == "$(sort <<<"$expected_bindings")" ]] || fail "bindings differ from README.md; expected:
$expected_bindings"
log "queue declarations and bindings match README.md"

# Argument types: list_queues prints values only; the declared types come from the queue record.
types="$(timeout "$T" rabbitmqctl eval "
[{Q, amqqueue:is_durable(R), amqqueue:is_auto_delete(R), amqqueue:get_exclusive_owner(R), amqqueue:get_arguments(R)}
 || Q <- [<<\"$QUEUE\">>, <<\"DLQ.$QUEUE\">>], {ok, R} <- [rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, Q))]].")"
types_flat="$(tr -d ' \n' <<<"$types")"
log "queue records (name, durable, auto_delete, exclusive owner, arguments with AMQP types): $types_flat"
want="[{<<\"$QUEUE\">>,true,false,none,[{<<\"x-dead-letter-exchange\">>,longstr,<<>>},{<<\"x-dead-letter-routing-key\">>,longstr,<<\"DLQ.$QUEUE\">>}]},{<<\"DLQ.$QUEUE\">>,true,false,none,[{<<\"x-dead-letter-exchange\">>,longstr,<<>>},{<<\"x-dead-letter-routing-key\">>,longstr,<<\"DLQ.DLQ.DLQ.$QUEUE\">>}]}]"
[[ $types_flat == "$want" ]] || fail "queue records differ; expected $want"
log "argument types: both x-dead-letter-* arguments are longstr"

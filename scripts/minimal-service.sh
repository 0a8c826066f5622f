#!/usr/bin/env bash
# The README's whole service (examples/minimal-service), built as a crate of
# its own with only the PostgreSQL driver, then run end to end: its callback is
# linked, `place-order` saves an order with its event, the relay sends it, and
# the service's own `subscribe` consumes it. Uses a database and a queue of its
# own, and removes the queue afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scripts/services.sh postgres rabbitmq
crate=examples/minimal-service
# Same versions as the workspace, so the shared target directory is reused.
cp Cargo.lock "$crate/Cargo.lock"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
echo "[minimal-service] building $crate on its own (postgres driver only)" >&2
cargo build --manifest-path "$crate/Cargo.toml"
bin=$CARGO_TARGET_DIR/debug/minimal-service

callbacks=$("$bin" callbacks)
grep -qx 'minimal_service::on_order' <<<"$callbacks" || {
    echo "[minimal-service] on_order is not linked; callbacks lists: $callbacks" >&2
    exit 1
}

run=$$
database=outbox_minimal_$run
queue=minimal-service-$run
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $database"
work=$(mktemp -d)
cleanup() {
    [[ -n ${subscriber:-} ]] && kill "$subscriber" 2>/dev/null || true
    rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
    rabbitmqctl -q delete_queue "DLQ.$queue" >/dev/null 2>&1 || true
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" || true
    rm -rf "$work"
}
trap cleanup EXIT
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$database
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f

"$bin" migrate
"$bin" subscribe minimal_service::on_order /topic/orders.created.v1 "$queue" >"$work/out" 2>"$work/err" &
subscriber=$!
# The subscriber declares its queue before anything is published to it.
for _ in $(seq 300); do
    rabbitmqctl -q list_queues name 2>/dev/null | grep -qx "$queue" && break
    kill -0 "$subscriber" || { cat "$work/err" >&2; exit 1; }
    sleep 0.1
done
"$bin" place-order
"$bin" publish --until-empty
for _ in $(seq 300); do
    grep -q '^order 1 for "ada"$' "$work/out" && break
    kill -0 "$subscriber" || { cat "$work/err" >&2; exit 1; }
    sleep 0.1
done
grep -q '^order 1 for "ada"$' "$work/out" || {
    echo "[minimal-service] the callback did not print the order; its output:" >&2
    cat "$work/out" "$work/err" >&2
    exit 1
}
kill -TERM "$subscriber"
wait "$subscriber"
subscriber=
received=$(psql -qtA -h 127.0.0.1 -U postgres -d "$database" -c "SELECT count(*) FROM received")
[[ $received == 1 ]] || { echo "[minimal-service] expected 1 received row, found $received" >&2; exit 1; }
echo "[minimal-service] ok: built alone, callback linked, an order saved, relayed and consumed once" >&2

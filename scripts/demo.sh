#!/usr/bin/env bash
# The main job end to end: save models, relay their events to RabbitMQ, consume them.
# Needs only RabbitMQ (installed from the distribution packages and started if missing);
# the database is a SQLite file under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
# `scripts/demo.sh nats`: the same over NATS JetStream.
if [ "${1:-}" = nats ]; then
    scripts/services.sh nats
    export AMQP_URL=${AMQP_URL:-nats://127.0.0.1:4222}
else
    scripts/services.sh rabbitmq
fi
echo "[demo] building the quickstart example (the first build takes several minutes; cargo shows its progress)" >&2
cargo build -p outbox-examples --example quickstart
echo "[demo] running it" >&2
exec cargo run --quiet -p outbox-examples --example quickstart

#!/usr/bin/env bash
# The main job end to end: save models, relay their events to RabbitMQ, consume them.
# Needs only RabbitMQ (installed from the distribution packages and started if missing);
# the database is a SQLite file under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh rabbitmq
echo "[demo] building the quickstart example (the first build takes several minutes; cargo shows its progress)" >&2
cargo build -p outbox-examples --example quickstart
echo "[demo] running it" >&2
exec cargo run --quiet -p outbox-examples --example quickstart

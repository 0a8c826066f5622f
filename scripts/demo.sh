#!/usr/bin/env bash
# The main job end to end: save models, relay their events to RabbitMQ, consume them.
# Needs only RabbitMQ (installed from the distribution packages and started if missing);
# the database is a SQLite file under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh rabbitmq
exec cargo run --quiet -p outbox-examples --example quickstart

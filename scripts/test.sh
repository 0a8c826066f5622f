#!/usr/bin/env bash
# The whole test suite, against real PostgreSQL, MariaDB, SQLite, RabbitMQ, NATS JetStream
# (and the Python django-outbox-pattern library for the interop tests).
# Starts, or installs, the services it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh all
export RUST_BACKTRACE=1
# Every package, every target: unit tests, integration tests, trybuild UI
# tests, the examples (run as tests), the interop tests and the reliability
# suite (one binary that restarts services, its tests one at a time).
# Tests that run outbox-cli use this binary, built once here (a build from
# each test binary would recompile outbox-core, whose features differ
# between the test build and this one).
cargo build -p outbox-cli --bin outbox-cli
export OUTBOX_TEST_CLI=${CARGO_TARGET_DIR:-$PWD/target}/debug/outbox-cli
cargo test --workspace --all-targets --no-fail-fast "$@"
# The README's whole service, as a crate of its own (postgres driver only).
scripts/minimal-service.sh
# The quickstart over NATS JetStream (the suite ran it over RabbitMQ).
scripts/demo.sh nats

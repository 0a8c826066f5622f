#!/usr/bin/env bash
# Prepare the Python (django-outbox-pattern) side of the interop tests. Idempotent.
#
#   bash tests/interop/setup.sh
#
# 1. RabbitMQ is running, rabbitmq_stomp is enabled and STOMP answers on $DOP_STOMP_PORT (61613).
# 2. PostgreSQL answers on 127.0.0.1:5432.
# 3. A virtualenv at target/interop-venv with requirements.txt installed (reused when the
#    requirements stamp matches).
# 4. The database $DOP_DATABASE_NAME (default dop_interop) exists and is migrated.
#
# Env knobs: INTEROP_BASE_PYTHON (interpreter used to create the venv; default python3),
# INTEROP_FORCE_REINSTALL=1 (rebuild the venv from scratch), plus those of env.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

START_TS=$(date +%s)
log()  { printf '[interop-setup] %s\n' "$*"; }
die()  { printf '[interop-setup] ERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "required command '$1' not found in PATH ($2)"; }

tcp_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}
wait_tcp() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 2; i++)); do
    tcp_open "$1" "$2" && return 0
    sleep 0.5
  done
  die "$4 does not answer on $1:$2 after $3 s"
}

# --------------------------------------------------------------------------- RabbitMQ
need rabbitmqctl "install the rabbitmq-server package"
need rabbitmq-plugins "install the rabbitmq-server package"
need timeout "coreutils"

if timeout 30 rabbitmqctl -q status >/dev/null 2>&1; then
  log "RabbitMQ: running"
else
  need rabbitmq-server "install the rabbitmq-server package"
  log "RabbitMQ: not running, starting it with 'rabbitmq-server -detached'"
  rabbitmq-server -detached || die "rabbitmq-server -detached failed"
  log "RabbitMQ: waiting for 'rabbitmqctl await_startup' (up to 120 s)"
  ok=0
  for _ in $(seq 1 24); do
    if timeout 30 rabbitmqctl -q await_startup >/dev/null 2>&1; then ok=1; break; fi
    sleep 5
  done
  [[ $ok == 1 ]] || die "RabbitMQ did not start (see /var/log/rabbitmq/)"
  log "RabbitMQ: started"
fi

if timeout 60 rabbitmq-plugins -q is_enabled rabbitmq_stomp >/dev/null 2>&1; then
  log "RabbitMQ: rabbitmq_stomp already enabled"
else
  log "RabbitMQ: enabling rabbitmq_stomp"
  timeout 120 rabbitmq-plugins enable rabbitmq_stomp || die "could not enable rabbitmq_stomp"
fi
wait_tcp "$DOP_STOMP_HOST" "$DOP_STOMP_PORT" 60 "RabbitMQ STOMP"
log "RabbitMQ: STOMP answers on $DOP_STOMP_HOST:$DOP_STOMP_PORT"
wait_tcp 127.0.0.1 5672 30 "RabbitMQ AMQP"
log "RabbitMQ: AMQP answers on 127.0.0.1:5672"

# --------------------------------------------------------------------------- PostgreSQL
need pg_isready "install postgresql-client"
need psql "install postgresql-client"
if pg_isready -q -h "$DOP_DATABASE_HOST" -p "$DOP_DATABASE_PORT"; then
  log "PostgreSQL: running on $DOP_DATABASE_HOST:$DOP_DATABASE_PORT"
else
  need pg_ctlcluster "install postgresql-common"
  ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)"
  [[ -n $ver ]] || die "PostgreSQL is down and no cluster is configured under /etc/postgresql"
  log "PostgreSQL: not running, starting cluster $ver/main"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || die "pg_ctlcluster $ver main start failed"
  for _ in $(seq 1 60); do
    pg_isready -q -h "$DOP_DATABASE_HOST" -p "$DOP_DATABASE_PORT" && break
    sleep 0.5
  done
  pg_isready -q -h "$DOP_DATABASE_HOST" -p "$DOP_DATABASE_PORT" || die "PostgreSQL did not come up"
  log "PostgreSQL: started"
fi
PSQL=(psql -X -q -h "$DOP_DATABASE_HOST" -p "$DOP_DATABASE_PORT" -U "$DOP_DATABASE_USER" -d postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -tAc 'select 1' >/dev/null || die "cannot connect to PostgreSQL as '$DOP_DATABASE_USER' (trust auth expected)"

# --------------------------------------------------------------------------- virtualenv
BASE_PY="${INTEROP_BASE_PYTHON:-python3}"
need "$BASE_PY" "Python >= 3.10 is required"
"$BASE_PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "$BASE_PY is $("$BASE_PY" -V 2>&1); django-outbox-pattern 3.2.1 needs Python >= 3.10"

REQ="$INTEROP_DIR/requirements.txt"
STAMP="$INTEROP_VENV/.interop-requirements.stamp"
want_stamp="$( (sha256sum "$REQ" | cut -d' ' -f1; "$BASE_PY" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"

if [[ ${INTEROP_FORCE_REINSTALL:-0} == 1 && -d $INTEROP_VENV ]]; then
  log "venv: INTEROP_FORCE_REINSTALL=1, removing $INTEROP_VENV"
  rm -rf "$INTEROP_VENV"
fi
if [[ -d $INTEROP_VENV && ! -x $INTEROP_PYTHON ]]; then
  log "venv: $INTEROP_VENV is broken (no $INTEROP_PYTHON), recreating it"
  rm -rf "$INTEROP_VENV"
fi
if [[ ! -d $INTEROP_VENV ]]; then
  log "venv: creating $INTEROP_VENV with $("$BASE_PY" -V 2>&1)"
  mkdir -p "$(dirname "$INTEROP_VENV")"
  "$BASE_PY" -m venv "$INTEROP_VENV" || die "python -m venv failed (on Debian: apt-get install python3-venv)"
fi

if [[ -f $STAMP && "$(cat "$STAMP")" == "$want_stamp" ]] \
  && "$INTEROP_PYTHON" -c 'import django_outbox_pattern, django, psycopg, stomp' >/dev/null 2>&1; then
  log "venv: requirements already satisfied (stamp matches), skipping pip"
else
  log "venv: pip install -r $REQ"
  rm -f "$STAMP"
  "$INTEROP_PYTHON" -m pip install --disable-pip-version-check -q -r "$REQ" \
    || die "pip install failed (is PyPI reachable? PIP_FIND_LINKS=${PIP_FIND_LINKS:-unset})"
  "$INTEROP_PYTHON" -c 'import django_outbox_pattern, django, psycopg, stomp' \
    || die "packages installed but cannot be imported"
  echo "$want_stamp" >"$STAMP"
  log "venv: installed: $("$INTEROP_PYTHON" -m pip freeze --disable-pip-version-check | tr '\n' ' ')"
fi

# --------------------------------------------------------------------------- database
exists="$("${PSQL[@]}" -tAc "select 1 from pg_database where datname = '$DOP_DATABASE_NAME'")"
if [[ $exists == 1 ]]; then
  log "database: $DOP_DATABASE_NAME exists"
else
  log "database: creating $DOP_DATABASE_NAME"
  "${PSQL[@]}" -c "create database \"$DOP_DATABASE_NAME\"" || die "could not create database $DOP_DATABASE_NAME"
fi

log "django: manage.py check"
"$INTEROP_PYTHON" "$INTEROP_MANAGE" check || die "manage.py check failed"
log "django: manage.py migrate"
"$INTEROP_PYTHON" "$INTEROP_MANAGE" migrate --noinput || die "manage.py migrate failed"

log "done in $(($(date +%s) - START_TS)) s"
log "INTEROP_PYTHON=$INTEROP_PYTHON"
log "INTEROP_MANAGE=$INTEROP_MANAGE"
log "use: source $INTEROP_DIR/env.sh"

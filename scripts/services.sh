#!/usr/bin/env bash
# Make sure the services the demo and the tests need are up, starting (and on
# a fresh machine installing, from Debian's packages) what is missing.
#
#   scripts/services.sh rabbitmq [stomp]   RabbitMQ on 5672 (and the STOMP plugin on 61613)
#   scripts/services.sh postgres           PostgreSQL on 5432, user postgres, trust on loopback, wal_level = logical
#   scripts/services.sh mariadb            MariaDB on 3306, root without password, database test
#   scripts/services.sh nats               NATS with JetStream on 4222 (store in /var/lib/nats-server)
#   scripts/services.sh all                all of the above, with STOMP
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds what
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        port_open "$1" && return 0
        sleep 0.2
    done
    die "$3 did not open port $1 within $2 s"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

apt_install() {
    command -v apt-get >/dev/null || die "cannot install $* (no apt-get); install it by hand"
    say "installing $* from the distribution packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        apt_install rabbitmq-server
    fi
    if ! port_open 5672; then
        say "starting RabbitMQ"
        as_root rabbitmq-server -detached >/dev/null 2>&1 || true
    fi
    as_root timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1 || wait_port 5672 120 RabbitMQ
    wait_port 5672 60 RabbitMQ
    if [ "${1:-}" = stomp ] && ! port_open 61613; then
        say "enabling the STOMP plugin (port 61613) for the django-outbox-pattern interop tests"
        as_root rabbitmq-plugins enable rabbitmq_stomp >/dev/null
        wait_port 61613 60 "RabbitMQ STOMP"
    fi
    say "RabbitMQ is up"
}

ensure_postgres() {
    local fresh=no
    if ! command -v pg_ctlcluster >/dev/null; then
        apt_install postgresql
        fresh=yes
    fi
    if ! port_open 5432; then
        say "starting PostgreSQL"
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    wait_port 5432 60 PostgreSQL
    if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
        [ "$fresh" = yes ] || die "PostgreSQL runs but postgres@127.0.0.1 cannot log in without a password; allow trust on loopback or set OUTBOX_TEST_POSTGRES_URL"
        say "allowing the postgres user on loopback without a password (fresh install)"
        local hba
        hba=$(as_root su postgres -c "psql -Atc 'show hba_file'")
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        as_root su postgres -c "psql -c 'select pg_reload_conf()'" >/dev/null
    fi
    # Log-tailing capture (relay.capture = "wal") reads logical replication;
    # wal_level only changes with a restart, done once here.
    if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show wal_level')" != logical ]; then
        say "setting wal_level = logical for log-tailing capture (restarts PostgreSQL once)"
        psql -h 127.0.0.1 -U postgres -d postgres -qc "alter system set wal_level = logical" >/dev/null
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
        wait_port 5432 60 PostgreSQL
        local i
        for ((i = 0; i < 100; i++)); do
            psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 && break
            sleep 0.2
        done
    fi
    say "PostgreSQL is up (wal_level = logical)"
}

ensure_mariadb() {
    local fresh=no
    if ! command -v mariadbd >/dev/null && ! [ -x /usr/sbin/mariadbd ]; then
        apt_install mariadb-server
        fresh=yes
    fi
    if ! port_open 3306; then
        say "starting MariaDB"
        as_root mkdir -p /run/mysqld
        as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
        as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    fi
    wait_port 3306 60 MariaDB
    if ! mariadb -h 127.0.0.1 -uroot -e 'select 1' >/dev/null 2>&1; then
        [ "$fresh" = yes ] || die "MariaDB runs but root@127.0.0.1 cannot log in without a password; set OUTBOX_TEST_MYSQL_URL"
        say "letting root log in over TCP without a password (fresh install)"
        as_root mariadb -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING PASSWORD('')"
    fi
    mariadb -h 127.0.0.1 -uroot -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null
    say "MariaDB is up"
}

ensure_nats() {
    if ! command -v nats-server >/dev/null; then
        apt_install nats-server
    fi
    if ! port_open 4222; then
        say "starting NATS with JetStream"
        as_root mkdir -p /var/lib/nats-server
        as_root setsid nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server \
            -l /var/log/nats-server.log </dev/null >/dev/null 2>&1 &
    fi
    wait_port 4222 60 NATS
    say "NATS is up"
}

case "${1:-all}" in
    rabbitmq) ensure_rabbitmq "${2:-}" ;;
    postgres) ensure_postgres ;;
    mariadb) ensure_mariadb ;;
    nats) ensure_nats ;;
    all)
        ensure_postgres
        ensure_mariadb
        ensure_rabbitmq stomp
        ensure_nats
        ;;
    *) die "unknown service '$1' (rabbitmq [stomp], postgres, mariadb, nats, all)" ;;
esac

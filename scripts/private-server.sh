#!/usr/bin/env bash
# Private, throw-away server instances for the tests that stop, kill or
# restart a server. Each instance lives entirely in one directory (data, logs,
# pid file, Erlang cookie) and listens on 127.0.0.1 only, so the machine's own
# services (PostgreSQL 5432, RabbitMQ 5672, NATS 4222) are never touched.
#
#   private-server.sh rabbitmq start <dir> <amqp-port> [rabbitmq.conf lines...]
#                                               prints the node name
#   private-server.sh rabbitmq stop <dir>       rabbitmqctl stop, then kill as a fallback
#   private-server.sh rabbitmq kill <dir>       kill -9 of the node
#   private-server.sh rabbitmq ctl <dir> <args...>
#                                               rabbitmqctl against that node
#   private-server.sh postgres start <dir> <port> [-c name=value ...]
#                                               prints postgres://postgres@127.0.0.1:<port>/postgres
#   private-server.sh postgres stop <dir> [fast|immediate|smart]
#   private-server.sh postgres restart <dir> [fast|immediate|smart]
#   private-server.sh nats start <dir> <port>   prints nats://127.0.0.1:<port>
#   private-server.sh nats stop <dir>           SIGTERM (graceful), then kill as a fallback
#   private-server.sh nats kill <dir>           kill -9
#   private-server.sh free-port                 prints a free TCP port
#
# `start` waits until the server accepts clients. On a directory whose server
# already runs it does nothing and prints the same line; after a stop or kill
# it starts the server again on the existing data. The configuration is
# regenerated from the arguments on every start (so pass the same extras
# again when restarting). `stop` and `kill` on a stopped instance are no-ops.
# Only the stated line goes to stdout; progress and errors go to stderr.
#
# Environment:
#   PRIVATE_SERVER_TIMEOUT     seconds to wait for start/stop (default 120)
#   PRIVATE_RABBITMQ_PLUGINS   plugins to enable, e.g. "rabbitmq_stomp" (default none;
#                              give their listeners free ports via extra conf lines)
#   RABBITMQ_SBIN              RabbitMQ's own sbin directory (default: Debian's 3.10.8)
#   PG_BINDIR                  PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   NATS_SERVER                nats-server binary (default: the one on PATH or /usr/sbin)
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

TIMEOUT=${PRIVATE_SERVER_TIMEOUT:-120}
RABBITMQ_SBIN=${RABBITMQ_SBIN:-/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/sbin}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
# Every private node gets the same cookie, so that any of them can be reached
# with this script's `ctl`; it only has to differ from nothing in particular.
RABBITMQ_COOKIE=OUTBOXPRIVATESERVERCOOKIE

say() { printf '[private-server] %s\n' "$*" >&2; }
die() { printf '[private-server] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '/^#   private-server.sh/,/^#$/{/^#$/d;s/^#   //;p}' "$0" >&2
    exit 2
}

# ---------------------------------------------------------------- helpers

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A listener on this port: what would stop a server from binding it. (Old
# client connections in TIME_WAIT do not: servers bind with SO_REUSEADDR.)
port_listening() {
    if command -v ss >/dev/null; then
        [ -n "$(ss -Htln "( sport = :$1 )" 2>/dev/null)" ]
    else
        port_open "$1"
    fi
}

# Any TCP socket (listening, bound or connected) with this local port.
port_in_use() {
    if command -v ss >/dev/null; then
        [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
    else
        port_open "$1"
    fi
}

check_port_arg() {
    if ! [[ "$1" =~ ^[0-9]{1,5}$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 65535 ]; then
        die "not a port number: '$1'"
    fi
}

free_port() {
    # Below the kernel's ephemeral range, so that no outgoing connection (nor
    # rabbitmqctl, which uses 35672-35682) takes the port in the meantime.
    local low=32768 base span p i
    read -r low _ 2>/dev/null </proc/sys/net/ipv4/ip_local_port_range || true
    base=15000
    span=$((low - base))
    [ "$span" -ge 1000 ] || { base=10000; span=5000; }
    for ((i = 0; i < 500; i++)); do
        p=$((base + (RANDOM * 32768 + RANDOM) % span))
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "found no free port in $base-$((base + span - 1))"
}

# Creates (for start) or requires the instance directory; prints its absolute path.
instance_dir() { # dir create|existing
    [ -n "$1" ] || usage
    if [ "$2" = create ]; then
        mkdir -p -- "$1"
    else
        [ -d "$1" ] || die "no such instance directory: $1"
    fi
    (cd -- "$1" && pwd -P)
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Sets CMDLINE to the command line of a process, each argument followed by a
# space, or to "" if it is gone (or a zombie). No fork: it runs in poll loops.
read_cmdline() {
    local -a args=()
    mapfile -d '' -t args 2>/dev/null <"/proc/$1/cmdline" || true
    CMDLINE=
    [ "${#args[@]}" -eq 0 ] || CMDLINE="${args[*]} "
}

# Pids of the processes whose command line contains all the given strings
# (fixed strings, not patterns).
pids_with_args() {
    local p s
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" != "$BASHPID" ] || continue
        read_cmdline "$p"
        for s in "$@"; do [[ "$CMDLINE" == *"$s"* ]] || continue 2; done
        echo "$p"
    done
}

# Whether a pid is alive and its command line contains all the given strings.
pid_is() { # pid string...
    local p=$1 s
    shift
    pid_alive "$p" || return 1
    read_cmdline "$p"
    for s in "$@"; do [[ "$CMDLINE" == *"$s"* ]] || return 1; done
}

# Waits until none of the pids is alive; false on timeout.
wait_gone() { # seconds pid...
    local deadline=$((SECONDS + $1)) p alive
    shift
    while :; do
        alive=no
        for p in "$@"; do pid_alive "$p" && alive=yes; done
        [ "$alive" = no ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# SIGTERM, wait, then SIGKILL.
terminate() { # seconds pid...
    local t=$1
    shift
    [ "$#" -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait_gone "$t" "$@" && return 0
    say "still running after ${t}s, sending SIGKILL to $*"
    kill -KILL "$@" 2>/dev/null || true
    wait_gone 10 "$@" || die "could not kill $*"
}

tail_log() { # file
    [ -f "$1" ] && { say "last lines of $1:"; tail -n 25 -- "$1" >&2; }
    return 0
}

# Starts a command in the background, detached from our session (so that a
# Ctrl-C or a process-group kill aimed at the test does not reach the server)
# and from our stdin/stdout/stderr (so that a caller reading our stdout to EOF
# does not wait for the server to exit). Output goes to a log file.
launch() { # logfile command...
    local log=$1
    shift
    setsid "$@" </dev/null >>"$log" 2>&1 &
}

# ---------------------------------------------------------------- RabbitMQ

rmq_host() {
    # Short names need a resolvable host; fall back to localhost (which the
    # machine's own node uses as well) if the hostname does not resolve.
    local h
    h=$(hostname -s 2>/dev/null || true)
    if [ -n "$h" ] && getent hosts "$h" >/dev/null 2>&1; then echo "$h"; else echo localhost; fi
}

# Exports everything a node or rabbitmqctl needs to work on this instance only.
rmq_env() { # dir
    local d=$1
    export HOME="$d/home"
    # Keep /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost ...) out.
    export RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
    export RABBITMQ_NODENAME RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODENAME=$(cat "$d/nodename")
    export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
    export RABBITMQ_CONFIG_FILES="$d/conf.d"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$d/mnesia"
    export RABBITMQ_LOG_BASE="$d/log"
    export RABBITMQ_PID_FILE="$d/rabbitmq.pid"
    # Should no epmd run yet, the one the node starts listens on loopback only.
    export ERL_EPMD_ADDRESS=127.0.0.1
}

rmq_ctl() { # dir args...
    local d=$1
    shift
    (rmq_env "$d" && exec "$RABBITMQ_SBIN/rabbitmqctl" -n "$RABBITMQ_NODENAME" "$@")
}

# The pid of the node's beam process, if it runs. The beam's command line
# carries "-home <dir>/home" (erlexec adds it from HOME), which tells our node
# apart from any other, even after pid reuse; "-s rabbit boot" tells it apart
# from a rabbitmqctl VM run with the same HOME.
rmq_pids() { # dir
    local d=$1 p=
    # (The node writes its pid without a newline, hence the || true.)
    if [ -f "$d/rabbitmq.pid" ]; then read -r p <"$d/rabbitmq.pid" || true; fi
    if pid_is "$p" "-home $d/home " "-s rabbit boot "; then
        echo "$p"
    else
        # No (valid) pid file yet, e.g. while it boots: look for it.
        pids_with_args "-home $d/home " "-s rabbit boot "
    fi
}

# A node name not registered with epmd right now: another directory's node,
# first started on this port and since restarted on another one, may hold it.
rmq_new_name() { # base
    local names n=$1 i=1
    names=$(epmd -names 2>/dev/null || true)
    while grep -qx "name $n at port [0-9]*" <<<"$names"; do
        i=$((i + 1))
        n=$1-$i
    done
    echo "$n"
}

# The rabbitmq.conf of this start, on stdout.
rmq_conf() { # port extra-lines...
    local line
    echo "# written by private-server.sh on every start"
    echo "listeners.tcp.default = 127.0.0.1:$1"
    echo "loopback_users = none"
    shift
    for line in "$@"; do echo "$line"; done
}

rmq_write_plugins() { # dir
    local plugins=()
    IFS=', ' read -r -a plugins <<<"${PRIVATE_RABBITMQ_PLUGINS:-}" || true
    if [ "${#plugins[@]}" -eq 0 ]; then
        echo '[].' >"$1/enabled_plugins"
    else
        local IFS=,
        echo "[${plugins[*]}]." >"$1/enabled_plugins"
    fi
}

rabbitmq_start() { # dir port extra-lines...
    [ "$#" -ge 2 ] || usage
    local d port=$2 node pids dist deadline log logoff outoff booted i t0=$SECONDS
    d=$(instance_dir "$1" create)
    check_port_arg "$port"
    shift 2
    [ -x "$RABBITMQ_SBIN/rabbitmq-server" ] || die "no rabbitmq-server in $RABBITMQ_SBIN (set RABBITMQ_SBIN)"

    pids=$(rmq_pids "$d")
    if [ -n "$pids" ]; then
        node=$(cat "$d/nodename")
        rmq_conf "$port" "$@" | cmp -s - "$d/rabbitmq.conf" ||
            say "$node already runs; the new configuration is not applied until it restarts"
        port_open "$port" || die "$node runs (pid $pids) but does not listen on $port"
        echo "$node"
        return 0
    fi
    port_listening "$port" && die "port $port is already in use"

    # The node name is fixed on first use: the data (mnesia/<node>) belongs to it.
    [ -s "$d/nodename" ] || echo "$(rmq_new_name "outbox-r$port")@$(rmq_host)" >"$d/nodename"
    node=$(cat "$d/nodename")
    mkdir -p "$d/home" "$d/mnesia" "$d/log" "$d/conf.d"
    : >>"$d/rabbitmq-env.conf"
    # Erlang insists the cookie file be readable by its owner only.
    if [ "$(cat "$d/home/.erlang.cookie" 2>/dev/null || true)" != "$RABBITMQ_COOKIE" ]; then
        rm -f "$d/home/.erlang.cookie"
        (umask 077 && printf '%s' "$RABBITMQ_COOKIE" >"$d/home/.erlang.cookie")
    fi
    chmod 400 "$d/home/.erlang.cookie"
    rmq_conf "$port" "$@" >"$d/rabbitmq.conf"
    rmq_write_plugins "$d"

    # The distribution port (node-to-node and rabbitmqctl) must be free too.
    # Its default, AMQP port + 20000, may be taken or out of range: pick one.
    dist=$(free_port)
    while [ "$dist" = "$port" ]; do dist=$(free_port); done
    rm -f "$d/rabbitmq.pid"
    # Where this boot's part of the node's log begins (see the wait below).
    log=$d/log/$node.log
    logoff=$(stat -c %s "$log" 2>/dev/null || echo 0)
    outoff=$(stat -c %s "$d/log/server.out" 2>/dev/null || echo 0)
    say "starting RabbitMQ node $node on 127.0.0.1:$port (distribution port $dist, dir $d)"
    (
        rmq_env "$d"
        export RABBITMQ_NODE_PORT=$port RABBITMQ_DIST_PORT=$dist
        # The distribution listener on loopback only, like the system node's.
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        export ERL_CRASH_DUMP="$d/log/erl_crash.dump"
        cd "$d" || exit 1
        launch "$d/log/server.out" "$RABBITMQ_SBIN/rabbitmq-server"
    )

    # Poll: the AMQP listener opens late in the boot, shortly before the node
    # logs "Server startup complete" (after the plugins). Reading that from the
    # log spares a rabbitmqctl await_startup (~1 s of Erlang VM start on this
    # machine), which remains the fallback, e.g. if extra lines moved the log.
    deadline=$((SECONDS + TIMEOUT))
    until port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail_log "$d/log/server.out"
            (rabbitmq_kill "$d") >/dev/null 2>&1 || true
            die "RabbitMQ node $node did not open port $port within ${TIMEOUT}s (log: $d/log)"
        fi
        # Give it a moment to write its pid file before declaring it dead.
        if [ $((SECONDS - t0)) -ge 3 ] && [ -z "$(rmq_pids "$d")" ]; then
            # The cause (e.g. an unknown conf setting) comes first, then pages
            # of crash reports: show the first errors of this boot.
            say "first errors in $d/log/server.out:"
            tail -c "+$((outoff + 1))" "$d/log/server.out" | grep -m 12 -F '[error]' >&2 || true
            die "RabbitMQ node $node exited during start (log: $d/log)"
        fi
        sleep 0.2
    done
    booted=no
    for ((i = 0; i < 25; i++)); do
        if tail -c "+$((logoff + 1))" "$log" 2>/dev/null | grep -q 'Server startup complete'; then
            booted=yes
            break
        fi
        sleep 0.2
    done
    if [ "$booted" = no ] && ! rmq_ctl "$d" -q await_startup --timeout "$TIMEOUT" >&2; then
        tail_log "$log"
        die "RabbitMQ node $node listens on $port but did not finish booting"
    fi
    say "RabbitMQ node $node is up after $((SECONDS - t0))s"
    echo "$node"
}

rabbitmq_stop() { # dir
    [ "$#" -eq 1 ] || usage
    local d pids node
    d=$(instance_dir "$1" existing)
    node=$(cat "$d/nodename" 2>/dev/null) || die "$d is not a private RabbitMQ instance"
    pids=$(rmq_pids "$d")
    if [ -z "$pids" ]; then
        say "RabbitMQ node $node is not running"
        return 0
    fi
    say "stopping RabbitMQ node $node"
    # With the pid file, `rabbitmqctl stop` returns only once the VM has exited.
    # shellcheck disable=SC2086 # several pids, one per word
    if ! (rmq_env "$d" && exec timeout "$TIMEOUT" "$RABBITMQ_SBIN/rabbitmqctl" \
        -n "$RABBITMQ_NODENAME" -q stop "$d/rabbitmq.pid") >&2 ||
        ! wait_gone 10 $pids; then
        say "rabbitmqctl stop failed or hung; terminating pid $pids"
        terminate 30 $pids
    fi
    say "RabbitMQ node $node stopped"
}

rabbitmq_kill() { # dir
    [ "$#" -eq 1 ] || usage
    local d pids
    d=$(instance_dir "$1" existing)
    pids=$(rmq_pids "$d")
    if [ -z "$pids" ]; then
        say "RabbitMQ node in $d is not running"
        return 0
    fi
    say "killing RabbitMQ node $(cat "$d/nodename") (pid $pids) with SIGKILL"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $pids || die "pid $pids survived SIGKILL"
}

rabbitmq_ctl() { # dir args...
    [ "$#" -ge 1 ] || usage
    local d
    d=$(instance_dir "$1" existing)
    shift
    [ -s "$d/nodename" ] || die "$d is not a private RabbitMQ instance"
    rmq_ctl "$d" "$@"
}

# ---------------------------------------------------------------- PostgreSQL

# initdb and the server refuse to run as root: run them as postgres then.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && exec runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# The postgres user must be able to reach the data directory: give search
# (x, not read) permission on the way there where it lacks it and we may.
pg_make_reachable() { # dir
    [ "$(id -u)" -eq 0 ] || return 0
    local p=$1
    while ! as_pg test -x "$1"; do
        # Find the topmost ancestor postgres cannot enter and open it.
        p=$1
        while [ "$p" != / ] && ! as_pg test -x "$(dirname "$p")"; do p=$(dirname "$p"); done
        [ "$(stat -c %u "$p")" -eq 0 ] || die "the postgres user cannot enter $p (not ours to chmod)"
        say "adding o+x to $p so that the postgres user can reach $1"
        chmod o+x "$p"
    done
}

pg_ctl_() { as_pg "$PG_BINDIR/pg_ctl" "$@"; }

pg_running() { pg_ctl_ status -D "$1/data" >/dev/null 2>&1; }

postgres_url() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

pg_quote() { local v=${1//\'/\'\'}; printf "'%s'" "$v"; }

postgres_start() { # dir port [-c name=value ...]
    [ "$#" -ge 2 ] || usage
    local d port=$2 data settings=() kv sock t0=$SECONDS
    d=$(instance_dir "$1" create)
    check_port_arg "$port"
    shift 2
    while [ "$#" -gt 0 ]; do
        case $1 in
            -c) [ "$#" -ge 2 ] || die "-c needs name=value"; kv=$2; shift 2 ;;
            -c*) kv=${1#-c}; shift ;;
            --*=*) kv=${1#--}; shift ;;
            *=*) kv=$1; shift ;;
            *) die "expected -c name=value, got '$1'" ;;
        esac
        [[ "$kv" == *=* ]] || die "expected name=value, got '$kv'"
        settings+=("${kv%%=*} = $(pg_quote "${kv#*=}")")
    done
    [ -x "$PG_BINDIR/pg_ctl" ] || die "no pg_ctl in $PG_BINDIR (set PG_BINDIR)"
    data=$d/data

    if [ ! -s "$data/PG_VERSION" ]; then
        say "initializing a PostgreSQL cluster in $data"
        mkdir -p "$data"
        chmod 700 "$data"
        if [ "$(id -u)" -eq 0 ]; then chown postgres: "$data"; fi
        pg_make_reachable "$data"
        # fsync at the end of initdb is skipped: a crash of the machine itself
        # within seconds is not what these tests are about.
        as_pg "$PG_BINDIR/initdb" -D "$data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 \
            --no-sync >"$d/initdb.log" 2>&1 || { tail_log "$d/initdb.log"; die "initdb failed"; }
        # Our settings live in their own file, rewritten on every start.
        echo "include_if_exists = 'private-server.conf'" >>"$data/postgresql.conf"
    fi
    pg_make_reachable "$data"

    # The unix socket goes into the data directory, unless its path would be
    # longer than the kernel allows (108 bytes); then TCP only.
    sock=$data
    if [ $((${#data} + 18)) -gt 107 ]; then
        say "data directory path too long for a unix socket; TCP only"
        sock=
    fi
    {
        echo "# written by private-server.sh on every start"
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = $(pg_quote "$sock")"
        echo "fsync = on"
        for kv in "${settings[@]}"; do echo "$kv"; done
    } >"$d/private-server.conf.new"

    if pg_running "$d"; then
        cmp -s "$d/private-server.conf.new" "$data/private-server.conf" ||
            say "PostgreSQL in $d already runs; the new settings are not applied until it restarts"
        rm -f "$d/private-server.conf.new"
        port_open "$port" || die "PostgreSQL in $d runs but does not listen on $port"
        postgres_url "$port"
        return 0
    fi
    port_listening "$port" && die "port $port is already in use"
    mv "$d/private-server.conf.new" "$data/private-server.conf"
    touch "$d/postgres.log"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$data/private-server.conf" "$d/postgres.log"; fi

    say "starting PostgreSQL on 127.0.0.1:$port (dir $d)"
    # -w: pg_ctl returns once the server accepts connections.
    if ! pg_ctl_ start -D "$data" -l "$d/postgres.log" -w -t "$TIMEOUT" -s >&2; then
        tail_log "$d/postgres.log"
        die "PostgreSQL did not start (log: $d/postgres.log)"
    fi
    port_open "$port" || die "PostgreSQL started but does not listen on $port"
    say "PostgreSQL is up after $((SECONDS - t0))s"
    postgres_url "$port"
}

pg_mode() {
    case ${1:-fast} in
        fast | immediate | smart) echo "${1:-fast}" ;;
        *) die "shutdown mode must be fast, immediate or smart, not '$1'" ;;
    esac
}

postgres_stop() { # dir [mode]
    if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then usage; fi
    local d mode
    d=$(instance_dir "$1" existing)
    mode=$(pg_mode "${2:-}")
    [ -s "$d/data/PG_VERSION" ] || die "$d is not a private PostgreSQL instance"
    if ! pg_running "$d"; then
        say "PostgreSQL in $d is not running"
        return 0
    fi
    say "stopping PostgreSQL in $d ($mode)"
    pg_ctl_ stop -D "$d/data" -m "$mode" -w -t "$TIMEOUT" -s >&2 ||
        { tail_log "$d/postgres.log"; die "PostgreSQL in $d did not stop"; }
}

postgres_restart() { # dir [mode]
    if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then usage; fi
    local d mode t0=$SECONDS
    d=$(instance_dir "$1" existing)
    mode=$(pg_mode "${2:-}")
    [ -s "$d/data/postmaster.opts" ] || die "PostgreSQL in $d was never started; use start"
    say "restarting PostgreSQL in $d ($mode)"
    # pg_ctl restart starts the server even if it was not running.
    pg_ctl_ restart -D "$d/data" -m "$mode" -l "$d/postgres.log" -w -t "$TIMEOUT" -s >&2 ||
        { tail_log "$d/postgres.log"; die "PostgreSQL in $d did not restart"; }
    say "PostgreSQL is up again after $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- NATS

nats_bin() {
    if [ -n "${NATS_SERVER:-}" ]; then
        [ -x "$NATS_SERVER" ] || die "NATS_SERVER=$NATS_SERVER is not executable"
        echo "$NATS_SERVER"
    else
        command -v nats-server || die "no nats-server found (set NATS_SERVER)"
    fi
}

# The pid of this instance's nats-server (identified by its store directory).
nats_pid() { # dir
    local p=
    if [ -f "$1/nats.pid" ]; then read -r p <"$1/nats.pid" || true; fi
    if pid_is "$p" "-sd $1/jetstream "; then
        echo "$p"
    else
        pids_with_args "-sd $1/jetstream " | head -n 1
    fi
}

nats_start() { # dir port
    [ "$#" -eq 2 ] || usage
    local d port=$2 bin pid deadline t0=$SECONDS
    d=$(instance_dir "$1" create)
    check_port_arg "$port"
    bin=$(nats_bin)
    pid=$(nats_pid "$d")
    if [ -n "$pid" ]; then
        pid_is "$pid" " -p $port " ||
            die "NATS in $d already runs (pid $pid) on another port"
        echo "nats://127.0.0.1:$port"
        return 0
    fi
    port_listening "$port" && die "port $port is already in use"
    mkdir -p "$d/jetstream"
    rm -f "$d/nats.pid"
    : >"$d/nats.log"
    say "starting NATS ($bin) on 127.0.0.1:$port with JetStream (dir $d)"
    launch "$d/nats.out" "$bin" -a 127.0.0.1 -p "$port" -js -sd "$d/jetstream" \
        -P "$d/nats.pid" -l "$d/nats.log"
    deadline=$((SECONDS + TIMEOUT))
    # "Server is ready" is logged once the client listener accepts connections,
    # after JetStream has been enabled.
    until grep -q 'Server is ready' "$d/nats.log" 2>/dev/null && port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail_log "$d/nats.log"
            (nats_kill "$d") >/dev/null 2>&1 || true
            die "NATS did not become ready on $port within ${TIMEOUT}s"
        fi
        if [ $((SECONDS - t0)) -ge 2 ] && [ -z "$(nats_pid "$d")" ]; then
            tail_log "$d/nats.out"
            tail_log "$d/nats.log"
            die "NATS exited during start"
        fi
        sleep 0.1
    done
    say "NATS is up after $((SECONDS - t0))s"
    echo "nats://127.0.0.1:$port"
}

nats_stop() { # dir
    [ "$#" -eq 1 ] || usage
    local d pid
    d=$(instance_dir "$1" existing)
    pid=$(nats_pid "$d")
    if [ -z "$pid" ]; then
        say "NATS in $d is not running"
        return 0
    fi
    say "stopping NATS in $d (pid $pid)"
    terminate 30 "$pid"
}

nats_kill() { # dir
    [ "$#" -eq 1 ] || usage
    local d pid
    d=$(instance_dir "$1" existing)
    pid=$(nats_pid "$d")
    if [ -z "$pid" ]; then
        say "NATS in $d is not running"
        return 0
    fi
    say "killing NATS in $d (pid $pid) with SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone 10 "$pid" || die "pid $pid survived SIGKILL"
}

# ---------------------------------------------------------------- main

[ "$#" -ge 1 ] || usage
case "$1" in
    free-port) [ "$#" -eq 1 ] || usage; free_port ;;
    rabbitmq | postgres | nats)
        [ "$#" -ge 2 ] || usage
        server=$1 action=$2
        shift 2
        case "$server:$action" in
            rabbitmq:start) rabbitmq_start "$@" ;;
            rabbitmq:stop) rabbitmq_stop "$@" ;;
            rabbitmq:kill) rabbitmq_kill "$@" ;;
            rabbitmq:ctl) rabbitmq_ctl "$@" ;;
            postgres:start) postgres_start "$@" ;;
            postgres:stop) postgres_stop "$@" ;;
            postgres:restart) postgres_restart "$@" ;;
            nats:start) nats_start "$@" ;;
            nats:stop) nats_stop "$@" ;;
            nats:kill) nats_kill "$@" ;;
            *) usage ;;
        esac
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac

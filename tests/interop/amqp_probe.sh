#!/usr/bin/env bash
# Look at messages as AMQP 0-9-1 sees them, with no AMQP client library: the Erlang
# amqp_client that ships with RabbitMQ (it is loaded because rabbitmq_stomp uses it) is driven
# through `rabbitmqctl eval` over a direct (in-node) connection as guest on vhost "/".
#
#   amqp_probe.sh declare QUEUE BINDING_KEY   non-durable, non-auto-delete queue bound to amq.topic
#   amqp_probe.sh peek QUEUE [MAX]            basic.get (no ack) up to MAX (default 10) messages,
#                                             print exchange, routing key, every basic property
#                                             and the headers table WITH AMQP field types, then
#                                             close the channel so they are requeued
#   amqp_probe.sh delete QUEUE                queue.delete
#   amqp_probe.sh describe QUEUE...           one line per existing queue: name, durable,
#                                             auto_delete, exclusive owner and the arguments
#                                             WITH AMQP field types (what a redeclare compares)
#
# Field types are printed as RabbitMQ names them: longstr = 'S', signedint = 'I', long = 'l',
# bool = 't', array = 'A', table = 'F', timestamp = 'T', ...
set -euo pipefail

die() { printf 'amqp_probe: %s\n' "$*" >&2; exit 2; }
safe() { [[ $1 =~ ^[A-Za-z0-9._#*-]+$ ]] || die "unsafe name '$1' (allowed: A-Z a-z 0-9 . _ - # *)"; }
command -v rabbitmqctl >/dev/null || die "rabbitmqctl not found"

OPEN='{ok, Conn} = amqp_connection:start({amqp_params_direct, <<"guest">>, <<"guest">>, <<"/">>, node(), none, []}), {ok, Ch} = amqp_connection:open_channel(Conn),'
CLOSE='amqp_channel:close(Ch), amqp_connection:close(Conn),'

run() { # rabbitmqctl prints a harmless warning about the client call timeout; drop it
  timeout 60 rabbitmqctl eval "$1" 2> >(grep -v 'client call timeout' >&2)
}

cmd="${1:-}"; shift || true
case "$cmd" in
  declare)
    [[ $# == 2 ]] || die "usage: declare QUEUE BINDING_KEY"
    safe "$1"; safe "$2"
    run "$OPEN
R1 = amqp_channel:call(Ch, {'queue.declare', 0, <<\"$1\">>, false, false, false, false, false, []}),
R2 = amqp_channel:call(Ch, {'queue.bind', 0, <<\"$1\">>, <<\"amq.topic\">>, <<\"$2\">>, false, []}),
$CLOSE {R1, R2}."
    ;;
  peek)
    [[ $# -ge 1 && $# -le 2 ]] || die "usage: peek QUEUE [MAX]"
    safe "$1"; max="${2:-10}"; [[ $max =~ ^[0-9]+$ ]] || die "MAX must be a number"
    run "$OPEN
Names = [content_type, content_encoding, headers, delivery_mode, priority, correlation_id, reply_to,
         expiration, message_id, timestamp, type, user_id, app_id, cluster_id],
Get = fun(_G, 0, Acc) -> lists:reverse(Acc);
         (G, N, Acc) ->
           case amqp_channel:call(Ch, {'basic.get', 0, <<\"$1\">>, false}) of
             {{'basic.get_ok', _Tag, Redel, Ex, RK, _Left}, {amqp_msg, Props, Body}} ->
               PL = lists:zip(Names, tl(tuple_to_list(Props))),
               G(G, N - 1, [[{exchange, Ex}, {routing_key, RK}, {redelivered, Redel}] ++ PL ++ [{body, Body}] | Acc]);
             {'basic.get_empty', _} -> lists:reverse(Acc)
           end
      end,
Msgs = Get(Get, $max, []),
$CLOSE
Show = fun({headers, undefined}) -> io:format(\"  headers: undefined~n\");
          ({headers, Hs}) -> io:format(\"  headers:~n\"), [io:format(\"    ~9999p~n\", [H]) || H <- Hs];
          ({K, V}) -> io:format(\"  ~s: ~9999p~n\", [K, V])
       end,
lists:foldl(fun(M, I) -> io:format(\"message ~b~n\", [I]), lists:foreach(Show, M), I + 1 end, 1, Msgs),
{messages_shown, length(Msgs)}."
    ;;
  delete)
    [[ $# == 1 ]] || die "usage: delete QUEUE"
    safe "$1"
    run "$OPEN
R = amqp_channel:call(Ch, {'queue.delete', 0, <<\"$1\">>, false, false, false}),
$CLOSE R."
    ;;
  describe)
    [[ $# -ge 1 ]] || die "usage: describe QUEUE..."
    names=""
    for q in "$@"; do safe "$q"; names+="${names:+, }<<\"$q\">>"; done
    run "lists:foreach(fun(Q) ->
  case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, Q)) of
    {ok, R} -> io:format(\"~9999p~n\", [{Q, amqqueue:is_durable(R), amqqueue:is_auto_delete(R),
                                         amqqueue:get_exclusive_owner(R), amqqueue:get_arguments(R)}]);
    _ -> io:format(\"~9999p~n\", [{Q, not_found}])
  end end, [$names])."
    ;;
  *) die "usage: amqp_probe.sh declare QUEUE BINDING_KEY | peek QUEUE [MAX] | delete QUEUE | describe QUEUE..." ;;
esac

#!/bin/sh
# Two organisations that share no broker: each side runs this once per peer, against its OWN RabbitMQ (3.10 or newer
# with the rabbitmq_shovel plugin enabled), after its bridge declared its topology (first start, or
# `partner-bridge topology declare`). docs/deployment.md "Organisations that share no broker" explains the layout.
#
#   shovel.sh issuer    on the issuer's broker   shovel.sh partner    on the partner's broker
#
# Each side
#   1. declares an outbound quorum queue on its own broker, bound to its own exchange
#        issuer:  PREFIX.shovel.tokens.<partner app id>   on PREFIX.tokens,  key token.<partner app id>
#        partner: PREFIX.shovel.reshare.<issuer app id>   on PREFIX.reshare, key reshare.<issuer app id>
#   2. creates SHOVEL_USER, the read-only user the other side's shovel logs in with: configure "^$", write "^$",
#      read on that outbound queue only;
#   3. runs a dynamic shovel on its own broker that pulls the other side's outbound queue (REMOTE_URI, with the user
#      the other side created) into its own exchange, keeping the routing key, with ack-mode on-confirm:
#        issuer:  PREFIX.shovel.reshare-from.<partner app id>   partner's reshare queue -> PREFIX.reshare
#        partner: PREFIX.shovel.tokens-from.<issuer app id>     issuer's tokens queue   -> PREFIX.tokens
#
# Environment (all required unless a default is shown):
#   PREFIX          amqp.prefix of both bridges (the same on both sides), e.g. partner-bridge
#   ISSUER_APP_ID   the issuer's Didit application id (its didit.application_id)
#   PARTNER_APP_ID  the partner's Didit application id (the issuer's [[issuer.partners]] application_id)
#   SHOVEL_USER, SHOVEL_PASSWORD
#                   the read-only user this side creates for the other side's shovel
#   REMOTE_URI      the other side's broker, with the user it created for this side, e.g.
#                   amqps://USER:PASSWORD@broker.other.example:5671/%2f?cacertfile=/etc/rabbitmq/shovel/other-ca.pem&certfile=/etc/rabbitmq/shovel/client.pem&keyfile=/etc/rabbitmq/shovel/client-key.pem&verify=verify_peer&server_name_indication=broker.other.example
#                   (percent-encode the password; the files must be readable by RabbitMQ on every node of this side)
#   VHOST           this side's virtual host (default /)
#   LOCAL_URI       how the shovel reaches this side's broker (default amqp:// = this node, virtual host /; for
#                   another virtual host amqp:///VHOST, percent-encoded)
#   RABBITMQCTL     the rabbitmqctl command line (default rabbitmqctl), e.g. "rabbitmqctl -n rabbit@broker-1"
#
# Running it again is harmless: the queue, binding and permissions are the same, the password is reset, and the
# shovel is redefined (it restarts; on-confirm redelivers what was in flight, and the bridges' ledgers absorb it).
set -eu

role=${1:-}
: "${PREFIX:?}" "${ISSUER_APP_ID:?}" "${PARTNER_APP_ID:?}" "${SHOVEL_USER:?}" "${SHOVEL_PASSWORD:?}" "${REMOTE_URI:?}"
vhost=${VHOST:-/}
local_uri=${LOCAL_URI:-amqp://}
ctl=${RABBITMQCTL:-rabbitmqctl}
here=$(cd "$(dirname "$0")" && pwd)

case "$role" in
issuer)
    out_queue="$PREFIX.shovel.tokens.$PARTNER_APP_ID"
    out_exchange="$PREFIX.tokens"
    out_key="token.$PARTNER_APP_ID"
    in_queue="$PREFIX.shovel.reshare.$ISSUER_APP_ID"
    in_exchange="$PREFIX.reshare"
    shovel="$PREFIX.shovel.reshare-from.$PARTNER_APP_ID"
    ;;
partner)
    out_queue="$PREFIX.shovel.reshare.$ISSUER_APP_ID"
    out_exchange="$PREFIX.reshare"
    out_key="reshare.$ISSUER_APP_ID"
    in_queue="$PREFIX.shovel.tokens.$PARTNER_APP_ID"
    in_exchange="$PREFIX.tokens"
    shovel="$PREFIX.shovel.tokens-from.$ISSUER_APP_ID"
    ;;
*)
    echo "usage: $0 issuer|partner (see the comment at the top)" >&2
    exit 64
    ;;
esac

# A value as a sed replacement (\, & and the | delimiter escaped) and as a JSON string body (\ and " escaped).
json() { printf '%s' "$1" | sed -e 's/[\\"]/\\&/g'; }
repl() { json "$1" | sed -e 's/[\\&|]/\\&/g'; }
# A name as an anchored regular expression for set_permissions.
regex() { printf '^%s$' "$(printf '%s' "$1" | sed -e 's/[].[\\*^$+?(){}|]/\\&/g')"; }

fill() {
    sed -e "s|@QUEUE@|$(repl "$out_queue")|g" \
        -e "s|@EXCHANGE@|$(repl "$2")|g" \
        -e "s|@KEY@|$(repl "$out_key")|g" \
        -e "s|@VHOST@|$(repl "$vhost")|g" \
        -e "s|@REMOTE_URI@|$(repl "$REMOTE_URI")|g" \
        -e "s|@REMOTE_QUEUE@|$(repl "$in_queue")|g" \
        -e "s|@LOCAL_URI@|$(repl "$local_uri")|g" \
        "$here/$1"
}

# 1. The outbound queue and its binding (the exchange is the bridge's own, declared already). On standard input:
#    the broker reads a file path with its own user.
fill outbound.json "$out_exchange" | $ctl import_definitions --format json

# 2. The other side's read-only user (rabbitmqctl 3.10 takes the password as an argument).
if $ctl -s list_users | cut -f1 | grep -qxF "$SHOVEL_USER"; then
    $ctl change_password "$SHOVEL_USER" "$SHOVEL_PASSWORD"
else
    $ctl add_user "$SHOVEL_USER" "$SHOVEL_PASSWORD"
fi
$ctl set_permissions -p "$vhost" "$SHOVEL_USER" '^$' '^$' "$(regex "$out_queue")"

# 3. The shovel that moves the other side's outbound queue into this side's exchange.
$ctl set_parameter -p "$vhost" shovel "$shovel" "$(fill inbound-shovel.json "$in_exchange")"
echo "$role side ready: outbound queue $out_queue (read by $SHOVEL_USER), shovel $shovel"

#!/bin/sh
# Make the pod's network namespace track connections, as the article's pods did,
# then run the server.  A modern kernel tracks only where a ruleset needs conntrack.
set -eu
if [ "${TRACK_CONNTRACK:-1}" = 1 ]; then
    iptables -A INPUT -m conntrack --ctstate INVALID -j DROP
fi
exec "$@"

#!/usr/bin/env bash
# Make a hospital's SuperNode key pair and (optionally) register it with the SuperLink.
#   deploy/site-key.sh KEYS_DIR SITE [CONNECTION]
# The private key (KEYS_DIR/SITE) never leaves the hospital; the coordinator registers the
# public key (KEYS_DIR/SITE.pub) with `flwr supernode register`. Without CONNECTION it only
# makes the keys: send SITE.pub to the coordinator, who runs the register command.
set -euo pipefail
keys=${1:?usage: site-key.sh KEYS_DIR SITE [CONNECTION]}
site=${2:?usage: site-key.sh KEYS_DIR SITE [CONNECTION]}
mkdir -p "$keys"
if [ ! -f "$keys/$site" ]; then
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$keys/$site"
fi
echo "key pair: $keys/$site (private, stays here) and $keys/$site.pub"
if [ -n "${3:-}" ]; then
  flwr supernode register "$keys/$site.pub" "$3" --name "$site"
fi

#!/usr/bin/env bash
# Make a private CA and the SuperLink's TLS certificate (openssl only).
#   deploy/certs.sh OUT_DIR [extra SAN ...]      e.g. deploy/certs.sh deploy/certs DNS:fl.example.org
# Writes OUT_DIR/ca.pem (give this to every hospital), ca.key (keep offline),
# server.pem + server.key (the SuperLink's). SANs always include superlink, localhost, 127.0.0.1.
set -euo pipefail
out=${1:?usage: certs.sh OUT_DIR [SAN ...]}
shift || true
mkdir -p "$out"
cd "$out"
san="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do san="$san,$extra"; done
openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=fedcxr CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=superlink" -keyout server.key \
  -out server.csr 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "wrote $out/ca.pem, $out/server.pem, $out/server.key (SANs: $san)"
echo "move $out/ca.key off this machine: it signs certificates, nothing at run time needs it"

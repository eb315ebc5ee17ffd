#!/usr/bin/env bash
# Debian packages the tests need, installed when missing (idempotent; CI runs as root on Debian):
# - redis-server: the registry's tests start their own server on a free port (never the system's);
# - libibverbs1: Mooncake's transfer engine links against it, even over its TCP protocol.
# Elsewhere (not root, no apt-get) it only says what is missing; those tests then fail naming it.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1' || missing+=(libibverbs1)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
  echo "installed: ${missing[*]}"
else
  echo "warning: missing ${missing[*]} (install them: apt-get install ${missing[*]})" >&2
fi

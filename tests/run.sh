#!/usr/bin/env bash
# The test command from the README: installs system tools and Python packages, then runs pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  for pair in wrk:wrk h2load:nghttp2-client nghttpd:nghttp2-server nginx:nginx-light iptables:iptables ip:iproute2 curl:curl docker-compose:docker-compose; do
    command -v "${pair%%:*}" >/dev/null || need="$need ${pair#*:}"
  done
  if [ -n "$need" ]; then
    echo "installing:$need"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null) || echo "warning: apt-get install failed"
  fi
fi
python3 -m pip install -q -e '.[test]' 2>&1 | grep -v -E "^(WARNING: Running pip as|\[notice\])" || true
python3 -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest: no tests collected"; exit 0; fi
exit $rc

#!/usr/bin/env bash
# The test command from the README: installs system tools and Python packages, then runs pytest.
#
# With CI=true nothing may turn into a silent skip: a failed apt-get or pip install, a missing tool
# (curl, nghttpd, h2load, nghttp, wrk, nginx, iptables, envoy) or missing Istio test data
# (../shared/testdata/istio beside the repository) fails the run, and so does a run that collects
# no test (pytest exit 5). Without CI they are warnings, and the suites that need them skip.
# RUN_SH_NO_INSTALL=1 skips apt-get and pip; RUN_SH_CHECK_ONLY=1 stops after the checks.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${CI:-}" in true|TRUE|True|1|yes) strict=1 ;; *) strict=0 ;; esac

problem() {  # a missing prerequisite: fatal under CI, a warning otherwise
  if [ "$strict" = 1 ]; then echo "error (CI=true): $*" >&2; exit 1; fi
  echo "warning: $*" >&2
}

# tool:package; the first list is required, the second optional (its suite skips without it)
required="wrk:wrk h2load:nghttp2-client nghttp:nghttp2-client nghttpd:nghttp2-server nginx:nginx-light iptables:iptables ip:iproute2 curl:curl"
optional="dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap"

if [ "${RUN_SH_NO_INSTALL:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=""; want=""
    for pair in $required; do command -v "${pair%%:*}" >/dev/null || need="$need ${pair#*:}"; done
    for pair in $optional; do command -v "${pair%%:*}" >/dev/null || want="$want ${pair#*:}"; done
    if [ -n "$need$want" ]; then
      echo "installing:$need$want"
      apt-get update -qq || problem "apt-get update failed"
      if [ -n "$need" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null \
          || problem "apt-get install$need failed"
      fi
      if [ -n "$want" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $want >/dev/null \
          || echo "warning: apt-get install$want failed (its suites skip)" >&2
      fi
    fi
  fi
  piplog="$(mktemp)"
  python3 -m pip install -q -e '.[test]' > "$piplog" 2>&1
  pip_rc=$?
  grep -v -E "^(WARNING: Running pip as|\[notice\])" "$piplog" || true
  rm -f "$piplog"
  [ "$pip_rc" = 0 ] || problem "pip install -e '.[test]' failed (exit $pip_rc)"
fi

missing=""
for tool in wrk h2load nghttp nghttpd nginx iptables curl envoy; do  # what the suites skip without
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
[ -z "$missing" ] || problem "missing tools:$missing (their suites would skip)"
testdata="$(cd .. && pwd)/shared/testdata/istio"
[ -d "$testdata" ] || problem "Istio test data not found at $testdata (its suites would skip)"
if [ "${RUN_SH_CHECK_ONLY:-0}" = 1 ]; then echo "prerequisites checked"; exit 0; fi

python3 -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "pytest: no tests collected"
  if [ "$strict" = 1 ]; then exit 1; fi
  exit 0
fi
exit $rc

"""Downstream connection limits, compared with Envoy on the same bootstrap: the global limit from
the overload manager's resource monitor or from the runtime key, listeners that ignore it, and a
listener's own limit from its runtime key; the connections over a limit are reset at accept and
counted under Envoy's stat names; a closed connection frees its place."""

from __future__ import annotations

import socket
import time

import pytest

from proxy_util import ENVOY, Envoy, Pyproxy, bootstrap, free_port, http_listener

RC = {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
    {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]}
MONITOR = {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
             "DownstreamConnectionsConfig",
    "max_active_downstream_connections": 3}}


def _bootstrap(mode):
    p1, p2 = free_port(), free_port()
    l1, l2 = http_listener(p1, RC, name="l1"), http_listener(p2, RC, name="l2", stat_prefix="two")
    if mode == "ignore":
        l2["ignore_global_conn_limit"] = True
    bs = bootstrap([l1, l2], [])
    if mode in ("monitor", "ignore"):
        bs["overload_manager"] = {"resource_monitors": [MONITOR]}
    elif mode == "runtime":
        bs["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
            "overload": {"global_downstream_max_connections": 3}}}]}
    elif mode == "listener":
        bs["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
            "envoy.resource_limits.listener.l1.connection_limit": 2}}]}
    return bs, p1, p2


def _one(port):
    """A connection sending one request: (socket, True if served / False if reset or closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = s.recv(1000)
    except OSError:
        data = b""
    return s, data.startswith(b"HTTP/1.1 200")


def _scenario(cls, mode):
    bs, p1, p2 = _bootstrap(mode)
    with cls(bs) as px:
        conns = [_one(p1) for _ in range(4)] + [_one(p2)]
        served = [ok for _, ok in conns]
        for s, _ in conns:                     # free every place (the admin call below needs one
            s.close()                          # under the runtime key in Envoy)
        time.sleep(0.3)
        st = px.stats()
        counters = tuple(st.get("listener.127.0.0.1_%d.%s" % (p, k), 0)
                         for p in (p1, p2) for k in ("downstream_global_cx_overflow", "downstream_cx_overflow"))
        # the places are free again: one more connection on l1 is served
        s, again = _one(p1)
        s.close()
    return served, counters, again


CASES = {
    # served: l1 x4 then l2; counters: (l1 global, l1 own, l2 global, l2 own)
    "monitor": ([True, True, True, False, False], (1, 0, 1, 0)),
    "runtime": ([True, True, True, False, False], (1, 0, 1, 0)),
    "ignore": ([True, True, True, False, True], (1, 0, 0, 0)),
    "listener": ([True, True, False, False, True], (0, 2, 0, 0)),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_connection_limits_as_envoy(mode):
    want_served, want_counters = CASES[mode]
    got = {"pyproxy": _scenario(Pyproxy, mode)}
    if ENVOY:
        got["envoy"] = _scenario(Envoy, mode)
    print(mode, got)
    for kind, (served, counters, again) in got.items():
        assert served == want_served, (kind, served)
        assert counters == want_counters, (kind, counters)
        assert again, kind


def test_monitor_needs_a_positive_limit(tmp_path):
    import json
    from proxy_util import run_pyproxy
    bs, _, _ = _bootstrap("monitor")
    bs["overload_manager"]["resource_monitors"][0]["typed_config"]["max_active_downstream_connections"] = 0
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(bs))
    r = run_pyproxy(["--mode", "validate", "-c", str(path)])
    assert r.returncode != 0 and "max_active_downstream_connections" in (r.stdout + r.stderr)

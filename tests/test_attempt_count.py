"""``include_request_attempt_count`` (Istio sets it on every virtual host it renders): the upstream
request carries ``x-envoy-attempt-count`` on every attempt, the first one included, with or
without a retry policy — checked against Envoy. The benchmark's Istio chain (benchmarks/bench/
configs.py) relies on it: its backend answers 200 only when the header says 1.
"""

import pytest

from proxy_util import (HttpBackend, bootstrap, cluster, http_listener, free_port, proxies, request,
                        route, route_config, simple_response)

RETRY = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
         "num_retries": 2, "retriable_status_codes": [503]}


def _bs(backend_port, include=True):
    port = free_port()
    rc = route_config([route("/retry", "b", timeout="0s", retry_policy=RETRY),
                       route("/", "b", timeout="0s")], include_request_attempt_count=include)
    return bootstrap([http_listener(port, rc)], [cluster("b", [backend_port])]), port


@pytest.mark.parametrize("proxy", proxies())
def test_attempt_count_on_first_attempt(proxy):
    with HttpBackend() as be:
        bs, port = _bs(be.port)
        with proxy(bs):
            for path in ("/retry/a", "/plain"):
                for _ in range(3):  # the same on a reused upstream connection
                    status, _, _ = request(port, "GET", path)
                    assert status == 200
        assert len(be.requests) == 6
        for r in be.requests:
            assert r.header_all("x-envoy-attempt-count") == ["1"], (proxy.kind, r.path, r.headers)


@pytest.mark.parametrize("proxy", proxies())
def test_attempt_count_counts_retries(proxy):
    calls = []

    def handler(req, sock):
        calls.append(req.header("x-envoy-attempt-count"))
        return simple_response(503 if len(calls) == 1 else 200, b"x")

    with HttpBackend(handler) as be:
        bs, port = _bs(be.port)
        with proxy(bs):
            status, _, _ = request(port, "GET", "/retry/a")
        assert status == 200
        assert calls == ["1", "2"], (proxy.kind, calls)


@pytest.mark.parametrize("proxy", proxies())
def test_no_attempt_count_unless_configured(proxy):
    with HttpBackend() as be:
        bs, port = _bs(be.port, include=False)
        with proxy(bs):
            for path in ("/retry/a", "/plain"):
                assert request(port, "GET", path)[0] == 200
        assert [r.header("x-envoy-attempt-count") for r in be.requests] == [None, None]


@pytest.mark.parametrize("proxy", proxies())
def test_client_attempt_count_replaced(proxy):
    # the client's own header is replaced by the first attempt's count (one header, "1")
    with HttpBackend() as be:
        bs, port = _bs(be.port)
        with proxy(bs):
            for path in ("/retry/a", "/plain"):
                assert request(port, "GET", path, headers={"x-envoy-attempt-count": "7"})[0] == 200
                assert request(port, "GET", path, headers={"X-Envoy-Attempt-Count": "3",
                                                           "content-type": "text/plain"})[0] == 200
        assert len(be.requests) == 4
        for r in be.requests:
            assert r.header_all("x-envoy-attempt-count") == ["1"], (proxy.kind, r.path, r.headers)

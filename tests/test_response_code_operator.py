"""``%RESPONSE_CODE%`` in a route's ``response_headers_to_add`` is the status going downstream, as
Envoy evaluates it (it used to be 0: the route's response mutations ran before the stream recorded
the status). Checked side by side with Envoy, on the compiled path and the reference mode."""

import pytest

from proxy_util import HttpBackend, one_route_bootstrap, proxies, request, simple_response


def _handler(req, sock):
    code = 503 if req.path.startswith("/fail") else 200
    return simple_response(code, b"x", [("x-up", "U")])


# (the reference mode, PYPROXY_REFERENCE=1, is pyproxy's own)
CASES = [(p, False) for p in proxies()] + [(proxies()[0], True)]


@pytest.mark.parametrize("proxy,reference", CASES, ids=lambda v: getattr(v, "kind", None) or str(v))
def test_response_code_in_route_response_headers(proxy, reference, monkeypatch):
    if reference:
        monkeypatch.setenv("PYPROXY_REFERENCE", "1")
    with HttpBackend(_handler) as be:
        bs, port = one_route_bootstrap([be.port], route_extra={"timeout": "3s"})
        rt = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"]["virtual_hosts"][0]["routes"][0]
        rt["response_headers_to_add"] = [
            {"header": {"key": "x-code", "value": "%RESPONSE_CODE%"}},
            {"header": {"key": "x-up-copy", "value": "%RESP(x-up)%"}}]
        with proxy(bs):
            for path, code in (("/ok", 200), ("/fail", 503), ("/ok2", 200)):
                status, headers, _ = request(port, "GET", path)
                assert status == code
                assert headers.get("x-code") == str(code), (proxy.kind, path, headers)
                assert headers.get("x-up-copy") == "U", (proxy.kind, path, headers)

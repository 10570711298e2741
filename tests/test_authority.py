"""Request authorities Envoy refuses are refused (``http/authority.py``, one check for both
codecs), each compared with Envoy on the same bootstrap:

- HTTP/1.1 ``Host`` with a space, a control or non-ASCII character, or one of ``" # / < > ? \\ ^ `
  { | }``: 400 (``@`` passes, as in Envoy);
- HTTP/2 ``:authority`` with those, with userinfo (``@``) or empty: the connection ends;
- an absolute-form request-target's authority wins over Host (RFC 9112 3.2.2), userinfo dropped.
"""

from __future__ import annotations

import shutil

import pytest

from pyproxy.http.authority import authority_ok
from tests.diff_util import H2, h2_script, request_headers
from tests.proxy_util import (HttpBackend, bootstrap, cluster, http_listener, raw, route, route_config,
                              three_ways)

ENVOY = shutil.which("envoy")
REFUSED = '"#/<>?\\^`{|} \t\x7f\x80\xff'
SAMPLE = REFUSED + "@:[]%_-.~!$&'()*+,;=" + "aZ09"


def test_authority_characters():
    for i in range(0x20, 0x100):
        c = chr(i)
        assert authority_ok("a" + c + "b") is (c not in REFUSED and i < 0x7f), repr(c)
        assert authority_ok("a" + c + "b", userinfo=False) is (c not in REFUSED + "@" and i < 0x7f), repr(c)
    assert authority_ok("u:p@host:80") and not authority_ok("u@host", userinfo=False)
    assert not authority_ok("a@b/c") and not authority_ok("a b@c") and authority_ok("[::1]:8080")
    for i in range(0, 0x20):
        assert not authority_ok("a%cb" % i)


@pytest.fixture(scope="module")
def procs():
    if ENVOY is None:
        pytest.skip("needs the envoy binary")
    be = HttpBackend()
    bs = bootstrap([http_listener(1, route_config([route("/", "b", timeout="2s")]))], [cluster("b", [be.port])])
    try:
        for out in three_ways(bs):
            yield be, out
    finally:
        be.close()


def test_http1_host_as_envoy(procs):
    _, ps = procs
    seen = {}
    for k, p in ps.items():
        seen[k] = [raw(p.port, b"GET / HTTP/1.1\r\nhost: a" + c.encode("latin-1") + b"b\r\n\r\n", until_close=False,
                       settle=0.1, timeout=2)[:12] for c in SAMPLE]
    want = seen["envoy"]
    assert want.count(b"HTTP/1.1 400") == len(REFUSED), want  # (the premise)
    assert seen["pyproxy"] == want and seen["reference"] == want, seen


def test_http2_authority_as_envoy(procs):
    _, ps = procs
    seen = {}
    for k, p in ("pyproxy", ps["pyproxy"]), ("envoy", ps["envoy"]):
        seen[k] = []
        for a in [("a" + c + "b") for c in SAMPLE] + ["u@a", ""]:
            (view, end), _ = h2_script(p.port, [H2.headers(1, request_headers("GET", "/", a))], timeout=2, settle=0.05)
            seen[k].append((a, [v[2][0] if v[0] == "headers" else v[0] for v in view], end))
    assert sum(1 for v in seen["envoy"] if v[2] == "closed") == len(REFUSED) + 3, seen["envoy"]  # (+ @, u@a, "")
    assert seen["pyproxy"] == seen["envoy"]


@pytest.mark.parametrize("target", ["http://other/a", "https://other/a", "http://u@other/a", "http://other:8080/a"])
def test_absolute_form_authority_wins_as_envoy(procs, target):
    be, ps = procs
    seen = {}
    for k, p in ps.items():
        n = len(be.requests)
        out = raw(p.port, b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % target.encode(), until_close=False, settle=0.2,
                  timeout=2)
        seen[k] = (out[:12], [(r.header("host"), r.path) for r in be.requests[n:]])
    assert seen["envoy"][1] and seen["envoy"][1][0][0] != "x", seen  # (the premise)
    assert seen["pyproxy"] == seen["envoy"] and seen["reference"] == seen["envoy"], seen

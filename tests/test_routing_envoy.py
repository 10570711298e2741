"""Route selection compared with the real Envoy.

One Envoy process serves a route configuration whose routes are all direct responses returning
"<vhost>/<route>"; every case is sent to Envoy over a real socket and the same headers go to
``RouteTable.find``. Both must pick the same route (or both none).
"""

import http.client
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

import pytest
import yaml
from google.protobuf import json_format

from envoy.config.route.v3 import route_pb2
from pyproxy.config.errors import ConfigError
from pyproxy.http.headers import Headers
from pyproxy.routing import compile_route_config

from proxy_util import kill_process

ENVOY = shutil.which("envoy")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")


def _dr(name):
    return {"direct_response": {"status": 200, "body": {"inline_string": name}}, "name": name}


def _r(match, name):
    d = _dr(name)
    d["match"] = match
    return d


ROUTES = [
    _r({"path": "/exact"}, "path_exact"),
    _r({"path": "/CaseI", "case_sensitive": False}, "path_ci"),
    _r({"prefix": "/api/v1"}, "prefix_api_v1"),
    _r({"prefix": "/Mixed", "case_sensitive": False}, "prefix_ci"),
    _r({"path_separated_prefix": "/sep"}, "sep"),
    _r({"safe_regex": {"regex": "/re/[0-9]+"}}, "regex"),
    _r({"safe_regex": {"regex": "/rx/(a|b)c?"}}, "regex2"),
    _r({"prefix": "/h1", "headers": [{"name": "x-exact", "string_match": {"exact": "v1"}}]}, "h_exact"),
    _r({"prefix": "/h2", "headers": [{"name": "x-sm", "string_match": {"prefix": "ab",
                                                                       "ignore_case": True}}]},
       "h_prefix_ic"),
    _r({"prefix": "/h3", "headers": [{"name": "x-present", "present_match": True}]}, "h_present"),
    _r({"prefix": "/h4", "headers": [{"name": "x-absent", "present_match": False}]}, "h_absent"),
    _r({"prefix": "/h5", "headers": [{"name": "x-num", "range_match": {"start": 10, "end": 20}}]},
       "h_range"),
    _r({"prefix": "/h6", "headers": [{"name": "x-re", "safe_regex_match": {"regex": "a.c"}}]},
       "h_regex"),
    _r({"prefix": "/h7", "headers": [{"name": "x-inv", "string_match": {"exact": "bad"},
                                      "invert_match": True}]}, "h_invert"),
    _r({"prefix": "/h8", "headers": [{"name": "x-me", "string_match": {"exact": ""},
                                      "treat_missing_header_as_empty": True}]}, "h_missing_empty"),
    _r({"prefix": "/h9", "headers": [{"name": "x-m", "string_match": {"exact": "a,b"}}]}, "h_multi"),
    _r({"prefix": "/ha", "headers": [{"name": "x-s", "string_match": {"suffix": "yz"}},
                                     {"name": "x-c", "string_match": {"contains": "mid"}}]}, "h_and"),
    _r({"prefix": "/hb", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]}, "h_method"),
    _r({"prefix": "/hc", "headers": [{"name": "x-inv2", "present_match": True, "invert_match": True}]},
       "h_invert_present"),
    _r({"prefix": "/q", "query_parameters": [{"name": "k", "string_match": {"exact": "v"}}]}, "q_exact"),
    _r({"prefix": "/q", "query_parameters": [{"name": "p", "present_match": True}]}, "q_present"),
    _r({"prefix": "/q", "query_parameters": [{"name": "s", "string_match": {"safe_regex": {"regex": "[0-9]+"}}}]},
       "q_regex"),
    _r({"prefix": "/grpc", "grpc": {}}, "grpc"),
    _r({"prefix": "/rt0", "runtime_fraction": {"default_value": {"numerator": 0}}}, "runtime_never"),
    _r({"prefix": "/rt", "runtime_fraction": {"default_value": {"numerator": 100}}}, "runtime_always"),
    _r({"prefix": "/"}, "fallback"),
]

VHOSTS = [
    {"name": "exact", "domains": ["foo.com", "foo.com:8080", "UPPER.example"],
     "routes": [_r({"prefix": "/"}, "exact")]},
    {"name": "suffix_long", "domains": ["*.bar.foo.com"], "routes": [_r({"prefix": "/"}, "sl")]},
    {"name": "suffix", "domains": ["*.foo.com", "*-suffix.org", "*:9090"],
     "routes": [_r({"prefix": "/"}, "s")]},
    {"name": "prefix", "domains": ["foo.*", "api.v1.*"], "routes": [_r({"prefix": "/"}, "p")]},
    {"name": "prefix_short", "domains": ["ap*"], "routes": [_r({"prefix": "/"}, "ps")]},
    {"name": "noroot", "domains": ["noroot.test"], "routes": [_r({"path": "/only"}, "only")]},
    {"name": "default", "domains": ["*"], "routes": ROUTES},
]

ROUTE_CONFIG = {"name": "cmp", "virtual_hosts": VHOSTS}

CASES = [
    # (host, path, headers)
    ("foo.com", "/", {}),
    ("FOO.com", "/", {}),
    ("foo.com:8080", "/", {}),
    ("foo.com:9090", "/", {}),
    ("foo.com:1234", "/", {}),
    ("upper.example", "/", {}),
    ("x.bar.foo.com", "/", {}),
    (".bar.foo.com", "/", {}),
    ("bar.foo.com", "/", {}),
    ("a.foo.com", "/", {}),
    ("a.foo.com:80", "/", {}),
    ("my-suffix.org", "/", {}),
    ("-suffix.org", "/", {}),
    ("foo.net", "/", {}),
    ("foo.", "/", {}),
    ("api.v1.x", "/", {}),
    ("api.v2.x", "/", {}),
    ("ap", "/", {}),
    ("apx", "/", {}),
    ("other.test", "/", {}),
    ("noroot.test", "/only", {}),
    ("noroot.test", "/other", {}),
    ("h", "/exact", {}),
    ("h", "/exact?x=1", {}),
    ("h", "/exact/", {}),
    ("h", "/EXACT", {}),
    ("h", "/casei", {}),
    ("h", "/CASEI?q", {}),
    ("h", "/api/v1", {}),
    ("h", "/api/v1x/y", {}),
    ("h", "/API/v1", {}),
    ("h", "/mixed/a", {}),
    ("h", "/MIXEDCASE", {}),
    ("h", "/sep", {}),
    ("h", "/sep/x", {}),
    ("h", "/sepx", {}),
    ("h", "/sep?x=1", {}),
    ("h", "/re/123", {}),
    ("h", "/re/123?a=b", {}),
    ("h", "/re/12a", {}),
    ("h", "/re/", {}),
    ("h", "/rx/ac", {}),
    ("h", "/rx/b", {}),
    ("h", "/rx/cc", {}),
    ("h", "/h1", {"x-exact": "v1"}),
    ("h", "/h1", {"x-exact": "V1"}),
    ("h", "/h1", {}),
    ("h", "/h2", {"x-sm": "ABcd"}),
    ("h", "/h2", {"x-sm": "xab"}),
    ("h", "/h3", {"x-present": ""}),
    ("h", "/h3", {"x-present": "1"}),
    ("h", "/h3", {}),
    ("h", "/h4", {}),
    ("h", "/h4", {"x-absent": "1"}),
    ("h", "/h5", {"x-num": "10"}),
    ("h", "/h5", {"x-num": "19"}),
    ("h", "/h5", {"x-num": "20"}),
    ("h", "/h5", {"x-num": "-5"}),
    ("h", "/h5", {"x-num": "1x"}),
    ("h", "/h6", {"x-re": "abc"}),
    ("h", "/h6", {"x-re": "abcd"}),
    ("h", "/h7", {"x-inv": "bad"}),
    ("h", "/h7", {"x-inv": "good"}),
    ("h", "/h7", {}),
    ("h", "/h8", {}),
    ("h", "/h8", {"x-me": ""}),
    ("h", "/h8", {"x-me": "x"}),
    ("h", "/h9", [("x-m", "a"), ("x-m", "b")]),
    ("h", "/h9", {"x-m": "a"}),
    ("h", "/h9", {"x-m": "a,b"}),
    ("h", "/h7", [("x-inv", "bad"), ("x-inv", "good")]),
    ("h", "/h5", [("x-num", "x"), ("x-num", "12")]),
    ("h", "/ha", {"x-s": "xyz", "x-c": "amidb"}),
    ("h", "/ha", {"x-s": "xyz"}),
    ("h", "/hb", {}),
    ("h", "/hc", {}),
    ("h", "/hc", {"x-inv2": "1"}),
    ("h", "/q?k=v", {}),
    ("h", "/q?k=w", {}),
    ("h", "/q?k=w&k=v", {}),
    ("h", "/q?k=v&k=w", {}),
    ("h", "/q?p", {}),
    ("h", "/q?p=", {}),
    ("h", "/q?pp=1", {}),
    ("h", "/q?s=123", {}),
    ("h", "/q?s=12a", {}),
    ("h", "/q?k=%76", {}),
    ("h", "/grpc", {"content-type": "application/grpc"}),
    ("h", "/grpc", {"content-type": "application/grpc+proto"}),
    ("h", "/grpc", {"content-type": "application/grpcx"}),
    ("h", "/grpc", {"content-type": "application/json"}),
    ("h", "/rt0", {}),
    ("h", "/rt1", {}),
]


def _route_config_proto(d):
    rc = route_pb2.RouteConfiguration()
    json_format.ParseDict(d, rc)
    return rc


def _envoy_bootstrap(route_config):
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [{
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "hcm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "cmp",
                    "route_config": route_config,
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                },
            }]}],
        }]},
    }


class Envoy:
    def __init__(self, bootstrap, tmp):
        self.tmp = tmp
        cfg = os.path.join(tmp, "envoy.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(bootstrap, f)
        self.admin_path = os.path.join(tmp, "admin")
        self.log = open(os.path.join(tmp, "envoy.log"), "w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", cfg, "--base-id", str(random.randint(1000, 60000)),
             "--disable-hot-restart", "--admin-address-path", self.admin_path,
             "--concurrency", "1", "-l", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.port = self._wait_listener()
        except BaseException:
            self.stop()
            raise

    def _wait_listener(self):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("envoy exited: " + open(self.log.name).read()[-2000:])
            if os.path.exists(self.admin_path):
                addr = open(self.admin_path).read().strip()
                if addr:
                    host, _, port = addr.rpartition(":")
                    try:
                        c = http.client.HTTPConnection(host, int(port), timeout=2)
                        c.request("GET", "/listeners?format=json")
                        data = json.loads(c.getresponse().read())
                        c.close()
                        for st in data.get("listener_statuses", []):
                            p = st["local_address"]["socket_address"].get("port_value")
                            if p:
                                return p
                    except (OSError, ValueError, KeyError):
                        pass
            time.sleep(0.05)
        raise RuntimeError("envoy did not start in time")

    def stop(self):
        kill_process(self.proc)
        self.log.close()


def envoy_validate(bootstrap) -> tuple:
    """Run ``envoy --mode validate``: (ok, output)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "envoy.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(bootstrap, f)
        p = subprocess.run([ENVOY, "--mode", "validate", "-c", cfg, "--base-id",
                            str(random.randint(1000, 60000)), "--disable-hot-restart",
                            "-l", "error"], capture_output=True, text=True, timeout=20)
        return p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def envoy():
    with tempfile.TemporaryDirectory() as tmp:
        e = Envoy(_envoy_bootstrap(ROUTE_CONFIG), tmp)
        try:
            yield e
        finally:
            e.stop()


def _ask_envoy(conn, host, path, hdrs):
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    items = hdrs.items() if isinstance(hdrs, dict) else hdrs
    for k, v in items:
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read().decode()
    if (r.getheader("content-type") or "").startswith("application/grpc"):
        body = r.getheader("grpc-message") or ""  # Envoy turns a gRPC local reply's body into this
    return body if r.status == 200 else None


def _ask_table(table, host, path, hdrs):
    items = list(hdrs.items()) if isinstance(hdrs, dict) else list(hdrs)
    h = Headers([(":method", "GET"), (":scheme", "http"), (":authority", host), (":path", path)]
                + [(k.lower(), v) for k, v in items])
    e = table.find(h, None, 12345)
    return e.name if e is not None else None


def test_route_selection_matches_envoy(envoy):
    table = compile_route_config(_route_config_proto(ROUTE_CONFIG))
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=5)
    mismatches = []
    try:
        for host, path, hdrs in CASES:
            want = _ask_envoy(conn, host, path, hdrs)
            got = _ask_table(table, host, path, hdrs)
            if want != got:
                mismatches.append((host, path, hdrs, want, got))
    finally:
        conn.close()
    assert not mismatches, "\n".join("%s %s %s: envoy=%s pyproxy=%s" % m for m in mismatches)


def test_ignore_port_in_host_matching_matches_envoy():
    rc = {"name": "p", "ignore_port_in_host_matching": True, "virtual_hosts": [
        {"name": "a", "domains": ["a.com"], "routes": [_r({"prefix": "/"}, "a")]},
        {"name": "d", "domains": ["*"], "routes": [_r({"prefix": "/"}, "d")]}]}
    table = compile_route_config(_route_config_proto(rc))
    with tempfile.TemporaryDirectory() as tmp:
        e = Envoy(_envoy_bootstrap(rc), tmp)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=5)
            for host in ("a.com", "a.com:8080", "A.COM:1", "b.com:80", "[::1]:80"):
                assert _ask_envoy(conn, host, "/", {}) == _ask_table(table, host, "/", {}), host
            conn.close()
        finally:
            e.stop()


BAD_CONFIGS = [
    # duplicate domain across virtual hosts (case-insensitively)
    {"name": "dup", "virtual_hosts": [
        {"name": "a", "domains": ["x.com"], "routes": [_r({"prefix": "/"}, "a")]},
        {"name": "b", "domains": ["X.com"], "routes": [_r({"prefix": "/"}, "b")]}]},
    # two default virtual hosts
    {"name": "dup2", "virtual_hosts": [
        {"name": "a", "domains": ["*"], "routes": []},
        {"name": "b", "domains": ["*"], "routes": []}]},
    # invalid regex
    {"name": "re", "virtual_hosts": [
        {"name": "a", "domains": ["*"], "routes": [_r({"safe_regex": {"regex": "/(a"}}, "a")]}]},
    # RE2 has no look-ahead
    {"name": "re2", "virtual_hosts": [
        {"name": "a", "domains": ["*"], "routes": [_r({"safe_regex": {"regex": "/(?=a)"}}, "a")]}]},
    # weights don't add up to total_weight
    {"name": "w", "virtual_hosts": [
        {"name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {
            "weighted_clusters": {"total_weight": 100, "clusters": [
                {"name": "c1", "weight": 30}, {"name": "c2", "weight": 30}]}}}]}]},
    # pseudo headers can't be added
    {"name": "h", "virtual_hosts": [
        {"name": "a", "domains": ["*"], "routes": [_r({"prefix": "/"}, "a")],
         "request_headers_to_add": [{"header": {"key": ":path", "value": "/x"}}]}]},
]


def test_rejections_agree_with_envoy():
    """Configs Envoy rejects are rejected here; the valid variant of each is accepted by both."""
    for rc in BAD_CONFIGS:
        ok, out = envoy_validate(_envoy_bootstrap(rc))
        assert not ok, "envoy accepted %s" % rc["name"]
        with pytest.raises(ConfigError):
            compile_route_config(_route_config_proto(rc))


def _redir(match, name, **kw):
    return {"match": match, "name": name, "redirect": kw}


REDIRECT_RC = {"name": "redir", "virtual_hosts": [{
    "name": "d", "domains": ["*"],
    "response_headers_to_add": [
        {"header": {"key": "x-a", "value": "vhost"}},
        {"header": {"key": "x-o", "value": "vhost"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-abs", "value": "vhost"}, "append_action": "ADD_IF_ABSENT"},
        {"header": {"key": "x-ow", "value": "vhost"}, "append_action": "OVERWRITE_IF_EXISTS"},
    ],
    "routes": [
        _redir({"prefix": "/r1"}, "r1", https_redirect=True),
        _redir({"prefix": "/r2"}, "r2", host_redirect="new.example", port_redirect=8443),
        _redir({"prefix": "/r3"}, "r3", path_redirect="/newpath"),
        _redir({"prefix": "/r4"}, "r4", path_redirect="/np?a=1", strip_query=True),
        _redir({"prefix": "/r5/old"}, "r5", prefix_rewrite="/new"),
        _redir({"prefix": "/r6"}, "r6", regex_rewrite={"pattern": {"regex": "^/r6/(\\w+)/x$"},
                                                        "substitution": "/\\1/y"},
               response_code="PERMANENT_REDIRECT"),
        _redir({"prefix": "/r7"}, "r7", scheme_redirect="https", strip_query=True,
               response_code="SEE_OTHER"),
        _redir({"prefix": "/r8"}, "r8", port_redirect=9000, response_code="TEMPORARY_REDIRECT"),
        _redir({"path": "/r9"}, "r9", prefix_rewrite="/whole", response_code="FOUND"),
        {"match": {"prefix": "/hdr"}, "name": "hdr",
         "direct_response": {"status": 200, "body": {"inline_string": "hdr"}},
         "response_headers_to_add": [
             {"header": {"key": "x-a", "value": "route"}},
             {"header": {"key": "x-o", "value": "route"}},
             {"header": {"key": "x-abs", "value": "route"}, "append_action": "ADD_IF_ABSENT"},
             {"header": {"key": "x-ow", "value": "route"}},
             {"header": {"key": "x-empty", "value": ""}},
             {"header": {"key": "x-keep", "value": ""}, "keep_empty_value": True},
             {"header": {"key": "x-old", "value": "old"}, "append": False},
             {"header": {"key": "x-fmt", "value": "%REQ(x-in)%|%PROTOCOL%|%%"}},
             {"header": {"key": "x-fmt-missing", "value": "%REQ(x-nope)%"}},
         ],
         "response_headers_to_remove": ["x-rc"]},
    ]}],
    "response_headers_to_add": [
        {"header": {"key": "x-a", "value": "rc"}},
        {"header": {"key": "x-o", "value": "rc"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-rc", "value": "rc"}},
    ],
}

REDIRECT_CASES = [
    ("h", "/r1", {}), ("h:80", "/r1?x=1", {}), ("h:8080", "/r1", {}),
    ("h:443", "/r1", {"x-forwarded-proto": "https"}), ("[::1]:80", "/r1", {}),
    ("h", "/r2/a?b", {}), ("h:81", "/r2", {}),
    ("h", "/r3?keep=1", {}), ("h", "/r3", {}),
    ("h", "/r4?drop=1", {}),
    ("h", "/r5/old/rest?q=1", {}), ("h", "/r5/oldx", {}),
    ("h", "/r6/abc/x?z", {}), ("h", "/r6/abc/y", {}),
    ("h:80", "/r7?q=1", {}), ("h", "/r7", {"x-forwarded-proto": "https"}),
    ("h:1234", "/r8/p", {}), ("h", "/r8", {}),
    ("h", "/r9?a=b", {}),
]


def test_redirects_and_response_headers_match_envoy():
    from pyproxy.routing import REDIRECT
    from pyproxy.stream_info import StreamInfo
    table = compile_route_config(_route_config_proto(REDIRECT_RC))
    with tempfile.TemporaryDirectory() as tmp:
        e = Envoy(_envoy_bootstrap(REDIRECT_RC), tmp)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=5)
            bad = []
            for host, path, hdrs in REDIRECT_CASES:
                conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", host)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                conn.endheaders()
                r = conn.getresponse()
                r.read()
                want = (r.status, r.getheader("location"))
                h = Headers([(":method", "GET"), (":scheme", "http"), (":authority", host),
                             (":path", path)] + list(hdrs.items()))
                h.set_default("x-forwarded-proto", "http")  # what the HCM adds
                entry = table.find(h)
                assert entry is not None and entry.kind == REDIRECT
                got = (entry.redirect_status, entry.redirect_location(h))
                if want != got:
                    bad.append((host, path, hdrs, want, got))
            assert not bad, "\n".join("%s %s %s: envoy=%s pyproxy=%s" % b for b in bad)

            # response header mutations on a direct response: route, then vhost, then config
            conn.putrequest("GET", "/hdr", skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", "h")
            conn.putheader("x-in", "IN")
            conn.endheaders()
            r = conn.getresponse()
            r.read()
            want = [(k.lower(), v) for k, v in r.getheaders() if k.lower().startswith("x-")]
            conn.close()
        finally:
            e.stop()
    req = Headers([(":method", "GET"), (":authority", "h"), (":path", "/hdr"), ("x-in", "IN")])
    entry = table.find(req)
    resp = Headers([(":status", "200"), ("x-old", "upstream")])
    si = StreamInfo()
    entry.finalize_response_headers(resp, si, None, request_headers=req)
    got = [(k, v) for k, v in resp.items() if k.startswith("x-")]
    # x-old from "upstream" is overwritten (append: false) and moves to the end, as in Envoy
    assert want == got

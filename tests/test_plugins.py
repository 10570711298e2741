"""HTTP filters written as plain Python classes, loaded with --plugin / PYPROXY_PLUGINS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from proxy_util import (HttpBackend, Pyproxy, ROOT, one_route_bootstrap, request,
                        run_pyproxy)

PLUGIN = textwrap.dedent('''
    from pyproxy.config.registry import REGISTRY
    from pyproxy.http.filter import CONTINUE, HttpFilter


    class Stamp(HttpFilter):
        __slots__ = ("word",)

        def __init__(self, callbacks, word):
            super().__init__(callbacks)
            self.word = word

        def decode_headers(self, headers, end_stream):
            headers.set("x-plugin-saw", headers.get(":path", ""))
            return CONTINUE

        def encode_headers(self, headers, end_stream):
            headers.set("x-stamp", self.word)
            return CONTINUE


    class StampFactory:
        def __init__(self, config, ctx):
            self.word = config.fields["word"].string_value

        def create(self, callbacks):
            return Stamp(callbacks, self.word)


    REGISTRY.register("http_filter", "test.Stamp", StampFactory)
''')

FILTERS = [
    {"name": "test.stamp", "typed_config": {
        "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
        "type_url": "type.googleapis.com/test.Stamp", "value": {"word": "hello"}}},
    {"name": "envoy.filters.http.router",
     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
]


def _env(tmp_path, **extra):
    (tmp_path / "stamp_plugin.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + ROOT)
    env.update(extra)
    return env


def test_plugin_filter_runs_on_real_traffic(tmp_path):
    be = HttpBackend()
    try:
        bs, port = one_route_bootstrap([be.port], hcm_extra={"http_filters": FILTERS})
        with Pyproxy(bs, env=_env(tmp_path, PYPROXY_PLUGINS="stamp_plugin")):
            status, headers, _ = request(port, "GET", "/abc")
            assert status == 200
            assert headers.get("x-stamp") == "hello"
        assert be.requests[-1].header("x-plugin-saw") == "/abc"
    finally:
        be.close()


def test_unknown_filter_without_plugin_is_rejected(tmp_path):
    bs, _ = one_route_bootstrap([9], hcm_extra={"http_filters": FILTERS})
    path = tmp_path / "bs.json"
    path.write_text(__import__("json").dumps(bs))
    r = run_pyproxy(["--mode", "validate", "-c", str(path)])
    assert r.returncode == 1 and "test.Stamp" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pyproxy", "--plugin", "stamp_plugin", "--mode", "validate",
                        "-c", str(path)], capture_output=True, text=True, timeout=30, cwd=ROOT,
                       env=_env(tmp_path))
    assert r.returncode == 0, r.stderr


def test_broken_plugin_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyproxy", "--version"], capture_output=True, text=True,
                       timeout=30, cwd=ROOT, env=_env(tmp_path, PYPROXY_PLUGINS="no_such_plugin_mod"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: cannot load plugin 'no_such_plugin_mod': ModuleNotFoundError: No module named 'no_such_plugin_mod'"]


BROKEN = textwrap.dedent('''
    from pyproxy.config.registry import REGISTRY
    from pyproxy.http.filter import CONTINUE, HttpFilter


    class Broken(HttpFilter):
        __slots__ = ()

        def decode_headers(self, headers, end_stream):
            if headers.get(":path") == "/boom-in":
                raise RuntimeError("bug on the way in")
            return CONTINUE

        def encode_headers(self, headers, end_stream):
            if self.callbacks.request_headers.get(":path") == "/boom-out":
                raise KeyError("bug on the way out")
            return CONTINUE


    class Factory:
        def __init__(self, config, ctx):
            pass

        def create(self, callbacks):
            return Broken(callbacks)


    REGISTRY.register("http_filter", "test.Broken", Factory)
''')


def test_a_filter_that_raises_gets_a_500_and_the_proxy_keeps_serving(tmp_path):
    (tmp_path / "broken_plugin.py").write_text(BROKEN)
    filters = [{"name": "test.broken", "typed_config": {
        "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
        "type_url": "type.googleapis.com/test.Broken", "value": {}}}, FILTERS[1]]
    be = HttpBackend()
    try:
        bs, port = one_route_bootstrap([be.port], hcm_extra={"http_filters": filters})
        env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + ROOT, PYPROXY_PLUGINS="broken_plugin")
        with Pyproxy(bs, env=env) as px:
            assert request(port, "GET", "/boom-in")[0] == 500
            assert request(port, "GET", "/boom-out")[0] == 500
            assert request(port, "GET", "/fine")[0] == 200
            assert "bug on the way in" in px.log()
        assert [r.path for r in be.requests] == ["/boom-out", "/fine"]
    finally:
        be.close()

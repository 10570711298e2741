"""`pyproxy example` end to end, and the README's promises: the two set-up commands come first, the
links point at files that exist, and the HTTP filter example in it really works (extracted from the
README and run as written, against real backends)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from proxy_util import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _run_example(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "pyproxy", "example", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_example_canary_split_and_cleanup():
    port, admin = free_port(), free_port()
    r = _run_example("--requests", "200", "--exit", "--port", str(port), "--admin-port", str(admin))
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    counts = {v: int(n) for v, n in re.findall(r"^  reviews (v\d)\s+(\d+)\s+[\d.]+%", out, re.M)}
    assert set(counts) == {"v1", "v2"}, out
    assert counts["v1"] + counts["v2"] == 200, out
    assert 0.02 <= counts["v2"] / 200 <= 0.25, counts
    # the printed /stats lines agree with what the client saw
    for v in ("v1", "v2"):
        m = re.search(r"cluster\.reviews-%s\.upstream_rq_2xx: (\d+)" % v, out)
        assert m and int(m.group(1)) == counts[v], out
    assert re.search(r"Access log \(pyproxy's stdout\), 200 lines", out), out
    assert "upstream_cluster=reviews-v" in out
    assert "curl -s http://127.0.0.1:%d/reviews" % port in out
    # every child was stopped by the runner
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out.splitlines()[0])]
    assert len(pids) == 3, out
    deadline = time.monotonic() + 3
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids)


def test_example_port_in_use_is_a_clear_error():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        r = _run_example("--exit", "--port", str(busy), "--admin-port", str(free_port()), timeout=15)
        assert r.returncode == 1
        assert "127.0.0.1:%d is already in use" % busy in r.stderr and "--port" in r.stderr
        assert "Traceback" not in r.stderr
        r = _run_example("--exit", "--port", str(free_port()), "--admin-port", str(busy), timeout=15)
        assert r.returncode == 1 and "--admin-port" in r.stderr
    finally:
        s.close()


def test_example_serve_mode_stops_children_on_sigterm():
    port, admin = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "pyproxy", "example", "--serve-only", "--port", str(port),
                          "--admin-port", str(admin)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        pids = [int(x) for x in re.findall(r"\(pid (\d+)\)", first)]
        assert len(pids) == 3, first
        status, body = None, ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                status, body, _ = _get(port, "/hello")
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200 and "direct_response" in body
        assert _get(port, "/nope")[0] == 404
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        assert p.returncode == 0
        deadline = time.monotonic() + 3
        while not all(_gone(x) for x in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(x) for x in pids)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdout.close()
        p.stderr.close()


def _get(port, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode(), dict((k.lower(), v) for k, v in r.getheaders())
    finally:
        c.close()


# -- the backend on its own ------------------------------------------------------------------------

def test_backend_answers_version_and_rejects_garbage():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "pyproxy.examples.backend", "--version", "v7", "--port", str(port)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in p.stdout.readline()
        status, body, hdrs = _get(port, "/reviews", {"x-pyproxy-example": "t"})
        assert status == 200 and body == "reviews v7 (x-pyproxy-example: t)\n" and hdrs["x-reviews-version"] == "v7"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
    finally:
        p.terminate()
        p.wait(5)
        p.stdout.close()
        p.stderr.close()


# -- the README -------------------------------------------------------------------------------------

def _fenced_blocks(text):
    """``[(info, body)]`` of the README's fenced code blocks, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```\s*$", text, re.M | re.S)]


def _readme():
    with open(README) as f:
        return f.read()


def test_readme_setup_commands_come_first():
    blocks = _fenced_blocks(_readme())
    assert [b.strip() for _, b in blocks[:2]] == ["pip install -e . && pyproxy example", "bash tests/run.sh"]
    assert os.path.exists(os.path.join(ROOT, "tests", "run.sh"))


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)\)", _readme()):
        assert os.path.exists(os.path.join(ROOT, target)), target


def _filter_section():
    text = _readme()
    start = text.index("## Writing an HTTP filter")
    end = text.index("\n## ", start + 1)
    blocks = _fenced_blocks(text[start:end])
    code = [b for info, b in blocks if info == "python"]
    conf = [b for info, b in blocks if info == "yaml"]
    assert len(code) == 1 and len(conf) == 1
    return code[0], yaml.safe_load(conf[0])


def test_readme_filter_example_runs(tmp_path):
    from pyproxy.examples.run import build_config

    code, snippet = _filter_section()
    (tmp_path / "api_key_filter.py").write_text(code)
    port, admin = free_port(), free_port()
    socks, procs = [], []
    try:
        ports = {}
        for v in ("v1", "v2"):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            socks.append(s)
            ports[v] = s.getsockname()[1]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pyproxy.examples.backend", "--version", v, "--fd", str(s.fileno())],
                pass_fds=(s.fileno(),), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL))
        cfg = build_config(port, admin, ports)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = snippet["http_filters"]
        hcm.pop("access_log")
        (tmp_path / "my-canary.yaml").write_text(yaml.safe_dump(cfg))
        px = subprocess.Popen([sys.executable, "api_key_filter.py", "-c", "my-canary.yaml", "-l", "warning"],
                              cwd=str(tmp_path), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(px)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and px.poll() is None:
            try:
                if _get(admin, "/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert px.poll() is None, px.stderr.read().decode()
        status, body, hdrs = _get(port, "/reviews")
        assert status == 401 and body == "unknown or missing x-api-key\n" and "x-api-user" not in hdrs
        assert _get(port, "/reviews", {"x-api-key": "wrong"})[0] == 401
        status, body, hdrs = _get(port, "/reviews", {"x-api-key": "s3cret"})
        assert status == 200 and body.startswith("reviews v") and hdrs["x-api-user"] == "alice", (body, hdrs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stderr:
                p.stderr.close()
        for s in socks:
            s.close()


def test_bundled_config_is_valid_for_pyproxy_and_envoy():
    path = os.path.join(ROOT, "pyproxy", "examples", "canary.yaml")
    r = subprocess.run([sys.executable, "-m", "pyproxy", "--mode", "validate", "-c", path], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    import shutil
    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.skip("envoy not installed")
    r = subprocess.run([envoy, "--mode", "validate", "-c", path, "-l", "error"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

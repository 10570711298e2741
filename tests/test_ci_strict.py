"""``CI=true`` makes the test command strict: a skip for a missing tool or missing Istio test data
is a failure, and tests/run.sh refuses to run without its tools and data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE = '''
import pytest

def test_tool():
    pytest.skip("envoy binary not on PATH")

@pytest.mark.skipif(True, reason="Istio testdata not available")
def test_data():
    pass

def test_other():
    pytest.skip("docker-compose not installed")

def test_ok():
    pass
'''


def _pytest(tmp_path, ci):
    f = tmp_path / "test_sample.py"
    f.write_text(SAMPLE)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_strict", "-p", "no:cacheprovider",
                           str(f)], capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)


def test_skips_for_missing_tools_fail_under_ci(tmp_path):
    r = _pytest(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    # the skipif mark is evaluated at setup, where pytest calls a failure an error
    assert "1 failed, 1 passed, 1 skipped, 1 error" in r.stdout, r.stdout
    assert "CI=true: this test would have been skipped (envoy binary not on PATH)" in r.stdout
    r = _pytest(tmp_path, None)
    assert r.returncode == 0 and "1 passed, 3 skipped" in r.stdout, r.stdout


def _run_sh(tmp_path, ci, drop=(), with_data=True):
    """tests/run.sh copied into a scratch repository, with PATH holding links to every tool it needs
    except ``drop``; RUN_SH_NO_INSTALL/RUN_SH_CHECK_ONLY: no apt-get, no pip, no pytest."""
    import tempfile
    top = tempfile.mkdtemp(dir=str(tmp_path))
    repo = os.path.join(top, "repo")
    os.makedirs(os.path.join(repo, "tests"))
    shutil.copy(os.path.join(ROOT, "tests", "run.sh"), os.path.join(repo, "tests", "run.sh"))
    if with_data:
        os.makedirs(os.path.join(top, "shared", "testdata", "istio"))
    from pathlib import Path
    bindir = Path(top) / "bin"
    bindir.mkdir()
    for tool in ("wrk", "h2load", "nghttp", "nghttpd", "nginx", "iptables", "ip", "curl", "envoy"):
        if tool not in drop:
            p = bindir / tool
            p.write_text("#!/bin/sh\nexit 0\n")
            p.chmod(0o755)
    for tool in ("bash", "id", "dirname", "cat", "mktemp", "rm", "grep", "env"):
        src = shutil.which(tool)
        if src and not (bindir / tool).exists():
            os.symlink(src, bindir / tool)
    env = {"PATH": str(bindir), "RUN_SH_NO_INSTALL": "1", "RUN_SH_CHECK_ONLY": "1", "HOME": top}
    if ci:
        env["CI"] = "true"
    return subprocess.run([shutil.which("bash"), os.path.join(repo, "tests", "run.sh")], capture_output=True,
                          text=True, timeout=60, env=env)


def test_run_sh_fails_under_ci_without_tools_or_data(tmp_path):
    r = _run_sh(tmp_path, True)
    assert r.returncode == 0 and "prerequisites checked" in r.stdout, r.stderr
    r = _run_sh(tmp_path, True, drop=("h2load", "envoy"))
    assert r.returncode == 1 and "missing tools: h2load envoy" in r.stderr, r.stderr
    r = _run_sh(tmp_path, False, drop=("h2load",))
    assert r.returncode == 0 and "warning: missing tools: h2load" in r.stderr, r.stderr


def test_run_sh_fails_under_ci_without_istio_testdata(tmp_path):
    r = _run_sh(tmp_path, True, with_data=False)
    assert r.returncode == 1 and "Istio test data not found" in r.stderr, r.stderr
    r = _run_sh(tmp_path, False, with_data=False)
    assert r.returncode == 0, r.stderr

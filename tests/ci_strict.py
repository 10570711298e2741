"""Under ``CI=true`` a test may not skip because a tool or the Istio test data is missing.

Locally a suite whose peer (curl, nghttpd, h2load, nghttp, wrk, nginx, iptables, envoy) or Istio test
data (``../shared/testdata/istio``) is absent skips, so a developer can run what they have. In CI
that would let a run pass without testing anything: there, such a skip is reported as a failure
naming what was missing. Skips for other reasons (no network namespaces, no docker-compose, a
module not in this checkout) stay skips. Loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import re

import pytest

REQUIRED_TOOLS = ("curl", "nghttpd", "h2load", "nghttp", "wrk", "nginx", "iptables", "envoy")
_MISSING = re.compile(r"(?i)\b(%s)\b|testdata|test data" % "|".join(REQUIRED_TOOLS))


def ci_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_prerequisite(reason: str) -> bool:
    """Whether a skip reason says a required tool or the Istio test data is missing (not that
    the run lacks root or namespaces: those suites stay skips)."""
    reason = reason or ""
    if reason.startswith("needs root"):
        return False
    return bool(_MISSING.search(reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail") or not ci_strict():
        return
    lr = rep.longrepr
    reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: "):]
    if missing_prerequisite(reason):
        rep.outcome = "failed"
        rep.longrepr = ("CI=true: this test would have been skipped (%s); in CI a missing tool or "
                        "missing Istio test data is a failure" % reason)

"""Per-request objects are freed by reference counting, never left in reference cycles for the
cyclic GC (whose passes cost milliseconds with a busy proxy and show up in tail latency). Drives
the socket-free benchmark harnesses (benchmarks/micro_h1.py, micro_h2.py: the real listener, HCM,
router and pool stack over in-memory transports) and counts what the collector finds."""

from __future__ import annotations

import collections
import gc
import importlib
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("lane", ["1", "0"])
@pytest.mark.parametrize("harness,engine", [("micro_h1", "lean"), ("micro_h2", "lean"), ("micro_h2", "h2")])
def test_requests_leave_no_cyclic_garbage(monkeypatch, capsys, harness, engine, lane):
    monkeypatch.setenv("PYPROXY_FAST_LANE", lane)
    monkeypatch.setenv("PYPROXY_H2_ENGINE", engine)
    monkeypatch.syspath_prepend(BENCH)
    mod = importlib.import_module(harness)
    freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freeze(), gc.set_debug(gc.DEBUG_SAVEALL)))
    try:
        args = ["-n", "300"] + (["--batch", "1"] if harness == "micro_h2" else [])
        assert mod.main(args) == 0
        gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.unfreeze()
    # 5 timed runs x 300 requests (+ warm-up): a per-request cycle would leave thousands
    assert sum(kinds.values()) < 50, kinds.most_common(10)

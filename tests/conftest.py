import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from ci_strict import pytest_runtest_makereport  # noqa: E402,F401  (CI=true: no skips for missing tools)

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_pyproxy_logging():
    """A test that sets up pyproxy's logging in-process (pyproxy.log.setup: own handler, propagate off,
    component levels) must not hide later tests' records from caplog: restore the logger tree after it."""
    root = logging.getLogger("pyproxy")
    saved = (root.propagate, root.level, list(root.handlers),
             {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if name.startswith("pyproxy.") and isinstance(lg, logging.Logger)})
    yield
    root.propagate, root.level = saved[0], saved[1]
    root.handlers[:] = saved[2]
    for name, lg in logging.root.manager.loggerDict.items():
        if name.startswith("pyproxy.") and isinstance(lg, logging.Logger):
            lg.setLevel(saved[3].get(name, logging.NOTSET))

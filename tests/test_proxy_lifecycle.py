"""Process lifecycle: SIGTERM drains (in-flight requests finish, new connections refused, exit 0
within the drain time) and /quitquitquit."""

from __future__ import annotations

import signal
import socket
import threading
import time

from proxy_util import HttpBackend, Pyproxy, one_route_bootstrap, request, simple_response


def slow(req, sock):
    time.sleep(1.0)
    return simple_response(200, b"finished " + req.path.encode())


def test_sigterm_drains_in_flight_requests_then_exits_0():
    with HttpBackend(slow) as be:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs, extra_args=["--drain-time-s", "5"]) as px:
            results = []

            def one(i):
                results.append(request(port, "GET", "/r%d" % i, timeout=8)[::2])
            ts = [threading.Thread(target=one, args=(i,)) for i in range(3)]
            for t in ts:
                t.start()
            time.sleep(0.3)  # all three are waiting on the backend
            t0 = time.monotonic()
            px.signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = False
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                refused = True
            for t in ts:
                t.join(8)
            rc = px.proc.wait(8)
            elapsed = time.monotonic() - t0
            assert sorted(results) == [(200, b"finished /r%d" % i) for i in range(3)]
            assert refused, "new connections must be refused while draining"
            assert rc == 0
            assert elapsed < 5, "exit must not wait for the whole drain time once idle"


def test_sigterm_exits_within_drain_time_with_a_stuck_request():
    def stuck(req, sock):
        time.sleep(10)
        return None

    with HttpBackend(stuck) as be:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs, extra_args=["--drain-time-s", "1"]) as px:
            t = threading.Thread(target=lambda: _quiet(request, port, "GET", "/stuck", timeout=10))
            t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            px.signal(signal.SIGTERM)
            rc = px.proc.wait(6)
            assert rc == 0
            assert time.monotonic() - t0 < 3
            t.join(10)


def _quiet(f, *a, **kw):
    try:
        f(*a, **kw)
    except OSError:
        pass


def test_quitquitquit():
    with HttpBackend() as be:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs) as px:
            st, _, _ = request(px.admin_port, "POST", "/quitquitquit")
            assert st == 200
            assert px.proc.wait(5) == 0

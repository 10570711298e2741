"""Fault drills on the data path, each an automated test bounded in time:

* SIGTERM under load: every request sent on an open connection gets its whole response (0 failed);
  the clients are told ``connection: close``; the process exits 0 within the drain time.
* slowloris: 1,000 connections that never finish their request head; other clients are still
  served promptly and the proxy's memory stays bounded.
* an upstream that reads slowly: a client streaming a large request body is held back (the proxy
  stops reading past its buffer limit), so the proxy's memory stays bounded.
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time

from proxy_util import HttpBackend, Pyproxy, one_route_bootstrap, request


def _rss_mb(px) -> float:
    return px.rss_kb() / 1024.0


# ------------------------------------------------------------------ SIGTERM drain under load

class _KeepAliveClient(threading.Thread):
    """Requests back to back on one keep-alive connection until told to stop or the proxy says
    ``connection: close``. A request sent that gets no whole response is a failure."""

    def __init__(self, port, stop):
        super().__init__(daemon=True)
        self.port = port
        self.stop_ev = stop
        self.ok = 0
        self.failed = []
        self.closed_by_proxy = False

    def run(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self.stop_ev.is_set():
                try:
                    c.request("GET", "/d", headers={"host": "x"})
                    r = c.getresponse()
                    body = r.read()
                except (OSError, http.client.HTTPException) as e:
                    self.failed.append(repr(e))
                    return
                if r.status != 200 or not body.startswith(b"b GET /d"):
                    self.failed.append((r.status, body[:80]))
                    return
                self.ok += 1
                if (r.getheader("connection") or "").lower() == "close":
                    self.closed_by_proxy = True
                    return
        finally:
            c.close()


def test_sigterm_drain_under_load_zero_failed_requests():
    with HttpBackend() as be:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs, extra_args=["--drain-time-s", "3", "--drain-strategy", "immediate"]) as px:
            stop = threading.Event()
            clients = [_KeepAliveClient(port, stop) for _ in range(16)]
            for c in clients:
                c.start()
            deadline = time.monotonic() + 10
            while sum(c.ok for c in clients) < 500 and time.monotonic() < deadline:
                time.sleep(0.05)
            before = sum(c.ok for c in clients)
            assert before >= 500, before
            t0 = time.monotonic()
            px.signal(signal.SIGTERM)
            for c in clients:
                c.join(8)
            stop.set()
            rc = px.proc.wait(8)
            elapsed = time.monotonic() - t0
            failed = [f for c in clients for f in c.failed]
            total = sum(c.ok for c in clients)
            print("SIGTERM under load: %d requests before, %d in all, %d failed, exit %s after %.2f s"
                  % (before, total, len(failed), rc, elapsed))
            assert not failed, failed[:5]
            assert all(c.closed_by_proxy for c in clients)     # each told connection: close
            assert rc == 0 and elapsed < 4.5


# ------------------------------------------------------------------ slowloris

def test_slowloris_1000_idle_connections_others_served_memory_bounded():
    with HttpBackend() as be:
        bs, port = one_route_bootstrap([be.port])
        with Pyproxy(bs) as px:
            for _ in range(20):
                assert request(port, "GET", "/warm")[0] == 200
            rss0 = _rss_mb(px)
            idle = []
            try:
                for i in range(1000):
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    # a request head that never ends, trickled
                    s.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\nx-a: ")
                    idle.append(s)
                for s in idle[::10]:
                    s.sendall(b"b")
                time.sleep(0.5)
                lat = []
                for i in range(50):
                    t = time.monotonic()
                    st, _, body = request(port, "GET", "/ok%d" % i, timeout=5)
                    lat.append(time.monotonic() - t)
                    assert st == 200 and body.startswith(b"b GET /ok"), (st, body)
                rss1 = _rss_mb(px)
                lat.sort()
                print("slowloris: 1000 idle connections, RSS %.1f -> %.1f MB, others p50 %.1f ms "
                      "max %.1f ms" % (rss0, rss1, lat[25] * 1000, lat[-1] * 1000))
                assert lat[-1] < 1.0
                assert rss1 - rss0 < 60, (rss0, rss1)       # ~tens of KB per idle connection
                st = px.stats()
                assert st.get("listener.127.0.0.1_%d.downstream_cx_active" % port, 0) >= 1000
            finally:
                for s in idle:
                    s.close()
            assert not [r for r in be.requests if r.path == "/slow"]   # nothing half-read went up


# ------------------------------------------------------------------ an upstream that reads slowly

def _slow_reader(req_sizes, stop):
    """A raw upstream that reads a request body 16 KiB at a time with pauses, then answers."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)

    def serve():
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                s, _ = ls.accept()
            except OSError:
                continue
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            s.settimeout(10)
            got = 0
            try:
                while not stop.is_set():
                    d = s.recv(16384)
                    if not d:
                        break
                    got += len(d)
                    req_sizes.append(got)
                    time.sleep(0.01)            # ~1.6 MB/s at most
                    if b"0\r\n\r\n" in d[-16:]:
                        break
                s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            except OSError:
                pass
            finally:
                s.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls, t


def test_slow_reading_upstream_memory_bounded():
    stop = threading.Event()
    sizes = []
    ls, t = _slow_reader(sizes, stop)
    try:
        bs, port = one_route_bootstrap([ls.getsockname()[1]])
        with Pyproxy(bs) as px:
            assert px.stats() is not None
            rss0 = _rss_mb(px)
            sent = [0]
            done = threading.Event()

            def client():
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
                s.settimeout(0.5)
                try:
                    s.sendall(b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
                    t_end = time.monotonic() + 4
                    while time.monotonic() < t_end:
                        try:
                            s.sendall(chunk)
                            sent[0] += 65536
                        except socket.timeout:
                            continue           # held back by the proxy: keep trying until the end
                        except OSError:
                            break
                finally:
                    done.set()
                    s.close()
            ct = threading.Thread(target=client, daemon=True)
            ct.start()
            peak = rss0
            while not done.wait(0.2):
                peak = max(peak, _rss_mb(px))
            ct.join(5)
            received = sizes[-1] if sizes else 0
            print("slow upstream: client pushed %.1f MB in 4 s, upstream read %.1f MB, proxy RSS "
                  "%.1f -> peak %.1f MB" % (sent[0] / 2**20, received / 2**20, rss0, peak))
            # the client was held back to about what the upstream read plus the buffers in
            # between (socket buffers and the proxy's 1 MiB limit per connection), not 4 s at
            # loopback speed (several GB)
            assert sent[0] - received < 16 * 2**20, (sent[0], received)
            assert peak - rss0 < 30, (rss0, peak)
    finally:
        stop.set()
        ls.close()
        t.join(3)

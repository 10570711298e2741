"""HTTP/2 downstream: inbound WINDOW_UPDATE frames are bounded as Envoy bounds them (review finding
F10), side by side with Envoy, on both HTTP/2 engines.

Envoy closes a connection that received more than 5 + 2 * (streams opened +
``max_inbound_window_update_frames_per_data_frame_sent`` (default 10) * DATA frames sent)
WINDOW_UPDATE frames, counted in ``http2.inbound_window_update_frames_flood``. A client that sends
window updates as it reads (h2load on a large body with a small window) stays within it.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import hpack
import pytest

from proxy_util import Envoy, HttpBackend, Pyproxy, one_route_bootstrap, run_pyproxy, simple_response

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BIG = 4 * 1024 * 1024


def frame(t, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, flags]) + struct.pack(">I", sid) + payload


WU = frame(8, 0, 0, struct.pack(">I", 1))
PING = frame(6, 0, 0, b"pyproxy!")


@pytest.fixture(params=["lean", "h2"])
def engine(request, monkeypatch):
    monkeypatch.setenv("PYPROXY_H2_ENGINE", request.param)
    return request.param


def _read_frames(s, until, timeout=3.0):
    """Frames (type, flags, sid, payload) read until ``until(frames)`` or the peer closes."""
    buf, frames = b"", []
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(frames):
        s.settimeout(max(0.05, end - time.monotonic()))
        try:
            d = s.recv(65536)
        except socket.timeout:
            break
        except OSError:
            return frames, True
        if not d:
            return frames, True
        buf += d
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]))
            buf = buf[9 + n:]
    return frames, False


def _probe(port, k, with_request):
    """A fresh connection (and optionally one GET answered in full), then ``k`` connection-level
    WINDOW_UPDATE frames and a PING: whether the connection survived (the PING acked)."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(PREFACE + frame(4, 0, 0) + frame(4, 1, 0))
        if with_request:
            block = hpack.Encoder().encode([(":method", "GET"), (":path", "/small"), (":scheme", "http"),
                                            (":authority", "x")])
            s.sendall(frame(1, 0x5, 1, block))
            frames, closed = _read_frames(s, lambda fs: any(f[0] == 0 and f[1] & 1 and f[2] == 1 for f in fs))
            assert not closed and any(f[0] == 0 and f[2] == 1 for f in frames), frames
        s.sendall(WU * k + PING)
        frames, closed = _read_frames(s, lambda fs: any(f[0] == 6 and f[1] & 1 for f in fs))
        acked = any(f[0] == 6 and f[1] & 1 and f[3] == b"pyproxy!" for f in frames)
        if acked:
            return True
        _read_frames(s, lambda fs: False, 2.0)  # (then the close)
        return False
    finally:
        s.close()


def _handler(req, sock):
    if req.path == "/big":
        return simple_response(200, b"x" * BIG)
    return simple_response(200, b"small body")


def _bootstrap(be_port, per_data_frame=None):
    extra = {"codec_type": "HTTP2"}
    if per_data_frame is not None:
        extra["http2_protocol_options"] = {"max_inbound_window_update_frames_per_data_frame_sent": per_data_frame}
    bs, _ = one_route_bootstrap([be_port], hcm_extra=extra)
    return bs


def test_window_update_bound_same_as_envoy(engine):
    """Before any stream or DATA frame: 5 WINDOW_UPDATE frames pass, the 6th closes the
    connection, in both proxies."""
    with HttpBackend(_handler) as be:
        bs = _bootstrap(be.port)
        for kind in (Pyproxy, Envoy) if engine == "lean" else (Pyproxy,):
            with kind(bs) as p:
                assert _probe(p.port, 5, False), kind.__name__
                assert not _probe(p.port, 6, False), kind.__name__
                assert p.stat("http2.inbound_window_update_frames_flood") == 1, kind.__name__


@pytest.mark.parametrize("per_data_frame, cap", [
    (None, 27),  # one stream, one DATA frame (the body with END_STREAM): 5 + 2 * (1 + 10 * 1)
    (1, 9),      # 5 + 2 * (1 + 1 * 1)
])
def test_window_update_bound_grows_with_data_frames_sent(engine, per_data_frame, cap):
    """The bound grows with the streams opened and the DATA frames sent, by
    max_inbound_window_update_frames_per_data_frame_sent (Envoy's formula; Envoy itself sends
    the body and an empty END_STREAM frame, two DATA frames, where pyproxy sends one)."""
    with HttpBackend(_handler) as be:
        with Pyproxy(_bootstrap(be.port, per_data_frame)) as p:
            assert _probe(p.port, cap, True)
            assert not _probe(p.port, cap + 1, True)
            assert p.stat("http2.inbound_window_update_frames_flood") == 1


def test_zero_per_data_frame_rejected():
    """Envoy's validation: max_inbound_window_update_frames_per_data_frame_sent >= 1."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(_bootstrap(1, 0), f)
    try:
        r = run_pyproxy(["validate", f.name])
        assert r.returncode != 0 and "max_inbound_window_update_frames_per_data_frame_sent" in r.stdout + r.stderr, \
            r.stdout + r.stderr
    finally:
        os.unlink(f.name)


def test_window_update_flood_closes_connection(engine):
    """The reviewer's flood: WINDOW_UPDATE(1) on the connection in a loop; the connection closes
    at once (before: 10 M frames in 8 s, still open), other clients are served."""
    with HttpBackend(_handler) as be:
        with Pyproxy(_bootstrap(be.port)) as p:
            s = socket.create_connection(("127.0.0.1", p.port))
            s.sendall(PREFACE + frame(4, 0, 0) + frame(4, 1, 0))
            s.settimeout(0.5)
            blob = WU * 1000
            sent, t0, closed = 0, time.monotonic(), False
            try:
                while time.monotonic() - t0 < 5:
                    s.sendall(blob)
                    sent += 1000
            except OSError:
                closed = True
            if not closed:
                _, closed = _read_frames(s, lambda fs: False, 3.0)
            s.close()
            assert closed, sent
            assert p.stat("http2.inbound_window_update_frames_flood") == 1
            assert _probe(p.port, 0, True)  # the proxy still serves


@pytest.mark.skipif(not shutil.which("h2load"), reason="h2load missing")
def test_reader_window_updates_within_bound(engine):
    """h2load with 64 KiB windows reads a 4 MiB body: it sends a WINDOW_UPDATE per window's worth
    read, never more than the bound allows."""
    with HttpBackend(_handler) as be:
        with Pyproxy(_bootstrap(be.port)) as p:
            r = subprocess.run(["h2load", "-n", "4", "-c", "1", "-m", "1", "-w", "16", "-W", "16",
                                "http://127.0.0.1:%d/big" % p.port], capture_output=True, text=True, timeout=60,
                               env=dict(os.environ))
            assert "4 succeeded" in r.stdout, r.stdout[-2000:]
            assert p.stat("http2.inbound_window_update_frames_flood") == 0

"""An HTTP/2 request whose DATA disagrees with its content-length is malformed (RFC 9113 8.1.1):
the stream is reset with PROTOCOL_ERROR (the connection closed when HEADERS with END_STREAM
declare a body) and no byte past the declared length reaches the HTTP/1.1 upstream, where it would start a second request (smuggling). Each case runs through pyproxy and
through Envoy on the same bootstrap: the client's view (reset code or status) and what the
upstream saw (a complete request or not, body bytes beyond the declared length) must agree."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from grpc_util import Proxy, RawH2, bootstrap, cluster, free_port, hcm_listener

ENVOY = shutil.which("envoy")


class RawUpstream:
    """An HTTP/1.1 upstream that records the raw bytes of each connection and answers a
    complete request with 200."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.conns = []
        self.done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.done:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            rec = [b""]
            self.conns.append(rec)
            threading.Thread(target=self._serve, args=(s, rec), daemon=True).start()

    def _serve(self, s, rec):
        s.settimeout(10)
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    return
                rec[0] += d
                head, sep, body = rec[0].partition(b"\r\n\r\n")
                if sep:
                    n = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            n = int(v.strip())
                    if len(body) >= n:
                        s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except OSError:
            return
        finally:
            s.close()

    def seen(self) -> bytes:
        return b"".join(c[0] for c in self.conns)

    def close(self):
        self.done = True
        self.lsock.close()


CASES = {  # name -> (declared content-length, DATA frames (bytes, end_stream)...)
    "fewer": ("10", [(b"abc", True)]),
    "more": ("2", [(b"abcdef", True)]),
    "more-in-two-frames": ("4", [(b"abc", False), (b"def", True)]),
    "declared-then-end-on-headers": ("5", []),
    "exact": ("3", [(b"abc", True)]),
}


def _run(cls_envoy: bool, case: str, tmp_path):
    up = RawUpstream()
    lp, ap = free_port(), free_port()
    bs = bootstrap(ap, [hcm_listener("m", lp, [{"match": {"prefix": "/"}, "route": {"cluster": "u"}}])],
                   [cluster("u", up.port)])
    d = tmp_path / ("envoy" if cls_envoy else "pyproxy")
    d.mkdir()
    px = Proxy(bs, str(d), envoy=cls_envoy, wait_ports=[lp])
    try:
        from hyperframe.frame import DataFrame
        declared, frames = CASES[case]
        c = RawH2(lp)
        try:
            c.send(c.headers(1, "/x", end_stream=not frames,
                             extra=[("content-length", declared)]))
            for data, end in frames:
                f = DataFrame(1)
                f.data = data
                f.flags = {"END_STREAM"} if end else set()
                c.send(f.serialize())
                time.sleep(0.05)

            def over(fs):
                return any(f.stream_id == 1 and (f.type == 0x3 or (f.type in (0x0, 0x1) and "END_STREAM" in f.flags))
                           for f in fs)
            c.read(over, 3)
            rst = [f.error_code for f in c.frames if f.type == 0x3 and f.stream_id == 1]
            status = None
            for f in c.frames:
                if f.type == 0x1 and f.stream_id == 1:
                    status = dict(c.dec.decode(f.data)).get(":status")
        finally:
            c.close()
        time.sleep(0.3)
        raw = up.seen()
        head, _, body = raw.partition(b"\r\n\r\n")
        return {"rst": rst, "status": status, "connection_closed": c.closed, "body_upstream_within_declared": len(body) <= int(declared),
                "upstream_has_more_than_declared": len(body) > int(declared)}
    finally:
        px.stop()
        up.close()


@pytest.mark.skipif(ENVOY is None, reason="envoy binary not on PATH")
@pytest.mark.parametrize("case", list(CASES))
def test_h2_content_length_mismatch_as_envoy(case, tmp_path):
    mine = _run(False, case, tmp_path)
    if os.environ.get("PYPROXY_H2_ENGINE") == "h2" and case != "exact":
        # the optional h2-library engine: h2 raises InvalidBodyLengthError, a connection error
        assert mine["connection_closed"] and not mine["upstream_has_more_than_declared"], mine
        return
    theirs = _run(True, case, tmp_path)
    assert mine == theirs, (mine, theirs)
    if case == "exact":
        assert mine["status"] == "200" and not mine["rst"]
    elif case == "declared-then-end-on-headers":  # (Envoy drops the connection)
        assert mine["connection_closed"] and not mine["upstream_has_more_than_declared"]
    else:
        assert mine["rst"] == [1] and not mine["upstream_has_more_than_declared"]  # PROTOCOL_ERROR

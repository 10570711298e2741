"""Differential testing of pyproxy's compiled request path against its reference mode.

``ModePair`` runs the same bootstrap in two pyproxy processes: the default (the compiled path: chain
plan shortcuts, the stream's own first attempt, byte relays) and ``PYPROXY_REFERENCE=1`` (the plain filter-by-filter
chain). Each mode has its own scripted upstreams (``ScriptedH1``, ``ScriptedH2``), so per-case
upstream state (a 503, then a 200) is the same for both. ``ModePair.run(client)`` runs one case in
each mode and returns, per mode, what the client saw, what the upstreams received and the counter
deltas of ``/stats?format=json&type=Counters``; ``assert_same`` compares them.

The clients speak raw bytes: ``h1_script`` (HTTP/1.1 steps: send bytes, wait for a marker) and
``h2_script`` (HTTP/2 frames built with hyperframe/hpack, no client state machine, so malformed
header blocks can be sent). What they return is a normalized, masked view: the bytes received and
how the connection ended (HTTP/1.1); the frame sequence, DATA frames of one stream merged (HTTP/2).

Everything is bounded in time; processes are killed by PID (``proxy_util.Pyproxy``), threads
stop when their sockets close.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time

from proxy_util import HttpBackend, Pyproxy, TcpBackend, recv_settled, recv_until, request, with_fresh_ports
from test_chain_plan import _mask

MODES = {"compiled": {}, "reference": {"PYPROXY_REFERENCE": "1"}}

# response/request header values that differ by nature
_H2_MASKED = {"date": "<date>", "x-envoy-upstream-service-time": "<n>"}
_UUID = re.compile(r"(?i)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def mask_headers(headers) -> list:
    out = []
    for k, v in headers:
        k = k.decode("latin-1") if isinstance(k, bytes) else k
        v = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((k, _H2_MASKED.get(k.lower(), _UUID.sub("<uuid>", v))))
    return out


def rst_close(sock) -> None:
    """Make the next close of ``sock`` a TCP reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


# ------------------------------------------------------------------------------------ upstreams

class ScriptedH1:
    """An HTTP/1.1 upstream (``proxy_util.HttpBackend``) answering by ``script(req, sock, n)``, n
    being how many requests for this path (without query) came before in the current case."""

    def __init__(self, script):
        self.script = script
        self.counts = {}
        self.be = HttpBackend(self._handle)

    @property
    def port(self):
        return self.be.port

    def _handle(self, req, sock):
        path = req.path.split("?")[0]
        with self.be.lock:
            n = self.counts.get(path, 0)
            self.counts[path] = n + 1
        return self.script(req, sock, n)

    def mark(self):
        with self.be.lock:
            self.counts = {}
            return len(self.be.raw)

    def drop_connections(self):
        """Close every connection (the proxy's pool starts the next case empty)."""
        with self.be.lock:
            socks = list(self.be.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def since(self, mark) -> bytes:
        with self.be.lock:
            return _mask(bytes(self.be.raw[mark:]))

    def close(self):
        self.be.close()


class ScriptedH2(TcpBackend):
    """An HTTP/2 upstream on the h2 library. ``script(headers: dict, n)`` returns the actions for a
    request once it has ended: ("headers", list, end_stream), ("data", bytes, end_stream),
    ("trailers", list), ("reset", code), ("sleep", seconds). Each answer runs in its own thread.
    ``log`` records, in order, every request (masked headers, body, trailers) and every reset the
    proxy sent."""

    def __init__(self, script):
        self.script = script
        self.counts = {}
        self.log = []
        self.lock = threading.Lock()
        super().__init__(self._serve)  # (the listening socket and accept loop: proxy_util.TcpBackend)

    def _serve(self, s):
        import h2.config
        import h2.connection
        import h2.events as E
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        wlock = threading.Lock()
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        reqs = {}
        s.settimeout(30)
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    return
                with wlock:
                    events = conn.receive_data(d)
                    for e in events:
                        if isinstance(e, E.RequestReceived):
                            reqs[e.stream_id] = [list(e.headers), b"", None]
                        elif isinstance(e, E.DataReceived):
                            reqs[e.stream_id][1] += e.data
                            conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                        elif isinstance(e, E.TrailersReceived):
                            reqs[e.stream_id][2] = list(e.headers)
                        elif isinstance(e, E.StreamEnded):
                            h, body, tr = reqs.pop(e.stream_id)
                            with self.lock:
                                self.log.append(("request", mask_headers(h), body, mask_headers(tr or [])))
                                path = dict(h).get(":path", "").split("?")[0]
                                n = self.counts.get(path, 0)
                                self.counts[path] = n + 1
                            threading.Thread(target=self._answer, daemon=True,
                                             args=(s, conn, wlock, e.stream_id, self.script(dict(h), n))).start()
                        elif isinstance(e, E.StreamReset):
                            with self.lock:
                                self.log.append(("reset", int(e.error_code)))
                            reqs.pop(e.stream_id, None)
                    out = conn.data_to_send()
                    if out:
                        s.sendall(out)
        except Exception:  # (the proxy went away, or sent what h2 refuses: the case shows it)
            return
        finally:
            with self.lock:
                if s in self.socks:
                    self.socks.remove(s)
            try:
                s.close()
            except OSError:
                pass

    @staticmethod
    def _answer(s, conn, wlock, sid, actions):
        """Run the actions; those between two sleeps go out in one write (the proxy then reads
        a response head and its end together, whatever the timing)."""
        try:
            for i, a in enumerate(actions):
                if a[0] == "sleep":
                    time.sleep(a[1])
                    continue
                with wlock:
                    if a[0] == "headers":
                        conn.send_headers(sid, a[1], end_stream=a[2])
                    elif a[0] == "data":
                        conn.send_data(sid, a[1], end_stream=a[2])
                    elif a[0] == "trailers":
                        conn.send_headers(sid, a[1], end_stream=True)
                    elif a[0] == "reset":
                        conn.reset_stream(sid, a[1])
                    if i + 1 == len(actions) or actions[i + 1][0] == "sleep":
                        s.sendall(conn.data_to_send())
        except Exception:
            return

    def mark(self):
        with self.lock:
            self.counts = {}
            return len(self.log)

    def drop_connections(self):
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def since(self, mark) -> list:
        with self.lock:
            return list(self.log[mark:])


# -------------------------------------------------------------------------------------- clients

class Wait:
    """An ``h1_script`` step: read until ``marker`` is in what was received (bounded)."""

    def __init__(self, marker: bytes, timeout: float = 1.5):
        self.marker = marker
        self.timeout = timeout


def _complete(buf: bytes, methods, n: int) -> bool:
    from proxy_util import parse_responses
    if buf.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in buf:
        return True  # (what follows belongs to the upgraded connection)
    try:
        rs = parse_responses(buf, methods)
    except (ValueError, IndexError):
        return False
    return len([r for r in rs if r.status >= 200 or r.status == 101]) >= n


def h1_script(port: int, steps, methods=("GET",), n: int = 1, timeout: float = 4.0, settle: float = 0.1):
    """Run ``steps`` (bytes to send, ``Wait`` markers) on one connection, then read until ``n``
    complete responses and ``settle`` seconds of quiet, or the close. Returns ((masked bytes,
    how the connection ended: "open", "eof" or "reset"), number of bytes received)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buf = b""
    try:
        for st in steps:
            if isinstance(st, Wait):
                buf, how = recv_until(s, st.timeout, lambda b, m=st.marker: m in b, buf, resets=True)
                if how:
                    return (_mask(buf), how), len(buf)
                continue
            try:
                s.sendall(st)
            except (BrokenPipeError, ConnectionResetError):
                break
        buf, how = recv_settled(s, timeout, lambda b: _complete(b, list(methods), n), settle, buf)
        return (_mask(buf), how or "open"), len(buf)
    finally:
        s.close()


def http1(method, path, headers=(), body=b"", host="svc.local", version="HTTP/1.1", length=True) -> bytes:
    """A request's bytes (``content-length`` added for a body unless ``length`` is False)."""
    hs = list(headers)
    if length and (body or method in ("POST", "PUT")) and not any(
            k.lower() in ("content-length", "transfer-encoding") for k, _ in hs):
        hs.append(("Content-Length", str(len(body))))
    h = ("Host: %s\r\n" % host) if host is not None else ""
    return ("%s %s %s\r\n%s%s\r\n" % (method, path, version, h, "".join("%s: %s\r\n" % kv for kv in hs))
            ).encode("latin-1") + body


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2:
    """Raw HTTP/2 frames for ``h2_script`` steps (any header list, in any order, any case)."""

    @staticmethod
    def headers(sid, hdrs, end_stream=True):
        return ("headers", sid, list(hdrs), end_stream)

    @staticmethod
    def data(sid, data, end_stream=True):
        return ("data", sid, data, end_stream)

    @staticmethod
    def wait(sid, timeout=1.0):
        """Wait for a HEADERS frame on ``sid`` (e.g. a 100 Continue), bounded."""
        return ("wait", sid, timeout)

    @staticmethod
    def raw(frame_bytes):
        return ("raw", frame_bytes)


def request_headers(method, path, authority="svc.local", extra=()):
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)] + list(extra)


def h2_script(port: int, steps, timeout: float = 4.0, settle: float = 0.1):
    """Run HTTP/2 ``steps`` on one h2c connection (prior knowledge), then read until every stream
    the client opened has ended (END_STREAM or RST_STREAM) or the connection is gone, then
    ``settle`` seconds more. Returns the list of frames received (SETTINGS, PING and WINDOW_UPDATE
    left out; consecutive DATA of one stream merged; header blocks decoded and masked) and how
    the connection ended, and the number of bytes received."""
    from hpack import Decoder, Encoder
    from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                                  PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)
    enc, dec = Encoder(), Decoder()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    view, rbuf, opened, ended = [], b"", set(), set()
    state = {"end": "open", "block": None, "n": 0}

    def send_now(b):
        try:
            s.sendall(b)
        except OSError:
            pass
    send = send_now

    def on_frame(f):
        if isinstance(f, SettingsFrame):
            if "ACK" not in f.flags:
                send_now(SettingsFrame(0, flags=["ACK"]).serialize())
            return
        if isinstance(f, PingFrame):
            if "ACK" not in f.flags:
                send_now(PingFrame(0, f.opaque_data, flags=["ACK"]).serialize())
            return
        if isinstance(f, WindowUpdateFrame):
            return
        if isinstance(f, (HeadersFrame, ContinuationFrame)):
            if isinstance(f, HeadersFrame):
                state["block"] = [f.stream_id, f.data, "END_STREAM" in f.flags]
            else:
                state["block"][1] += f.data
            if "END_HEADERS" in f.flags:
                sid, block, es = state["block"]
                try:
                    hs = mask_headers(dec.decode(block))
                except Exception as e:  # noqa: BLE001 (shown in the view)
                    hs = "undecodable: %s" % type(e).__name__
                view.append(["headers", sid, hs, es])
                if es:
                    ended.add(sid)
            return
        if isinstance(f, DataFrame):
            es = "END_STREAM" in f.flags
            # (no WINDOW_UPDATE: the responses fit the initial window, and what the client sends must
            # not depend on how the proxy cut its DATA frames)
            if view and view[-1][0] == "data" and view[-1][1] == f.stream_id and not view[-1][3]:
                view[-1][2] += f.data
                view[-1][3] = es
            else:
                view.append(["data", f.stream_id, bytes(f.data), es])
            if es:
                ended.add(f.stream_id)
            return
        if isinstance(f, RstStreamFrame):
            view.append(["rst", f.stream_id, f.error_code])
            ended.add(f.stream_id)
            return
        if isinstance(f, GoAwayFrame):
            view.append(["goaway", f.last_stream_id, f.error_code, bytes(f.additional_data)])
            return
        view.append(["frame", type(f).__name__, f.stream_id])

    def pump(until, deadline):
        nonlocal rbuf
        while not until() and state["end"] == "open":
            left = deadline - time.monotonic()
            if left <= 0:
                return
            s.settimeout(left)
            try:
                d = s.recv(65536)
            except socket.timeout:
                return
            except ConnectionResetError:
                state["end"] = "reset"
                return
            if not d:
                state["end"] = "eof"
                return
            rbuf += d
            state["n"] += len(d)
            while len(rbuf) >= 9:
                f, ln = Frame.parse_frame_header(memoryview(rbuf[:9]))
                if len(rbuf) < 9 + ln:
                    break
                f.parse_body(memoryview(rbuf[9:9 + ln]))
                rbuf = rbuf[9 + ln:]
                on_frame(f)

    try:
        # the frames between two waits go out in one write (the proxy reads them together:
        # two streams opened at once are concurrent whatever the timing)
        pending = bytearray(PREFACE + SettingsFrame(0).serialize())
        send = pending.extend
        for st in steps:
            if st[0] == "headers":
                _, sid, hdrs, es = st
                opened.add(sid)
                block = enc.encode(hdrs)
                f = HeadersFrame(sid)
                f.data, block = block[:16384], block[16384:]  # (the default SETTINGS_MAX_FRAME_SIZE)
                f.flags = ({"END_STREAM"} if es else set()) | (set() if block else {"END_HEADERS"})
                out = f.serialize()
                while block:
                    c = ContinuationFrame(sid)
                    c.data, block = block[:16384], block[16384:]
                    c.flags = set() if block else {"END_HEADERS"}
                    out += c.serialize()
                send(out)
            elif st[0] == "data":
                _, sid, data, es = st
                f = DataFrame(sid)
                f.data = data
                f.flags = {"END_STREAM"} if es else set()
                send(f.serialize())
            elif st[0] == "wait":
                _, sid, to = st
                send_now(bytes(pending))
                pending.clear()
                pump(lambda: any(v[0] == "headers" and v[1] == sid for v in view), time.monotonic() + to)
            elif st[0] == "raw":
                opened.add(-1)  # (a raw frame: read until the connection settles)
                send(st[1])
        send_now(bytes(pending))
        send = send_now
        pump(lambda: opened <= ended or any(v[0] == "goaway" for v in view), time.monotonic() + timeout)
        pump(lambda: False, time.monotonic() + settle)
        # frames of each stream in order, streams by id (concurrent streams end in any order),
        # connection frames last; a closed connection is "closed" (whether the kernel sent a FIN
        # or a reset depends on what of the client's writes the proxy had read when it closed)
        view.sort(key=lambda v: v[1] if v[0] not in ("goaway", "frame") else 1 << 32)
        return (view, "open" if state["end"] == "open" else "closed"), state["n"]
    finally:
        s.close()


# ----------------------------------------------------------------------------------- the pair

def _open_to(ports) -> int:
    """TCP connections of this machine to one of ``ports`` on 127.0.0.1 still established or
    waiting for their owner's close (ESTABLISHED, CLOSE_WAIT), from /proc/net/tcp."""
    want = {"0100007F:%04X" % p for p in ports}
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[2] in want and parts[3] in ("01", "08"):
                n += 1
    return n


_REQUEST_START = re.compile(rb"(?m)(?=^[A-Z]+ /\S* HTTP/1\.1\r$)")
_GAUGE_ACTIVE = ("downstream_rq_active", "upstream_rq_active", "downstream_cx_active")


class ModePair:
    """The same bootstrap (``make_bootstrap(h1_port, h2_port)``) in both modes, each with its own
    scripted upstreams. ``ignore`` is a regex of counter names left out of the comparison."""

    def __init__(self, make_bootstrap, h1_script_fn, h2_script_fn, ignore=None):
        self.sides = {}
        self.ignore = re.compile(ignore) if ignore else None
        try:
            for mode, env in MODES.items():
                up1, up2 = ScriptedH1(h1_script_fn), ScriptedH2(h2_script_fn)
                self.sides[mode] = {"up1": up1, "up2": up2}
                bs = with_fresh_ports(make_bootstrap(up1.port, up2.port))
                px = Pyproxy(bs, env=dict(os.environ, **env))
                self.sides[mode]["px"] = px
                # listener stat names carry the address: the same name in both modes
                self.sides[mode]["ports"] = [str(p) for p in px.ports]
        except BaseException:
            self.close()
            raise

    def close(self):
        for side in self.sides.values():
            if "px" in side:
                side["px"].stop()
            side["up1"].close()
            side["up2"].close()

    def port(self, mode: str, listener: int = 0) -> int:
        return self.sides[mode]["px"].ports[listener]

    def _stats(self, mode, kind):
        px = self.sides[mode]["px"]
        _, _, body = request(px.admin_port, "GET", "/stats?format=json&type=%s" % kind, timeout=5)
        out = {}
        ports = self.sides[mode]["ports"]
        for st in json.loads(body).get("stats", []):
            if "name" not in st or not isinstance(st.get("value"), int):
                continue
            name = st["name"]
            if name.startswith(("http.admin.", "listener.admin.", "server.", "runtime.", "cluster_manager.",
                                "listener_manager.", "filesystem.", "main_thread.", "workers.")):
                continue
            for i, p in enumerate(ports):
                name = name.replace("_%s." % p, "_<port%d>." % i)
            out[name] = st["value"]
        return out

    def _settled_counters(self, mode, idle=False):
        """Counters once the case's streams and connections are over (gauges at 0, counters
        unchanged across two reads; ``idle``: no connection to the upstreams either, as the
        kernel sees it: the ``upstream_cx_active`` gauges are not trusted for that), bounded."""
        deadline = time.monotonic() + 3
        last = None
        side = self.sides[mode]
        while True:
            g = self._stats(mode, "Gauges")
            c = self._stats(mode, "Counters")
            busy = any(v for k, v in g.items() if k.endswith(_GAUGE_ACTIVE) and not k.startswith("cluster."))
            busy = busy or any(v for k, v in g.items() if k.endswith(".upstream_rq_active"))
            # (a connection a stuck stream holds is waited for once: the next cases wait for the others)
            busy = busy or idle and _open_to((side["up1"].port, side["up2"].port)) > side.get("stuck", 0)
            if not busy and c == last:
                return c
            if time.monotonic() > deadline:
                if idle:
                    side["stuck"] = _open_to((side["up1"].port, side["up2"].port))
                return c
            last = None if busy else c
            time.sleep(0.02)

    def run(self, client, listener: int = 0, concurrent: bool = False, unread: bool = False) -> dict:
        """``client(port)`` in each mode (both at once, each on its own proxy and upstreams):
        {mode: (client view, h1 upstream bytes, h2 upstream log, counter deltas)}. A client
        returns (view, bytes received): the listener's ``downstream_cx_tx_bytes_total`` delta is
        compared less those bytes (masked values such as x-envoy-upstream-service-time vary in
        length). ``unread``: the proxy closes the connection while the client still writes, so
        how much of it the proxy read (``downstream_cx_rx_bytes_total``) is not compared."""
        seen, errors = {}, []

        def one(mode):
            try:
                side = self.sides[mode]
                # each case starts with no upstream connection: what a case does to the pool
                # does not carry over into the next one's counters
                side["up1"].drop_connections()
                side["up2"].drop_connections()
                before = self._settled_counters(mode, idle=True)
                m1, m2 = side["up1"].mark(), side["up2"].mark()
                view, nbytes = client(self.port(mode, listener))
                after = self._settled_counters(mode)
                delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
                for k in list(delta):
                    if unread and k.endswith("downstream_cx_rx_bytes_total"):
                        del delta[k]
                    elif k.endswith("downstream_cx_tx_bytes_total"):
                        delta[k] -= nbytes
                        if not delta[k]:
                            del delta[k]
                if self.ignore is not None:
                    delta = {k: v for k, v in delta.items() if not self.ignore.search(k)}
                up1, up2 = side["up1"].since(m1), side["up2"].since(m2)
                if concurrent:  # (requests on several connections: arrival order is not compared)
                    up1 = sorted(_REQUEST_START.split(up1))
                    up2 = sorted(up2, key=repr)
                seen[mode] = (view, up1, up2, delta)
            except BaseException as e:  # (re-raised below, in the test's thread)
                errors.append(e)
        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in MODES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if errors:
            raise errors[0]
        assert len(seen) == len(MODES), "a mode did not finish its case in 30 s"
        return seen


def assert_same(seen: dict):
    a, b = seen["compiled"], seen["reference"]
    what = ("client view", "HTTP/1.1 upstream bytes", "HTTP/2 upstream log", "counter deltas")
    for i, name in enumerate(what):
        assert a[i] == b[i], "%s differ:\ncompiled:  %r\nreference: %r" % (name, a[i], b[i])

"""``--concurrency N``: N processes serve the listeners; admin and xDS stay in the first one.

The main process forks N-1 workers before any event loop or gRPC channel exists. Every process
binds the listeners with SO_REUSEPORT, so the kernel spreads connections across them. The main
process runs admin and the xDS client as usual; each update it has validated and applied is
forwarded to the workers over a socketpair, and they apply the same resources through the same
config path (``XdsManager.on_resources``). Workers report their stats every second; the admin API
renders the sum (counters, accumulating gauges, histograms) as Envoy does across its workers.

Messages are length-prefixed pickles of plain tuples (protos travel serialized).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import signal
import socket
import struct
import sys

log = logging.getLogger("pyproxy.main")

_LEN = struct.Struct("!I")
# Stats the main process owns (config updates, server state): a worker applying the same updates
# must not count them again. Data-path stats (listener.*, http.*, cluster.*, tcp.*) are summed.
_MAIN_ONLY = re.compile(r"(server|cluster_manager|listener_manager|control_plane)\.|http\.[^.]+\.rds\.")
MAX_MESSAGE = 256 * 1024 * 1024


class _Channel(asyncio.Protocol):
    """One end of a socketpair carrying framed messages; ``on_message(msg)`` per message."""

    def __init__(self, on_message, on_lost):
        self.on_message = on_message
        self.on_lost = on_lost
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_MESSAGE:
                self.transport.abort()
                return
            if len(buf) < 4 + n:
                return
            body = bytes(buf[4:4 + n])
            del buf[:4 + n]
            try:
                msg = pickle.loads(body)
            except Exception:
                log.error("worker channel: undecodable message dropped")
                continue
            self.on_message(msg)

    def connection_lost(self, exc):
        self.on_lost()

    def send(self, msg) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            self.transport.write(_LEN.pack(len(body)) + body)


def fork_workers(n: int) -> tuple[int, list]:
    """Fork ``n - 1`` workers. Returns ``(index, links)``: index 0 and the links to the workers in the
    main process; the worker's index and ``[its link socket]`` in a worker."""
    links = []
    for i in range(1, n):
        parent, child = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            parent.close()
            for _, s in links:
                s.close()
            _die_with_parent()
            return i, [child]
        child.close()
        links.append((pid, parent))
    return 0, links


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if the main process dies (even by SIGKILL)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- in the main process ----------------------------------------------------------------------------

class WorkerSet:
    """The main process's view of its workers: forwarding config, collecting stats, stopping."""

    def __init__(self, server, links):
        self.server = server
        self.links = links  # [(pid, socket)]
        self.channels = []
        self.stats: dict = {}  # worker index -> last snapshot

    async def start(self):
        loop = self.server.loop
        for i, (pid, sock) in enumerate(self.links, start=1):
            def on_message(msg, i=i):
                if msg[0] == "stats":
                    self.stats[i] = msg[1]

            def on_lost(i=i, pid=pid):
                self.stats.pop(i, None)
                if not self.server.exiting:
                    log.error("worker %d (pid %d) went away", i, pid)

            _, ch = await loop.create_connection(lambda: _Channel(on_message, on_lost), sock=sock)
            self.channels.append(ch)

    def forward(self, type_url, version, added: dict, removed) -> None:
        """An update the main process accepted: the workers apply the same."""
        payload = ("resources", type_url, version,
                   {n: (type(m).DESCRIPTOR.full_name, m.SerializeToString()) for n, m in added.items()},
                   sorted(removed))
        for ch in self.channels:
            ch.send(payload)

    def forward_secrets(self, source: str, version, added: dict) -> None:
        """Secrets the main process accepted from the SDS config source ``source`` (its key)."""
        payload = ("secrets", source, version,
                   {n: m.SerializeToString() for n, m in added.items()})
        for ch in self.channels:
            ch.send(payload)

    def drain(self, inbound_only: bool, graceful: bool) -> None:
        for ch in self.channels:
            ch.send(("drain", inbound_only, graceful))

    def health_check_failed(self, failed: bool) -> None:
        for ch in self.channels:
            ch.send(("hc_failed", failed))

    def secret_ready(self, name: str, source: str = "ads") -> None:
        """An SDS secret's initial fetch ended without it (timeout, rejected): workers stop waiting."""
        for ch in self.channels:
            ch.send(("secret_ready", name, source))

    def merged_store(self, store):
        """The main process's stats plus the workers' last snapshots."""
        if not self.stats:
            return store
        from .stats import Store, Histogram
        m = Store.__new__(Store)
        m.__dict__.update(store.__dict__)
        m.counters = {k: _copy_counter(c) for k, c in store.counters.items()}
        m.gauges = {k: _copy_gauge(g) for k, g in store.gauges.items()}
        m.histograms = {k: _copy_hist(h) for k, h in store.histograms.items()}
        m.tagged = dict(store.tagged)
        for snap in self.stats.values():
            m.tagged.update(snap.get("t") or {})
            for name, v in snap["c"].items():
                m.counter(name).value += v
            for name, (v, acc) in snap["g"].items():
                g = m.gauge(name, acc)
                if acc:
                    g.value += v
                    g.used = True
            for name, (counts, total, count, lo, hi) in snap["h"].items():
                h = m.histogram(name)
                if len(h.counts) != len(counts):
                    continue  # (the same bootstrap gives the same buckets; never mix two layouts)
                other = Histogram(name, buckets=h.buckets)
                other.counts, other.total, other.count = list(counts), total, count
                other.samples_min, other.samples_max = lo, hi
                h.merge_from(other)
        return m

    async def stop(self, timeout: float) -> None:
        for pid, _ in self.links:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        loop = self.server.loop
        deadline = loop.time() + timeout
        pending = {pid for pid, _ in self.links}
        while pending and loop.time() < deadline:
            for pid in list(pending):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.discard(pid)
            if pending:
                await asyncio.sleep(0.05)
        for pid in pending:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for ch in self.channels:
            if ch.transport is not None:
                ch.transport.close()


def _copy_counter(c):
    from .stats import Counter
    n = Counter(c.name)
    n.value = c.value
    return n


def _copy_gauge(g):
    from .stats import Gauge
    n = Gauge(g.name, g.accumulate)
    n.value, n.used = g.value, g.used
    return n


def _copy_hist(h):
    from .stats import Histogram
    n = Histogram(h.name, h.unit, h.buckets)
    n.merge_from(h)
    return n


# -- in a worker ----------------------------------------------------------------------------------

class WorkerLink:
    """A worker's end: applies forwarded resources, reports stats, exits when the main one does."""

    def __init__(self, server, sock, index: int):
        self.server = server
        self.sock = sock
        self.index = index
        self.channel = None
        self.timer = None

    async def start(self):
        loop = self.server.loop
        _, self.channel = await loop.create_connection(
            lambda: _Channel(self._on_message, self._on_lost), sock=self.sock)
        self.timer = loop.call_later(0.2, self._report)

    def _on_message(self, msg):
        kind = msg[0]
        if kind == "resources":
            _, type_url, version, added, removed = msg
            from .config.registry import message_class
            protos = {}
            for name, (full_name, data) in added.items():
                cls = message_class(full_name)
                p = cls()
                p.ParseFromString(data)
                protos[name] = p
            glue = self.server.xds
            try:
                if glue is None and type_url.endswith(".tls.v3.Secret"):  # SDS without ADS
                    from .tls.secrets import STORE
                    STORE.apply_sds(protos, set(removed), version)
                    return
                glue.on_resources(type_url, version, protos, set(removed), False)
            except Exception as e:  # the main process accepted it: this is a bug, keep serving
                log.error("worker %d: applying %s failed: %s", self.index, type_url, e)
        elif kind == "secrets":
            _, source, version, added = msg
            from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
            from .tls.secrets import STORE
            protos = {}
            for name, data in added.items():
                protos[name] = Secret.FromString(data)
            try:
                STORE.apply_sds(protos, (), version, source=source)
            except Exception as e:  # the main process accepted it: this is a bug, keep serving
                log.error("worker %d: applying SDS secrets failed: %s", self.index, e)
        elif kind == "drain":
            self.server.listener_manager.drain_listeners(inbound_only=msg[1], graceful=msg[2])
        elif kind == "hc_failed":
            self.server.set_healthcheck_failed(msg[1])
        elif kind == "secret_ready":
            from .tls.secrets import STORE
            for p in list(STORE.providers.values()):
                if p.name == msg[1] and p.source_key == msg[2]:
                    STORE.mark_ready(p)

    def _on_lost(self):
        if not self.server.exiting:
            log.info("worker %d: main process gone; exiting", self.index)
            self.server.shutdown_gracefully()

    def _report(self):
        self.timer = None
        st = self.server.stats
        own = _MAIN_ONLY.match
        snap = {
            "c": {k: c.value for k, c in st.counters.items() if c.value and not own(k)},
            "g": {k: (g.value, g.accumulate) for k, g in st.gauges.items()
                  if g.used and g.accumulate and not own(k)},
            "h": {k: (h.counts, h.total, h.count, h.samples_min, h.samples_max)
                  for k, h in st.histograms.items() if h.count and not own(k)},
        }
        tagged = st.tagged
        if tagged:  # names with explicit tags (istio_*): the main process renders them as labels
            snap["t"] = {k: tagged[k] for kind in ("c", "g", "h") for k in snap[kind] if k in tagged}
        if self.channel is not None:
            self.channel.send(("stats", snap))
        self.timer = self.server.loop.call_later(1.0, self._report)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

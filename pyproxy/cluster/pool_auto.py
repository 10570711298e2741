"""``auto_config`` upstreams: HTTP/2 or HTTP/1.1, whichever the host picks by ALPN.

Envoy's AutoHttpConfig offers ``h2`` and ``http/1.1`` in the TLS handshake and speaks what the
upstream chose; without TLS there is no ALPN and HTTP/1.1 is used. pyproxy learns the choice once
per host: the first request opens a probe connection (the cluster's TLS transport socket, whose
ALPN list is ``h2, http/1.1`` unless configured), reads the negotiated protocol, closes it, and from
then on the host's requests go to its HTTP/2 or HTTP/1.1 pool. Requests that arrive while the
probe runs wait for it; a failed probe fails them like a failed connection (503 UF), and the next
request probes again. A host that later changes its mind is not followed (the pools would fail
their connections); Envoy decides per connection.
"""

from __future__ import annotations

import asyncio
import logging

from .pool import CONNECT_TIMEOUT, Http1Pool, connect_error, open_socket

log = logging.getLogger("pyproxy.pool")

H2, H1 = "h2", "http/1.1"


class _Waiting:
    """A request waiting for the probe: cancellable like a pool's queued request."""

    __slots__ = ("cb", "cancelled", "inner")

    def __init__(self, cb):
        self.cb = cb
        self.cancelled = False
        self.inner = None  # the sub-pool's own handle once dispatched

    def cancel(self):
        self.cancelled = True
        inner = self.inner
        if inner is not None:
            self.inner = None
            inner.cancel()


class _AlpnProbe(asyncio.Protocol):
    """Only completes the handshake and remembers what ALPN gave."""

    def __init__(self):
        self.alpn = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.alpn = transport.get_extra_info("alpn_protocol")

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        pass


class AutoProtocolPools:
    """One HTTP/1.1 and one HTTP/2 pool for the host, and the protocol ALPN chose (see above)."""

    __slots__ = ("cluster", "host", "loop", "h1", "h2", "proto", "waiting", "probing")

    def __init__(self, cluster, host, loop):
        from .pool_h2 import Http2Pool
        self.cluster = cluster
        self.host = host
        self.loop = loop
        self.h1 = Http1Pool(cluster, host, loop)
        self.h2 = Http2Pool(cluster, host, loop)
        self.proto = None if cluster.transport_for(host).is_tls else H1
        self.waiting: list = []
        self.probing = False

    def new_stream(self, cb):
        p = self.proto
        if p is H2:
            return self.h2.new_stream(cb)
        if p is H1:
            return self.h1.new_stream(cb)
        w = _Waiting(cb)
        self.waiting.append(w)
        if not self.probing:
            self.probing = True
            self.loop.create_task(self._probe())
        return w

    async def _probe(self) -> None:
        c = self.cluster
        probe = _AlpnProbe()
        try:
            from ..transport import connect_upstream
            sock = await open_socket(self.loop, self.host, c.connect_timeout, c.source_address, c.tcp_keepalive)
            await connect_upstream(self.loop, c.transport_for(self.host), sock, probe, c)
        except asyncio.TimeoutError:
            self._probe_failed(CONNECT_TIMEOUT)
            return
        except OSError as e:
            self._probe_failed("delayed connect error: %s" % connect_error(e))
            return
        finally:
            if probe.transport is not None:
                probe.transport.close()
        self.probing = False
        self.proto = H2 if probe.alpn == "h2" else H1
        log.debug("upstream %s: ALPN chose %s", self.host.key, self.proto)
        pool = self.h2 if self.proto is H2 else self.h1
        waiting, self.waiting = self.waiting, []
        for w in waiting:
            if not w.cancelled:
                w.inner = pool.new_stream(w.cb)

    def _probe_failed(self, reason: str) -> None:
        self.probing = False
        c = self.cluster
        c.st_cx_connect_fail.value += 1
        self.host.cx_connect_fail += 1
        if reason == CONNECT_TIMEOUT:
            c.st_cx_connect_timeout.value += 1
        waiting, self.waiting = self.waiting, []
        for w in waiting:
            if not w.cancelled:
                w.cb.on_pool_failure(reason, "UF", self.host)

    def drain(self) -> None:
        self.h1.drain()
        self.h2.drain()

"""Istio's TCP metadata exchange, ``istio.metadata_exchange``
(``envoy.tcp.metadataexchange.config.MetadataExchange``), as istio/proxy's
``source/extensions/filters/network/metadata_exchange`` does it.

Where Istio puts it: first network filter of every inbound chain (the downstream side, here a
listener network filter) and in ``filters`` of every outbound cluster (the upstream side, run by
``tcp_proxy`` on its upstream connection; see ``upstream_factory``).

On the first read or the first write of the connection:
1. if the **negotiated** ALPN is not the configured ``protocol`` (``istio-peer-exchange``), the
   filter sets ``peer_not_found`` in the connection's filter state and passes everything through;
2. otherwise it writes its frame before any application byte:
   ``be32 0x3D230467 | be32 length | Any{google.protobuf.Struct{x-envoy-peer-metadata: <Struct>,
   x-envoy-peer-metadata-id: <node id>}}``;
3. it reads the peer's frame at the head of the inbound bytes (buffered until complete, at most
   64 KiB), strips it, and passes the rest on. A bad magic or an unparsable ``Any`` sets
   ``peer_not_found`` and passes the bytes on untouched; a half-close while waiting aborts the
   exchange (the buffered bytes go on).

The peer lands in the connection's filter state (``downstream_peer``/``downstream_peer_obj`` on the
server side, ``upstream_peer``/``upstream_peer_obj`` on the client side, where Envoy writes the
upstream connection's state that tcp_proxy exposes). ``enable_discovery`` needs Istio's workload
metadata xDS provider, which sidecars run without: as in Envoy without it, nothing more than
``peer_not_found`` is set. Stats: ``metadata_exchange.{alpn_protocol_found,alpn_protocol_not_found,
initial_header_not_found,header_not_found,metadata_added}``.
"""

from __future__ import annotations

from .. import istio_peer as P

from ...http.filter import CONTINUE, STOP
_INIT, _READ, _DONE = 0, 1, 2


class MxStats:
    __slots__ = ("alpn_protocol_found", "alpn_protocol_not_found", "initial_header_not_found",
                 "header_not_found", "metadata_added")

    def __init__(self, store):
        for n in self.__slots__:
            setattr(self, n, store.counter("metadata_exchange." + n))


class MxConfig:
    """Config-time state (both directions): the protocol, our frame, the stats."""

    def __init__(self, cfg, node, store, downstream: bool):
        self.protocol = cfg.protocol
        self.additional = frozenset(cfg.additional_labels)
        self.downstream = downstream
        self.local = P.LocalNode(node, self.additional)
        self.frame = self.local.exchange_frame()
        self.stats = MxStats(store)

    def create(self, conn):
        return MxFilter(conn, self)


class _Exchange:
    """The exchange's state machine; subclasses say how bytes are written and passed on."""

    __slots__ = ("cfg", "state", "buf")

    def _alpn(self) -> str:
        raise NotImplementedError

    def _write_frame(self, frame: bytes) -> None:
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError

    def start(self) -> bool:
        """First read or write: True if the exchange goes on (our frame is written)."""
        cfg = self.cfg
        st = cfg.stats
        if self._alpn() != cfg.protocol:
            st.alpn_protocol_not_found.value += 1
            self._no_peer()
            self.state = _DONE
            return False
        st.alpn_protocol_found.value += 1
        self._write_frame(cfg.frame)
        st.metadata_added.value += 1
        self.state = _READ
        return True

    def _no_peer(self) -> None:
        self._state()[P.NO_PEER] = True

    def read(self, data: bytes, end_stream: bool):
        """Feed inbound bytes while reading the peer's frame: the bytes to pass on, or None
        while more are needed."""
        buf = self.buf = self.buf + data if self.buf else data
        st = self.cfg.stats
        if len(buf) < 8:
            st.initial_header_not_found.value += 1
            if end_stream:
                return self._give_up(buf)
            return None
        if int.from_bytes(buf[:4], "big") != P.MAGIC:
            st.initial_header_not_found.value += 1
            self._no_peer()
            return self._give_up(buf)
        n = int.from_bytes(buf[4:8], "big")
        if n > P.MAX_FRAME_BYTES:
            st.header_not_found.value += 1
            self._no_peer()
            return self._give_up(buf)
        if len(buf) < 8 + n:
            if end_stream:
                return self._give_up(buf)
            return None
        peer, ok = P.decode_frame_body(bytes(buf[8:8 + n]), self.cfg.additional)
        if not ok:
            st.header_not_found.value += 1
            self._no_peer()
            return self._give_up(buf)
        if peer is not None:
            P.set_peer(self._state(), self.cfg.downstream, peer)
        rest = buf[8 + n:]
        self.buf = b""
        self.state = _DONE
        return rest

    def _give_up(self, buf):
        self.buf = b""
        self.state = _DONE
        return buf


class MxFilter(_Exchange):
    """The downstream side: a listener network filter (read path) with a write hook on the
    connection so that our frame precedes the first byte written to the peer. On a TLS chain the
    negotiated ALPN is known only when the handshake is done: bytes written before that (a
    server-first protocol's greeting) are held until then, and the decision is taken at once
    when the handshake completes (the peer may be waiting for our frame)."""

    __slots__ = ("conn", "after", "held")

    def __init__(self, conn, cfg):
        self.conn = conn
        self.cfg = cfg
        self.state = _INIT
        self.buf = b""
        self.after = None
        self.held = None

    def _alpn(self) -> str:
        tls = self.conn.ssl
        return (tls.alpn or "") if tls is not None else ""

    def _write_frame(self, frame: bytes) -> None:
        self.conn.write(frame)

    def _state(self) -> dict:
        return self.conn.filter_state

    def on_new_connection(self):
        conn = self.conn
        conn.write_hook = self._on_write
        chain = conn.chain
        if chain is not None and chain.transport_socket.is_tls and conn.ssl is None:
            conn.on_tls_open = self._decide
        return CONTINUE

    def _on_write(self, data) -> bool:
        """The connection's first write (True: the bytes are held until the handshake is done)."""
        if self.state != _INIT:
            return False
        conn = self.conn
        if conn.on_tls_open is not None:  # TLS not open yet: hold, keep watching writes
            held = self.held
            if held is None:
                held = self.held = []
            held.append(data)
            conn.write_hook = self._on_write
            return True
        self.start()
        return False

    def _decide(self) -> None:
        conn = self.conn
        conn.write_hook = None
        conn.on_tls_open = None
        if self.state == _INIT:
            self.start()
        held, self.held = self.held, None
        if held and not conn.closed:
            conn.write(b"".join(held))

    def on_data(self, data, end_stream):
        state = self.state
        if state == _DONE:
            return CONTINUE
        if state == _INIT:
            self._decide()
            if self.state == _DONE:
                return CONTINUE
        out = self.read(data, end_stream)
        if out is None:
            return STOP
        if out or end_stream:
            self._forward(out, end_stream)
        return STOP

    def _forward(self, data, end_stream) -> None:
        """Pass bytes to the filters after this one (as the connection's iteration would)."""
        fl = self.conn.filters
        after = self.after
        if after is None:
            after = self.after = fl[fl.index(self) + 1:]
        for f in after:
            if f.on_data(data, end_stream) == STOP:
                return

    def on_close(self, exc):
        self.conn.write_hook = None
        self.conn.on_tls_open = None
        self.held = None


class MxUpstream(_Exchange):
    """The upstream side, on one tcp_proxy upstream connection (``attach``): the first write to
    the upstream is preceded by our frame; the upstream's first bytes are the peer's frame."""

    __slots__ = ("conn", "up", "real")

    def __init__(self, cfg, conn, up):
        self.cfg = cfg
        self.conn = conn  # the downstream connection: its filter state gets upstream_peer
        self.up = up
        self.real = up.transport
        self.state = _INIT
        self.buf = b""

    def _alpn(self) -> str:
        return getattr(self.real, "alpn", "") or ""

    def _write_frame(self, frame: bytes) -> None:
        self.real.write(frame)

    def _state(self) -> dict:
        return self.conn.filter_state

    # -- the write side (tcp_proxy writes through ``up.transport``) ----------------------------------
    def write(self, data) -> None:
        up = self.up
        up.transport = self.real  # from now on tcp_proxy writes to the real transport directly
        if self.state == _INIT:
            self.start()
        self.real.write(data)

    def __getattr__(self, name):  # every other transport call goes to the real transport
        return getattr(self.real, name)

    # -- the read side (``up.rx_hook``) -----------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        if self.state == _INIT:
            self.up.transport = self.real
            if not self.start():
                self.up.rx_hook = None
                return data
        out = self.read(data, False)
        if out is None:
            return b""
        self.up.rx_hook = None
        return out

    def eof(self) -> bytes:
        """The upstream half-closed while we waited: the exchange is aborted, buffered bytes go on."""
        self.up.rx_hook = None
        if self.state == _INIT:
            self.up.transport = self.real
            self.start()
            return b""
        return self._give_up(self.buf) if self.state == _READ else b""


class MxUpstreamConfig(MxConfig):
    """A cluster's ``filters`` entry; tcp_proxy calls ``attach`` on each new upstream connection."""

    is_upstream_exchange = True

    def attach(self, conn, up) -> None:
        mx = MxUpstream(self, conn, up)
        up.transport = mx
        up.rx_hook = mx


def factory(cfg, ctx, terminal=False):
    node = getattr(getattr(ctx, "server", None), "node", None)
    return MxConfig(cfg, node, ctx.stats, downstream=True)


def upstream_factory(cfg, manager):
    """For a cluster's ``filters`` (``manager``: the cluster manager, which knows the node)."""
    return MxUpstreamConfig(cfg, getattr(manager, "node", None), manager.stats, downstream=False)

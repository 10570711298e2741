"""Transport sockets: the layer under every connection.

A factory is compiled once per filter chain or cluster from its ``transport_socket``:

- ``raw_buffer`` (plaintext): ``is_tls`` is False and the asyncio transport is used as is — no
  wrapper, no extra call per chunk.
- TLS (``pyproxy.tls``, imported only when configured): downstream, ``wrap_downstream(conn, chain)``
  puts a TLS server layer between the connection and its transport once the filter chain is chosen;
  upstream, ``await connect(loop, sock, protocol, timeout, scope)`` completes the TLS handshake
  before ``protocol.connection_made`` runs. Either way the layer presents the asyncio transport
  interface, so listeners, filters, codecs and pools never know whether bytes are encrypted.
"""

from __future__ import annotations


class RawBufferFactory:
    """Plaintext: nothing to wrap."""

    name = "raw_buffer"
    is_tls = False
    alpn: tuple = ()

    def wrap(self, transport):
        return transport


RAW_BUFFER = RawBufferFactory()


def raw_buffer_factory(config, ctx=None):
    return RAW_BUFFER


def build_transport_socket(ts_proto, what: str):
    """The factory for an ``envoy.config.core.v3.TransportSocket`` (None/unset = raw_buffer)."""
    from .config.registry import REGISTRY
    if ts_proto is None or (not ts_proto.name and not ts_proto.HasField("typed_config")):
        return RAW_BUFFER
    tc = ts_proto.typed_config if ts_proto.HasField("typed_config") else None
    factory, cfg = REGISTRY.resolve("transport_socket", ts_proto.name, tc, what=what)
    if factory is None:
        return RAW_BUFFER
    return factory(cfg)


async def connect_upstream(loop, factory, sock, protocol, cluster) -> None:
    """Start ``protocol`` on the connected ``sock`` through the cluster's transport socket factory
    (plaintext: at once; TLS: after the handshake, bounded by the cluster's connect timeout).
    Raises OSError (a failed handshake included) or asyncio.TimeoutError."""
    if factory.is_tls:
        await factory.connect(loop, sock, protocol, cluster.connect_timeout, cluster.scope)
    else:
        await loop.create_connection(lambda: protocol, sock=sock)


def upstream_tls_sans(encoder):
    """``(peer URI SAN, local URI SAN, TLS layer)`` of the TLS upstream connection under a request
    encoder (an HTTP/1.1 connection or an HTTP/2 stream), or None over plaintext (istio.stats
    principals; the layer's facts serve the %UPSTREAM_TLS_*% / %UPSTREAM_PEER_*% log operators)."""
    t = getattr(encoder, "transport", None)
    if t is None:
        t = getattr(getattr(encoder, "conn", None), "transport", None)
    tls = getattr(t, "tls", None)
    if tls is None:
        return None
    return getattr(t, "peer_uri_san", "") or "", getattr(tls, "local_uri_san", "") or "", t

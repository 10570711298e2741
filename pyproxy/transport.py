"""Transport sockets: the layer under every connection.

Today only ``raw_buffer`` exists (plaintext: the asyncio transport is used as is). TLS transport
sockets (downstream and upstream, SDS-fed) plug in here: a factory returns an object that wraps a
connection's transport, so listeners and pools never know whether bytes are encrypted.
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

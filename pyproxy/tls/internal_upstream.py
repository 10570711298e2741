"""``envoy.transport_sockets.internal_upstream``: connections to Envoy *internal listeners*.

Istio uses it for HBONE (connect_originate / waypoint tunnels). Internal listeners are not
supported, so the config is validated (the wrapped transport socket included) and any attempt to
use it on a connection is refused with a logged reason (a connect failure), never sent in plaintext.
"""

from __future__ import annotations

import logging

from ..config import ConfigError

log = logging.getLogger("pyproxy.config")


class InternalUpstreamFactory:
    name = "internal_upstream"
    is_tls = True  # not plaintext: pools must ask it (and it refuses)
    alpn: tuple = ()

    def __init__(self, inner, passthrough: tuple):
        self.inner = inner
        self.passthrough_metadata = passthrough
        self.unsupported = 0
        self.notes = ["internal upstream connections (HBONE) are not supported; the cluster's "
                      "connections are refused"]

    @property
    def unsupported_reason(self) -> str:
        return "internal_upstream transport socket: internal listeners are not supported"

    def wrap(self, transport):
        from .context import TlsNotImplemented
        self.unsupported += 1
        if self.unsupported == 1:
            log.warning(self.unsupported_reason)
        raise TlsNotImplemented(self.unsupported_reason)

    def wrap_downstream(self, conn, chain=None):
        return self.wrap(None)

    async def connect(self, loop, sock, protocol, timeout, scope):
        sock.close()
        self.wrap(None)


def factory(cfg, ctx=None) -> InternalUpstreamFactory:
    from ..transport import build_transport_socket
    inner = None
    if cfg.HasField("transport_socket"):
        try:
            inner = build_transport_socket(cfg.transport_socket, "transport_socket")
        except ConfigError as e:
            raise e.within(field="InternalUpstreamTransport.transport_socket")
    md = []
    for i, m in enumerate(cfg.passthrough_metadata):
        if not m.name:
            raise ConfigError("metadata name must not be empty",
                              field="InternalUpstreamTransport.passthrough_metadata[%d].name" % i)
        md.append((m.kind.WhichOneof("kind") or "", m.name))
    return InternalUpstreamFactory(inner, tuple(md))

"""TLS transport sockets (``envoy.transport_sockets.tls``) and their secrets.

- ``context``: compiles ``DownstreamTlsContext`` / ``UpstreamTlsContext`` into a ``TlsSocketFactory``;
  ``parse``: the parts of those protos (certificates, keys, validation contexts, data sources) and
  SDS ``Secret`` resources, parsed and checked.
- ``ssl_context``: one ``ssl.SSLContext`` per distinct configuration (cached), plus the peer checks
  stdlib cannot make during the handshake (SAN matchers, certificate pins).
- ``socket``: TLS as a layer over an existing plaintext connection (``ssl.SSLObject`` over memory
  BIOs) presenting the asyncio transport interface upward; the server side for listeners (the
  ClientHello the listener filters already read is fed to it). ``client``: the client side for
  cluster pools. ``ssl_stats``: the ``ssl.*`` counters and how failed handshakes are counted.
- ``secrets``: the named-secret store (static bootstrap secrets and SDS).

Nothing here is imported unless a configuration uses TLS.
"""

from .context import (TlsNotImplemented, TlsNotReady, TlsSocketFactory, downstream_factory,
                      upstream_factory, validate_secret)

__all__ = ["TlsNotImplemented", "TlsNotReady", "TlsSocketFactory", "downstream_factory",
           "upstream_factory", "validate_secret"]

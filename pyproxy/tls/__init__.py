"""TLS transport sockets (``envoy.transport_sockets.tls``) and their secrets.

Today this package *compiles and validates* TLS configuration — ``DownstreamTlsContext``,
``UpstreamTlsContext``, SDS secret references, validation contexts, ALPN, TLS parameters, and SDS
``Secret`` resources — so Istio's listeners and clusters are accepted. Using a TLS transport socket
on a live connection is not implemented yet (mTLS is the next issue): ``wrap()`` counts the
attempt, logs why, and raises ``TlsNotImplemented`` so the caller closes the connection instead of
sending plaintext where TLS was configured.
"""

from .context import (TlsNotImplemented, TlsSocketFactory, downstream_factory, upstream_factory,
                      validate_secret)

__all__ = ["TlsNotImplemented", "TlsSocketFactory", "downstream_factory", "upstream_factory",
           "validate_secret"]

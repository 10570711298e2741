"""Istio's legacy ``istio_authn`` network filter (``io.istio.network.authn.Config``, removed from
Istio in October 2023 but present in older sidecar configs).

Once the connection's TLS handshake is done (the first bytes reach the filter chain), it puts the
peer's identity in the connection's filter state: ``io.istio.peer_principal`` = the peer
certificate's first ``spiffe://`` URI SAN, and ``io.istio.local_principal`` = the local
certificate's. On plaintext, or without a client certificate, nothing is set (RBAC on those keys
then denies, as with Envoy). ``shared`` (sharing with the upstream connection) is not modelled:
the values serve this connection's filters, RBAC and access logs.
"""

from __future__ import annotations

from ...http.filter import CONTINUE
PEER = "io.istio.peer_principal"
LOCAL = "io.istio.local_principal"


class AuthnFactory:
    def __init__(self, cfg, ctx):
        self.notes = []
        shared = getattr(cfg, "shared", False)
        if not isinstance(shared, bool):  # a Struct (TypedStruct without the proto)
            f = cfg.fields.get("shared") if hasattr(cfg, "fields") else None
            shared = bool(f.bool_value) if f is not None else False
        if shared:
            self.notes.append("shared: the principals stay on the downstream connection")

    def create(self, conn):
        return AuthnFilter(conn)


class AuthnFilter:
    __slots__ = ("conn", "done")

    def __init__(self, conn):
        self.conn = conn
        self.done = False

    def on_new_connection(self):
        return CONTINUE

    def on_data(self, data, end_stream):
        if not self.done:
            self.done = True
            c = self.conn
            tls = c.ssl
            if tls is not None:
                peer = tls.peer_uri_san
                local = tls.tls.local_uri_san
                for key, v in ((PEER, peer), (LOCAL, local)):
                    if v and v.startswith("spiffe://"):
                        c.filter_state[key] = v
                        c.stream_info.filter_state[key] = v
        return CONTINUE

    def on_close(self, exc):
        pass


def factory(cfg, ctx, terminal=False):
    from ...config import ConfigError
    if terminal:
        raise ConfigError("istio_authn must not be the last network filter")
    return AuthnFactory(cfg, ctx)

"""Envoy's ``<listener or cluster>.ssl.*`` counters for TLS connections, and how a failed handshake
is named and counted (shared by the server side, ``tls.socket``, and the client side, ``tls.client``).

As Envoy: a failed certificate verification counts ``ssl.fail_verify_*`` only, any other failure
``ssl.connection_error``; a handshake timeout has its own listener counter. A finished handshake
counts ``ssl.handshake``, ``ssl.versions.<v>`` and ``ssl.ciphers.<c>``.
"""

from __future__ import annotations

import ssl

TIMEOUT = "timeout"
_VerifyError = ssl.SSLCertVerificationError


class SslStats:
    """The ``ssl.*`` counters of one listener or cluster: the ones every handshake touches held,
    the others made when first counted and then kept by name (no string building per handshake)."""

    __slots__ = ("counter", "handshake", "connection_error", "no_certificate", "named")

    def __init__(self, counter):
        self.counter = counter
        self.handshake = counter("ssl.handshake")
        self.connection_error = counter("ssl.connection_error")
        self.no_certificate = counter("ssl.no_certificate")
        self.named = {}

    def inc(self, name: str) -> None:
        self.counter(name).inc()

    def handshake_done(self, version: str, cipher: str) -> None:
        """One finished handshake: ``ssl.handshake``, ``ssl.versions.<version>``, ``ssl.ciphers.<cipher>``."""
        self.handshake.inc()
        named = self.named
        pair = named.get((version, cipher))
        if pair is None:
            pair = named[(version, cipher)] = (
                self.counter("ssl.versions." + version) if version else None,
                self.counter("ssl.ciphers." + cipher) if cipher else None)
        v, c = pair
        if v is not None:
            v.inc()
        if c is not None:
            c.inc()


def listener_stats(conn) -> SslStats:
    return listener_ssl_stats(conn.listener, conn.manager.stats)


def listener_ssl_stats(cl, store) -> SslStats:
    """The listener's ``listener.<prefix>.ssl.*``, owned by the listener (freed with its other
    stats when it is removed, unless another listener made them too), cached on its config. Made
    when the listener becomes active (as Envoy's TLS context makes them), so that a new version of
    a listener holds them before the old one drains."""
    s = getattr(cl, "ssl_stats", None)
    if s is None:
        prefix = "listener.%s." % cl.stat_prefix
        owner = getattr(cl, "stats_owner", None)
        if owner is not None:
            s = SslStats(store.owned_scope(prefix, owner).counter)
        else:
            s = SslStats(lambda n: store.counter(prefix + n))
        try:
            cl.ssl_stats = s
        except AttributeError:
            pass
    return s


def cluster_stats(scope) -> SslStats | None:
    """The cluster's ``cluster.<name>.ssl.*`` through its owned scope (nothing cached here: a
    removed cluster's stats go with it, and one re-added under the same name counts afresh)."""
    if scope is None:
        return None
    return SslStats(scope.counter)


def error_text(e) -> str:
    """Envoy's text for a TLS error (``TLS_error:|...:TLS_error_end``)."""
    if isinstance(e, _VerifyError):
        return "TLS_error:|%s:CERTIFICATE_VERIFY_FAILED:TLS_error_end" % (e.verify_message or "verify failed")
    lib = getattr(e, "library", None) or "SSL routines"
    reason = getattr(e, "reason", None) or str(e)
    return "TLS_error:|%s:%s:TLS_error_end" % (lib, reason)


def count_failure(st, kind: str, timeout_stat: str) -> None:
    """Count a failed handshake of ``kind`` ("" for a plain connection error, ``TIMEOUT``, or an
    ``ssl.*`` counter's last part such as ``fail_verify_san``)."""
    if kind == TIMEOUT:
        if timeout_stat:
            st.counter(timeout_stat).inc()
    elif kind:
        st.inc("ssl." + kind)
    else:
        st.connection_error.inc()


def failure_kind(e) -> str:
    if isinstance(e, _VerifyError):
        return "fail_verify_error"
    if getattr(e, "reason", None) == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "fail_verify_no_cert"
    return ""

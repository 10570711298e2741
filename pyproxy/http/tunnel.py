"""Upgrades and CONNECT as Envoy's connection manager and router treat them (the stream's side).

- ``upgrade_refused``: the HCM's check when it builds the filter chain (its ``upgrade_configs``, a
  route's own entry winning); an accepted upgrade counts in ``downstream_cx_upgrades_total`` and
  holds the ``downstream_cx_upgrades_active`` gauge until the stream ends (``upgrade_ended``).
- ``handshake_failed``: an HTTP/1.1 upstream that answers a websocket upgrade with a 2xx/3xx other
  than 101 did not switch; as Envoy's upstream codec filter, the client gets the upstream's head
  as a local reply without its body (``content-length: 0``, details
  ``websocket_handshake_unsuccessful``) and the connection closes.
- The end of a tunnel: the client's FIN on an HTTP/1.1 tunnel is its disconnect (Envoy's HTTP
  connections do not half-close): flag ``DC``, details ``downstream_remote_disconnect``; the
  upstream's close (``http1_client.py``) is a ``connection termination`` reset: ``UC``.
"""

from __future__ import annotations

from ..cluster.pool import UpstreamConnection


def upgrade_refused(s) -> bool:
    """Envoy's check when it builds the filter chain: an upgrade (or CONNECT) needs its type in
    the HCM's upgrade_configs (a route's own upgrade_configs may turn it on or off); otherwise
    403 before any HTTP filter runs."""
    route = s.route
    if route is None or route.kind != 0:
        return False  # no route or not a cluster route: the router answers (404, redirect...)
    kind = s.upgrade_type or "connect"
    rc = route.upgrade_configs.get(kind) if route.upgrade_configs else None  # (the route's word wins)
    st = s.hc.stats
    if (rc[0] if rc is not None else s.cfg.upgrades.get(kind)):
        st.cx_upgrades_total.value += 1
        st.cx_upgrades_active.inc()
        s.tunneling = True  # (until upgrade_ended)
        return False
    st.rq_ws_on_non_ws_route.value += 1
    s.send_local_reply(403, "", "upgrade_failed")
    if s.hc.is_h2:
        s.hc.codec.go_away()  # Envoy closes the HTTP/2 connection too
    return True


def upgrade_ended(s) -> None:
    """The stream of an accepted upgrade ends (ActiveStream._finish)."""
    s.tunneling = False
    s.hc.stats.cx_upgrades_active.dec()


_UNSUCCESSFUL = "websocket_handshake_unsuccessful"


def handshake_failed(router, up, headers, status: int) -> bool:
    """An upgrade's response (``Router.on_upstream_headers``): True when it was a websocket
    handshake an HTTP/1.1 upstream did not accept with a 101 and the client got the local reply
    (Envoy: a 2xx or 3xx; an error status is relayed as it is, the connection closing after it)."""
    s = router.s
    if s.upgrade_type != "websocket" or not 200 <= status < 400 or type(up.encoder) is not UpstreamConnection:
        return False
    # the upstream's headers, without its framing (the local reply has no body)
    keep = {}
    for k, v in headers._h:
        if k[0] != ":" and k not in ("content-length", "transfer-encoding", "connection", "upgrade", "keep-alive"):
            keep[k] = v
    up.abandon()  # (its request never ended: the upstream connection is not reused)
    router.upstream = None
    s.send_local_reply(status, "", _UNSUCCESSFUL, headers=keep, close=True)
    return True

"""Upgrades and CONNECT as Envoy's connection manager treats them (the stream's side; the
router's side is ``filters/http/router_tunnel.py``).

``upgrade_refused``: the HCM's check when it builds the filter chain (its ``upgrade_configs``, a
route's own entry winning); an accepted upgrade counts in ``downstream_cx_upgrades_total`` and
holds the ``downstream_cx_upgrades_active`` gauge until the stream ends (the router's
``upgrade_ended``: an accepted upgrade always runs the filter chain).

The end of a tunnel: the client's FIN on an HTTP/1.1 tunnel is its disconnect (Envoy's HTTP
connections do not half-close, ``http1.py on_eof``): flag ``DC``, details
``downstream_remote_disconnect`` (``ActiveStream.on_reset``); the upstream's close
(``http1_client.py``) is a ``connection termination`` reset: ``UC``.
"""

from __future__ import annotations


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
        # (until upgrade_ended; 2: a CONNECT the route terminates, its bytes go to a TCP upstream)
        s.tunneling = 2 if rc is not None and rc[1] and kind == "connect" else True
        return False
    st.rq_ws_on_non_ws_route.value += 1
    s.send_local_reply(403, "", "upgrade_failed")
    if s.hc.is_h2:
        s.hc.codec.go_away()  # Envoy closes the HTTP/2 connection too
    return True

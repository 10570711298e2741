"""The router's side of upgrades and CONNECT (the stream's side: ``http/tunnel.py``).

- ``handshake_failed``: an HTTP/1.1 upstream that answers a websocket upgrade with a 2xx/3xx other
  than 101 did not switch; as Envoy's upstream codec filter, the client gets the upstream's head
  as a local reply without its body (``content-length: 0``, details
  ``websocket_handshake_unsuccessful``, no ``upstream_rq_<code>``) and the connection closes; an
  error status is relayed as it is (the downstream codec closes after it).
- ``upgrade_ended``: the stream of an accepted upgrade ends (``Router.on_destroy``).
"""

from __future__ import annotations

from ...cluster.pool import UpstreamConnection


def upgrade_ended(s) -> None:
    """The stream of an accepted upgrade ends (``Router.on_destroy``)."""
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

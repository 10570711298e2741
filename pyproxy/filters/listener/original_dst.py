"""``envoy.filters.listener.original_dst``: restore the destination an iptables REDIRECT rewrote.

The connection's local address becomes the pre-NAT destination (``SO_ORIGINAL_DST`` for IPv4,
``IP6T_SO_ORIGINAL_DST`` for IPv6, the IPv4 option again for v4-mapped peers on a dual-stack
socket). Filter-chain matching then sees the original ``IP:port`` (virtualInbound matches chains on
``destination_port``). Handing the connection to another listener is the listener's business and
happens only when it says ``use_original_dst: true`` (virtualOutbound); see
``listeners/connection.py``.
"""

from __future__ import annotations

from ...http.filter import CONTINUE


class OriginalDstFilter:
    __slots__ = ()
    needs_data = False
    is_original_dst = True

    def on_accept(self, conn) -> int:
        conn.restore_original_dst()
        return CONTINUE


_INSTANCE = OriginalDstFilter()


def factory(cfg, ctx):
    return _INSTANCE

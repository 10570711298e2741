"""Envoy's filter-chain selection (FilterChainMatch precedence).

Criteria are applied in Envoy's order; at each step the most specific chains that match survive, and
chains that leave the criterion unset are the fallback when nothing specific matches:
destination_port, destination IP (prefix_ranges, longest prefix), server_names (exact, then longest
wildcard), transport_protocol, application_protocols, direct_source_prefix_ranges, source_type,
source_prefix_ranges, source_ports.
"""

from __future__ import annotations

import ipaddress

from envoy.config.listener.v3 import listener_components_pb2

_ST = listener_components_pb2.FilterChainMatch.ConnectionSourceType
SOURCE_ANY, SOURCE_LOCAL, SOURCE_EXTERNAL = _ST.ANY, _ST.SAME_IP_OR_LOOPBACK, _ST.EXTERNAL


class ConnInfo:
    """What filter-chain matching reads from a connection."""

    __slots__ = ("dst_ip", "dst_port", "src_ip", "src_port", "direct_src_ip", "server_name",
                 "transport_protocol", "application_protocols")

    def __init__(self, dst_ip="", dst_port=0, src_ip="", src_port=0, server_name="",
                 transport_protocol="raw_buffer", application_protocols=()):
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.src_ip = src_ip
        self.src_port = src_port
        self.direct_src_ip = src_ip
        self.server_name = server_name
        self.transport_protocol = transport_protocol
        self.application_protocols = application_protocols


def _ip(s):
    try:
        return ipaddress.ip_address(s.split("%")[0]) if s else None
    except ValueError:
        return None


def _longest_prefix(chains, attr, ip_str):
    """The chains whose ``attr`` ranges hold the address ``ip_str`` most specifically, else those
    without ranges. The address is parsed only when some chain has ranges (not per connection
    on the common listener whose chains name none)."""
    if not any(getattr(c.match, attr) for c in chains):
        return chains
    ip = _ip(ip_str)
    best_len = -1
    best = []
    empty = []
    for c in chains:
        nets = getattr(c.match, attr)
        if not nets:
            empty.append(c)
            continue
        if ip is None:
            continue
        l = -1
        for n in nets:
            if ip.version == n.version and ip in n and n.prefixlen > l:
                l = n.prefixlen
        if l < 0:
            continue
        if l > best_len:
            best_len, best = l, [c]
        elif l == best_len:
            best.append(c)
    return best or empty


def select_chain(chains, info: ConnInfo):
    """The chain for ``info``, or None (then the default chain applies)."""
    cand = chains
    # 1. destination port
    exact = [c for c in cand if c.match.destination_port == info.dst_port]
    cand = exact or [c for c in cand if c.match.destination_port is None]
    if not cand:
        return None
    # 2. destination IP
    cand = _longest_prefix(cand, "prefix_ranges", info.dst_ip)
    if not cand:
        return None
    # 3. server names
    sn = (info.server_name or "").lower()
    if sn:
        exact = [c for c in cand if sn in c.match.server_names]
        if exact:
            cand = exact
        else:
            best, best_len = [], -1
            for c in cand:
                for pat in c.match.server_names:
                    if pat.startswith("*.") and sn.endswith(pat[1:]) and len(pat) > best_len:
                        best_len, best = len(pat), [c]
                    elif pat.startswith("*.") and sn.endswith(pat[1:]) and len(pat) == best_len and c not in best:
                        best.append(c)
            cand = best or [c for c in cand if not c.match.server_names]
    else:
        cand = [c for c in cand if not c.match.server_names]
    if not cand:
        return None
    # 4. transport protocol
    exact = [c for c in cand if c.match.transport_protocol and c.match.transport_protocol == info.transport_protocol]
    cand = exact or [c for c in cand if not c.match.transport_protocol]
    if not cand:
        return None
    # 5. application protocols
    # the connection's protocols in its own (client preference) order: the first one some chain
    # names wins; chains that name none are the fallback
    exact = None
    for a in info.application_protocols:
        exact = [c for c in cand if a in c.match.application_protocols]
        if exact:
            break
    cand = exact or [c for c in cand if not c.match.application_protocols]
    if not cand:
        return None
    # 6. direct source IP
    cand = _longest_prefix(cand, "direct_source_prefix_ranges", info.direct_src_ip)
    if not cand:
        return None
    # 7. source type
    if any(c.match.source_type != SOURCE_ANY for c in cand):
        src = _ip(info.src_ip)
        local = src is not None and (src.is_loopback or info.src_ip == info.dst_ip)
        want = SOURCE_LOCAL if local else SOURCE_EXTERNAL
        exact = [c for c in cand if c.match.source_type == want]
        cand = exact or [c for c in cand if c.match.source_type == SOURCE_ANY]
        if not cand:
            return None
    # 8. source IP
    cand = _longest_prefix(cand, "source_prefix_ranges", info.src_ip)
    if not cand:
        return None
    # 9. source port
    exact = [c for c in cand if info.src_port in c.match.source_ports]
    cand = exact or [c for c in cand if not c.match.source_ports]
    return cand[0] if cand else None

"""Per-request (or per-connection) facts that access logs, header formatters and stats read.

One ``StreamInfo`` is made per HTTP stream (or TCP connection). Attribute names follow Envoy's
StreamInfo; the ``%COMMAND%`` formatter maps its commands onto them.
"""

from __future__ import annotations

import time

# Envoy's response flags (short form), for reference by filters and the formatter.
RESPONSE_FLAGS = (
    "UH", "UF", "UO", "NR", "URX", "NC", "DT", "UT", "LR", "UR", "UC", "DI", "FI", "RL", "UAEX",
    "RLSE", "IH", "SI", "DPE", "UPE", "UMSDR", "OM", "DF", "DO", "DC", "LH", "UDO",
)


class ResponseFlags(list):
    """The response flags in the order they were set, each once: Envoy prints them in that order
    (``URX,UF``: the retry state gives up, then the failure is recorded). A ``set``-like ``add``."""

    __slots__ = ()

    def add(self, flag: str) -> None:
        if flag not in self:
            self.append(flag)

    def discard(self, flag: str) -> None:
        if flag in self:
            self.remove(flag)

    def isdisjoint(self, other) -> bool:
        return not any(f in other for f in self)


class StreamInfo:
    """Attributes default at class level, so a request only sets what it knows (cheap to create)."""

    start_time = 0.0
    start_monotonic = 0.0
    end_monotonic = None
    protocol = "HTTP/1.1"
    downstream_remote_address = ""
    downstream_direct_remote_address = ""
    downstream_local_address = ""
    requested_server_name = ""
    upstream_host = ""
    upstream_cluster = ""
    upstream_local_address = ""
    upstream_transport_failure_reason = ""
    upstream_protocol = ""
    response_code = 0
    response_code_details = ""
    bytes_received = 0
    bytes_sent = 0
    route_name = ""
    request_id = ""
    first_upstream_rx_byte = None
    last_upstream_rx_byte = None
    first_upstream_tx_byte = None
    last_upstream_tx_byte = None
    last_downstream_rx_byte = None
    last_downstream_tx_byte = None
    connection_id = 0
    connection_termination_details = ""
    attempt_count = 0
    virtual_cluster_name = ""
    downstream_tls_version = ""
    downstream_ssl = None  # the TLS layer (pyproxy/tls/socket.py ServerTls) of a TLS connection
    downstream_peer_uri_san = ""
    downstream_local_uri_san = ""
    upstream_peer_uri_san = ""   # first URI SAN of the upstream's certificate (tcp_proxy over TLS)
    upstream_local_uri_san = ""  # first URI SAN of our certificate on that connection
    upstream_ssl = None  # the upstream connection's TLS layer (tls/socket.py TlsLayer) when over TLS
    health_check = False
    traceable = False

    def __init__(self, downstream_remote_address: str = "", downstream_local_address: str = "",
                 protocol: str = "HTTP/1.1", connection_id: int = 0):
        self.start_time = time.time()
        self.start_monotonic = time.monotonic()
        self.protocol = protocol
        self.downstream_remote_address = downstream_remote_address
        self.downstream_direct_remote_address = downstream_remote_address
        self.downstream_local_address = downstream_local_address
        self.connection_id = connection_id
        self.response_flags = ResponseFlags()
        self.dynamic_metadata: dict = {}
        self.filter_state: dict = {}

    def duration_ms(self) -> int:
        end = self.end_monotonic if self.end_monotonic is not None else time.monotonic()
        return int((end - self.start_monotonic) * 1000)

    def flags_string(self) -> str:
        if not self.response_flags:
            return "-"
        return ",".join(self.response_flags)

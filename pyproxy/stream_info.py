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


class StreamInfo:
    __slots__ = (
        "start_time", "start_monotonic", "end_monotonic", "protocol",
        "downstream_remote_address", "downstream_direct_remote_address", "downstream_local_address",
        "requested_server_name", "upstream_host", "upstream_cluster", "upstream_local_address",
        "upstream_transport_failure_reason", "response_code", "response_code_details",
        "response_flags", "bytes_received", "bytes_sent", "route_name", "request_id",
        "first_upstream_rx_byte", "last_upstream_rx_byte", "first_upstream_tx_byte",
        "last_downstream_tx_byte", "connection_id", "connection_termination_details",
        "dynamic_metadata", "filter_state", "attempt_count", "virtual_cluster_name",
        "downstream_tls_version", "downstream_peer_uri_san", "downstream_local_uri_san",
    )

    def __init__(self, downstream_remote_address: str = "", downstream_local_address: str = "",
                 protocol: str = "HTTP/1.1", connection_id: int = 0):
        self.start_time = time.time()
        self.start_monotonic = time.monotonic()
        self.end_monotonic = None
        self.protocol = protocol
        self.downstream_remote_address = downstream_remote_address
        self.downstream_direct_remote_address = downstream_remote_address
        self.downstream_local_address = downstream_local_address
        self.requested_server_name = ""
        self.upstream_host = ""
        self.upstream_cluster = ""
        self.upstream_local_address = ""
        self.upstream_transport_failure_reason = ""
        self.response_code = 0
        self.response_code_details = ""
        self.response_flags: set = set()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.route_name = ""
        self.request_id = ""
        self.first_upstream_rx_byte = None
        self.last_upstream_rx_byte = None
        self.first_upstream_tx_byte = None
        self.last_downstream_tx_byte = None
        self.connection_id = connection_id
        self.connection_termination_details = ""
        self.dynamic_metadata: dict = {}
        self.filter_state: dict = {}
        self.attempt_count = 0
        self.virtual_cluster_name = ""
        self.downstream_tls_version = ""
        self.downstream_peer_uri_san = ""
        self.downstream_local_uri_san = ""

    def duration_ms(self) -> int:
        end = self.end_monotonic if self.end_monotonic is not None else time.monotonic()
        return int((end - self.start_monotonic) * 1000)

    def flags_string(self) -> str:
        if not self.response_flags:
            return "-"
        return ",".join(f for f in RESPONSE_FLAGS if f in self.response_flags)

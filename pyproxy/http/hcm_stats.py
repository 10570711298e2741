"""The HTTP connection manager's stats (``http.<stat_prefix>.*``), declared together: one
``HcmStats`` per HCM config, moved by its connections and streams."""

from __future__ import annotations


class HcmStats:
    __slots__ = (
        "cx_total", "cx_active", "cx_http1_total", "cx_http1_active", "cx_http2_total",
        "cx_http2_active", "cx_destroy", "cx_protocol_error", "cx_idle_timeout", "cx_drain_close",
        "cx_max_requests_reached", "cx_max_duration_reached", "cx_destroy_local", "cx_destroy_remote",
        "cx_destroy_active_rq", "cx_destroy_local_active_rq", "cx_destroy_remote_active_rq",
        "rq_total", "rq_active", "rq_http1_total", "rq_http2_total", "rq_class", "rq_completed",
        "rq_time", "rq_rx_reset", "rq_tx_reset", "rq_timeout", "rq_idle_timeout", "no_route",
        "rq_direct_response", "rq_redirect", "rq_too_large", "rq_ws_on_non_ws_route",
        "rq_header_timeout", "rq_overload_close", "rq_max_duration_reached", "no_cluster",
        "cx_rx_bytes", "cx_tx_bytes", "rq_response_before_rq_complete", "router_rq_total",
        "cx_upgrades_total", "cx_upgrades_active", "prefix",
    )

    def __init__(self, store, prefix):
        s = store.scope("http.%s." % prefix)
        self.prefix = prefix
        self.cx_total = s.counter("downstream_cx_total")
        self.cx_active = s.gauge("downstream_cx_active")
        self.cx_http1_total = s.counter("downstream_cx_http1_total")
        self.cx_http1_active = s.gauge("downstream_cx_http1_active")
        self.cx_http2_total = s.counter("downstream_cx_http2_total")
        self.cx_http2_active = s.gauge("downstream_cx_http2_active")
        self.cx_destroy = s.counter("downstream_cx_destroy")
        self.cx_destroy_local = s.counter("downstream_cx_destroy_local")
        self.cx_destroy_remote = s.counter("downstream_cx_destroy_remote")
        self.cx_destroy_active_rq = s.counter("downstream_cx_destroy_active_rq")
        self.cx_destroy_local_active_rq = s.counter("downstream_cx_destroy_local_active_rq")
        self.cx_destroy_remote_active_rq = s.counter("downstream_cx_destroy_remote_active_rq")
        self.cx_protocol_error = s.counter("downstream_cx_protocol_error")
        self.cx_idle_timeout = s.counter("downstream_cx_idle_timeout")
        self.cx_drain_close = s.counter("downstream_cx_drain_close")
        self.cx_max_requests_reached = s.counter("downstream_cx_max_requests_reached")
        self.cx_max_duration_reached = s.counter("downstream_cx_max_duration_reached")
        self.cx_upgrades_total = s.counter("downstream_cx_upgrades_total")  # (upgrades/CONNECTs accepted)
        self.cx_upgrades_active = s.gauge("downstream_cx_upgrades_active")  # (http/tunnel.py)
        self.cx_rx_bytes = s.counter("downstream_cx_rx_bytes_total")
        self.cx_tx_bytes = s.counter("downstream_cx_tx_bytes_total")
        self.rq_total = s.counter("downstream_rq_total")
        self.rq_active = s.gauge("downstream_rq_active")
        self.rq_http1_total = s.counter("downstream_rq_http1_total")
        self.rq_http2_total = s.counter("downstream_rq_http2_total")
        # (charged once per request: this HCM config's parts of http.<prefix>.* and, once its
        # listener is bound, of listener.<address>.http.<prefix>.*, as Envoy charges both)
        self.rq_class = [None] + [s.sum_part("downstream_rq_%dxx" % c) for c in range(1, 6)]
        self.rq_completed = s.sum_part("downstream_rq_completed")
        self.rq_time = s.histogram("downstream_rq_time")
        self.rq_rx_reset = s.counter("downstream_rq_rx_reset")
        self.rq_tx_reset = s.counter("downstream_rq_tx_reset")
        self.rq_timeout = s.counter("downstream_rq_timeout")
        self.rq_idle_timeout = s.counter("downstream_rq_idle_timeout")
        self.rq_header_timeout = s.counter("downstream_rq_header_timeout")
        self.rq_too_large = s.counter("downstream_rq_too_large")
        self.rq_ws_on_non_ws_route = s.counter("downstream_rq_ws_on_non_ws_route")
        self.rq_overload_close = s.counter("downstream_rq_overload_close")
        self.rq_max_duration_reached = s.counter("downstream_rq_max_duration_reached")
        self.rq_response_before_rq_complete = s.counter("downstream_rq_response_before_rq_complete")
        self.no_route = s.counter("no_route")
        self.no_cluster = s.counter("no_cluster")
        self.rq_direct_response = s.counter("rq_direct_response")
        self.rq_redirect = s.counter("rq_redirect")
        self.router_rq_total = s.counter("rq_total")  # (the router's: requests that reached it)

    def bind_listener(self, scope) -> None:
        """Envoy's per-listener HCM stats, ``listener.<address>.http.<prefix>.downstream_rq_<N>xx``
        and ``downstream_rq_completed`` (``scope``: the listener's ``listener.<address>.``, known
        once it is bound): sums of the same parts, so a request is still charged once."""
        s = scope.scope("http.%s." % self.prefix)
        for c in range(1, 6):
            s.sum_counter("downstream_rq_%dxx" % c).add(self.rq_class[c])
        s.sum_counter("downstream_rq_completed").add(self.rq_completed)

    def take_connection_bytes(self, conn) -> None:
        """``conn``'s byte counts go to ``http.<prefix>.downstream_cx_rx/tx_bytes_total`` from now
        on (Envoy's HCM sets them as the connection's stats), with what it counted before."""
        for mine, slot in ((self.cx_rx_bytes, "rx_ctr"), (self.cx_tx_bytes, "tx_ctr")):
            mine.value += getattr(conn, slot).value
            setattr(conn, slot, mine)

"""Pieces of the HTTP stream (``stream.ActiveStream``) that are not the filter manager: the guard
around its event entry points, and its ``StreamInfo`` (made at once, or lazily on first use for
a stream whose request the compiled path serves)."""

from __future__ import annotations

import time

from .grpc_timeout import grpc_timeout_ms, to_grpc_timeout
from ..stream_info import ResponseFlags as _ResponseFlags, StreamInfo


def _guarded(method):
    """A stream event entry point: a filter's exception answers 500 (or resets the stream once the
    response started) instead of escaping into the connection and killing it.

    The wrapper has the method's own arity (no ``*args`` packing on every event)."""
    code = method.__code__
    n = code.co_argcount - 1
    if n == 0:
        def entry(self):
            try:
                method(self)
            except Exception as e:
                self._filter_failed(e)
    elif n == 1:
        def entry(self, a):
            try:
                method(self, a)
            except Exception as e:
                self._filter_failed(e)
    elif n == 2:
        def entry(self, a, b):
            try:
                method(self, a, b)
            except Exception as e:
                self._filter_failed(e)
    elif n == 3 and code.co_varnames[3] == "from_filter":
        def entry(self, a, b, from_filter=-1):
            try:
                method(self, a, b, from_filter)
            except Exception as e:
                self._filter_failed(e)
    else:
        def entry(self, *args, **kwargs):
            try:
                method(self, *args, **kwargs)
            except Exception as e:
                self._filter_failed(e)
    entry.__name__ = method.__name__
    entry.__qualname__ = method.__qualname__
    entry.__doc__ = method.__doc__
    return entry


class LazyInfo:
    """``stream_info`` made on first use by the stream's ``_make_stream_info`` (a non-data
    descriptor: once made, or set, it is a plain instance attribute and costs nothing)."""

    def __get__(self, s, owner=None):
        if s is None:
            return self
        d = s.__dict__
        si = d["stream_info"] = s._make_stream_info()
        d["has_info"] = True  # (FirstAttempt.has_info)
        return si


_StreamInfo = StreamInfo
_new_si = StreamInfo.__new__
_time = time.time
_monotonic = time.monotonic


def new_stream_info(conn, version: str, start_time: float, start_monotonic: float):
    """A stream's StreamInfo: the connection's facts copied, the rest defaults at class level."""
    si = _new_si(_StreamInfo)
    csi = conn.stream_info
    si.start_time = start_time
    si.start_monotonic = start_monotonic
    si.protocol = version
    si.downstream_remote_address = csi.downstream_remote_address
    si.downstream_direct_remote_address = csi.downstream_direct_remote_address
    si.downstream_local_address = csi.downstream_local_address
    si.requested_server_name = csi.requested_server_name
    si.response_flags = _ResponseFlags()
    si.connection_id = csi.connection_id
    si.filter_state = conn.filter_state
    si.dynamic_metadata = {}
    tls = csi.downstream_ssl
    if tls is not None:
        si.downstream_ssl = tls
        si.downstream_tls_version = csi.downstream_tls_version
        si.downstream_peer_uri_san = csi.downstream_peer_uri_san
        si.downstream_local_uri_san = csi.downstream_local_uri_san
    return si


def make_stream_info(s):
    """The StreamInfo of a stream made without one (``conn_manager.HttpConnection.on_request``): what
    ``ActiveStream.__init__`` and the stream have recorded by now (its ``_make_stream_info``)."""
    si = new_stream_info(s.hc.conn, s.version, _time() - (_monotonic() - s.t0), s.t0)
    si.request_id = s.rid  # (the request preparation's, as decode_headers records it)
    if s.remote is not None:
        si.downstream_remote_address = s.remote
    r = s.route
    si.route_name = r.name if r is not None else ""
    c = s.cluster
    if c is not None:
        si.upstream_cluster = c.name
        si.attempt_count = 1
    if s.host is not None:
        si.upstream_host = s.host.key
    si.upstream_local_address = s.up_local
    code = si.response_code = s.status or s.code
    if not s.status:
        si.bytes_sent = s.tx_body  # (what encode_data counted; the byte relay's stay in tx_body)
    if code:
        # (a response head went out before anything needed a StreamInfo: the upstream's; a
        # local reply makes the StreamInfo before its head)
        si.response_code_details = "via_upstream"
    return si


def route_duration(stream, route, headers) -> None:
    """The stream's duration timer once its route is known, as Envoy's ``refreshDurationTimeout``:
    on a route whose ``max_stream_duration`` sets ``grpc_timeout_header_max``, a gRPC request's
    ``grpc-timeout`` (capped by it unless 0, less ``grpc_timeout_header_offset``); otherwise the
    route's ``max_stream_duration`` (0: none), else the HCM's. The stream may last that long from
    its start (a timer for what is left). On such a route (``RouteEntry.new_timeouts``) a gRPC
    request's ``grpc-timeout`` then says the time the stream has; when the route turns off a
    running HCM timer, the header goes. A non-gRPC request's ``grpc-timeout`` arms the timer too,
    as Envoy's (and goes upstream as it came); but a bodiless one the connection manager serves
    inline (no stream, no timers) is not read.)"""
    grpc = route.new_timeouts and (headers.get("content-type") or "").startswith("application/grpc")
    ms = None
    if route.grpc_timeout_header_max is not None and route.new_timeouts:
        ms = grpc_timeout_ms(headers.get("grpc-timeout"))
        if ms is not None:
            cap = route.grpc_timeout_header_max
            if cap and ms > cap:
                ms = cap
            off = route.grpc_timeout_header_offset
            if ms and off is not None:
                ms = ms - off if off < ms else 0
    if ms is None:
        msd = route.max_stream_duration
        if msd is None:
            msd = stream.cfg.max_stream_duration
            if not route.new_timeouts:
                return  # (the HCM's timer, armed as the stream began, runs on)
        if msd:
            ms = int(round(msd * 1000))
    t = stream.max_duration_timer
    if t is not None:
        t.cancel()
        stream.max_duration_timer = None
    if ms is None:
        if t is not None and grpc:
            headers.remove("grpc-timeout")
        return
    if grpc:
        headers.set("grpc-timeout", to_grpc_timeout(ms))
    left = ms / 1000.0 - (time.monotonic() - stream.t0)
    stream.max_duration_timer = stream.cfg.loop.call_later(max(0.0, left), stream._max_duration)


def charge_started(stream, si, st) -> None:
    """A stream reset after its response head went out (``st``: its HcmStats): Envoy counted the
    request's ``downstream_rq_<N>xx`` and ``downstream_rq_completed`` as the head was encoded."""
    code = si.response_code if si is not None else stream.status or stream.code
    c = st.rq_class[code // 100] if 0 < code < 600 else None
    if c is not None:
        c.value += 1
    st.rq_completed.value += 1

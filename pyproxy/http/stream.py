"""One request/response exchange (``ActiveStream``), whatever the codec: the one stream class.

What a request needs is decided by the HCM's chain plan and the route's plan: a request whose
filters have nothing to do runs the router's first attempt in the stream itself
(``first_attempt.py``, relaying the response head as bytes on HTTP/1.1 when the plans allow,
``h1_relay.py``); any other request runs the configured filter chain.

Codec -> stream: ``decode_headers/data/trailers``, ``on_reset``.
Stream -> codec: ``encode_headers/data/trailers`` (after the encoder filters).
Filters iterate first-to-last on decode and last-to-first on encode; a ``STOP`` holds the event
until the filter calls ``continue_decoding()`` / ``continue_encoding()``. Local replies are in
``local_reply.py``; the connection (``HttpConnection``) in ``conn_manager.py``.
"""

from __future__ import annotations

import logging
import time

from .decorator import decorate, decorate_response
from .filter import STOP
from .first_attempt import FirstAttempt, chain_is_inert, pick_cluster
from .headers import Headers
from .local_reply import _date, send_local_reply
from .request_prep import prepare
from . import tunnel
from .stream_parts import LazyInfo, _guarded, charge_started, make_stream_info, new_stream_info, route_duration

log = logging.getLogger("pyproxy.http")


class ActiveStream(FirstAttempt):
    """One request/response exchange: through the HTTP filter chain, or, when the plans show the
    filters inert, with the router's first attempt run by the stream (``FirstAttempt``).

    The attributes every request sets are slots (see ``FirstAttempt``); the others default at
    class level and live in the instance's ``__dict__`` once set.
    """

    __slots__ = ("hc", "cfg", "encoder", "t0", "request_headers", "route", "remote_complete", "rid",
                 "last_activity", "router", "deadline", "response_started", "local_complete", "done",
                 "__dict__")
    response_headers = None
    response_trailers = None
    route_table = None
    filters = None
    decoder_stopped_at = -1
    decoder_buffer = None
    encoder_stopped_at = -1
    encoder_buffer = None
    filter_state = None
    request_timer = None
    max_duration_timer = None
    failing = False
    caller_op = None  # on ingress, the caller's x-envoy-decorator-operation (http/decorator.py)
    prepped = None  # the request preparation's result when HttpConnection.on_request ran it before the stream existed
    upgrade_type = None  # a genuine upgrade's type (request_prep), else None
    tunneling = False  # an accepted upgrade or CONNECT (tunnel.py), until the stream ends
    ctl = None  # an internal request's router control headers (request_prep's Prepared.ctl), else None
    version = "HTTP/1.1"
    remote = None         # the downstream address derived from the headers (request_prep)
    # made at once by __init__; lazily (``_make_stream_info``) for a stream made by HttpConnection.on_request
    stream_info = LazyInfo()
    code = 0              # the response status, sent before a lazily made StreamInfo existed

    def __init__(self, hc, encoder, version):
        self.hc = hc
        cfg = self.cfg = hc.cfg
        self.encoder = encoder
        # the slots (``deadline``: the loop time at which ``on_deadline()`` runs, HttpConnection.arm_deadline)
        self.request_headers = self.route = self.router = self.deadline = None
        self.cluster = self.choice = self.host = self.encoder_up = self.pending = self.up_head = None
        self.remote_complete = self.response_started = self.local_complete = self.done = False
        self.counted = self.up_done = self.plain = self.quiet = self.raw_head = False
        self.status = self.tx_head = self.tx_body = self.start = 0
        self.rid = self.up_local = ""
        self.t0 = t0 = _monotonic()
        self.stream_info = new_stream_info(hc.conn, version, _time(), t0)
        self.has_info = True  # (FirstAttempt.has_info)
        self.version = version
        st = hc.stats
        st.rq_total.value += 1
        g = st.rq_active
        g.value += 1
        g.used = True
        if hc.is_h2:
            st.rq_http2_total.value += 1
        else:
            st.rq_http1_total.value += 1
        self.last_activity = hc.last_activity  # the stream idle timeout is checked by the connection's tick
        if cfg.request_timeout:
            self.request_timer = cfg.loop.call_later(cfg.request_timeout, self._request_timeout)
        if cfg.max_stream_duration:
            self.max_duration_timer = cfg.loop.call_later(cfg.max_stream_duration, self._max_duration)

    _make_stream_info = make_stream_info  # (stream_parts.py)

    # -- properties filters use ---------------------------------------------------------------------
    @property
    def connection(self):
        return self.hc.conn

    @property
    def cluster_manager(self):
        return self.cfg.cluster_manager

    # -- decode path (codec -> filters) ---------------------------------------------------------------
    @_guarded
    def decode_headers(self, headers: Headers, end_stream: bool) -> None:
        self.request_headers = headers
        self.remote_complete = end_stream
        cfg = self.cfg
        si = self.stream_info
        table = cfg.routes.table
        # the connection manager's request preparation (request_prep.py), once per request
        p = self.prepped
        if p is None:
            r = prepare(cfg.prep, self.hc.conn, headers, table, self.quiet)
        else:
            r = p
        if type(r) is str:
            si.request_id = r
        elif self._prepared(r):
            return
        # route lookup (filters may clear it and cause a new lookup)
        self.route_table = table
        if p is not None and p.route is not None and p.table is table:
            route = self.route = p.route  # (on_request found it before leaving the request here)
        elif table is None:
            route = self.route = None
        else:
            h = headers._h  # (the codecs' order: :method, :scheme, :path, :authority first)
            if len(h) > 3 and h[2][0] == ":path" and h[3][0] == ":authority" and h[0][1] != "CONNECT":
                route = self.route = table.find_for_path(headers, h[3][1], h[2][1],
                                                         _urand(32) if table.needs_random else 0)
            else:  # (refresh_route)
                route = self.route = table.find(headers, si, _urand(32))
        si.route_name = route.name if route is not None else ""
        if route is not None and (route.duration or cfg.max_stream_duration):
            route_duration(self, route, headers)  # (the route's replaces the HCM's)
        d = cfg.prep.decorate
        if d:
            self.caller_op = decorate(d, route, headers, self.quiet)
        if self.request_timer is not None and end_stream:
            self.request_timer.cancel()
            self.request_timer = None
        if self.upgrade_type is not None or headers._h[0][1] == "CONNECT":
            # (the HTTP/2 codec turns an extended CONNECT's :protocol into an upgrade header)
            if self.upgrade_refused():
                return
        elif end_stream and cfg.fast_router and route is not None and route.fast and self.ctl is None and not (
                (cfg.chain_checks or route.grpc_router) and not chain_is_inert(cfg, route, headers)):
            # the plans show every filter inert: the stream runs the router's first attempt
            picked = pick_cluster(route, headers, cfg.cluster_manager)
            if picked is not None:
                self.begin_first_attempt(route, headers, picked[2], picked[1])
                return
        self.filters = [f.create(self) for f in cfg.decoder_factories]
        self._run_decode_headers(0, headers, end_stream)

    def _prepared(self, r) -> bool:
        """The request preparation's ``Prepared`` result (``decode_headers``; ``prepped`` when
        ``HttpConnection.on_request`` ran it). Returns True when a local reply was sent instead."""
        si = self.stream_info
        si.request_id = r.rid
        if r.remote is not None:
            si.downstream_remote_address = r.remote
        self.upgrade_type, self.ctl = r.upgrade, r.ctl  # (ctl: for the router, not the stream's first attempt)
        rep = r.reply
        if rep is not None:
            status, details, location = rep
            self.send_local_reply(status, "", details, headers={"location": location} if location else None,
                                  close=status == 400 and details == "unexpected_underscore")
            return True
        return False

    upgrade_refused = tunnel.upgrade_refused  # (the HCM's upgrade check, tunnel.py)

    def refresh_route(self):
        table = self.cfg.routes.table
        self.route_table = table
        if table is None:
            self.route = None
        else:
            self.route = table.find(self.request_headers, self.stream_info, _rand32())
        r = self.route
        self.stream_info.route_name = r.name if r is not None else ""

    def clear_route_cache(self):
        self.refresh_route()

    def _run_decode_headers(self, start: int, headers, end_stream) -> None:
        filters = self.filters
        n = len(filters)
        i = start
        while i < n:
            if filters[i].decode_headers(headers, end_stream) == STOP:
                self.decoder_stopped_at = i
                return
            if self.done or self.response_started and self.local_complete:
                return
            i += 1

    @_guarded
    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if self.done:
            return
        if end_stream:
            self.remote_complete = True
            if self.request_timer is not None:
                self.request_timer.cancel()
                self.request_timer = None
        self.last_activity = self.cfg.loop.time()
        self.stream_info.bytes_received += len(data)
        filters = self.filters
        if filters is None:
            # no filter: the stream runs the request's first attempt (its request had no body,
            # so these are the downstream side of a tunnel, after an upstream 101 the request did
            # not ask for): passed upstream as the router passes them (``Router.decode_data``)
            if self.router is self and not self.up_done:
                enc = self.encoder_up
                if enc is not None:
                    enc.encode_data(data, end_stream)
            return
        # Envoy: a filter that stopped the headers still receives the body; filters after it get
        # it when it continues
        stopped = self.decoder_stopped_at
        n = len(filters)
        limit = stopped + 1 if stopped >= 0 else n
        if limit == 1:
            filters[0].decode_data(data, end_stream)
        else:
            for i in range(limit):
                if filters[i].decode_data(data, end_stream) == STOP:
                    return  # that filter holds the data and passes it on when it continues
        if limit < n:
            buf = self.decoder_buffer
            if buf is None:
                buf = self.decoder_buffer = []
            buf.append(("d", data, end_stream))

    @_guarded
    def decode_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        self.remote_complete = True
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None
        filters = self.filters
        if filters is None:
            return
        stopped = self.decoder_stopped_at
        n = len(filters)
        limit = stopped + 1 if stopped >= 0 else n
        for i in range(limit):
            if filters[i].decode_trailers(trailers) == STOP:
                return
        if limit < n:
            buf = self.decoder_buffer
            if buf is None:
                buf = self.decoder_buffer = []
            buf.append(("t", trailers))

    @_guarded
    def continue_decoding(self) -> None:
        """A filter that returned STOP lets the request go on to the filters after it."""
        i = self.decoder_stopped_at
        if i < 0 or self.done:
            return
        self.decoder_stopped_at = -1
        buffered = self.decoder_buffer
        self.decoder_buffer = None
        end_now = self.remote_complete and not buffered
        self._run_decode_headers(i + 1, self.request_headers, end_now)
        if not buffered:
            return
        filters = self.filters
        for ev in buffered:
            if self.done:
                return
            # deliver to the filters after the one that continued (up to a new stop)
            stop = self.decoder_stopped_at
            last = stop + 1 if stop >= 0 else len(filters)
            for f in filters[i + 1:last]:
                r = f.decode_data(ev[1], ev[2]) if ev[0] == "d" else f.decode_trailers(ev[1])
                if r == STOP:
                    break

    def on_reset(self, reason: str) -> None:
        """The downstream went away (or reset the stream)."""
        if self.done:
            return
        self.hc.stats.rq_rx_reset.value += 1
        si = self.stream_info
        si.response_flags.add("DR" if reason == "http2.remote_reset" else "DC")  # (RST_STREAM: DR)
        if not si.response_code_details or self.tunneling:  # (a tunnel's end names the disconnect)
            si.response_code_details = reason
        r = self.router
        if r is not None:
            r.on_downstream_reset()
        self._finish(reset=True)

    # -- encode path (router/filters -> codec) --------------------------------------------------------
    @_guarded
    def encode_headers(self, headers: Headers, end_stream: bool, from_filter: int = -1) -> None:
        if self.done:
            return
        filters = self.filters
        if filters and len(filters) > 1 and not self.failing:
            start = (len(filters) - 2) if from_filter < 0 else from_filter - 1
            for i in range(start, -1, -1):
                f = filters[i]
                if f.encode_headers(headers, end_stream) == STOP:
                    self.encoder_stopped_at = i
                    self.response_headers = headers
                    return
        self._send_headers(headers, end_stream)

    def _send_headers(self, headers: Headers, end_stream: bool):
        cfg = self.cfg
        if self.handed is not None:
            # the router filter took the request over from the stream's first attempt: the
            # telemetry hooks see its answer
            for hook in cfg.response_hooks:
                hook.on_response(self, headers)
        self.response_started = True
        self.response_headers = headers
        if "date" not in headers:
            headers.add("date", _date())  # Envoy keeps the upstream's date, adds one if absent
        st = cfg.server_transform
        if st == 0:
            headers.set("server", cfg.server_name)
        elif st == 1 and "server" not in headers:
            headers.set("server", cfg.server_name)
        if cfg.via:
            via = headers.get("via")
            headers.set("via", cfg.via if not via else via + ", " + cfg.via)
        if cfg.always_set_request_id_in_response and self.stream_info.request_id:
            headers.set("x-request-id", self.stream_info.request_id)
        d = cfg.prep.decorate
        if d:
            decorate_response(d, self.route, self.caller_op, headers)
        first = headers._h[0] if headers._h else None
        status = first[1] if first is not None and first[0] == ":status" else headers.get(":status")
        try:
            code = int(status)
        except (TypeError, ValueError):
            code = 0
        si = self.stream_info if self.has_info else None  # (None: made lazily, from ``code``)
        if si is not None:
            si.response_code = code
        else:
            self.code = code
        if self.hc.draining and not self.hc.is_h2:
            self.encoder.drain_close = True
        if end_stream:
            self.local_complete = True
        self.encoder.encode_headers(headers, end_stream)
        if end_stream:
            self._finish()

    @_guarded
    def encode_data(self, data: bytes, end_stream: bool, from_filter: int = -1) -> None:
        if self.done:
            return
        if self.encoder_stopped_at >= 0 and not self.failing:
            buf = self.encoder_buffer
            if buf is None:
                buf = self.encoder_buffer = []
            buf.append(("d", data, end_stream))
            return
        filters = self.filters
        if filters and len(filters) > 1 and not self.failing:
            start = (len(filters) - 2) if from_filter < 0 else from_filter - 1
            for i in range(start, -1, -1):
                if filters[i].encode_data(data, end_stream) == STOP:
                    return
        si = self.stream_info if self.has_info else None
        if si is not None:
            si.bytes_sent += len(data)
        else:
            self.tx_body += len(data)  # (counted as the byte relay counts, for the telemetry hooks)
        self.last_activity = self.cfg.loop.time()
        if end_stream:
            self.local_complete = True
        self.encoder.encode_data(data, end_stream)
        if end_stream:
            self._finish()

    @_guarded
    def encode_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        if self.encoder_stopped_at >= 0:
            buf = self.encoder_buffer
            if buf is None:
                buf = self.encoder_buffer = []
            buf.append(("t", trailers))
            return
        filters = self.filters
        if filters and len(filters) > 1:
            for i in range(len(filters) - 2, -1, -1):
                if filters[i].encode_trailers(trailers) == STOP:
                    return
        self.response_trailers = trailers
        self.local_complete = True
        self.encoder.encode_trailers(trailers)
        self._finish()

    @_guarded
    def continue_encoding(self) -> None:
        i = self.encoder_stopped_at
        if i < 0 or self.done:
            return
        self.encoder_stopped_at = -1
        headers = self.response_headers
        buffered = self.encoder_buffer
        self.encoder_buffer = None
        end_now = not buffered and self.local_complete
        filters = self.filters
        for j in range(i - 1, -1, -1):
            if filters[j].encode_headers(headers, end_now) == STOP:
                self.encoder_stopped_at = j
                self.encoder_buffer = buffered
                return
        self._send_headers(headers, end_now and not buffered)
        for ev in buffered or ():
            if ev[0] == "d":
                self.encode_data(ev[1], ev[2], from_filter=i)
            else:
                self.encode_trailers(ev[1])

    def _filter_failed(self, exc) -> None:
        if self.done:
            return
        log.error("HTTP filter chain failed on %s: %s", self.request_headers.get(":path", "?")
                  if self.request_headers is not None else "?", exc, exc_info=exc)
        if self.failing:
            self.hc.conn.close(flush=False)  # failed again while answering: give up on the connection
            return
        self.failing = True  # from here the reply bypasses the filters
        r = self.router
        if r is not None:
            try:
                r.on_downstream_reset()
            except Exception:
                pass
        if self.response_started:
            self.reset_stream("filter_error")
        else:
            self.send_local_reply(500, "internal error in an HTTP filter", "filter_chain_error")

    # a local reply (http/local_reply.py)
    send_local_reply = send_local_reply

    def reset_stream(self, reason: str, over: bool = False) -> None:
        if self.done:
            return
        self.hc.stats.rq_tx_reset.value += 1
        self.stream_info.response_code_details = reason if over else (self.stream_info.response_code_details or reason)
        enc = self.encoder
        self._finish(reset=True)
        enc.reset_stream(reason) if hasattr(enc, "reset_stream") else self.hc.conn.close(flush=True)  # (as Envoy)

    # -- flow control ----------------------------------------------------------------------------------
    def read_disable(self, disable: bool) -> None:
        """Stop/start reading the request from downstream (upstream write buffer is full)."""
        enc = self.encoder
        if enc is None:
            return  # the stream is over
        rd = getattr(enc, "stream_read_disable", None)
        if rd is not None:
            rd(self, disable)
        else:
            self.hc.conn.read_disable(disable)

    # -- timers --------------------------------------------------------------------------------------
    def on_deadline(self):
        """The stream's deadline passed (HttpConnection.arm_deadline): the router's route timeout."""
        r = self.router
        if r is self:
            self._attempt_deadline()
        elif r is not None:
            r.on_deadline()

    def on_idle_timeout(self):
        """No activity for stream_idle_timeout (called by the connection's tick)."""
        if self.done:
            return
        self.hc.stats.rq_idle_timeout.value += 1
        self.stream_info.response_flags.add("SI")
        r = self.router
        if r is not None:
            r.on_downstream_reset()
        if self.response_started:
            self.reset_stream("stream_idle_timeout", True)  # (the details, as Envoy's)
        else:
            # (Envoy: 408 and close while the request is incomplete; 504 once it is, keep-alive)
            done = self.remote_complete
            self.send_local_reply(504 if done else 408, "stream timeout", "stream_idle_timeout", close=not done)

    def _request_timeout(self):
        self.request_timer = None
        if self.done or self.remote_complete:
            return
        self.hc.stats.rq_timeout.value += 1
        r = self.router
        if r is not None:
            r.on_downstream_reset()
        self.send_local_reply(408, "request timeout", "request_overall_timeout", close=True)

    def _max_duration(self):
        self.max_duration_timer = None
        if self.done:
            return
        self.hc.stats.rq_max_duration_reached.value += 1
        r = self.router
        if r is not None:
            r.on_downstream_reset()
        if self.response_started:
            self.reset_stream("max_duration_timeout")
        else:
            done = self.remote_complete  # (as on_idle_timeout)
            self.send_local_reply(504 if done else 408, "downstream duration timeout", "max_duration_timeout",
                                  close=not done, grpc_status=4)  # (DEADLINE_EXCEEDED)

    # -- completion ------------------------------------------------------------------------------------
    def _finish(self, reset: bool = False) -> None:
        if self.done:
            return
        mine = self.router is self or self.handed is not None  # (the stream ran the first attempt)
        if mine and not self.up_done:
            self._abandon()  # the downstream is gone (or the stream failed) mid-exchange
        self.done = True
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None
        if self.max_duration_timer is not None:
            self.max_duration_timer.cancel()
            self.max_duration_timer = None
        hc = self.hc
        st = hc.stats
        st.rq_active.value -= 1  # (a gauge __init__ raised: no need to mark it used)
        si = self.stream_info if self.has_info else None  # (None: made lazily, if ever, by what reads it)
        now = _monotonic()
        if si is not None:
            si.end_monotonic = now
        if not reset:
            code = si.response_code if si is not None else self.status or self.code
            c = st.rq_class[code // 100] if 0 < code < 600 else None
            if c is not None:
                c.value += 1
            st.rq_completed.value += 1
            st.rq_time.record((now - self.t0) * 1000.0)  # (t0: the StreamInfo's start_monotonic)
            if not self.remote_complete:
                st.rq_response_before_rq_complete.value += 1
        elif self.response_started:  # (Envoy charged these as the response head went out)
            charge_started(self, si, st)
        filters = self.filters
        if filters:
            for f in filters:
                f.on_destroy()
        logs = self.cfg.access_logs
        if logs:
            si = self.stream_info
            for al in logs:
                al.log(si, self.request_headers, self.response_headers, self.response_trailers)
        hc.stream_done(self)
        # break the stream <-> filter and stream <-> codec-stream references now (an HTTP/2
        # stream points back at us), so memory returns by reference counting, without a GC pass
        self.filters = None
        self.router = None
        self.encoder = None
        if mine:
            for obs in self.cfg.observers:  # telemetry filters' completion work (ChainPlan)
                obs(self)


_time = time.time
_monotonic = time.monotonic
_urand = __import__("random").getrandbits


def _rand32() -> int:
    return _urand(32)

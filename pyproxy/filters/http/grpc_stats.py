"""``envoy.filters.http.grpc_stats``: per-cluster gRPC call statistics, as Envoy emits them.

For gRPC requests (``content-type: application/grpc*``) routed to a cluster, counters under the
cluster's scope:
- ``cluster.<c>.grpc.<service>.<method>.{success,failure,total,<grpc-status>}`` for methods that get
  their own stats (``stats_for_all_methods: true``, or listed in
  ``individual_method_stats_allowlist``), else the same names without ``<service>.<method>``;
- ``...request_message_count`` / ``response_message_count`` (gRPC length-prefixed messages seen)
  when ``emit_filter_state`` is set; the counts also go to the stream's filter state under
  ``envoy.filters.http.grpc_stats``;
- ``...upstream_rq_time`` (histogram, ms) with ``enable_upstream_stats``.

The status comes from ``grpc-status`` in the trailers (or in the headers: of a trailers-only
response, or of one whose body ends without trailers, as Envoy charges it); a call that ends without one counts as neither success nor failure, as in Envoy.

Per-status counters exist only for the 17 codes gRPC defines (``"0"`` .. ``"16"``): Envoy makes a
counter for whatever string an upstream sends, which lets an upstream grow the stats without bound;
here any other value counts in ``total`` and ``failure`` only.
"""

from __future__ import annotations

import time

from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2  # noqa: F401 (registers the type)

from ...http.filter import CONTINUE

FILTER_STATE_KEY = "envoy.filters.http.grpc_stats"
KNOWN_STATUSES = frozenset(str(i) for i in range(17))  # OK .. UNAUTHENTICATED


class _Counters:
    __slots__ = ("scope", "prefix", "success", "failure", "total", "req_msgs", "resp_msgs", "by_status",
                 "rq_time")

    def __init__(self, scope, prefix):
        self.scope = scope
        self.prefix = prefix
        self.success = scope.counter(prefix + "success")
        self.failure = scope.counter(prefix + "failure")
        self.total = scope.counter(prefix + "total")
        self.req_msgs = self.resp_msgs = None  # made when a message is first counted, as Envoy
        self.by_status = {}
        self.rq_time = None

    def status(self, code: str):
        c = self.by_status.get(code)
        if c is None:
            c = self.by_status[code] = self.scope.counter(self.prefix + code)
        return c


class GrpcStatsConfig:
    inert_unless_grpc = True  # the HCM's chain plan: a non-gRPC request is not this filter's

    def __init__(self, cfg, ctx):
        self.cm = ctx.cluster_manager
        self.emit_filter_state = cfg.emit_filter_state
        self.enable_upstream_stats = cfg.enable_upstream_stats
        which = cfg.WhichOneof("per_method_stat_specifier")
        self.all_methods = False
        self.allow = None
        if which == "stats_for_all_methods":
            self.all_methods = cfg.stats_for_all_methods.value
        elif which == "individual_method_stats_allowlist":
            self.allow = {}
            for svc in cfg.individual_method_stats_allowlist.services:
                self.allow[svc.name] = frozenset(svc.method_name)
        self.replace_dots = cfg.replace_dots_in_grpc_service_name
        self.counters = {}  # (cluster stat scope id, per-method name or "") -> _Counters

    def create(self, stream):
        return GrpcStatsFilter(self, stream)

    def counters_for(self, cluster, method_key: str) -> _Counters:
        key = (cluster.name, method_key)
        c = self.counters.get(key)
        if c is None or c.scope is not cluster.scope:
            if len(self.counters) >= 4096:  # removed clusters' entries go too
                self.counters.clear()
            c = self.counters[key] = _Counters(cluster.scope, "grpc." + method_key)
            if self.enable_upstream_stats:
                c.rq_time = cluster.scope.histogram("grpc." + method_key + "upstream_rq_time")
        return c

    def method_key(self, parts) -> str:
        """``"<service>.<method>."`` when this method gets its own stats, else ``""``."""
        if not self.all_methods and self.allow is None:
            return ""
        svc, method = parts
        if self.allow is not None and method not in self.allow.get(svc, ()):
            return ""
        if self.replace_dots:
            svc = svc.replace(".", "_")
        return "%s.%s." % (svc, method)


def factory(cfg, ctx):
    return GrpcStatsConfig(cfg, ctx)


class _FrameCounter:
    """Counts length-prefixed gRPC messages across arbitrary DATA chunk boundaries."""

    __slots__ = ("count", "skip", "head")

    def __init__(self):
        self.count = 0
        self.skip = 0  # payload bytes of the current message still to come
        self.head = b""  # a partial 5-byte message prefix

    def feed(self, data) -> None:
        n = len(data)
        i = 0
        while i < n:
            if self.skip:
                take = min(self.skip, n - i)
                self.skip -= take
                i += take
                continue
            need = 5 - len(self.head)
            if n - i < need:
                self.head += bytes(data[i:])
                return
            hdr = self.head + bytes(data[i:i + need]) if self.head else data[i:i + 5]
            self.head = b""
            i += need
            self.count += 1
            self.skip = int.from_bytes(hdr[1:5], "big")


class GrpcStatsFilter:
    __slots__ = ("cfg", "s", "active", "method_key", "req", "resp", "done", "start", "head_status")

    def __init__(self, cfg, stream):
        self.cfg = cfg
        self.s = stream
        self.active = False
        self.done = False
        self.req = self.resp = None
        self.head_status = None  # (grpc-status in the headers of a response with a body)

    # -- decode ---------------------------------------------------------------------------------
    def decode_headers(self, headers, end_stream):
        ct = headers.get("content-type")
        if ct is None or not ct.startswith("application/grpc"):
            return CONTINUE
        # (as Envoy's: only a call whose path is ``/<service>/<method>`` — query cut, empty segments
        # skipped — is counted)
        parts = [p for p in (headers.get(":path") or "").split("?", 1)[0].split("/") if p]
        if len(parts) != 2:
            return CONTINUE
        self.active = True
        self.method_key = self.cfg.method_key(parts)
        self.start = time.monotonic()
        if self.cfg.emit_filter_state:
            self.req = _FrameCounter()
            self.resp = _FrameCounter()
        return CONTINUE

    def decode_data(self, data, end_stream):
        if self.req is not None:
            self.req.feed(data)
        return CONTINUE

    def decode_trailers(self, trailers):
        return CONTINUE

    # -- encode ---------------------------------------------------------------------------------
    def encode_headers(self, headers, end_stream):
        if self.active:
            if end_stream:
                self._charge(headers.get("grpc-status"))
            else:  # (Envoy charges a status in the headers too: at the end, with the messages)
                self.head_status = headers.get("grpc-status")
        return CONTINUE

    def encode_data(self, data, end_stream):
        if self.resp is not None:
            self.resp.feed(data)
        if end_stream and self.active:
            self._charge(self.head_status)
        return CONTINUE

    def encode_trailers(self, trailers):
        if self.active:
            st = trailers.get("grpc-status")
            self._charge(st if st is not None else self.head_status)
        return CONTINUE

    def on_destroy(self):
        if self.active and not self.done:
            self._charge(self.head_status)

    # -- stats ----------------------------------------------------------------------------------
    def _charge(self, status) -> None:
        if self.done:
            return
        self.done = True
        s = self.s
        name = s.stream_info.upstream_cluster
        cluster = self.cfg.cm.get(name) if name else None
        if self.req is not None:
            fs = s.filter_state
            if fs is None:
                fs = s.filter_state = {}
            if isinstance(fs, dict):
                fs[FILTER_STATE_KEY] = {"request_message_count": self.req.count,
                                        "response_message_count": self.resp.count}
        if cluster is None:
            return
        c = self.cfg.counters_for(cluster, self.method_key)
        if self.req is not None:
            if self.req.count:
                if c.req_msgs is None:
                    c.req_msgs = c.scope.counter(c.prefix + "request_message_count")
                c.req_msgs.value += self.req.count
            if self.resp.count:
                if c.resp_msgs is None:
                    c.resp_msgs = c.scope.counter(c.prefix + "response_message_count")
                c.resp_msgs.value += self.resp.count
        if c.rq_time is not None:
            c.rq_time.record((time.monotonic() - self.start) * 1000.0)
        if status is None:
            return
        c.total.value += 1
        if status == "0":
            c.success.value += 1
        else:
            c.failure.value += 1
        if status in KNOWN_STATUSES:
            c.status(status).value += 1

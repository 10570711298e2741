"""Header maps shared by every codec and filter.

A ``Headers`` is an ordered list of ``(name, value)`` string pairs with lower-case names, as Envoy
keeps them. Request pseudo-headers (``:method``, ``:path``, ``:authority``, ``:scheme``) and the
response's ``:status`` live in the same list, first, so HTTP/1.1 and HTTP/2 codecs produce and
consume the same object and filters see one shape whatever the protocol.
"""

from __future__ import annotations


# the ``:scheme`` the HTTP/1.1 codec gives an origin-form request (the same object every time, so
# that the request preparation knows it for a placeholder: Envoy's HTTP/1.1 codec sets no :scheme
# there, and its connection manager takes it from X-Forwarded-Proto, else the connection's TLS)
H1_SCHEME_HTTP = (":scheme", "http")


class Headers:
    __slots__ = ("_h",)

    def __init__(self, items=None):
        self._h: list = list(items) if items else []

    # -- reads --------------------------------------------------------------------------------
    def get(self, name: str, default=None):
        for k, v in self._h:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list:
        return [v for k, v in self._h if k == name]

    def __contains__(self, name: str) -> bool:
        # (a plain loop: on a head's ~10 entries it is about twice as fast as ``in map(...)``)
        for k, _ in self._h:
            if k == name:
                return True
        return False

    def __iter__(self):
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)

    def items(self) -> list:
        return self._h

    def byte_size(self) -> int:
        return sum(len(k) + len(v) for k, v in self._h)

    # -- writes -------------------------------------------------------------------------------
    def add(self, name: str, value: str) -> None:
        self._h.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one value (keeps the first position)."""
        h = self._h
        for kv in h:
            if kv[0] == name:
                break
        else:
            if name[0] == ":":
                # pseudo-headers stay ahead of regular ones
                j = 0
                while j < len(h) and h[j][0][0] == ":":
                    j += 1
                h.insert(j, (name, value))
            else:
                h.append((name, value))
            return
        i = h.index(kv)
        h[i] = (name, value)
        rest = h[i + 1:]
        for kv in rest:
            if kv[0] == name:
                self._h = h[: i + 1] + [x for x in rest if x[0] != name]
                return

    def set_default(self, name: str, value: str) -> None:
        if name not in self:
            self.set(name, value)

    def remove(self, name: str) -> bool:
        before = len(self._h)
        self._h = [kv for kv in self._h if kv[0] != name]
        return len(self._h) != before

    def remove_prefix(self, prefix: str) -> None:
        self._h = [kv for kv in self._h if not kv[0].startswith(prefix)]

    def copy(self) -> "Headers":
        return Headers(self._h)

    # -- convenience for requests -------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.get(":method", "")

    @property
    def path(self) -> str:
        return self.get(":path", "")

    @property
    def host(self) -> str:
        return self.get(":authority", "")

    @property
    def status(self) -> int:
        s = self.get(":status")
        return int(s) if s else 0

    def __repr__(self) -> str:
        return "Headers(%r)" % (self._h,)


# -- the request headers Envoy keeps "inline" ------------------------------------------------------
# Envoy 1.40 stores these request headers in fixed slots of its header map: a repeated one is not a
# second entry but the first one's value with the next appended after a comma (``a,b``), whichever
# codec parsed it; every other header keeps one entry per line (``cookie`` included). The list is
# Envoy 1.40's own (its startup "HTTP header map info" log line for the request header map: the core
# headers plus those its built-in extensions register), less the pseudo-headers and the framing
# headers the codecs check line by line (``content-length``, ``transfer-encoding``). The codecs call
# ``coalesce`` only when a head has a repeated name (HTTP/1.1: a set of the head's names is shorter
# than its list; HTTP/2: once per distinct header block, memoized), so a request without repeated
# names pays nothing more.

INLINE_REQUEST = frozenset((
    "accept", "accept-encoding", "access-control-request-headers", "access-control-request-method",
    "access-control-request-private-network", "authentication", "authorization", "cache-control", "cdn-loop",
    "connection", "content-encoding", "content-type", "expect", "grpc-accept-encoding", "grpc-timeout",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "keep-alive", "origin",
    "pragma", "proxy-connection", "proxy-status", "referer", "te", "upgrade", "user-agent", "via",
    "x-client-trace-id", "x-envoy-attempt-count", "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node", "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address", "x-envoy-force-trace", "x-envoy-hedge-on-per-try-timeout", "x-envoy-internal",
    "x-envoy-ip-tags", "x-envoy-is-timeout-retry", "x-envoy-max-retries", "x-envoy-original-host",
    "x-envoy-original-path", "x-envoy-original-url", "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes", "x-envoy-retry-grpc-on", "x-envoy-retry-on", "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-stream-duration-ms", "x-forwarded-client-cert",
    "x-forwarded-for", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto", "x-request-id",
))


def coalesce(names: list, values: list) -> tuple:
    """A head's parallel name and value lists with each repeated inline header folded into its
    first entry (values joined by ``,``, in arrival order). Returns new ``(names, values)``."""
    first: dict = {}
    out_n: list = []
    out_v: list = []
    for n, v in zip(names, values):
        if n in INLINE_REQUEST:
            i = first.get(n)
            if i is not None:
                out_v[i] = out_v[i] + "," + v
                continue
            first[n] = len(out_n)
        out_n.append(n)
        out_v.append(v)
    return out_n, out_v


def coalesce_fields(fields: list) -> list:
    """``coalesce`` for a list of ``(name, value)`` pairs (an HTTP/2 header block)."""
    n, v = coalesce([kv[0] for kv in fields], [kv[1] for kv in fields])
    return list(zip(n, v))

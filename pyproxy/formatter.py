"""Envoy's ``%COMMAND%`` substitution formatter (access logs, header values, local replies).

A format string is compiled once into a list of literal strings and command callables; formatting a
request is a join over that list. Each command callable takes ``(stream_info, request_headers,
response_headers, response_trailers)`` and returns a value or ``None`` when the value is unknown.
Text output renders ``None`` as ``-`` (Envoy's rule) or as nothing with ``omit_empty_values``; JSON
output keeps numbers typed and renders ``None`` as ``null`` (or drops the key, ``omit_empty_values``).

Time fields of ``StreamInfo`` (``first_upstream_rx_byte`` ...) are ``time.monotonic()`` instants.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid

from .config.errors import ConfigError
from .config.util import data_source_bytes, request_header_name
from .formatter_unkept import NOT_KEPT

log = logging.getLogger("pyproxy.formatter")

__all__ = ["DEFAULT_FORMAT", "compile_format", "compile_json_format", "compile_substitution_format",
           "Formatter", "JsonFormatter", "RESPONSE_FLAGS_LONG"]

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

RESPONSE_FLAGS_LONG = {
    "UH": "NoHealthyUpstream", "UF": "UpstreamConnectionFailure", "UO": "UpstreamOverflow",
    "NR": "NoRouteFound", "URX": "UpstreamRetryLimitExceeded", "NC": "NoClusterFound",
    "DT": "DurationTimeout", "UT": "UpstreamRequestTimeout", "LR": "LocalReset",
    "UR": "UpstreamRemoteReset", "UC": "UpstreamConnectionTermination", "DI": "DelayInjected",
    "FI": "FaultInjected", "RL": "RateLimited", "UAEX": "UnauthorizedExternalService",
    "RLSE": "RateLimitServiceError", "IH": "InvalidEnvoyRequestHeaders",
    "SI": "StreamIdleTimeout", "DPE": "DownstreamProtocolError", "UPE": "UpstreamProtocolError",
    "UMSDR": "UpstreamMaxStreamDurationReached", "OM": "OverloadManagerTerminated",
    "DF": "DnsResolutionFailed", "DO": "DropOverload", "DC": "DownstreamConnectionTermination",
    "LH": "FailedLocalHealthCheck", "UDO": "UnconditionalDropOverload",
}

GRPC_STATUS_NAMES = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)

_CMD = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\((.*?)\))?(?::(\d+))?%")
_HOSTNAME = socket.gethostname()


# --------------------------------------------------------------------------------------------
# value helpers

def _s(v):
    """A string attribute: empty/None -> None."""
    return v if v else None


def _tls(si, attr, side="downstream_ssl"):
    """A fact of a TLS handshake (``si.downstream_ssl`` / ``si.upstream_ssl``: tls/socket.py TlsLayer)."""
    t = getattr(si, side, None)
    return _s(getattr(t, attr, None)) if t is not None else None


def _addr(v):
    if not v:
        return None
    a = getattr(v, "address", v)
    return a if isinstance(a, str) else str(a)


def strip_port(a):
    """The address ``a`` (``ip:port``, ``[ip6]:port`` or a bare IP) without its port; None if empty."""
    if not a:
        return None
    if a.startswith("["):
        end = a.find("]")
        return a[1:end] if end > 0 else a
    if a.count(":") == 1:
        return a.rpartition(":")[0]
    return a


def _port(a):
    if not a:
        return None
    if a.startswith("["):
        p = a.rpartition("]:")[2] if "]:" in a else ""
    elif a.count(":") == 1:
        p = a.rpartition(":")[2]
    else:
        p = ""
    return int(p) if p.isdigit() else None


def _ms_since_start(si, t):
    if t is None:
        return None
    return int(round((t - si.start_monotonic) * 1000))


def _duration(si):
    end = getattr(si, "last_downstream_tx_byte", None) or si.end_monotonic
    return _ms_since_start(si, end)


def _flags_long(si):
    if not si.response_flags:
        return "-"
    return ",".join(RESPONSE_FLAGS_LONG.get(f, f) for f in si.response_flags)


def _grpc_status(rs, rt):
    v = None
    if rt is not None:
        v = rt.get("grpc-status")
    if v is None and rs is not None:
        v = rs.get("grpc-status")
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _to_text(v):
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


# --------------------------------------------------------------------------------------------
# START_TIME

class _TimeFormat:
    """``START_TIME(fmt)``: strftime in UTC plus ``%s`` (epoch seconds) and ``%f``/``%Nf``."""

    __slots__ = ("parts", "_cache_sec", "_cache_val", "simple")

    def __init__(self, fmt: str):
        parts = []  # strftime chunks (str) or ("f", digits) / ("s",)
        buf = []
        i, n = 0, len(fmt)
        while i < n:
            c = fmt[i]
            if c == "%" and i + 1 < n:
                d = fmt[i + 1]
                if d == "f":
                    parts.append("".join(buf)); buf = []
                    parts.append(("f", 9)); i += 2; continue
                if d.isdigit() and d != "0" and i + 2 < n and fmt[i + 2] == "f":
                    parts.append("".join(buf)); buf = []
                    parts.append(("f", int(d))); i += 3; continue
                if d == "s":
                    parts.append("".join(buf)); buf = []
                    parts.append(("s",)); i += 2; continue
                if d == "E" and fmt[i + 2:i + 3] == "z":  # (absl's RFC 3339 offset; always UTC here)
                    buf.append("+00:00"); i += 3; continue
                buf.append(fmt[i:i + 2]); i += 2; continue
            buf.append(c)
            i += 1
        parts.append("".join(buf))
        self.parts = [p for p in parts if p != ""]
        self.simple = all(isinstance(p, str) for p in self.parts)
        self._cache_sec = None
        self._cache_val = None

    def __call__(self, t: float) -> str:
        sec = int(t)
        if self.simple:
            if sec != self._cache_sec:
                self._cache_val = time.strftime("".join(self.parts), time.gmtime(sec))
                self._cache_sec = sec
            return self._cache_val
        gm = time.gmtime(sec)
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(time.strftime(p, gm))
            elif p[0] == "s":
                out.append(str(sec))
            else:
                ns = int(round((t - sec) * 1e9))
                if ns >= 1000000000:
                    ns = 999999999
                out.append(("%09d" % ns)[:p[1]])
        return "".join(out)


class _DefaultTime:
    """Envoy's default START_TIME: ``2024-01-02T03:04:05.678Z``."""

    __slots__ = ("_sec", "_prefix")

    def __init__(self):
        self._sec = None
        self._prefix = ""

    def __call__(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._sec = sec
        return "%s.%03dZ" % (self._prefix, min(int((t - sec) * 1000), 999))


# --------------------------------------------------------------------------------------------
# command compilation

def _header_cmd(which: int, arg: str, cmd: str, max_len, strip_query=False):
    if not arg:
        raise ConfigError("%s requires a header name" % cmd, "format")
    main, _, alt = arg.partition("?")
    main, alt = main.lower(), alt.lower()
    if not main or (("?" in arg) and not alt):
        raise ConfigError("invalid header specifier '%s' in %s" % (arg, cmd), "format")
    if which == 0:
        main, alt = request_header_name(main), alt and request_header_name(alt)

    def f(si, rq, rs, rt):
        h = rq if which == 0 else rs if which == 1 else rt
        if h is None:
            return None
        v = h.get(main)
        if v is None and alt:
            v = h.get(alt)
        if v is None:
            return None
        if strip_query:
            q = v.find("?")
            if q >= 0:
                v = v[:q]
        return v
    return f


def _metadata_cmd(arg: str, attr: str):
    parts = arg.split(":") if arg else []
    if not parts or not parts[0]:
        raise ConfigError("%s requires a namespace" % attr.upper(), "format")

    def f(si, rq, rs, rt):
        v = getattr(si, attr, None) or {}
        for p in parts:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return v
    return f


def _filter_state_cmd(arg: str):
    key, _, mode = arg.partition(":")
    if not key:
        raise ConfigError("FILTER_STATE requires a key", "format")
    if mode.startswith("FIELD:") or mode == "FIELD":
        # %FILTER_STATE(downstream_peer_obj:FIELD:workload)%: one field of an object that has
        # fields (Istio's peer metadata objects)
        field = mode[6:]
        if not field:
            raise ConfigError("FILTER_STATE FIELD requires a field name", "format")

        def fld(si, rq, rs, rt):
            fs = getattr(si, "filter_state", None)
            v = fs.get(key) if fs else None
            get = getattr(v, "field", None)
            if get is None:
                return None
            r = get(field)
            return r if r else None
        return fld
    if mode and mode not in ("PLAIN", "TYPED"):
        raise ConfigError("FILTER_STATE serialization must be PLAIN, TYPED or FIELD:<name>", "format")

    def f(si, rq, rs, rt):
        fs = getattr(si, "filter_state", None)
        if not fs or key not in fs:
            return None
        v = fs[key]
        ser = getattr(v, "serialize_as_string", None)
        if ser is not None:
            return ser()
        return v
    return f


def _simple(fn):
    return lambda si, rq, rs, rt: fn(si)


_SIMPLE = {
    "PROTOCOL": lambda si: _s(si.protocol),
    "UPSTREAM_PROTOCOL": lambda si: _s(getattr(si, "upstream_protocol", None)),
    "RESPONSE_CODE": lambda si: si.response_code or 0,
    "RESPONSE_CODE_DETAILS": lambda si: _s(si.response_code_details),
    "CONNECTION_TERMINATION_DETAILS": lambda si: _s(si.connection_termination_details),
    "RESPONSE_FLAGS": lambda si: si.flags_string(),
    "RESPONSE_FLAGS_LONG": _flags_long,
    "BYTES_RECEIVED": lambda si: si.bytes_received,
    "BYTES_SENT": lambda si: si.bytes_sent,
    "DURATION": _duration,
    "REQUEST_DURATION": lambda si: _ms_since_start(si, getattr(si, "last_downstream_rx_byte", None)),
    "REQUEST_TX_DURATION": lambda si: _ms_since_start(si, getattr(si, "last_upstream_tx_byte", None)),
    "RESPONSE_DURATION": lambda si: _ms_since_start(si, si.first_upstream_rx_byte),
    "RESPONSE_TX_DURATION": lambda si: (
        None if si.first_upstream_rx_byte is None or _duration(si) is None
        else _duration(si) - _ms_since_start(si, si.first_upstream_rx_byte)),
    "UPSTREAM_HOST": lambda si: _addr(si.upstream_host),
    "UPSTREAM_REMOTE_ADDRESS": lambda si: _addr(si.upstream_host),
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda si: strip_port(_addr(si.upstream_host)),
    "UPSTREAM_REMOTE_PORT": lambda si: _port(_addr(si.upstream_host)),
    "UPSTREAM_CLUSTER": lambda si: _s(si.upstream_cluster),
    "UPSTREAM_CLUSTER_RAW": lambda si: _s(si.upstream_cluster),
    "UPSTREAM_LOCAL_ADDRESS": lambda si: _s(si.upstream_local_address),
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda si: strip_port(si.upstream_local_address),
    "UPSTREAM_LOCAL_PORT": lambda si: _port(si.upstream_local_address),
    # Envoy writes the reason with its spaces as underscores
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda si: _s(si.upstream_transport_failure_reason.replace(" ", "_")),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": lambda si: si.attempt_count or 0,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda si: _s(si.downstream_remote_address),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda si: strip_port(si.downstream_remote_address),
    "DOWNSTREAM_REMOTE_PORT": lambda si: _port(si.downstream_remote_address),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda si: _s(si.downstream_direct_remote_address),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT":
        lambda si: strip_port(si.downstream_direct_remote_address),
    "DOWNSTREAM_DIRECT_REMOTE_PORT": lambda si: _port(si.downstream_direct_remote_address),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda si: _s(si.downstream_local_address),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda si: strip_port(si.downstream_local_address),
    "DOWNSTREAM_LOCAL_PORT": lambda si: _port(si.downstream_local_address),
    "REQUESTED_SERVER_NAME": lambda si: _s(si.requested_server_name),
    "ROUTE_NAME": lambda si: _s(si.route_name),
    "VIRTUAL_CLUSTER_NAME": lambda si: _s(si.virtual_cluster_name),
    "CONNECTION_ID": lambda si: si.connection_id,
    "STREAM_ID": lambda si: _s(si.request_id),
    "DOWNSTREAM_TLS_VERSION": lambda si: _s(si.downstream_tls_version),
    "DOWNSTREAM_PEER_URI_SAN": lambda si: _s(si.downstream_peer_uri_san),
    "DOWNSTREAM_LOCAL_URI_SAN": lambda si: _s(si.downstream_local_uri_san),
    "UPSTREAM_PEER_URI_SAN": lambda si: _s(si.upstream_peer_uri_san),
    "UPSTREAM_LOCAL_URI_SAN": lambda si: _s(getattr(si, "upstream_local_uri_san", "")),
    "UPSTREAM_TLS_VERSION": lambda si: _tls(si, "version", "upstream_ssl"),
    "UPSTREAM_TLS_CIPHER": lambda si: _tls(si, "cipher_name", "upstream_ssl"),
    "UPSTREAM_PEER_SUBJECT": lambda si: _tls(si, "peer_subject", "upstream_ssl"),
    "UPSTREAM_PEER_ISSUER": lambda si: _tls(si, "peer_issuer", "upstream_ssl"),
    "UPSTREAM_PEER_DNS_SAN": lambda si: _tls(si, "peer_dns_san", "upstream_ssl"),
    "DOWNSTREAM_TLS_CIPHER": lambda si: _tls(si, "cipher_name"),
    "DOWNSTREAM_PEER_SUBJECT": lambda si: _tls(si, "peer_subject"),
    "DOWNSTREAM_PEER_ISSUER": lambda si: _tls(si, "peer_issuer"),
    "DOWNSTREAM_PEER_DNS_SAN": lambda si: _tls(si, "peer_dns_san"),
    "DOWNSTREAM_PEER_SERIAL": lambda si: _tls(si, "peer_serial"),
    "DOWNSTREAM_LOCAL_DNS_SAN": lambda si: _s(getattr(getattr(getattr(si, "downstream_ssl", None), "tls", None),
                                                      "local_dns_san", None)),
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON": lambda si: _s(si.connection_termination_details)
        if si.connection_termination_details.startswith("TLS_error") else None,
    "HOSTNAME": lambda si: _HOSTNAME,
    "UNIQUE_ID": lambda si: str(uuid.uuid4()),
}

# commands that yield numbers (typed in JSON output)
_NUMERIC = {
    "RESPONSE_CODE", "BYTES_RECEIVED", "BYTES_SENT", "DURATION", "REQUEST_DURATION",
    "REQUEST_TX_DURATION", "RESPONSE_DURATION", "RESPONSE_TX_DURATION", "UPSTREAM_REMOTE_PORT",
    "UPSTREAM_LOCAL_PORT", "DOWNSTREAM_REMOTE_PORT", "DOWNSTREAM_DIRECT_REMOTE_PORT",
    "DOWNSTREAM_LOCAL_PORT", "CONNECTION_ID", "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "GRPC_STATUS_NUMBER",
}


def _compile_command(name: str, arg, max_len):
    """A callable for one ``%NAME(arg):max_len%`` command."""
    has_arg = arg is not None
    if name in _SIMPLE:
        if has_arg and arg != "":
            raise ConfigError("command %s takes no argument" % name, "format")
        return _simple(_SIMPLE[name])
    if name == "START_TIME":
        tf = _TimeFormat(arg) if arg else _DefaultTime()
        return lambda si, rq, rs, rt: tf(si.start_time)
    if name in ("REQ", "RESP", "TRAILER"):
        return _header_cmd(("REQ", "RESP", "TRAILER").index(name), arg, name, max_len)
    if name == "REQ_WITHOUT_QUERY":
        return _header_cmd(0, arg, name, max_len, strip_query=True)
    if name == "DYNAMIC_METADATA":
        return _metadata_cmd(arg, "dynamic_metadata")
    if name in ("FILTER_STATE", "PER_REQUEST_STATE"):
        return _filter_state_cmd(arg or "")
    if name == "ENVIRONMENT":
        if not arg:
            raise ConfigError("ENVIRONMENT requires a variable name", "format")
        val = os.environ.get(arg)
        return lambda si, rq, rs, rt: val
    if name == "GRPC_STATUS":
        def grpc_status(si, rq, rs, rt):
            c = _grpc_status(rs, rt)
            if c is None:
                return None
            return GRPC_STATUS_NAMES[c] if 0 <= c < len(GRPC_STATUS_NAMES) else str(c)
        return grpc_status
    if name == "GRPC_STATUS_NUMBER":
        return lambda si, rq, rs, rt: _grpc_status(rs, rt)
    if name in ("UPSTREAM_METADATA", "CLUSTER_METADATA", "METADATA", "UPSTREAM_FILTER_STATE",
                "TRACE_ID"):
        # best effort: pyproxy keeps no such data for formatters; renders as missing
        return lambda si, rq, rs, rt: None
    if name in NOT_KEPT:
        # an operator Envoy has and pyproxy keeps no data for: the format is accepted (refusing it
        # would refuse every listener carrying a mesh-wide format) and the field renders "-";
        # named (pyproxy validate collects this line) and logged at WARNING
        log.warning("access log format: %%%s%% is not implemented; rendered as '-'", name)
        return lambda si, rq, rs, rt: None
    raise ConfigError("Not supported field in StreamInfo: %s" % name, "format")



def _parse(fmt: str) -> list:
    """Literal strings and ``(name, callable, max_len)`` tuples."""
    out: list = []
    lit: list[str] = []
    i, n = 0, len(fmt)
    while i < n:
        c = fmt[i]
        if c != "%":
            j = fmt.find("%", i)
            if j < 0:
                j = n
            lit.append(fmt[i:j])
            i = j
            continue
        if fmt.startswith("%%", i):
            lit.append("%")
            i += 2
            continue
        m = _CMD.match(fmt, i)
        if m is None:
            raise ConfigError("Incorrect configuration: %s. Couldn't find valid command at "
                              "position %d" % (fmt, i), "format")
        if lit:
            out.append("".join(lit))
            lit = []
        name, arg, ml = m.group(1), m.group(2), m.group(3)
        fn = _compile_command(name, arg, ml)
        out.append((name, fn, int(ml) if ml else None))
        i = m.end()
    if lit:
        out.append("".join(lit))
    return out


class Formatter:
    """A compiled text format. ``format(si, req_headers, resp_headers, resp_trailers) -> str``."""

    __slots__ = ("parts", "omit_empty", "fmt", "_single")

    def __init__(self, fmt: str, omit_empty_values: bool = False):
        self.fmt = fmt
        self.omit_empty = omit_empty_values
        self.parts = _parse(fmt)
        self._single = len(self.parts) == 1 and isinstance(self.parts[0], str)

    @property
    def is_literal(self) -> bool:
        return self._single or not self.parts

    def format(self, si, rq=None, rs=None, rt=None) -> str:
        if self._single:
            return self.parts[0]
        missing = "" if self.omit_empty else "-"
        out = []
        for p in self.parts:
            if p.__class__ is str:
                out.append(p)
                continue
            v = p[1](si, rq, rs, rt)
            if v is None:
                out.append(missing)
                continue
            v = _to_text(v)
            if p[2] is not None:
                v = v[:p[2]]
            out.append(v)
        return "".join(out)

    def value(self, si, rq=None, rs=None, rt=None):
        """Typed value for JSON output: a lone command keeps its type (None when missing)."""
        if len(self.parts) == 1 and not isinstance(self.parts[0], str):
            name, fn, ml = self.parts[0]
            v = fn(si, rq, rs, rt)
            if v is None:
                return None
            if name in _NUMERIC and isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
            if isinstance(v, (dict, list, bool)) or (isinstance(v, (int, float)) and ml is None):
                return v
            v = _to_text(v)
            return v[:ml] if ml is not None else v
        return self.format(si, rq, rs, rt)


def compile_format(fmt: str, omit_empty_values: bool = False) -> Formatter:
    """Compile an Envoy format string; ``ConfigError`` for an unknown or malformed command."""
    return Formatter(fmt, omit_empty_values)


class JsonFormatter:
    """``json_format``: a dict whose string leaves are format strings; one JSON object per line."""

    __slots__ = ("tree", "omit_empty", "sort_keys")

    def __init__(self, struct: dict, omit_empty_values: bool = False, sort_keys: bool = True):
        self.omit_empty = omit_empty_values
        self.sort_keys = sort_keys
        self.tree = self._compile(struct)

    def _compile(self, node):
        if isinstance(node, dict):
            return [(k, self._compile(v)) for k, v in node.items()]
        if isinstance(node, str):
            return Formatter(node, self.omit_empty)
        if isinstance(node, list):
            return ("list", [self._compile(v) for v in node])
        if node is None or isinstance(node, (int, float, bool)):
            return ("const", node)
        raise ConfigError("unsupported json_format value %r" % (node,), "json_format")

    def _eval(self, node, si, rq, rs, rt):
        if isinstance(node, Formatter):
            return node.value(si, rq, rs, rt)
        if isinstance(node, list):
            out = {}
            for k, sub in node:
                v = self._eval(sub, si, rq, rs, rt)
                if v is None and self.omit_empty:
                    continue
                out[k] = v
            return out
        if node[0] == "const":
            return node[1]
        return [self._eval(x, si, rq, rs, rt) for x in node[1]]

    def format(self, si, rq=None, rs=None, rt=None) -> str:
        obj = self._eval(self.tree, si, rq, rs, rt)
        return json.dumps(obj, separators=(",", ":"), sort_keys=self.sort_keys,
                          ensure_ascii=False) + "\n"


def compile_json_format(struct: dict, omit_empty_values: bool = False,
                        sort_keys: bool = True) -> JsonFormatter:
    return JsonFormatter(struct, omit_empty_values, sort_keys)


def _data_source(ds, field: str) -> str:
    b = data_source_bytes(ds, field)
    if b is None:
        raise ConfigError("data source is empty", field)
    return b.decode("utf-8", "replace")


# formatter extensions whose commands are built in here
_BUILTIN_FORMATTER_EXTENSIONS = {
    "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery",
    "envoy.extensions.formatter.metadata.v3.Metadata",
}


def compile_substitution_format(sfs, default: str = DEFAULT_FORMAT):
    """A ``core.v3.SubstitutionFormatString`` (or None for ``default``) → Formatter/JsonFormatter."""
    if sfs is None:
        return compile_format(default)
    for i, ext in enumerate(sfs.formatters):
        t = ext.typed_config.type_url.rpartition("/")[2]
        if t not in _BUILTIN_FORMATTER_EXTENSIONS:
            raise ConfigError("formatter extension '%s' (%s) is not supported" % (ext.name, t),
                              "formatters[%d]" % i)
    omit = sfs.omit_empty_values
    which = sfs.WhichOneof("format")
    if which == "text_format":
        return compile_format(sfs.text_format, omit)
    if which == "text_format_source":
        return compile_format(_data_source(sfs.text_format_source, "text_format_source"), omit)
    if which == "json_format":
        from google.protobuf import json_format as jf
        # Envoy 1.40 writes the keys of a json_format in sorted order (checked against the binary)
        return compile_json_format(jf.MessageToDict(sfs.json_format), omit, True)
    return compile_format(default, omit)

"""Local replies: the answers the proxy gives itself, shaped like Envoy's (a status, a text/plain
body or a gRPC status for gRPC requests, a date), sent through the stream's encoder path."""

from __future__ import annotations

from random import getrandbits as _rand

from .headers import Headers
from .http_date import http_date as _date  # (the date every response carries)


def send_local_reply(self, status: int, body: str | bytes, details: str, *, flag: str = "",
                     headers: dict | None = None, close: bool = False, grpc_status: int | None = None) -> None:
    """Answer from the proxy itself, shaped like Envoy's local replies."""
    if self.done:
        return
    si = self.stream_info
    si.response_code_details = details
    rt = self.route
    if rt is not None and not si.upstream_cluster and rt.kind == 0:
        # (Envoy records the route's cluster as the route resolves: a filter's reply before the
        # router logs it too)
        si.upstream_cluster = rt.select_cluster(self.request_headers, _rand(32))[0]
    if flag:
        si.response_flags.add(flag)
    if self.response_started:
        # too late for a reply: reset the stream
        self.reset_stream(details)
        return
    b = body.encode() if isinstance(body, str) else body
    req = self.request_headers
    is_grpc = req is not None and (req.get("content-type") or "").startswith("application/grpc")
    # (the caller's headers come right after the status, as Envoy's modify_headers callback adds
    # them before the body's headers)
    h = Headers([(":status", "200" if is_grpc else str(status))])
    if headers:
        for k, v in headers.items():
            h.set(k, v)
    if is_grpc:
        h.add("content-type", "application/grpc")
        h.add("grpc-status", str(grpc_status if grpc_status is not None else _grpc_status(status)))
        if b:  # (Envoy sends no grpc-message for an empty body)
            h.add("grpc-message", (body if isinstance(body, str) else body.decode("latin-1")))
        b = b""
    elif b:
        h.add("content-length", str(len(b)))
        h.add("content-type", "text/plain")
    h.add("date", _date())
    if close and not self.hc.is_h2:  # (a reply before the request was read: the encoder closes)
        self.encoder.response_close = True
    r = self.router
    if r is not None:
        r.on_local_reply()
    is_head = req is not None and req.get(":method") == "HEAD"
    if b and not is_head:
        self.encode_headers(h, False)
        self.encode_data(b, True)
    else:
        self.encode_headers(h, True)


def _grpc_status(http_status: int) -> int:
    # Envoy's HTTP -> gRPC status mapping for local replies
    return {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}.get(http_status, 2)

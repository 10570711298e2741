"""The upstream response relayed to an HTTP/2 client by the stream itself: the HTTP/2 form of the
byte relay (http/h1_relay.py). A stream that ``HttpConnection.on_request`` made for a complete,
bodiless HTTP/2 request (no timers, no filters, no access logs: ``raw_head`` is ``H2_RELAY``)
writes the upstream's final response head straight to its ``H2ServerStream``, with the edits
``ActiveStream._send_headers`` makes (date, server, via, decorator), and then its body
(``write_body``) and end (``h1_relay.relay_done``) as the byte relay does: no encoder chain, no
``_finish``. The response is what the generic path writes, field for field.

``relay_head`` is called by ``FirstAttempt.on_upstream_headers`` once the router's work on the
head is done (the stats, the route's response header mutations, the telemetry hooks).
"""

from __future__ import annotations

from itertools import chain
from operator import itemgetter

from .decorator import DECORATE_EGRESS, decorate_response
from .http_date import http_date as _date

H2_RELAY = 2  # ``FirstAttempt.raw_head`` of a stream whose response this module relays
_DECORATOR = "x-envoy-decorator-operation"
_first = itemgetter(0)
_flat = chain.from_iterable
_join = "".join


def relay_head(s, headers, status: int, si) -> None:
    """Write the final (2xx-5xx, not end-of-stream) response head ``headers`` downstream as
    ``ActiveStream._send_headers`` would, and mark the stream as relaying (``status``: the body
    goes through ``write_body``, the end through ``relay_done``)."""
    cfg = s.cfg
    h = headers._h
    names = list(map(_first, h))  # (one C pass: the edits below test names against it)
    if "date" not in names:
        h.append(("date", _date()))  # Envoy keeps the upstream's date, adds one if absent
    st = cfg.server_transform
    if st == 0:
        n = names.count("server")
        if n == 0:
            h.append(("server", cfg.server_name))
        elif n == 1:
            h[names.index("server")] = ("server", cfg.server_name)
        else:
            headers.set("server", cfg.server_name)
    elif st == 1 and "server" not in names:
        h.append(("server", cfg.server_name))
    if cfg.via:
        via = headers.get("via")
        headers.set("via", cfg.via if not via else via + ", " + cfg.via)
    d = cfg.prep.decorate
    if d:
        if d != DECORATE_EGRESS:
            decorate_response(d, s.route, s.caller_op, headers)
        elif _DECORATOR in names:
            headers.remove(_DECORATOR)
    s.status = status
    s.response_started = True
    if si is not None:
        si.response_code = status
    if cfg.observers:  # (istio.stats: the head as written, and its size as the byte relay counts it)
        s.response_headers = headers
        h = headers._h
        s.tx_head = len(_join(_flat(h))) + 4 * len(h) + 2 - 14  # (less the :status line, 3 digits)
    s.encoder.encode_headers(headers, False)

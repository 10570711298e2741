"""A request rejected before pyproxy made a stream for it (an HTTP/1.1 head too malformed to
parse, HTTP/1.0, request_headers_timeout; an HTTP/2 HEADERS block with an invalid field): Envoy
has a stream there from the request's first byte, so it counts the request and writes its
access-log line. This does the same for the caller's local reply (review finding F22)."""

from __future__ import annotations

import time

from .headers import Headers
from .stream_parts import new_stream_info


def streamless_request(hc, protocol: str, status: int, details: str, protocol_error: bool,
                       bytes_sent: int, flag: str = "") -> None:
    """Count (downstream_rq_total, _http1/2_total, _rx_reset; with a reply sent also
    _rq_completed and _response_before_rq_complete; the reply's class is the caller's) and log
    the rejected request on ``hc`` (an ``HttpConnection``), with response flag ``flag`` if any."""
    st = hc.stats
    if protocol == "HTTP/2" and protocol_error:  # (HTTP/1.1: on_codec_error counted it)
        st.cx_protocol_error.value += 1
    st.rq_total.value += 1
    (st.rq_http2_total if protocol == "HTTP/2" else st.rq_http1_total).value += 1
    st.rq_rx_reset.value += 1
    if status:
        st.rq_completed.value += 1
        st.rq_response_before_rq_complete.value += 1
    logs = hc.cfg.access_logs
    if not logs:
        return
    now = time.monotonic()
    si = new_stream_info(hc.conn, protocol, time.time(), now)
    si.end_monotonic = now
    si.response_code = status
    si.response_code_details = details
    si.bytes_sent = bytes_sent
    if protocol_error:
        si.response_flags.add("DPE")
    if flag:
        si.response_flags.add(flag)
    req = Headers([])
    for al in logs:
        al.log(si, req, None, None)




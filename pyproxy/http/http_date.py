"""The HTTP date every response carries (``date``), cached for the second as Envoy's date
provider caches it; read by the codecs (the HTTP/1.1 byte relay) and the connection manager."""

from __future__ import annotations

import time

_time = time.time
_DATE_CACHE = [0, ""]


def http_date() -> str:
    """The HTTP date now (IMF-fixdate)."""
    now = int(_time())
    c = _DATE_CACHE
    if c[0] != now:
        c[0] = now
        c[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
    return c[1]

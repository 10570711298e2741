"""The HTTP filter interface: what every HTTP filter (built-in or a user's plain Python class) is.

A filter sees the request on the way in (``decode_*``, first to last) and the response on the way
out (``encode_*``, last to first). Each method returns ``CONTINUE`` to pass the event on or
``STOP`` to hold it; a stopped filter resumes the chain with ``callbacks.continue_decoding()`` /
``continue_encoding()``. ``callbacks`` is the stream (see ``ActiveStream``): ``send_local_reply``,
``route``, ``stream_info``, ``request_headers``, ``connection``.

A filter *factory* is built once per config from the proto; ``create(callbacks)`` makes a cheap
per-stream instance.
"""

from __future__ import annotations

# a filter's answer to an event, for every kind of filter (listener, network and HTTP; Envoy's
# Continue / StopIteration): defined once, here
CONTINUE = 0
STOP = 1


class HttpFilter:
    """Base class with pass-through defaults; subclasses override what they need."""

    __slots__ = ("callbacks",)
    is_decoder = True
    is_encoder = True

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def decode_headers(self, headers, end_stream: bool) -> int:
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def decode_trailers(self, trailers) -> int:
        return CONTINUE

    def encode_headers(self, headers, end_stream: bool) -> int:
        return CONTINUE

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def encode_trailers(self, trailers) -> int:
        return CONTINUE

    def on_destroy(self) -> None:
        pass

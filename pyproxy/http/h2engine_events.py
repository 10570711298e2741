"""Events of the lean HTTP/2 engine (``h2engine``): slotted twins of ``h2.events``.

Same class names and attributes as ``h2``'s, so code written against ``h2`` reads them
unchanged; they are built with positional arguments (cheaper than ``h2``'s keyword-only
dataclass-like events). Codecs that accept both engines map either class to the same handler.
"""

from __future__ import annotations

# Event kinds (``h2_common.EVENT_KIND`` maps either engine's classes to them). In codec mode
# (``H2Engine.split_ends`` False) the lean engine reports its hot events as plain tuples
# ``(kind, stream id, data or header fields, flow-controlled length, end of stream?)`` for
# EV_REQUEST / EV_RESPONSE / EV_TRAILERS / EV_DATA: no event object is made per frame (an
# EV_REQUEST's fourth item is the new stream's object, of the engine's ``stream_cls``).
(EV_REQUEST, EV_RESPONSE, EV_DATA, EV_TRAILERS, EV_ENDED, EV_RESET, EV_WINDOW, EV_SETTINGS, EV_PING, EV_PING_ACK,
 EV_GOAWAY, EV_PRIORITY, EV_SETTINGS_ACK, EV_INFO) = range(14)


class _Event:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<%s %s>" % (self.__class__.__name__,
                            ", ".join("%s:%r" % (k, getattr(self, k))
                                      for c in reversed(type(self).__mro__) for k in c.__dict__.get("__slots__", ())))


class _HeaderBlockEvent(_Event):
    """A header block on a stream (codecs dispatch on the concrete class, as with ``h2``'s)."""

    __slots__ = ("stream_id", "headers", "stream_ended", "priority_updated")

    def __init__(self, stream_id, headers, stream_ended=None):
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended
        self.priority_updated = None


class RequestReceived(_HeaderBlockEvent):
    __slots__ = ()


class ResponseReceived(_HeaderBlockEvent):
    __slots__ = ()


class TrailersReceived(_HeaderBlockEvent):
    __slots__ = ()


class InformationalResponseReceived(_Event):
    __slots__ = ("stream_id", "headers", "priority_updated")

    def __init__(self, stream_id, headers):
        self.stream_id = stream_id
        self.headers = headers
        self.priority_updated = None


class DataReceived(_Event):
    __slots__ = ("stream_id", "data", "flow_controlled_length", "stream_ended")

    def __init__(self, stream_id, data, flow_controlled_length, stream_ended=None):
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        self.stream_ended = stream_ended


class StreamEnded(_Event):
    __slots__ = ("stream_id",)

    def __init__(self, stream_id):
        self.stream_id = stream_id


class StreamReset(_Event):
    __slots__ = ("stream_id", "error_code", "remote_reset")

    def __init__(self, stream_id, error_code, remote_reset=True):
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote_reset = remote_reset


class WindowUpdated(_Event):
    __slots__ = ("stream_id", "delta")

    def __init__(self, stream_id, delta):
        self.stream_id = stream_id
        self.delta = delta


class RemoteSettingsChanged(_Event):
    __slots__ = ("changed_settings",)

    def __init__(self, changed_settings):
        self.changed_settings = changed_settings


class SettingsAcknowledged(_Event):
    __slots__ = ("changed_settings",)

    def __init__(self, changed_settings):
        self.changed_settings = changed_settings


class PingReceived(_Event):
    __slots__ = ("ping_data",)

    def __init__(self, ping_data):
        self.ping_data = ping_data


class PingAckReceived(_Event):
    __slots__ = ("ping_data",)

    def __init__(self, ping_data):
        self.ping_data = ping_data


class ConnectionTerminated(_Event):
    __slots__ = ("error_code", "last_stream_id", "additional_data")

    def __init__(self, error_code, last_stream_id, additional_data):
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


class PriorityUpdated(_Event):
    __slots__ = ("stream_id", "weight", "depends_on", "exclusive")

    def __init__(self, stream_id, weight, depends_on, exclusive):
        self.stream_id = stream_id
        self.weight = weight
        self.depends_on = depends_on
        self.exclusive = exclusive

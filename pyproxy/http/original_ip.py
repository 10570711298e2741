"""The downstream address from the request's headers: ``x-forwarded-for`` (Envoy's
``getLastAddressFromXFF``) and the original IP detection extensions
(``envoy.extensions.http.original_ip_detection.{xff,custom_header}``), compiled when the HCM's
config loads; run by the request preparation (``request_prep.py``)."""

from __future__ import annotations

from ..config import ConfigError
from ..netaddr import cidr_range, in_any, parse_ip


def last_xff(xff: str, skip: int):
    """Envoy's ``getLastAddressFromXFF``: ``(ip or None, single address)`` after ignoring the
    last ``skip`` entries."""
    s = xff
    for _ in range(skip):
        c = s.rfind(",")
        if c < 0:
            return None, False
        s = s[:c]
    c = s.rfind(",")
    if c >= 0 and c + 1 < len(s):
        s = s[c + 1:]
    ip = parse_ip(s.strip(" \t"))
    return ip, (ip is not None and c < 0)


class XffDetection:
    """``envoy.extensions.http.original_ip_detection.xff.v3.XffConfig``."""

    __slots__ = ("hops", "trusted")

    def __init__(self, hops: int, trusted=()):
        self.hops = hops
        self.trusted = tuple(trusted)

    def detect(self, xff, headers, direct_ip):
        """``(ip or None, allow trusted address checks, reject reply or None)``."""
        if xff is None:
            return None, False, None
        if self.trusted:
            if not in_any(direct_ip, self.trusted):
                return None, False, None
            # the last address that is not a trusted proxy
            parts = [x.strip(" \t") for x in xff.split(",")]
            for i in range(len(parts) - 1, -1, -1):
                ip = parse_ip(parts[i])
                if ip is None:
                    return None, False, None
                if not in_any(ip, self.trusted):
                    return ip, True, None
            return None, False, None
        ip, single = last_xff(xff, self.hops)
        return ip, single, None


class CustomHeaderDetection:
    """``envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig``."""

    __slots__ = ("name", "trusted", "reject")

    def __init__(self, name: str, trusted: bool, reject):
        self.name = name
        self.trusted = trusted
        self.reject = reject

    def detect(self, xff, headers, direct_ip):
        v = headers.get(self.name)
        ip = parse_ip(v) if v is not None else None
        if ip is not None:
            return ip, self.trusted, None
        return None, False, self.reject


_XFF_TYPE = "envoy.extensions.http.original_ip_detection.xff.v3.XffConfig"
_CUSTOM_TYPE = "envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig"


def detection(ext, field):
    from envoy.extensions.http.original_ip_detection.custom_header.v3 import custom_header_pb2
    from envoy.extensions.http.original_ip_detection.xff.v3 import xff_pb2
    tc = ext.typed_config
    tname = tc.type_url.rsplit("/", 1)[-1]
    if tname == _XFF_TYPE:
        m = xff_pb2.XffConfig()
        tc.Unpack(m)
        if m.HasField("xff_trusted_cidrs") and m.xff_num_trusted_hops:
            raise ConfigError("Cannot set both xff_num_trusted_hops and xff_trusted_cidrs", field=field)
        nets = [cidr_range(c, "%s.xff_trusted_cidrs.cidrs[%d]" % (field, i))
                for i, c in enumerate(m.xff_trusted_cidrs.cidrs)]
        return XffDetection(m.xff_num_trusted_hops, nets)
    if tname == _CUSTOM_TYPE:
        m = custom_header_pb2.CustomHeaderConfig()
        tc.Unpack(m)
        name = m.header_name.lower()
        if not name:
            raise ConfigError("header_name must not be empty", field=field + ".header_name")
        reject = None
        if m.HasField("reject_with_status"):
            code = m.reject_with_status.code
            # Envoy: a code outside 400-511 becomes 403
            code = code if 400 <= code <= 511 else 403
            reject = (code, "rejecting because detected address is untrusted", None)
        return CustomHeaderDetection(name, m.allow_extension_to_set_address_as_trusted, reject)
    raise ConfigError("original IP detection extension '%s' (%s) is not supported" % (ext.name, tname),
                      field=field)

"""IP address helpers shared by the data path: IP literals as Envoy parses them, address
formatting, loopback and internal-address checks, CIDR membership and the host's own address
(Envoy's ``Network::Utility``)."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from .config import ConfigError


def parse_ip(s: str):
    """Envoy's ``parseInternetAddress``: a bare IPv4/IPv6 literal (inet_pton rules), else None."""
    if not s:
        return None
    fam = socket.AF_INET6 if ":" in s else socket.AF_INET
    try:
        b = socket.inet_pton(fam, s)
    except (OSError, ValueError):
        return None
    return socket.inet_ntop(fam, b)


def fmt_addr(ip: str, port: int) -> str:
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def default_internal(ip: str) -> bool:
    """Envoy's ``Network::Utility::isInternalAddress``: RFC 1918, 127.0.0.1, fd00::/8, ::1."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        b = a.packed
        return b[0] == 10 or (b[0] == 192 and b[1] == 168) or (b[0] == 172 and 16 <= b[1] <= 31) \
            or ip == "127.0.0.1"
    return a.packed[0] == 0xfd or a == ipaddress.IPv6Address("::1")


_LOCAL = {}


def local_ip(version: str = "v4") -> str:
    """Envoy's local address (``Network::Utility::getLocalAddress``): the first non-loopback
    interface address of the IP version, else the loopback address. Appended to XFF in place of
    a loopback peer."""
    ip = _LOCAL.get(version)
    if ip is not None:
        return ip
    ip = "127.0.0.1" if version == "v4" else "::1"
    if version == "v4":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _, name in socket.if_nameindex():
                try:
                    r = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                cand = socket.inet_ntoa(r[20:24])
                if not cand.startswith("127."):
                    ip = cand
                    break
        finally:
            s.close()
    else:
        try:
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    hexaddr = line.split()[0]
                    cand = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr))
                    if cand != "::1":
                        ip = cand
                        break
        except OSError:
            pass
    _LOCAL[version] = ip
    return ip


def in_any(ip: str, nets) -> bool:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(a.version == n.version and a in n for n in nets)


def cidr_range(r, field: str):
    """An Envoy ``config.core.v3.CidrRange`` as an ``ipaddress`` network (host bits masked, as
    Envoy does; no prefix_len means the whole address); an invalid one is a ConfigError naming
    ``field``."""
    try:
        addr = ipaddress.ip_address(r.address_prefix)
        plen = r.prefix_len.value if r.HasField("prefix_len") else addr.max_prefixlen
        return ipaddress.ip_network("%s/%d" % (addr, plen), strict=False)
    except ValueError as e:
        raise ConfigError("invalid CIDR range: %s" % e, field=field) from None

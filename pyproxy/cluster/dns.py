"""Asynchronous DNS for STRICT_DNS and LOGICAL_DNS clusters.

Resolution never blocks the event loop. Two back ends, chosen per resolver:

* **System** (default): ``loop.getaddrinfo`` in the loop's default executor, so ``/etc/hosts``,
  ``/etc/resolv.conf`` search domains and ``nsswitch`` behave exactly as for any process in the pod
  (in Istio that includes the agent's DNS proxy). Each lookup is bounded by ``timeout``; a stuck
  libc call can keep an executor thread but never the loop or the refresher.
* **Nameservers** (when the cluster lists ``dns_resolvers`` / a c-ares
  ``typed_dns_resolver_config`` with ``resolvers``): a tiny UDP client — one A or AAAA query per
  family with EDNS0 (1232-byte payload), ``attempts`` tries per server with ``timeout`` each,
  answers taken from A/AAAA records of the answer section (CNAME chains included by the server).
  Names are used as given (fully qualified); no search list.

``DnsResolver.resolve(name, family)`` returns addresses in order, de-duplicated, honouring
``dns_lookup_family``: V4_ONLY, V6_ONLY, AUTO (IPv6, else IPv4), V4_PREFERRED (IPv4, else IPv6),
ALL (IPv4 then IPv6). A name that does not exist (NXDOMAIN / no data) resolves to ``[]``; a
failure (timeout, SERVFAIL, refused, truncated) raises ``DnsError``. IP literals resolve to
themselves.

``DnsRefresher`` re-resolves a cluster's names every ``dns_refresh_rate`` (5 s), or after a failure
on the ``dns_failure_refresh_rate`` backoff (base doubling up to max; defaults: base = refresh
rate, max = 10 × base), plus up to ``dns_jitter``. ``respect_dns_ttl`` is ignored. It calls
``on_hosts(PrioritySet)`` after the first round (even when empty, so the cluster can finish
warming) and then only when the resolved addresses changed. A name whose lookup fails keeps its
previous addresses (as Envoy does). The set passed is freshly built: the cluster should merge it with
``endpoints.diff_hosts(old, new)`` so Host objects (and their pools) survive.
STRICT_DNS: every address of every name becomes a host. LOGICAL_DNS: exactly one endpoint; the
first address is the single host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import struct

from ..config.errors import ConfigError
from ..config.util import duration_s
from .endpoints import build_priority_set, endpoint_address, is_ip_literal
from .host import PrioritySet

log = logging.getLogger("pyproxy.cluster.dns")

AUTO, V4_ONLY, V6_ONLY, V4_PREFERRED, ALL = 0, 1, 2, 3, 4
FAMILY_NAMES = {AUTO: "AUTO", V4_ONLY: "V4_ONLY", V6_ONLY: "V6_ONLY",
                V4_PREFERRED: "V4_PREFERRED", ALL: "ALL"}
_STRICT_DNS, _LOGICAL_DNS = 1, 2


class DnsError(Exception):
    """A lookup failed (as opposed to: the name has no addresses)."""


def _dedupe(addrs):
    seen = set()
    out = []
    for a in addrs:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# DNS wire format (RFC 1035) — just enough for A / AAAA queries

_QTYPE = {socket.AF_INET: 1, socket.AF_INET6: 28}


def encode_query(qid: int, name: str, qtype: int) -> bytes:
    labels = [l for l in name.rstrip(".").split(".")]
    q = bytearray(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1))
    for l in labels:
        b = l.encode("idna") if not l.isascii() else l.encode()
        if not 0 < len(b) < 64:
            raise DnsError("invalid DNS name %r" % name)
        q.append(len(b))
        q += b
    q.append(0)
    q += struct.pack("!HH", qtype, 1)
    q += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # EDNS0 OPT
    return bytes(q)


def _skip_name(buf: bytes, off: int) -> int:
    while True:
        if off >= len(buf):
            raise DnsError("malformed DNS response")
        n = buf[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def decode_response(buf: bytes, qid: int, qtype: int) -> list[str] | None:
    """Addresses of type ``qtype`` in the answer; None when ``buf`` is not our response."""
    if len(buf) < 12:
        return None
    rid, flags, qd, an, _, _ = struct.unpack_from("!HHHHHH", buf)
    if rid != qid or not flags & 0x8000:
        return None
    if flags & 0x0200:
        raise DnsError("truncated DNS response")
    rcode = flags & 0xF
    if rcode == 3:
        return []  # NXDOMAIN
    if rcode != 0:
        raise DnsError("DNS server answered rcode %d" % rcode)
    off = 12
    for _ in range(qd):
        off = _skip_name(buf, off) + 4
    out = []
    fam = socket.AF_INET if qtype == 1 else socket.AF_INET6
    for _ in range(an):
        off = _skip_name(buf, off)
        if off + 10 > len(buf):
            raise DnsError("malformed DNS response")
        rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", buf, off)
        off += 10
        rdata = buf[off:off + rdlen]
        off += rdlen
        if rtype == qtype and rclass == 1 and len(rdata) == (4 if qtype == 1 else 16):
            out.append(socket.inet_ntop(fam, rdata))
    return out


class _QueryProtocol(asyncio.DatagramProtocol):
    __slots__ = ("fut", "qid", "qtype")

    def __init__(self, fut, qid, qtype):
        self.fut = fut
        self.qid = qid
        self.qtype = qtype

    def datagram_received(self, data, addr):
        if self.fut.done():
            return
        try:
            r = decode_response(data, self.qid, self.qtype)
        except DnsError as e:
            self.fut.set_exception(e)
            return
        if r is not None:
            self.fut.set_result(r)

    def error_received(self, exc):
        if not self.fut.done():
            self.fut.set_exception(DnsError("DNS query failed: %s" % exc))


# --------------------------------------------------------------------------------------------

class DnsResolver:
    """Resolves names without blocking the loop (see the module docstring).

    ``nameservers``: list of ``(ip, port)``; empty = the system resolver (getaddrinfo).
    """

    def __init__(self, nameservers=(), *, timeout: float = 5.0, attempts: int = 2):
        self.nameservers = [(str(h), int(p)) for h, p in nameservers]
        self.timeout = timeout
        self.attempts = max(1, attempts)

    async def resolve(self, name: str, family: int = AUTO) -> list[str]:
        if family not in FAMILY_NAMES:
            raise ConfigError("unknown dns_lookup_family %r" % family, "dns_lookup_family")
        if is_ip_literal(name):
            v6 = ipaddress.ip_address(name).version == 6
            if (family == V4_ONLY and v6) or (family == V6_ONLY and not v6):
                return []
            return [name]
        if family == V4_ONLY:
            return await self._lookup(name, socket.AF_INET)
        if family == V6_ONLY:
            return await self._lookup(name, socket.AF_INET6)
        if family == ALL:
            r4, r6 = await asyncio.gather(self._lookup(name, socket.AF_INET),
                                          self._lookup(name, socket.AF_INET6),
                                          return_exceptions=True)
            if isinstance(r4, BaseException) and isinstance(r6, BaseException):
                raise r4
            out = []
            for r in (r4, r6):
                if not isinstance(r, BaseException):
                    out += r
            return out
        first, second = ((socket.AF_INET6, socket.AF_INET) if family == AUTO
                         else (socket.AF_INET, socket.AF_INET6))
        try:
            r = await self._lookup(name, first)
        except DnsError:
            r = []
        if r:
            return r
        return await self._lookup(name, second)

    async def _lookup(self, name: str, af: int) -> list[str]:
        if self.nameservers:
            return await self._query_servers(name, af)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, family=af, type=socket.SOCK_STREAM), self.timeout)
        except asyncio.TimeoutError:
            raise DnsError("DNS lookup of %s timed out after %gs" % (name, self.timeout)) from None
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5),
                           getattr(socket, "EAI_ADDRFAMILY", -9)):
                return []
            raise DnsError("DNS lookup of %s failed: %s" % (name, e.strerror)) from None
        except (OSError, UnicodeError) as e:
            raise DnsError("DNS lookup of %s failed: %s" % (name, e)) from None
        return _dedupe(i[4][0].partition("%")[0] for i in infos if i[0] == af)

    async def _query_servers(self, name: str, af: int) -> list[str]:
        qtype = _QTYPE[af]
        loop = asyncio.get_running_loop()
        last: Exception | None = None
        for _ in range(self.attempts):
            for server in self.nameservers:
                qid = random.getrandbits(16)
                fut = loop.create_future()
                try:
                    query = encode_query(qid, name, qtype)
                except UnicodeError:
                    raise DnsError("invalid DNS name %r" % name) from None
                transport = None
                try:
                    fam = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _QueryProtocol(fut, qid, qtype), remote_addr=server, family=fam)
                    transport.sendto(query)
                    return _dedupe(await asyncio.wait_for(fut, self.timeout))
                except asyncio.TimeoutError:
                    last = DnsError("DNS query for %s to %s:%d timed out" % (name, *server))
                except (DnsError, OSError) as e:
                    last = e if isinstance(e, DnsError) else DnsError(str(e))
                finally:
                    if transport is not None:
                        transport.close()
        raise last or DnsError("no nameserver answered")


# --------------------------------------------------------------------------------------------

def _resolver_for_cluster(cluster, timeout: float) -> DnsResolver:
    servers = []
    for a in cluster.dns_resolvers:  # deprecated but still accepted by Envoy
        servers.append((a.socket_address.address, a.socket_address.port_value or 53))
    if cluster.HasField("dns_resolution_config"):
        for a in cluster.dns_resolution_config.resolvers:
            servers.append((a.socket_address.address, a.socket_address.port_value or 53))
    if cluster.HasField("typed_dns_resolver_config"):
        from ..config.registry import type_name_of, unpack_any
        tc = cluster.typed_dns_resolver_config.typed_config
        tname = type_name_of(tc) if tc.type_url else ""
        if tname == "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig":
            for a in unpack_any(tc).resolvers:
                servers.append((a.socket_address.address, a.socket_address.port_value or 53))
        elif tname:
            log.warning("dns resolver %s not supported; using the system resolver", tname)
    return DnsResolver(servers, timeout=timeout)


class DnsRefresher:
    """Keeps a STRICT_DNS / LOGICAL_DNS cluster's hosts in step with DNS (module docstring)."""

    def __init__(self, cluster, on_hosts, *, resolver: DnsResolver | None = None,
                 timeout: float = 5.0):
        if cluster.type not in (_STRICT_DNS, _LOGICAL_DNS) or \
                cluster.WhichOneof("cluster_discovery_type") == "cluster_type":
            raise ConfigError("DnsRefresher needs a STRICT_DNS or LOGICAL_DNS cluster", "type")
        self.name = cluster.name
        self.logical = cluster.type == _LOGICAL_DNS
        self.cla = cluster.load_assignment
        self.on_hosts = on_hosts
        self.family = cluster.dns_lookup_family
        try:
            self.refresh_rate = duration_s(cluster, "dns_refresh_rate", 5.0)
            if self.refresh_rate < 0.001:
                raise ConfigError("value must be greater than 1ms", "dns_refresh_rate")
            base = self.refresh_rate
            mx = None
            if cluster.HasField("dns_failure_refresh_rate"):
                fr = cluster.dns_failure_refresh_rate
                base = duration_s(fr, "base_interval", self.refresh_rate)
                mx = duration_s(fr, "max_interval", None)
                if base < 0.001:
                    raise ConfigError("value must be greater than 1ms",
                                      "dns_failure_refresh_rate.base_interval")
                if mx is not None and mx < base:
                    raise ConfigError("max_interval must be greater than or equal to the "
                                      "base_interval", "dns_failure_refresh_rate.max_interval")
            self.failure_base = base
            self.failure_max = mx if mx is not None else 10 * base
            self.jitter = duration_s(cluster, "dns_jitter", 0.0)
            self.names = self._validate()
        except ConfigError as e:
            raise e.within(resource="cluster '%s'" % cluster.name)
        self.resolver = resolver or _resolver_for_cluster(cluster, timeout)
        self._resolved: dict[str, list[str]] | None = None
        self._failures = 0
        self._task: asyncio.Task | None = None
        self.resolutions = 0  # completed rounds (for stats / tests)

    def _validate(self) -> list[str]:
        cla = self.cla
        if self.logical:
            if len(cla.endpoints) != 1 or len(cla.endpoints[0].lb_endpoints) != 1:
                raise ConfigError("LOGICAL_DNS clusters must have a single locality_lb_endpoint "
                                  "and a single lb_endpoint", "load_assignment")
        names = []
        for i, lle in enumerate(cla.endpoints):
            for j, lbe in enumerate(lle.lb_endpoints):
                f = "load_assignment.endpoints[%d].lb_endpoints[%d].endpoint" % (i, j)
                addr, _port, pipe = endpoint_address(lbe.endpoint, f, allow_names=True)
                if pipe:
                    raise ConfigError("DNS clusters need socket addresses, not pipes",
                                      f + ".address.pipe")
                if addr not in names:
                    names.append(addr)
        # Build once with placeholders so every other validation error surfaces now.
        try:
            build_priority_set(cla, resolved={n: [] for n in names}, logical=self.logical)
        except ConfigError as e:
            raise e.within(field="load_assignment")
        return names

    # ---- one round

    async def resolve_once(self) -> tuple[PrioritySet, bool]:
        """Resolve every name once: ``(priority_set, all_succeeded, changed)``."""
        results = await asyncio.gather(*(self.resolver.resolve(n, self.family)
                                          for n in self.names), return_exceptions=True)
        prev = self._resolved or {}
        resolved = {}
        ok = True
        for n, r in zip(self.names, results):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                ok = False
                log.warning("cluster '%s': DNS resolution of %s failed: %s", self.name, n, r)
                resolved[n] = prev.get(n, [])
            else:
                resolved[n] = r
        changed = resolved != self._resolved
        self._resolved = resolved
        self.resolutions += 1
        ps = build_priority_set(self.cla, resolved=resolved, logical=self.logical)
        return ps, ok, changed

    # ---- periodic

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="dns:" + self.name)

    def stop(self) -> None:
        t, self._task = self._task, None
        if t is not None and not t.done():
            t.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def next_interval(self, ok: bool) -> float:
        if ok:
            self._failures = 0
            delay = self.refresh_rate
        else:
            delay = min(self.failure_max, self.failure_base * (2 ** self._failures))
            self._failures = min(self._failures + 1, 30)
        if self.jitter:
            delay += random.uniform(0, self.jitter)
        return delay

    async def _run(self) -> None:
        first = True
        while True:
            try:
                ps, ok, changed = await self.resolve_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the refresh loop silently
                log.exception("cluster '%s': DNS refresh failed", self.name)
                ps, ok, changed = None, False, False
            if ps is not None and (first or changed):
                first = False
                try:
                    self.on_hosts(ps)
                except Exception:
                    log.exception("cluster '%s': on_hosts callback failed", self.name)
            await asyncio.sleep(self.next_interval(ok))

"""ClusterLoadAssignment → PrioritySet, and the EDS update merge that keeps Host objects.

``build_priority_set(cla)`` validates a ``ClusterLoadAssignment`` the way Envoy does for STATIC and
EDS clusters and turns every ``LbEndpoint`` into a ``Host``:

* ``LocalityLbEndpoints.priority`` → ``PrioritySet.priorities[p]``. Envoy accepts priorities that
  skip a level (0 and 2 with nothing at 1); the missing levels become empty host lists.
* ``locality`` → ``Host.locality`` = ``(region, zone, sub_zone)``; the locality's
  ``load_balancing_weight`` → ``PrioritySet.localities[p][locality]`` (0 when unset).
* ``LbEndpoint.load_balancing_weight`` → ``Host.weight`` (default 1; 0 is rejected, as Envoy does).
* ``health_status`` → ``Host.eds_status`` and Envoy's flags: UNHEALTHY and TIMEOUT →
  ``failed_eds_health``, DRAINING → ``eds_status_draining`` (both out of rotation), DEGRADED →
  ``degraded_eds_health``; UNKNOWN and HEALTHY → healthy.
* ``socket_address`` (IPv4 / IPv6 literal + ``port_value``) or ``pipe.path``; ``Endpoint.hostname``.
* ``metadata.filter_metadata`` → ``Host.metadata`` as plain dicts, e.g.
  ``host.metadata["envoy.transport_socket_match"]["tlsMode"] == "istio"``.
* ``policy.overprovisioning_factor`` (default 140).

A DNS name as address is an error unless ``resolve_hostnames`` is true. Then the DNS cluster passes
``resolved={name: [ip, ...]}`` and each endpoint becomes one host per resolved address (its
``hostname`` is the DNS name, as in Envoy); a name missing from ``resolved`` keeps the name itself
as the host address (the connection then resolves it).

``diff_hosts(old, new)`` merges an update into the live hosts: see its docstring.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from google.protobuf import json_format

from ..config.errors import ConfigError
from .host import Host, PrioritySet

_U32_MAX = 0xFFFFFFFF
DEFAULT_OVERPROVISIONING = 140


def is_ip_literal(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _metadata_dict(md) -> dict:
    if md is None or not md.filter_metadata:
        return {}
    return {k: json_format.MessageToDict(v) for k, v in md.filter_metadata.items()}


def endpoint_address(ep, field: str, *, allow_names: bool):
    """``(address, port, pipe)`` of an ``Endpoint``; ConfigError naming ``field`` when invalid."""
    if not ep.HasField("address"):
        raise ConfigError("endpoint has no address", field + ".address")
    addr = ep.address
    which = addr.WhichOneof("address")
    if which == "pipe":
        if not addr.pipe.path:
            raise ConfigError("pipe path is empty", field + ".address.pipe.path")
        return "", 0, addr.pipe.path
    if which == "envoy_internal_address":
        # Envoy internal listeners (HBONE/waypoints) are not routed to yet: such a host is kept
        # (config is accepted) but connecting to it fails like an unreachable endpoint
        ia = addr.envoy_internal_address
        return "", 0, "envoy_internal:%s/%s" % (ia.server_listener_name, ia.endpoint_id)
    if which != "socket_address":
        raise ConfigError("address type '%s' is not supported" % which, field + ".address")
    sa = addr.socket_address
    f = field + ".address.socket_address"
    if sa.protocol != 0:
        raise ConfigError("only TCP endpoints are supported", f + ".protocol")
    ps = sa.WhichOneof("port_specifier")
    if ps is None:
        raise ConfigError("port_specifier is required", f + ".port_value")
    if ps == "named_port":
        raise ConfigError("named_port is not supported", f + ".named_port")
    if sa.port_value > 65535:
        raise ConfigError("port %d out of range" % sa.port_value, f + ".port_value")
    if sa.resolver_name:
        raise ConfigError("custom resolver '%s' is not supported" % sa.resolver_name,
                          f + ".resolver_name")
    host = sa.address
    if not host:
        raise ConfigError("address is empty", f + ".address")
    if not is_ip_literal(host):
        if not allow_names:
            raise ConfigError("malformed IP address: %s. Consider setting resolver_name or setting "
                              "cluster type to 'STRICT_DNS' or 'LOGICAL_DNS'" % host, f + ".address")
    elif "%" in host:
        raise ConfigError("scoped IPv6 addresses are not supported", f + ".address")
    return host, sa.port_value, ""


def build_priority_set(cla, *, resolve_hostnames: bool = False, resolved: dict | None = None,
                       logical: bool = False) -> PrioritySet:
    """A ``PrioritySet`` from a ``ClusterLoadAssignment`` (see the module docstring).

    ``logical``: LOGICAL_DNS — only the first resolved address of the (single) endpoint is used.
    """
    overprov = DEFAULT_OVERPROVISIONING
    if cla.HasField("policy"):
        pol = cla.policy
        if pol.HasField("overprovisioning_factor"):
            overprov = pol.overprovisioning_factor.value
            if overprov == 0:
                raise ConfigError("value must be greater than 0", "policy.overprovisioning_factor")
    priorities: list[list[Host]] = []
    localities: list[dict] = []
    allow_names = resolve_hostnames or resolved is not None
    for i, lle in enumerate(cla.endpoints):
        lf = "endpoints[%d]" % i
        if lle.HasField("leds_cluster_locality_config"):
            raise ConfigError("LEDS is not supported", lf + ".leds_cluster_locality_config")
        if len(lle.load_balancer_endpoints.lb_endpoints) and not len(lle.lb_endpoints):
            raise ConfigError("load_balancer_endpoints is not supported; use lb_endpoints",
                              lf + ".load_balancer_endpoints")
        prio = lle.priority
        if prio > 127:  # Envoy's limit (uint32 lte 128 in the proto), keeps the list small
            raise ConfigError("priority %d is too large" % prio, lf + ".priority")
        while len(priorities) <= prio:
            priorities.append([])
            localities.append({})
        loc = (lle.locality.region, lle.locality.zone, lle.locality.sub_zone)
        # Envoy's proto validation rejects an explicit 0; config dumps (Istio's testdata) carry
        # it for "unset", so 0 is read as unset (never chosen under locality weighting).
        lweight = lle.load_balancing_weight.value if lle.HasField("load_balancing_weight") else 0
        # The same locality may appear more than once; Envoy keeps the last weight.
        localities[prio][loc] = lweight
        if sum(localities[prio].values()) > _U32_MAX:
            raise ConfigError("The sum of weights of all localities at the same priority exceeds "
                              "%d" % _U32_MAX, lf + ".load_balancing_weight")
        hosts = priorities[prio]
        loc_weight_sum = 0
        for j, lbe in enumerate(lle.lb_endpoints):
            ef = "%s.lb_endpoints[%d]" % (lf, j)
            weight = 1
            if lbe.HasField("load_balancing_weight"):
                weight = lbe.load_balancing_weight.value
                if weight < 1:
                    raise ConfigError("value must be greater than or equal to 1",
                                      ef + ".load_balancing_weight")
            loc_weight_sum += weight
            if loc_weight_sum > _U32_MAX:
                raise ConfigError("The sum of weights of all upstream hosts in a locality exceeds "
                                  "%d" % _U32_MAX, ef + ".load_balancing_weight")
            if lbe.WhichOneof("host_identifier") != "endpoint":
                raise ConfigError("endpoint_name (named endpoints) is not supported",
                                  ef + ".endpoint_name")
            ep = lbe.endpoint
            address, port, pipe = endpoint_address(ep, ef + ".endpoint", allow_names=allow_names)
            meta = _metadata_dict(lbe.metadata if lbe.HasField("metadata") else None)
            hostname = ep.hostname
            addrs = [address]
            if not pipe and resolved is not None and address in resolved:
                hostname = ep.hostname or address
                addrs = list(resolved[address])
                if logical:
                    addrs = addrs[:1]
            for a in addrs:
                hosts.append(Host(a, port, weight=weight, priority=prio, locality=loc,
                                  metadata=meta, hostname=hostname, pipe=pipe,
                                  lb_endpoint=lbe, eds_status=lbe.health_status))
    return PrioritySet(priorities, localities, overprov)


# --------------------------------------------------------------------------------------------
# EDS updates

class HostsUpdate(NamedTuple):
    priority_set: PrioritySet   # install this one (holds the surviving Host objects)
    added: list                 # new Host objects (need pools, stats)
    removed: list               # Host objects gone (drain and close their pools)
    changed: bool               # False when the update changed nothing observable


def _same_attrs(a: Host, b: Host) -> bool:
    return (a.weight == b.weight and a.eds_status == b.eds_status and a.priority == b.priority
            and a.locality == b.locality and a.metadata == b.metadata
            and a.hostname == b.hostname)


def diff_hosts(old: PrioritySet | None, new: PrioritySet) -> HostsUpdate:
    """Merge a freshly built ``new`` set into the live ``old`` one.

    Semantics:

    * Hosts are matched by ``Host.key`` (``ip:port``, ``[ip6]:port`` or pipe path). When an address
      appears several times (it may, in different localities or priorities), occurrences are
      matched in order.
    * A matched host keeps its **old object** — so ``rq_active``, ``cx_active``, ``stats``,
      ``outlier_ejected`` and the connection pools keyed by it survive — and takes the new
      ``weight``, ``health`` (the EDS health status), ``priority``, ``locality``, ``metadata``,
      ``hostname`` and ``lb_endpoint`` in place.
    * Unmatched new hosts are ``added``; unmatched old hosts are ``removed``.
    * The returned ``priority_set`` is a new ``PrioritySet`` with ``new``'s structure (order,
      priorities, locality weights, overprovisioning factor) holding the surviving objects; the
      caller swaps it in and builds a new load balancer from it (``create_lb`` or ``lb.update``).
    * ``changed`` is False when nothing a load balancer or a connection can see differs (then the
      caller may skip the rebuild).

    In-place changes are safe because the event loop runs one callback at a time: the old load
    balancer is replaced before any request sees the updated hosts.
    """
    if old is None:
        hosts = new.all_hosts
        return HostsUpdate(new, list(hosts), [], True)
    pool: dict[str, list[Host]] = {}
    for h in old.all_hosts:
        pool.setdefault(h.key, []).append(h)
    added: list[Host] = []
    changed = (len(old.priorities) != len(new.priorities)
               or old.localities != new.localities
               or old.overprovisioning_factor != new.overprovisioning_factor)
    out_priorities = []
    for p, hosts in enumerate(new.priorities):
        out = []
        old_p = old.priorities[p] if p < len(old.priorities) else ()
        if len(old_p) != len(hosts):
            changed = True
        for idx, nh in enumerate(hosts):
            cands = pool.get(nh.key)
            if cands:
                oh = cands.pop(0)
                if not _same_attrs(oh, nh):
                    changed = True
                    oh.weight = nh.weight
                    oh.set_eds_status(nh.eds_status)
                    oh.priority = nh.priority
                    oh.locality = nh.locality
                    oh.metadata = nh.metadata
                    oh.hostname = nh.hostname
                oh.lb_endpoint = nh.lb_endpoint
                if not changed and (idx >= len(old_p) or old_p[idx] is not oh):
                    changed = True  # order changed
                out.append(oh)
            else:
                changed = True
                added.append(nh)
                out.append(nh)
        out_priorities.append(out)
    removed = [h for lst in pool.values() for h in lst]
    if removed:
        changed = True
    ps = PrioritySet(out_priorities, [dict(d) for d in new.localities], new.overprovisioning_factor)
    return HostsUpdate(ps, added, removed, changed)

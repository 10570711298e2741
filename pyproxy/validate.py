"""``pyproxy validate FILE...``: check bootstraps and config dumps resource by resource.

Takes Envoy bootstrap files (JSON/YAML), config dumps (the JSON of ``/config_dump``, and
``istioctl proxy-config all -o json``), single resources (``{"@type": ..., ...}``) and resource lists
(``{"resources": [...]}`` as the file-driven control plane reads them). Every resource is compiled
through the same code xDS uses — ``ListenerManager.build``, ``ClusterManager.build``,
``compile_route_config``, ``build_priority_set``, the TLS secret checks — in a server context that
binds no sockets, and gets one verdict line::

    FILE: listener 'virtualInbound': accepted
    FILE: listener 'x': accepted with ignored parts (istio.stats: telemetry not emitted yet; ...)
    FILE: cluster 'y': rejected (cluster 'y': lb_policy: ...)

then a summary line. Exit status: 0 when nothing was rejected, 1 otherwise, 2 for usage errors.

"Ignored parts" are what pyproxy accepts but does not act on: known-and-skipped extensions (with
the registry's reason), optional extensions it does not have, notes of implemented extensions about
fields without effect, unknown JSON fields (ignored, as ``--allow-unknown-static-fields`` and xDS
do), and what the compile path logs as not implemented.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import sys

from google.protobuf import json_format

from .config import ConfigError, unacted
from .config.registry import REGISTRY, ensure_types_for_json

ACCEPTED, IGNORED, REJECTED = "accepted", "accepted with ignored parts", "rejected"

# config dump section -> [(list key, function entry -> raw resource dict or None)]
_DUMP = {
    "envoy.admin.v3.ListenersConfigDump": [
        ("static_listeners", lambda e: e.get("listener")),
        ("dynamic_listeners", lambda e: (e.get("active_state") or e.get("warming_state")
                                         or e.get("draining_state") or {}).get("listener"))],
    "envoy.admin.v3.ClustersConfigDump": [
        ("static_clusters", lambda e: e.get("cluster")),
        ("dynamic_active_clusters", lambda e: e.get("cluster")),
        ("dynamic_warming_clusters", lambda e: e.get("cluster"))],
    "envoy.admin.v3.RoutesConfigDump": [
        ("static_route_configs", lambda e: e.get("route_config")),
        ("dynamic_route_configs", lambda e: e.get("route_config"))],
    "envoy.admin.v3.ScopedRoutesConfigDump": [
        ("inline_scoped_route_configs", lambda e: None),
        ("dynamic_scoped_route_configs", lambda e: None)],
    "envoy.admin.v3.EndpointsConfigDump": [
        ("static_endpoint_configs", lambda e: e.get("endpoint_config")),
        ("dynamic_endpoint_configs", lambda e: e.get("endpoint_config"))],
    "envoy.admin.v3.SecretsConfigDump": [
        ("static_secrets", lambda e: e.get("secret")),
        ("dynamic_active_secrets", lambda e: e.get("secret")),
        ("dynamic_warming_secrets", lambda e: e.get("secret"))],
}

# resource type -> (kind shown, proto module path, class name); order = validation order
_TYPES = {
    "envoy.config.bootstrap.v3.Bootstrap": ("bootstrap", "envoy.config.bootstrap.v3.bootstrap_pb2", "Bootstrap"),
    "envoy.extensions.transport_sockets.tls.v3.Secret": ("secret", "envoy.extensions.transport_sockets.tls.v3.secret_pb2", "Secret"),
    "envoy.config.cluster.v3.Cluster": ("cluster", "envoy.config.cluster.v3.cluster_pb2", "Cluster"),
    "envoy.config.endpoint.v3.ClusterLoadAssignment": ("endpoints", "envoy.config.endpoint.v3.endpoint_pb2", "ClusterLoadAssignment"),
    "envoy.config.listener.v3.Listener": ("listener", "envoy.config.listener.v3.listener_pb2", "Listener"),
    "envoy.config.route.v3.RouteConfiguration": ("route", "envoy.config.route.v3.route_pb2", "RouteConfiguration"),
    "envoy.config.route.v3.ScopedRouteConfiguration": ("scoped route", "envoy.config.route.v3.scoped_route_pb2", "ScopedRouteConfiguration"),
}
_ORDER = {t: i for i, t in enumerate(_TYPES)}
_SHORT = {v[2]: k for k, v in _TYPES.items()}


class Item:
    """One resource found in a file: its raw JSON and, after validation, the verdict."""

    __slots__ = ("type", "raw", "static", "name", "verdict", "why", "ignored", "origin")

    def __init__(self, type_name: str, raw: dict, static: bool, origin: str):
        self.type = type_name
        self.raw = raw
        self.static = static
        self.origin = origin
        self.name = _raw_name(type_name, raw)
        self.verdict = None
        self.why = ""
        self.ignored: list = []

    @property
    def kind(self) -> str:
        return _TYPES[self.type][0]

    def line(self) -> str:
        label = "%s '%s'" % (self.kind, self.name) if self.kind != "bootstrap" else "bootstrap"
        if self.verdict == ACCEPTED:
            v = ACCEPTED
        elif self.verdict == IGNORED:
            v = "%s (%s)" % (IGNORED, "; ".join(self.ignored))
        else:
            v = "%s (%s)" % (REJECTED, self.why)
        return "%s: %s: %s" % (self.origin, label, v)


def _raw_name(t: str, raw: dict) -> str:
    if t == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(raw.get("cluster_name") or raw.get("clusterName") or "")
    if t == "envoy.config.bootstrap.v3.Bootstrap":
        return ""
    return str(raw.get("name") or "")


# -- reading files ----------------------------------------------------------------------------------

def read_items(path: str) -> list:
    """Every resource in ``path`` (ConfigError when the file is unreadable or of no known shape)."""
    from .config.bootstrap import _parse_text
    origin = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("cannot read: %s" % (getattr(e, "strerror", None) or e), resource=origin) from None
    doc = _parse_text(text, origin)
    items = []
    if isinstance(doc, list):
        for i, r in enumerate(doc):
            items.append(_typed_item(r, origin, "[%d]" % i))
    elif not isinstance(doc, dict):
        raise ConfigError("expected a bootstrap, a config dump or resources", resource=origin)
    elif isinstance(doc.get("configs"), list):
        for section in doc["configs"]:
            items.extend(_dump_section(section, origin))
    elif isinstance(doc.get("resources"), list):
        for i, r in enumerate(doc["resources"]):
            items.append(_typed_item(r, origin, "resources[%d]" % i))
    elif str(doc.get("@type", "")).endswith("ConfigDump"):
        items.extend(_dump_section(doc, origin))
    elif "@type" in doc:
        items.append(_typed_item(doc, origin, ""))
    else:
        items.append(Item("envoy.config.bootstrap.v3.Bootstrap", doc, True, origin))
    return items


def _typed_item(raw, origin: str, where: str) -> Item:
    if not isinstance(raw, dict):
        raise ConfigError("a resource must be a mapping", resource=origin, field=where)
    t = str(raw.get("@type", "")).rpartition("/")[2]
    t = _SHORT.get(t, t)
    if t not in _TYPES:
        raise ConfigError("unknown resource type '%s'" % raw.get("@type"), resource=origin, field=where)
    return Item(t, raw, False, origin)


def _dump_section(section, origin: str) -> list:
    if not isinstance(section, dict):
        raise ConfigError("config dump entry is not a mapping", resource=origin)
    t = str(section.get("@type", "")).rpartition("/")[2]
    if t == "envoy.admin.v3.BootstrapConfigDump":
        bs = section.get("bootstrap")
        return [Item("envoy.config.bootstrap.v3.Bootstrap", bs, True, origin)] if isinstance(bs, dict) else []
    out = []
    for key, pick in _DUMP.get(t, ()):
        for entry in section.get(key) or ():
            raw = pick(entry) if isinstance(entry, dict) else None
            if isinstance(raw, dict):
                rt = str(raw.get("@type", "")).rpartition("/")[2]
                if rt in _TYPES:
                    out.append(Item(rt, raw, key.startswith("static"), origin))
    return out


# -- collecting ignored parts ------------------------------------------------------------------------

class _Collector(logging.Handler):
    """Records, for the resource being compiled, everything skipped or noted along the way."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.items: list = []      # "name: reason"
        self.reasons: list = []    # the bare reasons, to drop log lines that repeat them
        self.logged: list = []

    def add(self, text: str, name: str = "") -> None:
        text = " ".join(str(text).split())
        if not text or text in self.reasons:
            return  # the same reason under another name (e.g. a library and its filter) is shown once
        self.reasons.append(text)
        if name and not text.startswith(name + ":"):
            text = "%s: %s" % (name, text)
        if text not in self.items:
            self.items.append(text)

    def emit(self, record):
        try:
            msg = " ".join(record.getMessage().split())
        except Exception:  # a malformed log call must not break validation
            return
        low = msg.lower()
        if any(w in low for w in ("ignored", "skipped", "not supported", "not implemented", "not enforced")):
            self.logged.append(msg)

    @property
    def parts(self) -> list:
        out = list(self.items)
        for m in self.logged:
            if not any(r in m for r in self.reasons) and m not in out:
                out.append(m)
        return out


@contextlib.contextmanager
def _collecting(coll: _Collector):
    """Route registry resolutions and pyproxy.config log records into ``coll`` while compiling."""
    def hook(category, name, factory, cfg):
        if factory is None:
            coll.add(cfg, name or category)
            return factory

        def built(*a, **kw):
            obj = factory(*a, **kw)
            for n in getattr(obj, "notes", None) or ():
                coll.add(n, name or category)
            skip = getattr(obj, "skip_reason", None)
            if skip:
                coll.add(skip, name or category)
            return obj
        return built

    lg = logging.getLogger("pyproxy")
    old_level = lg.level
    lg.addHandler(coll)
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
    try:
        with REGISTRY.resolve_hook(hook):
            yield coll
    finally:
        lg.removeHandler(coll)
        lg.setLevel(old_level)


# -- compiling ---------------------------------------------------------------------------------------

def _to_proto(item: Item, coll: _Collector):
    import importlib
    kind, mod, cls_name = _TYPES[item.type]
    msg = getattr(importlib.import_module(mod), cls_name)()
    body = copy.deepcopy({k: v for k, v in item.raw.items() if k != "@type"})
    ensure_types_for_json(body)
    try:
        json_format.ParseDict(body, msg, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        text = str(e)
        if "no field named" not in text and "Cannot find field" not in text:
            raise ConfigError("invalid %s: %s" % (cls_name, text)) from None
        msg.Clear()
        try:
            json_format.ParseDict(body, msg, ignore_unknown_fields=True)
        except json_format.ParseError as e2:
            raise ConfigError("invalid %s: %s" % (cls_name, e2)) from None
        coll.add("unknown field ignored (%s)" % text)
    return msg


class Validation:
    """A server-like context for one file: real managers, no sockets, an xDS manager for RDS route names."""

    def __init__(self, bootstrap=None):
        from envoy.config.bootstrap.v3 import bootstrap_pb2
        from . import access_log, extensions  # noqa: F401 (registers built-in extensions)
        from .server import Options, Server
        self.loop = asyncio.new_event_loop()
        bs = bootstrap if bootstrap is not None else bootstrap_pb2.Bootstrap()
        self.server = Server(bs, Options(mode="validate"), self.loop)
        self.server.xds_manager()  # RDS route names compile against its providers
        # clusters seen in the file so far: route configs' validate_clusters checks read it (a file
        # without clusters, such as a listener dump, leaves the check to the proxy that loads it)
        self.server.cluster_manager.validated = set()
        self.listeners: dict = {}  # (host, port) -> name, for duplicate addresses

    def close(self):
        self.loop.close()

    def compile(self, item: Item, msg, coll: _Collector) -> None:
        t = item.type
        s = self.server
        if t == "envoy.config.listener.v3.Listener":
            cl = s.listener_manager.build(msg, added_via_api=not item.static)
            for name, reason in cl.skipped:
                coll.add(reason, name)
            for chain in cl.chains + ([cl.default_chain] if cl.default_chain else []):
                for name, reason in chain.skipped:
                    coll.add(reason, name)
                for f in chain.filter_factories:
                    for name, reason in getattr(f, "skipped_filters", ()):
                        coll.add(reason, name)
            if cl.bind_to_port and cl.family == "ip" and cl.port:
                other = self.listeners.get((cl.host, cl.port))
                if other is not None and other != cl.name:
                    raise ConfigError("listener '%s' has duplicate address '%s' (also listener '%s')"
                                      % (cl.name, cl.address_str(), other))
                self.listeners[(cl.host, cl.port)] = cl.name
        elif t == "envoy.config.cluster.v3.Cluster":
            c = s.cluster_manager.build(msg, added_via_api=not item.static)
            c.close()
            # (a static route_config's validate_clusters check sees the clusters validated so far)
            s.cluster_manager.validated.add(c.name)
        elif t == "envoy.config.route.v3.RouteConfiguration":
            from .routing import compile_route_config
            try:
                compile_route_config(msg)
            except ConfigError as e:
                raise e.within(resource="RouteConfiguration '%s'" % msg.name)
        elif t == "envoy.config.endpoint.v3.ClusterLoadAssignment":
            from .cluster.endpoints import build_priority_set
            try:
                build_priority_set(msg, resolve_hostnames=item.static)
            except ConfigError as e:
                raise e.within(resource="ClusterLoadAssignment '%s'" % msg.cluster_name)
        elif t == "envoy.extensions.transport_sockets.tls.v3.Secret":
            from .tls import validate_secret
            try:
                for n in validate_secret(msg):
                    coll.add(n)
            except ConfigError as e:
                raise e.within(resource="secret '%s'" % msg.name)
        elif t == "envoy.config.route.v3.ScopedRouteConfiguration":
            raise ConfigError("scoped routes (SRDS) are not supported", resource="scoped route '%s'" % msg.name)
        elif t == "envoy.config.bootstrap.v3.Bootstrap":
            self._bootstrap(msg, coll)

    def _bootstrap(self, bs, coll: _Collector) -> None:
        """The bootstrap's own parts; its static clusters/listeners are separate items."""
        s = self.server
        s._validate_bootstrap_extensions()
        from .config.bootstrap import check_dynamic_resources
        check_dynamic_resources(bs)  # the check startup makes
        dr = bs.dynamic_resources
        if dr.HasField("ads_config"):
            from .xds_client.target import keepalive_note, target_from_grpc_service
            by_name = {c.name: c for c in bs.static_resources.clusters}
            target_from_grpc_service(dr.ads_config.grpc_services[0], by_name)
            note = keepalive_note(dr.ads_config.grpc_services[0], by_name)
            if note:
                coll.add(note)
        if bs.HasField("tracing") and bs.tracing.HasField("http"):
            t = bs.tracing.http.typed_config.type_url.rpartition("/")[2]
            if t not in ("envoy.config.trace.v3.ZipkinConfig", "envoy.config.trace.v3.OpenTelemetryConfig"):
                coll.add("tracing.http: provider '%s' is not implemented; HCMs that trace with it produce "
                         "no spans" % bs.tracing.http.name)
        for i, sink in enumerate(bs.stats_sinks):
            coll.add("stats_sinks[%d] %s: not implemented; ignored" % (i, sink.name))
        if bs.HasField("admin") and bs.admin.HasField("address"):
            a = bs.admin.address
            if not a.HasField("socket_address") and not a.HasField("pipe"):
                raise ConfigError("admin address must be a socket address or a pipe", field="admin.address")


def _bootstrap_children(item: Item, bs) -> list:
    """Static clusters, listeners and secrets of a bootstrap, as separate items."""
    out = []
    for key, t in (("clusters", "envoy.config.cluster.v3.Cluster"),
                   ("listeners", "envoy.config.listener.v3.Listener"),
                   ("secrets", "envoy.extensions.transport_sockets.tls.v3.Secret")):
        for raw in (item.raw.get("static_resources") or {}).get(key) or ():
            if isinstance(raw, dict):
                out.append(Item(t, raw, True, item.origin))
    return out


def validate_items(items: list) -> list:
    """Validate ``items`` (from one file) in dependency order; fills in each item's verdict."""
    boot = [it for it in items if it.type == "envoy.config.bootstrap.v3.Bootstrap"]
    bs_msg = None
    extra = []
    seen = set()
    for it in boot[:1]:
        coll = _Collector()
        try:
            bs_msg = _to_proto(it, coll)
        except ConfigError as e:
            it.verdict, it.why = REJECTED, str(e)
        for child in _bootstrap_children(it, bs_msg):
            extra.append(child)
    for it in boot[1:]:
        it.verdict, it.why = REJECTED, "more than one bootstrap in one file"
    todo = []
    for it in extra + items:
        key = (it.type, it.name, json.dumps(it.raw, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        todo.append(it)
    todo.sort(key=lambda it: _ORDER[it.type])
    try:
        v = Validation(bs_msg)
    except ConfigError as e:  # the bootstrap's own config the server compiles (stats_config...)
        for it in boot[:1]:
            it.verdict, it.why = REJECTED, str(e)
        v = Validation(None)
    try:
        for it in todo:
            if it.verdict is not None:
                continue
            _validate_one(v, it)
    finally:
        v.close()
    return todo


# resource type -> kind in config/unacted.py's table (fields accepted but not acted on)
_UNACTED_KIND = {
    "envoy.config.cluster.v3.Cluster": "cluster",
    "envoy.config.route.v3.RouteConfiguration": "route_configuration",
    "envoy.config.bootstrap.v3.Bootstrap": "bootstrap",
}


def _validate_one(v: Validation, it: Item) -> None:
    coll = _Collector()
    label = "%s '%s'" % (it.kind, it.name)
    unacted.reset()  # every resource gets its own warnings
    try:
        with _collecting(coll):
            msg = _to_proto(it, coll)
            if it.type in _UNACTED_KIND:
                for n in unacted.notes(_UNACTED_KIND[it.type], msg):
                    coll.add(n)
            if it.type == "envoy.config.bootstrap.v3.Bootstrap":
                v.compile(it, v.server.bootstrap, coll)
            else:
                v.compile(it, msg, coll)
    except ConfigError as e:
        it.verdict = REJECTED
        it.why = str(e) if (it.name and it.name in str(e)) or it.kind == "bootstrap" else "%s: %s" % (label, e)
        return
    except Exception as e:  # a bug in pyproxy: report it as a rejection, never crash the tool
        it.verdict = REJECTED
        it.why = "%s: internal error %s: %s" % (label, type(e).__name__, e)
        return
    it.ignored = coll.parts
    it.verdict = IGNORED if coll.parts else ACCEPTED


# -- command line ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pyproxy validate",
                                description="Check Envoy bootstraps and config dumps resource by resource.")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print only rejected resources and the summary")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if not args.files:
        sys.stderr.write("usage: pyproxy validate FILE...\n")
        return 2
    lg = logging.getLogger("pyproxy")
    lg.propagate = False  # verdicts go to stdout, not log noise
    lg.addHandler(logging.NullHandler())
    counts = {ACCEPTED: 0, IGNORED: 0, REJECTED: 0}
    out = sys.stdout
    for path in args.files:
        try:
            items = read_items(path)
        except ConfigError as e:
            counts[REJECTED] += 1
            out.write("%s: rejected (%s)\n" % (os.path.basename(path), e))
            continue
        if not items:
            out.write("%s: no resources found\n" % os.path.basename(path))
        for it in validate_items(items):
            counts[it.verdict] += 1
            if not args.quiet or it.verdict == REJECTED:
                out.write(it.line() + "\n")
    total = sum(counts.values())
    out.write("%d resources: %d accepted, %d accepted with ignored parts, %d rejected\n"
              % (total, counts[ACCEPTED], counts[IGNORED], counts[REJECTED]))
    out.flush()
    return 1 if counts[REJECTED] else 0

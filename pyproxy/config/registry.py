"""Extensions found by the type URL of their ``typed_config``.

Every extension lives in its own module and is listed here by the proto full name it implements,
as ``"module:attribute"``. Modules are imported only when a configuration uses them, so a sidecar
that never sees, say, a ring-hash cluster never pays for its code. Plugins register at run time with
``register(category, type_name, factory)``.

``unpack_any`` turns an ``Any`` (including ``udpa.type.v1.TypedStruct`` / ``xds.type.v3.TypedStruct``
wrappers) into the concrete message, importing the proto module on demand.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil

from google.protobuf import json_format, symbol_database
from google.protobuf import any_pb2, struct_pb2

from .errors import ConfigError
from .istio_protos import CLASSES as _ISTIO_CLASSES

log = logging.getLogger("pyproxy.config")

TYPE_PREFIX = "type.googleapis.com/"
TYPED_STRUCT_TYPES = ("udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct")
# A JSON config (bootstrap or dump) may hold an Any of a type no proto module here defines
# (Istio's own filters). The loader keeps it as a Struct carrying the original type under this key.
UNKNOWN_TYPE_KEY = "__pyproxy_type_url"

CATEGORIES = (
    "listener_filter", "network_filter", "http_filter", "cluster", "transport_socket",
    "lb_policy", "access_logger", "upstream_protocol_options", "resource_monitor", "bootstrap",
    "tracer", "stat_sink", "header_validator", "compressor", "matcher", "upstream_network_filter",
    "route_filter_config",  # a check of an HTTP filter's typed_per_filter_config, run as routes load
    "route_policy",  # an HTTP filter's policy on a route (e.g. cors), compiled as routes load
)


class Ignored:
    """A known extension that pyproxy deliberately skips; ``reason`` says why it is safe."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


class Registry:
    def __init__(self):
        # (category, type full name) -> "module:attr" | callable | Ignored
        self._by_type: dict[tuple[str, str], object] = {}
        # (category, extension name) -> type full name (for configs that give only a name)
        self._by_name: dict[tuple[str, str], str] = {}
        # f(category, name, factory, config) -> factory, applied to every ``resolve`` result
        # (``pyproxy validate`` collects what each built extension reports)
        self._resolve_hooks: list = []

    def register(self, category: str, type_name: str, factory, names=()) -> None:
        if category not in CATEGORIES:
            raise ValueError("unknown extension category %r" % category)
        self._by_type[(category, type_name)] = factory
        for n in names:
            self._by_name[(category, n)] = type_name

    def ignore(self, category: str, type_name: str, reason: str, names=()) -> None:
        self.register(category, type_name, Ignored(reason), names)

    def lookup(self, category: str, type_name: str):
        """The factory for ``type_name`` (imported if needed), an ``Ignored``, or ``None``."""
        f = self._by_type.get((category, type_name))
        if isinstance(f, str):
            mod, _, attr = f.partition(":")
            try:
                f = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError("extension '%s' cannot be loaded: %s" % (type_name, e)) from None
            self._by_type[(category, type_name)] = f
        return f

    def type_for_name(self, category: str, name: str) -> str | None:
        return self._by_name.get((category, name))

    def known_types(self, category: str) -> list[str]:
        return sorted(t for (c, t) in self._by_type if c == category)

    @contextlib.contextmanager
    def resolve_hook(self, hook):
        """While the block runs, every ``resolve`` result ``(factory, config)`` becomes
        ``(hook(category, name, factory, config), config)``."""
        self._resolve_hooks.append(hook)
        try:
            yield
        finally:
            self._resolve_hooks.remove(hook)

    def resolve(self, category: str, name: str, typed_config, *, is_optional: bool = False,
                what: str = "filter"):
        factory, cfg = self._resolve(category, name, typed_config, is_optional, what)
        for hook in self._resolve_hooks:
            factory = hook(category, name, factory, cfg)
        return factory, cfg

    def _resolve(self, category, name, typed_config, is_optional, what):
        """Find the extension for a ``{name, typed_config}`` entry.

        Returns ``(factory, config_message)``; ``(None, reason)`` when the extension is skipped
        (optional, or known-and-ignored). Raises ``ConfigError`` for an unknown non-optional one.
        """
        if typed_config is not None and typed_config.type_url:
            tname = type_name_of(typed_config)
        else:
            tname = self.type_for_name(category, name)
            if tname is None:
                if is_optional:
                    return None, "optional %s '%s' has no typed_config" % (what, name)
                raise ConfigError("%s '%s' has no typed_config and no known name" % (what, name))
        factory = self.lookup(category, tname)
        if factory is None:
            if is_optional:
                reason = "optional %s '%s' (%s) is not supported; skipped" % (what, name, tname)
                log.warning(reason)
                return None, reason
            raise ConfigError("didn't find a registered implementation for '%s' with type URL: '%s'"
                              % (name, tname))
        if isinstance(factory, Ignored):
            return None, factory.reason
        msg = unpack_any(typed_config) if typed_config is not None and typed_config.type_url else None
        return factory, msg


REGISTRY = Registry()
register = REGISTRY.register


# --------------------------------------------------------------------------------------------
# Any handling

def type_name_of(a: any_pb2.Any) -> str:
    """The effective type name of an Any: TypedStruct and unknown-JSON wrappers see through."""
    t = a.type_url.rpartition("/")[2]
    if t in TYPED_STRUCT_TYPES:
        ts = _typed_struct_class(t)()
        a.Unpack(ts)
        return ts.type_url.rpartition("/")[2]
    if t == "google.protobuf.Struct":
        s = struct_pb2.Struct()
        a.Unpack(s)
        if UNKNOWN_TYPE_KEY in s.fields:
            return s.fields[UNKNOWN_TYPE_KEY].string_value.rpartition("/")[2]
    return t


def _typed_struct_class(t: str):
    if t == "udpa.type.v1.TypedStruct":
        from udpa.type.v1 import typed_struct_pb2
    else:
        from xds.type.v3 import typed_struct_pb2
    return typed_struct_pb2.TypedStruct


def unpack_any(a: any_pb2.Any):
    """The concrete message inside ``a``. TypedStruct values are parsed as JSON into the inner type.

    For a type no proto module defines (Istio's own extensions), returns a ``Struct`` of its JSON
    (TypedStruct value or the loader's unknown-type wrapper).
    """
    t = a.type_url.rpartition("/")[2]
    if t in TYPED_STRUCT_TYPES:
        ts = _typed_struct_class(t)()
        a.Unpack(ts)
        inner = ts.type_url.rpartition("/")[2]
        cls = message_class(inner)
        if cls is None:
            return ts.value
        msg = cls()
        try:
            json_format.ParseDict(json_format.MessageToDict(ts.value), msg, ignore_unknown_fields=False)
        except json_format.ParseError as e:
            raise ConfigError("invalid TypedStruct value for %s: %s" % (inner, e)) from None
        return msg
    cls = message_class(t)
    if cls is None:
        raise ConfigError("unknown type URL '%s'" % a.type_url)
    msg = cls()
    if not a.Unpack(msg):
        raise ConfigError("cannot unpack '%s'" % a.type_url)
    if t == "google.protobuf.Struct" and UNKNOWN_TYPE_KEY in msg.fields:
        del msg.fields[UNKNOWN_TYPE_KEY]
    return msg


_sym = symbol_database.Default()
_imported_dirs: set = set()


def message_class(full_name: str):
    """The generated class for a proto message full name, importing its module on demand.

    Generated modules live at ``<package path>/<file>_pb2.py``; the package path is the name minus
    the message (and any enclosing messages), so the candidate directory is imported whole.
    """
    try:
        return _sym.GetSymbol(full_name)
    except KeyError:
        pass
    cls = _ISTIO_CLASSES.get(full_name)
    if cls is not None:
        return cls
    parts = full_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        pkg = ".".join(parts[:cut])
        if pkg in _imported_dirs:
            continue
        _imported_dirs.add(pkg)
        if not _import_pb2_dir(pkg):
            continue
        try:
            return _sym.GetSymbol(full_name)
        except KeyError:
            continue
    return None


def _import_pb2_dir(pkg: str) -> bool:
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        return False
    paths = getattr(mod, "__path__", None)
    if not paths:
        return False
    found = False
    for p in paths:
        try:
            names = os.listdir(p)
        except OSError:
            continue
        for n in names:
            if n.endswith("_pb2.py"):
                try:
                    importlib.import_module(pkg + "." + n[:-3])
                    found = True
                except Exception:  # a broken generated module must not stop config loading
                    log.debug("cannot import %s.%s", pkg, n[:-3])
    return found


def ensure_types_for_json(obj) -> None:
    """Import proto modules for every ``@type`` in a JSON tree, and wrap types nobody defines.

    ``json_format`` resolves ``Any`` through the default pool, so its types must be imported first.
    An ``Any`` of a type no module defines becomes a ``google.protobuf.Struct`` carrying the type
    under ``UNKNOWN_TYPE_KEY``; the registry sees through it (see ``type_name_of``).
    """
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            t = o.get("@type")
            if isinstance(t, str):
                name = t.rpartition("/")[2]
                if message_class(name) is None:
                    body = {k: v for k, v in o.items() if k != "@type"}
                    o.clear()
                    o["@type"] = TYPE_PREFIX + "google.protobuf.Struct"
                    o["value"] = dict(body, **{UNKNOWN_TYPE_KEY: t})
                    continue
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def iter_builtin_modules():
    """Every pyproxy module that registers extensions (for tests and ``--version`` listings)."""
    import pyproxy
    for m in pkgutil.walk_packages(pyproxy.__path__, "pyproxy."):
        yield m.name

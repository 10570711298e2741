"""Reading Envoy resources from a directory of YAML/JSON files (format: see the package docstring)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import yaml
from google.protobuf import any_pb2, json_format

from pyproxy.config.errors import ConfigError
from pyproxy.config.registry import (TYPE_PREFIX, UNKNOWN_TYPE_KEY, ensure_types_for_json,
                                     message_class)
from pyproxy.xds_client import resources as R

SUFFIXES = (".yaml", ".yml", ".json")
STRUCT_URL = TYPE_PREFIX + "google.protobuf.Struct"
TYPED_STRUCT_URL = TYPE_PREFIX + "xds.type.v3.TypedStruct"

# Config dump sections: (section key, how to find the resource in one entry)
_DUMP_SECTIONS = {
    "envoy.admin.v3.ListenersConfigDump": [
        ("dynamic_listeners", lambda e: [(e.get("active_state") or e.get("warming_state")
                                          or {}).get("listener")])],
    "envoy.admin.v3.ClustersConfigDump": [
        ("dynamic_active_clusters", lambda e: [e.get("cluster")]),
        ("dynamic_warming_clusters", lambda e: [e.get("cluster")])],
    "envoy.admin.v3.RoutesConfigDump": [
        ("dynamic_route_configs", lambda e: [e.get("route_config")])],
    "envoy.admin.v3.ScopedRoutesConfigDump": [
        ("dynamic_scoped_route_configs", lambda e: list(e.get("scoped_route_configs") or ()))],
    "envoy.admin.v3.EndpointsConfigDump": [
        ("dynamic_endpoint_configs", lambda e: [e.get("endpoint_config")])],
    "envoy.admin.v3.SecretsConfigDump": [
        ("dynamic_active_secrets", lambda e: [e.get("secret")]),
        ("dynamic_warming_secrets", lambda e: [e.get("secret")])],
}


@dataclass(frozen=True)
class Resource:
    type_url: str
    name: str
    any: any_pb2.Any
    version: str          # digest of the serialized resource: changes iff the content changes
    source: str           # file it came from


def file_signature(config_dir: str) -> tuple:
    """What the poller compares: (name, inode, mtime_ns, size) of every config file."""
    sig = []
    try:
        entries = list(os.scandir(config_dir))
    except OSError as e:
        return (("<error>", str(e)),)
    for de in entries:
        if de.name.startswith(".") or not de.name.endswith(SUFFIXES):
            continue
        try:
            st = de.stat()
        except OSError:
            continue
        if not de.is_file():
            continue
        sig.append((de.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sorted(sig))


def load_dir(config_dir: str) -> dict[str, dict[str, Resource]]:
    """Every resource in the directory, by type URL then name. ``ConfigError`` on any bad file."""
    if not os.path.isdir(config_dir):
        raise ConfigError("not a directory", resource=config_dir)
    out: dict[str, dict[str, Resource]] = {}
    for name in sorted(os.listdir(config_dir)):
        if name.startswith(".") or not name.endswith(SUFFIXES):
            continue
        path = os.path.join(config_dir, name)
        if not os.path.isfile(path):
            continue
        for res in load_file(path):
            by_name = out.setdefault(res.type_url, {})
            prev = by_name.get(res.name)
            if prev is not None and prev.version != res.version:
                raise ConfigError("%s '%s' defined twice (also in %s)"
                                  % (res.type_url.rpartition(".")[2], res.name, prev.source),
                                  resource=path)
            by_name[res.name] = res
    return out


def load_file(path: str) -> list[Resource]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("cannot read: %s" % e, resource=path) from None
    try:
        if path.endswith(".json"):
            docs = [json.loads(text)] if text.strip() else []
        else:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError("cannot parse: %s" % str(e).replace("\n", " "), resource=path) from None
    out: list[Resource] = []
    seen: set = set()
    for doc in docs:
        for i, raw in enumerate(_resource_dicts(doc, path)):
            try:
                res = parse_resource(raw, path)
            except ConfigError as e:
                raise e.within(path, "resources[%d]" % i) from None
            key = (res.type_url, res.name)
            if key in seen:
                continue  # config dumps may list a resource as active and warming
            seen.add(key)
            out.append(res)
    return out


def _resource_dicts(doc, path: str) -> list:
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        raise ConfigError("expected a list of resources or a mapping", resource=path)
    if "configs" in doc:
        found = []
        for section in doc.get("configs") or ():
            found.extend(_from_dump_section(section, path))
        return found
    if "resources" in doc:
        res = doc["resources"]
        if not isinstance(res, list):
            raise ConfigError("'resources' must be a list", resource=path)
        return res
    t = doc.get("@type", "")
    if isinstance(t, str) and t.endswith("ConfigDump"):
        return _from_dump_section(doc, path)
    if "@type" in doc:
        return [doc]
    raise ConfigError("no 'resources', 'configs' or '@type' at the top level", resource=path)


def _from_dump_section(section, path: str) -> list:
    if not isinstance(section, dict):
        raise ConfigError("config dump entry is not a mapping", resource=path)
    t = str(section.get("@type", "")).rpartition("/")[2]
    found = []
    for key, pick in _DUMP_SECTIONS.get(t, ()):
        for entry in section.get(key) or ():
            if isinstance(entry, dict):
                found.extend(r for r in pick(entry) if r)
    return found


def _unknown_to_typed_struct(obj) -> None:
    """Turn ``ensure_types_for_json``'s marked Structs into standard ``xds.type.v3.TypedStruct``s."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if o.get("@type") == STRUCT_URL and isinstance(o.get("value"), dict) \
                    and UNKNOWN_TYPE_KEY in o["value"]:
                body = dict(o["value"])
                orig = body.pop(UNKNOWN_TYPE_KEY)
                o.clear()
                o.update({"@type": TYPED_STRUCT_URL, "type_url": orig, "value": body})
                continue
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def parse_resource(raw, source: str = "") -> Resource:
    if not isinstance(raw, dict):
        raise ConfigError("a resource must be a mapping with '@type'")
    t = raw.get("@type")
    if not isinstance(t, str) or not t:
        raise ConfigError("missing '@type'")
    type_url = R.SHORT_NAMES.get(t) or (t if "/" in t else TYPE_PREFIX + t)
    cls = message_class(type_url.rpartition("/")[2])
    if cls is None:
        raise ConfigError("unknown resource type '%s'" % t, field="@type")
    body = json.loads(json.dumps({k: v for k, v in raw.items() if k != "@type"}))
    ensure_types_for_json(body)
    if UNKNOWN_TYPE_KEY in json.dumps(body):
        message_class("xds.type.v3.TypedStruct")
        _unknown_to_typed_struct(body)
    msg = cls()
    try:
        json_format.ParseDict(body, msg, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise ConfigError("invalid %s: %s" % (cls.DESCRIPTOR.name, e)) from None
    name = R.resource_name(msg)
    if not name:
        raise ConfigError("%s has no name" % cls.DESCRIPTOR.name)
    a = any_pb2.Any(type_url=type_url, value=msg.SerializeToString(deterministic=True))
    version = hashlib.blake2b(a.value, digest_size=8).hexdigest()
    return Resource(type_url, name, a, version, source)

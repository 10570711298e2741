"""``/config_dump`` query handling on ConfigDump JSON (``?resource=``, ``?mask=``, ``?name_regex=``).

The context hands over a ConfigDump as a JSON dict (``{"configs": [{"@type": ..., ...}]}``, proto
field names as keys, as Envoy prints it). This module applies Envoy's rules on that dict:

- ``resource=<field>``: the elements of that repeated field of whichever config dump has it,
  each becoming a config with its own ``@type`` (``...ClustersConfigDump.StaticCluster``);
  unknown field -> 404 ``<field> not found in config dump``.
- ``mask=<a.b,c>`` (a FieldMask): with ``resource`` it applies to every element, and an invalid
  mask is a 400; without it, it applies to each config dump, those it does not fit are left out,
  and a 400 when it fits none. A path may not go through a repeated field; it goes through an
  ``Any`` (``cluster.name``) by the ``@type`` it holds.
- ``name_regex=<re>``: keep only resources whose whole name matches (RE2 ``FullMatch``, with
  RE2's program-size check, as Envoy); the bootstrap
  is never filtered.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

from pyproxy.routing.regex import RegexError, check_re2

try:  # make the admin dump types known to the descriptor pool
    from envoy.admin.v3 import config_dump_pb2 as _cd  # noqa: F401
    from envoy.admin.v3 import config_dump_shared_pb2 as _cds  # noqa: F401
except Exception:  # pragma: no cover - xds-protos is a hard dependency
    pass

TYPE_PREFIX = "type.googleapis.com/"


class DumpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _descriptor(type_url_or_name: str):
    name = type_url_or_name.rsplit("/", 1)[-1]
    try:
        return descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return None


def _is_map(field) -> bool:
    mt = field.message_type
    return mt is not None and mt.GetOptions().map_entry


def _path_valid(desc, parts, value) -> bool:
    """Is the FieldMask path ``parts`` valid for message ``desc`` (``value``: its JSON dict,
    consulted for the ``@type`` of an ``Any`` on the way)?"""
    for i, part in enumerate(parts):
        if desc is None:
            return False
        if desc.full_name == "google.protobuf.Any":
            inner = value.get("@type") if isinstance(value, dict) else None
            desc = _descriptor(inner) if inner else None
            if desc is None:
                return False
        f = desc.fields_by_name.get(part)
        if f is None:
            return False
        last = i == len(parts) - 1
        if not last:
            if f.is_repeated or f.message_type is None:
                return False
            desc = f.message_type
            value = value.get(part) if isinstance(value, dict) else None
    return True


def _mask_tree(paths):
    tree: dict = {}
    for p in paths:
        node = tree
        for part in p:
            node = node.setdefault(part, {})
    return tree


def _trim(value: dict, tree: dict) -> dict:
    out = {}
    if "@type" in value:
        out["@type"] = value["@type"]
    for k, sub in tree.items():
        if k not in value:
            continue
        v = value[k]
        if sub and isinstance(v, dict):
            t = _trim(v, sub)
            if any(key != "@type" for key in t):
                out[k] = t
        else:
            out[k] = v
    return out


def parse_mask(mask: str):
    paths = [tuple(p.strip().split(".")) for p in mask.split(",") if p.strip()]
    if not paths or any("" in p for p in paths):
        raise DumpError(400, "FieldMask %s could not be parsed." % mask)
    return paths


def _mask_ok(desc, value, paths) -> bool:
    return all(_path_valid(desc, p, value) for p in paths)


def _resource_name(elem: dict) -> str | None:
    """The name of one config-dump element (StaticCluster, DynamicListener, DynamicSecret...)."""
    if "name" in elem and isinstance(elem["name"], str):
        return elem["name"]
    for v in elem.values():
        if isinstance(v, dict):
            if isinstance(v.get("name"), str):
                return v["name"]
            if isinstance(v.get("cluster_name"), str):
                return v["cluster_name"]
            for vv in v.values():  # DynamicListener.active_state.listener
                if isinstance(vv, dict) and isinstance(vv.get("name"), str):
                    return vv["name"]
    return None


def _filter_names(cfg: dict, regex) -> dict:
    if cfg.get("@type", "").endswith("BootstrapConfigDump"):
        return cfg
    out = {}
    for k, v in cfg.items():
        if isinstance(v, list):
            kept = [e for e in v if not isinstance(e, dict) or
                    (lambda n: n is not None and regex.fullmatch(n) is not None)(_resource_name(e))]
            if kept:
                out[k] = kept
        else:
            out[k] = v
    return out


def apply_query(dump: dict, resource: str | None, mask: str | None, name_regex: str | None) -> dict:
    """Apply Envoy's /config_dump query parameters to a ConfigDump JSON dict."""
    configs = list(dump.get("configs", []))
    regex = None
    if name_regex:
        try:
            regex = check_re2(name_regex)  # RE2 with the program-size check, as Envoy
        except RegexError as e:
            raise DumpError(400, "INVALID_ARGUMENT: Error while parsing name_regex from %s: %s"
                            % (name_regex, e.reason)) from None
        configs = [_filter_names(c, regex) for c in configs]
    paths = parse_mask(mask) if mask else None

    if resource:
        for cfg in configs:
            desc = _descriptor(cfg.get("@type", ""))
            field = desc.fields_by_name.get(resource) if desc is not None else None
            if field is None or not field.is_repeated or field.message_type is None or _is_map(field):
                continue
            elem_type = TYPE_PREFIX + field.message_type.full_name
            out = []
            for elem in cfg.get(resource, []):
                if paths is not None:
                    if not _mask_ok(field.message_type, elem, paths):
                        raise DumpError(400, "FieldMask %s could not be successfully used." % mask)
                    elem = _trim(elem, _mask_tree(paths))
                    elem.pop("@type", None)
                out.append({"@type": elem_type, **elem})
            return {"configs": out} if out else {}
        raise DumpError(404, "%s not found in config dump" % resource)

    if paths is not None:
        out = []
        for cfg in configs:
            desc = _descriptor(cfg.get("@type", ""))
            if desc is None or not _mask_ok(desc, cfg, paths):
                continue
            out.append(_trim(cfg, _mask_tree(paths)))
        if not out:
            raise DumpError(400, "FieldMask %s could not be successfully applied to any configs." % mask)
        return {"configs": out}
    return {"configs": configs}

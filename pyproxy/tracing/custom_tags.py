"""Envoy's tracing custom tags (``type.tracing.v3.CustomTag``), compiled once at config load and
applied to a finished stream's span: literal, environment (read at load), request header, and
metadata of kind request (the stream's dynamic metadata), route, cluster (the upstream
cluster's) or host (the upstream endpoint's), walked along ``metadata_key.path``."""

from __future__ import annotations

import json
import os

from google.protobuf import json_format

from ..config import ConfigError


def apply_tags(tags: dict, custom, get, si, route, cm) -> None:
    """Envoy's custom tags onto ``tags``: a tag whose value is empty is not set."""
    for tag, kind, v in custom:
        if kind == "lit":
            val = v
        elif kind == "hdr":
            val = get(v[0])
            if val is None:
                val = v[1]
        else:
            val = _metadata_value(v, si, route, cm)
        if val:
            tags[tag] = val


def _metadata_value(v, si, route, cm) -> str:
    """A ``metadata`` custom tag's value: the metadata of its kind, walked along the key's path,
    rendered as Envoy does (string as is, bool ``true``/``false``, a number in its shortest form,
    a struct or list as JSON); the default when absent."""
    kind, ns, path, default = v
    if kind == "request":
        md = (si.dynamic_metadata or {}).get(ns)
    elif kind == "route":
        fm = (getattr(route, "metadata", None) or {}).get("filterMetadata") or {}
        md = fm.get(ns)
    else:
        md = None
        c = cm.get(si.upstream_cluster) if (cm is not None and si.upstream_cluster) else None
        if c is not None and kind == "cluster":
            fm = c.proto.metadata.filter_metadata
            if ns in fm:
                md = json_format.MessageToDict(fm[ns])
        elif c is not None and si.upstream_host:
            ps = getattr(c, "priority_set", None)
            for h in (ps.all_hosts if ps is not None else ()):
                if h.key == si.upstream_host:
                    md = (h.metadata or {}).get(ns)
                    break
    for k in path:
        if not isinstance(md, dict):
            md = None
            break
        md = md.get(k)
    if md is None:
        return default
    if isinstance(md, str):
        return md
    if isinstance(md, bool):
        return "true" if md else "false"
    if isinstance(md, (int, float)):
        return str(int(md)) if float(md).is_integer() and abs(md) < 1e16 else repr(float(md))
    if isinstance(md, (dict, list)):
        return json.dumps(md, separators=(",", ":"))
    return default


def custom_tags(hcm_proto) -> list:
    return compile_custom_tags(hcm_proto.tracing.custom_tags, "tracing.custom_tags")


def compile_custom_tags(tags, field: str) -> list:
    """``type.tracing.v3.CustomTag`` list -> ``(tag, kind, value)`` tuples (kind ``lit``, ``hdr``
    or ``md``), compiled once at config load."""
    out = []
    for i, t in enumerate(tags):
        which = t.WhichOneof("type")
        if not t.tag:
            raise ConfigError("a custom tag needs a name", field="%s[%d].tag" % (field, i))
        if which == "literal":
            out.append((t.tag, "lit", t.literal.value))
        elif which == "environment":
            out.append((t.tag, "lit", os.environ.get(t.environment.name, t.environment.default_value)))
        elif which == "request_header":
            out.append((t.tag, "hdr", (t.request_header.name.lower(), t.request_header.default_value)))
        elif which == "metadata":
            m = t.metadata
            k = m.kind.WhichOneof("kind")
            if k not in ("request", "route", "cluster", "host"):
                raise ConfigError("metadata kind '%s' is not supported" % k,
                                  field="%s[%d].metadata.kind" % (field, i))
            if not m.metadata_key.key:
                raise ConfigError("metadata_key.key is required", field="%s[%d].metadata.metadata_key" % (field, i))
            path = []
            for j, seg in enumerate(m.metadata_key.path):
                if seg.WhichOneof("segment") != "key":
                    raise ConfigError("a path segment must be a key",
                                      field="%s[%d].metadata.metadata_key.path[%d]" % (field, i, j))
                path.append(seg.key)
            out.append((t.tag, "md", (k, m.metadata_key.key, tuple(path), m.default_value)))
        else:
            raise ConfigError("custom tag type '%s' is not supported" % which, field="%s[%d]" % (field, i))
    return out

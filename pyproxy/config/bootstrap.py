"""Load an Envoy v3 Bootstrap from a file and/or ``--config-yaml``, as Envoy does."""

from __future__ import annotations

import json
import os

from google.protobuf import json_format

from .errors import ConfigError
from .registry import ensure_types_for_json


def _parse_text(text: str, origin: str):
    text_s = text.lstrip()
    if text_s.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass  # YAML is a superset; let the YAML parser report the error
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("unable to parse %s as JSON or YAML: %s" % (origin, str(e).replace("\n", " ")))


def to_message(data, msg, *, allow_unknown: bool, what: str):
    """Parse a JSON-like dict into ``msg``; errors name the offending field path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("%s must be a mapping, got %s" % (what, type(data).__name__))
    ensure_types_for_json(data)
    try:
        json_format.ParseDict(data, msg, ignore_unknown_fields=allow_unknown)
    except json_format.ParseError as e:
        # protobuf appends a list of the available fields on a second line: keep one clear line
        msg = " ".join(str(e).split("\n")[0].split())
        hint = "" if allow_unknown or "has no field named" not in msg else \
            " (use --allow-unknown-static-fields to ignore unknown fields)"
        raise ConfigError("invalid %s: %s%s" % (what, msg, hint)) from None
    return msg


def load_bootstrap(path: str | None, config_yaml: str | None, *, allow_unknown: bool = False):
    """Bootstrap from ``path`` with ``config_yaml`` merged over it (proto merge semantics)."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    if not path and not config_yaml:
        raise ConfigError("at least one of --config-path or --config-yaml is required")
    bs = bootstrap_pb2.Bootstrap()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError("unable to read file: %s: %s" % (path, e.strerror)) from None
        data = _parse_text(text, path)
        to_message(data, bs, allow_unknown=allow_unknown, what="bootstrap %s" % os.path.basename(path))
    if config_yaml:
        over = bootstrap_pb2.Bootstrap()
        to_message(_parse_text(config_yaml, "--config-yaml"), over, allow_unknown=allow_unknown,
                   what="--config-yaml")
        bs.MergeFrom(over)
    return bs


_ADS_API_TYPES = ("GRPC", "DELTA_GRPC", "AGGREGATED_GRPC", "AGGREGATED_DELTA_GRPC")


def check_dynamic_resources(bs) -> None:
    """What startup accepts in ``dynamic_resources``: one check shared by startup, ``--mode
    validate`` and ``pyproxy validate``, so that they agree. ``ConfigError`` naming the field."""
    from envoy.config.core.v3 import config_source_pb2
    dr = bs.dynamic_resources
    if dr.HasField("ads_config"):
        a = dr.ads_config
        api = config_source_pb2.ApiConfigSource.ApiType.Name(a.api_type)
        if api not in _ADS_API_TYPES:
            raise ConfigError("ads_config.api_type %s is not supported" % api, field="dynamic_resources.ads_config")
        if not a.grpc_services:
            raise ConfigError("ads_config needs grpc_services", field="dynamic_resources.ads_config")
    for src_name in ("cds_config", "lds_config"):
        if dr.HasField(src_name):
            check_config_source(dr, src_name)


def check_config_source(dr, src_name: str) -> None:
    """``dynamic_resources.<src_name>`` (cds_config / lds_config) must say ``ads: {}`` with an
    ``ads_config`` present; anything else is a ``ConfigError`` naming the field."""
    kind = getattr(dr, src_name).WhichOneof("config_source_specifier")
    if kind == "ads":
        if not dr.HasField("ads_config"):
            raise ConfigError("%s uses ADS but ads_config is missing" % src_name, field="dynamic_resources")
    elif kind == "api_config_source":
        # Per-type discovery services (StreamClusters, StreamListeners...) are not implemented;
        # say so rather than speak ADS to a server that may only serve the per-type service.
        raise ConfigError("api_config_source (per-type discovery service) is not supported; "
                          "use ads_config with '%s: {ads: {}}'" % src_name,
                          field="dynamic_resources.%s" % src_name)
    else:
        raise ConfigError("%s: config source '%s' is not supported" % (src_name, kind),
                          field="dynamic_resources.%s" % src_name)

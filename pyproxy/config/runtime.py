"""Values of the bootstrap's ``layered_runtime`` static layers, as Envoy reads them.

Only ``static_layer`` layers are read (the last layer that sets a key wins); a key is found flat
(``"overload.global_downstream_max_connections": 10``) or nested by its dotted parts, as Envoy
flattens a static layer. Admin and RTDS layers are not implemented.
"""

from __future__ import annotations


def _lookup(fields, key: str):
    if key in fields:
        return fields[key]
    parts = key.split(".")
    # nested: {"overload": {"global_downstream_max_connections": 10}}, or any mix of the two
    for i in range(1, len(parts)):
        head = ".".join(parts[:i])
        if head in fields and fields[head].WhichOneof("kind") == "struct_value":
            v = _lookup(fields[head].struct_value.fields, ".".join(parts[i:]))
            if v is not None:
                return v
    return None


def static_value(bootstrap, key: str):
    """The ``google.protobuf.Value`` of ``key`` in the last static layer that sets it, or None."""
    if bootstrap is None or not bootstrap.HasField("layered_runtime"):
        return None
    found = None
    for layer in bootstrap.layered_runtime.layers:
        if layer.WhichOneof("layer_specifier") == "static_layer":
            v = _lookup(layer.static_layer.fields, key)
            if v is not None:
                found = v
    return found


def static_uint(bootstrap, key: str) -> int | None:
    """A non-negative integer runtime value (a number, or a string holding one), else None."""
    v = static_value(bootstrap, key)
    if v is None:
        return None
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        n = v.number_value
    elif kind == "string_value":
        try:
            n = float(v.string_value.strip())
        except ValueError:
            return None
    else:
        return None
    return int(n) if n >= 0 else None


# process-wide, like Envoy's runtime singleton: the bootstrap's static layers, set once at startup
_BOOTSTRAP = [None]


def configure(bootstrap) -> None:
    """The bootstrap whose static layers ``feature_enabled`` reads (set before any listener compiles)."""
    _BOOTSTRAP[0] = bootstrap


def feature_enabled(key: str, default: bool) -> bool:
    """A boolean runtime feature (``envoy.reloadable_features.*``) from the static layers: a bool, or
    the string ``"true"``/``"false"``; ``default`` when unset or of another kind."""
    v = static_value(_BOOTSTRAP[0], key)
    if v is None:
        return default
    kind = v.WhichOneof("kind")
    if kind == "bool_value":
        return v.bool_value
    if kind == "string_value" and v.string_value.strip().lower() in ("true", "false"):
        return v.string_value.strip().lower() == "true"
    return default

"""Shared by the network and HTTP ``set_filter_state`` filters: compiled ``FilterStateValue`` lists."""

from __future__ import annotations

from ..config import ConfigError


class FilterStateValue:
    __slots__ = ("key", "formatter", "read_only", "skip_if_empty", "shared")

    def __init__(self, v, field: str):
        from ..formatter import compile_substitution_format
        which = v.WhichOneof("key")
        if which != "object_key" or not v.object_key:
            raise ConfigError("object_key is required", field=field + ".object_key")
        self.key = v.object_key
        if v.WhichOneof("value") != "format_string":
            raise ConfigError("format_string is required", field=field + ".format_string")
        try:
            self.formatter = compile_substitution_format(v.format_string)
        except ConfigError as e:
            raise e.within(field=field + ".format_string")
        self.read_only = v.read_only
        self.skip_if_empty = v.skip_if_empty
        self.shared = v.shared_with_upstream


def compile_values(values, field: str) -> tuple:
    return tuple(FilterStateValue(v, "%s[%d]" % (field, i)) for i, v in enumerate(values))


def apply(values, si, state: dict, headers=None) -> None:
    """Evaluate each value against ``si`` (and request ``headers``) into the ``state`` dict."""
    for v in values:
        val = v.formatter.format(si, headers)
        if val == "-" or val == "":
            if v.skip_if_empty:
                continue
            val = ""
        state[v.key] = val

"""Config model: Envoy v3 protos in, validated and immutable runtime objects out.

This package sits at the bottom of the import graph: it knows protos, the extension registry and
errors, and nothing of the data path.
"""

from .errors import ConfigError  # noqa: F401
from .registry import REGISTRY, unpack_any, type_name_of, register  # noqa: F401
from .util import duration_s, has, u32  # noqa: F401

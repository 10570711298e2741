"""Named TLS secrets: ``static_resources.secrets`` and SDS-delivered ``Secret`` resources.

A TLS context refers to certificates and trust anchors by name (``tls_certificate_sds_secret_configs``,
``validation_context_sds_secret_config``). The store holds the current ``Secret`` proto per name, in
two namespaces like Envoy: static secrets (bootstrap, referenced without ``sds_config``) and dynamic
ones (SDS, referenced with ``sds_config``); a lookup falls back to the other namespace.

``generation`` changes on every update, so a compiled TLS context only re-checks its secrets
(one integer compare per connection) after something changed. Loading a secret validates it
(``ConfigError`` if bad), so a broken key never reaches a live context.

    from pyproxy.tls.secrets import STORE
    STORE.load_static(bootstrap.static_resources.secrets)        # at bootstrap
    STORE.apply_sds(added={name: Secret}, removed=[name])         # on each SDS update
"""

from __future__ import annotations

import logging

from ..config import ConfigError

log = logging.getLogger("pyproxy.config")


class SecretStore:
    __slots__ = ("static", "dynamic", "generation")

    def __init__(self):
        self.static: dict = {}
        self.dynamic: dict = {}
        self.generation = 0

    def load_static(self, secrets) -> None:
        """Replace the static secrets (an iterable of ``Secret`` protos); ConfigError if one is bad."""
        from .context import validate_secret
        new = {}
        for i, s in enumerate(secrets):
            try:
                validate_secret(s)
            except ConfigError as e:
                raise e.within(resource="secret '%s'" % s.name, field="static_resources.secrets[%d]" % i)
            if s.name in new:
                raise ConfigError("duplicate static secret '%s'" % s.name,
                                  field="static_resources.secrets[%d]" % i)
            new[s.name] = s
        self.static = new
        self.generation += 1

    def apply_sds(self, added: dict | None = None, removed=()) -> None:
        """An SDS update: ``added`` maps names to ``Secret`` protos; ``removed`` lists names."""
        from .context import validate_secret
        for name, s in (added or {}).items():
            try:
                validate_secret(s)
            except ConfigError as e:
                raise e.within(resource="secret '%s'" % name)
        changed = False
        for name, s in (added or {}).items():
            if self.dynamic.get(name) != s:
                self.dynamic[name] = s
                changed = True
        for name in removed:
            if self.dynamic.pop(name, None) is not None:
                changed = True
        if changed:
            self.generation += 1

    def get(self, name: str, dynamic: bool):
        """The ``Secret`` named ``name``: SDS first for SDS references, static first otherwise."""
        first, second = (self.dynamic, self.static) if dynamic else (self.static, self.dynamic)
        s = first.get(name)
        return s if s is not None else second.get(name)

    def clear(self) -> None:
        self.static = {}
        self.dynamic = {}
        self.generation += 1


STORE = SecretStore()

"""Named TLS secrets: ``static_resources.secrets`` and SDS-delivered ``Secret`` resources.

A TLS context refers to certificates and trust anchors by name (``tls_certificate_sds_secret_configs``,
``validation_context_sds_secret_config``). The store holds the current ``Secret`` protos like Envoy:
static secrets by name (bootstrap, referenced without ``sds_config``) and dynamic ones by (config
source key, name) (SDS, referenced with ``sds_config``): ``default`` from the agent's ``sds-grpc``
and ``default`` over ADS are two secrets. A lookup falls back to the static secret of that name.

Every SDS reference (name plus ``sds_config``) is a ``SecretProvider``, shared per (config source,
name) as Envoy shares its ``SdsApi`` providers. A provider is *ready* — the init target of the
listeners and clusters that use it — once its first secret arrived, its first response was rejected,
or its ``initial_fetch_timeout`` elapsed (``0s``: never). The SDS client (``pyproxy.xds.sds``) opens one
subscription per provider; a provider no TLS context references any more is dropped (its stream
closed) shortly after.

``generation`` changes on every update. An update rebuilds, right away, the SSL contexts of the TLS
sockets that use the changed secrets (never at a connection's first handshake), and is refused
whole — the last good secrets stay — if one of them cannot be built. Connections that exist keep
the context they started with; new handshakes take the new one.

    from pyproxy.tls.secrets import STORE
    STORE.load_static(bootstrap.static_resources.secrets)        # at bootstrap
    STORE.apply_sds(added={name: Secret}, removed=[name], source="ads")   # on each SDS update
"""

from __future__ import annotations

import logging
import time
import weakref

from ..config import ConfigError


class TlsNotReady(ConnectionError):
    """A TLS transport socket cannot carry a connection yet: its SDS secrets have not arrived, or
    its key is not usable. The connection is refused, never sent in plaintext."""


log = logging.getLogger("pyproxy.config")


def source_key(config_source) -> str:
    """Which subscription a ``ConfigSource`` stands for: ``ads``, or the gRPC service it names."""
    kind = config_source.WhichOneof("config_source_specifier")
    if kind == "ads":
        return "ads"
    if kind == "api_config_source":
        acs = config_source.api_config_source
        if acs.grpc_services:
            g = acs.grpc_services[0]
            if g.WhichOneof("target_specifier") == "envoy_grpc":
                return "grpc:" + g.envoy_grpc.cluster_name
            return "grpc:" + g.google_grpc.target_uri
        return "cluster:" + ",".join(acs.cluster_names)
    if kind == "path_config_source":
        return "path:" + config_source.path_config_source.path
    if kind == "path":
        return "path:" + config_source.path
    return str(kind)


class SecretProvider:
    """One SDS subscription: a secret name from one config source."""

    __slots__ = ("key", "name", "source", "source_key", "refs", "ready", "version_info",
                 "last_updated", "fetch_timeout", "timer", "factories", "waiters", "error",
                 "received", "__weakref__")

    def __init__(self, name: str, config_source, skey: str):
        from ..config import duration_s
        self.key = (skey, name)
        self.name = name
        self.source = config_source
        self.source_key = skey
        self.refs = 0
        self.ready = False
        self.received = False            # a secret arrived (not just timed out / rejected)
        self.version_info = ""
        self.last_updated = 0.0
        # Envoy's default initial fetch timeout is 15 s; 0 waits forever (Istio's sds-grpc)
        self.fetch_timeout = duration_s(config_source, "initial_fetch_timeout", 15.0) or 0.0
        self.timer = None
        self.factories: weakref.WeakSet = weakref.WeakSet()
        self.waiters: list = []          # one-shot callbacks for "ready"
        self.error = ""

    def set_ready(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ready:
            return
        self.ready = True
        ws, self.waiters = self.waiters, []
        for cb in ws:
            try:
                cb()
            except Exception:  # noqa: BLE001 - one waiter must not stop the others
                log.exception("secret '%s': ready callback failed", self.name)

    def __repr__(self):
        return "SecretProvider(%s, %s, ready=%s)" % (self.source_key, self.name, self.ready)


class SecretStore:
    __slots__ = ("static", "dynamic", "generation", "providers", "hooks", "ready_hooks", "meta",
                 "rejected_hooks")

    def __init__(self):
        self.static: dict = {}           # name -> Secret
        self.dynamic: dict = {}          # (source key, name) -> Secret
        self.generation = 0
        self.providers: dict = {}        # (source key, name) -> SecretProvider
        self.hooks: list = []            # the SDS client: hook(provider, wanted: bool)
        self.ready_hooks: list = []      # called after any provider became ready
        self.meta: dict = {}             # (source key, name) -> (version_info, last_updated)
        self.rejected_hooks: list = []   # the SDS client: hook(providers) when first responses failed

    # -- references from TLS contexts ------------------------------------------------------------
    def watch(self, name: str, config_source, factory) -> SecretProvider:
        """``factory`` (a TLS socket factory) uses secret ``name`` from ``config_source``."""
        skey = source_key(config_source)
        key = (skey, name)
        p = self.providers.get(key)
        if p is None:
            p = SecretProvider(name, config_source, skey)
            if key in self.dynamic:
                p.ready = p.received = True   # e.g. a worker got it forwarded already
            try:
                for h in self.hooks:
                    h(p, True)   # the SDS client subscribes (ConfigError: an unusable source)
            except ConfigError as e:
                raise ConfigError("SDS secret '%s': %s" % (name, e)) from None
            self.providers[key] = p
        if factory not in p.factories:
            p.factories.add(factory)
            p.refs += 1
            weakref.finalize(factory, self._release, key)
        return p

    def _release(self, key) -> None:
        p = self.providers.get(key)
        if p is None:
            return
        p.refs -= 1
        if p.refs <= 0:
            for h in self.hooks:
                h(p, False)

    def drop(self, p: SecretProvider) -> None:
        """The SDS client closed ``p``'s subscription (nothing used it any more)."""
        if p.refs <= 0 and self.providers.get(p.key) is p:
            del self.providers[p.key]
            if p.timer is not None:
                p.timer.cancel()
                p.timer = None

    def pending(self) -> list:
        """Providers in use whose initial fetch has not finished."""
        return [p for p in self.providers.values() if p.refs > 0 and not p.ready]

    def mark_ready(self, p: SecretProvider) -> None:
        if not p.ready:
            p.set_ready()
            self._ready_changed()

    def _ready_changed(self) -> None:
        for h in list(self.ready_hooks):
            try:
                h()
            except Exception:  # noqa: BLE001
                log.exception("secret readiness hook failed")

    # -- contents ----------------------------------------------------------------------------------
    def load_static(self, secrets) -> None:
        """Replace the static secrets (an iterable of ``Secret`` protos); ConfigError if one is bad."""
        from .parse import validate_secret
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

    def apply_sds(self, added: dict | None = None, removed=(), version_info: str = "",
                  source: str = "ads") -> None:
        """An SDS update from the config source ``source`` (its ``source_key``): ``added`` maps
        names to ``Secret`` protos; ``removed`` lists names.

        Validated first; then the TLS contexts using a changed secret are rebuilt, and if one of
        them fails the update is undone (ConfigError: the response is NACKed, the last good
        secrets stay)."""
        from .parse import validate_secret
        added = added or {}
        for name, s in added.items():
            try:
                validate_secret(s)
            except ConfigError as e:
                self._first_rejected(added, source)
                raise e.within(resource="secret '%s'" % name)
        changed = []
        before = {}
        dynamic = self.dynamic
        for name, s in added.items():
            key = (source, name)
            if dynamic.get(key) != s:
                before[key] = dynamic.get(key)
                dynamic[key] = s
                changed.append(key)
        for name in removed:
            key = (source, name)
            if key in dynamic and name not in added:
                before[key] = dynamic.pop(key)
                changed.append(key)
        if not changed:
            self._mark_received(added, version_info, source)
            return
        self.generation += 1
        try:
            self._rebuild(changed)
        except ConfigError:
            for key, s in before.items():
                if s is None:
                    dynamic.pop(key, None)
                else:
                    dynamic[key] = s
            self.generation += 1
            self._first_rejected(added, source)
            raise
        now = time.time()
        for key in changed:
            if key in dynamic:
                self.meta[key] = (version_info, now)
            else:
                self.meta.pop(key, None)
        self._mark_received(added, version_info, source)

    def _rebuild(self, keys) -> None:
        """Rebuild the contexts of the sockets that use ``keys`` ((source key, name) pairs); the
        others only note that the store moved on (their context is unchanged), so no handshake
        pays for the update."""
        wanted = set(keys)
        seen = set()
        gen = self.generation
        for p in list(self.providers.values()):
            for f in list(p.factories):
                if id(f) in seen:
                    continue
                seen.add(id(f))
                if not f.depends_on(wanted):
                    if f.compiled_tls is not None and f.generation >= 0:
                        f.generation = gen
                    continue
                try:
                    f.rebuild()
                except TlsNotReady:
                    pass  # another secret it needs is still missing: it stays not ready
                except ConfigError as e:
                    raise ConfigError("secret '%s' not usable by a TLS context: %s"
                                      % ("', '".join(sorted(n for _, n in wanted)), e))

    def _first_rejected(self, added, source) -> None:
        """As Envoy: a rejected first response ends the initial fetch of the secrets it named
        (their TLS contexts stay unusable; listeners and clusters stop waiting)."""
        became = [p for p in self.providers.values()
                  if p.source_key == source and p.name in added and not p.ready]
        for p in became:
            p.error = p.error or "first response rejected"
            p.set_ready()
        if became:
            for h in list(self.rejected_hooks):
                h(became)
            self._ready_changed()

    def _mark_received(self, added, version_info, source) -> None:
        became = False
        for p in self.providers.values():
            if p.source_key == source and p.name in added:
                p.received = True
                p.version_info = version_info
                p.last_updated = time.time()
                p.error = ""
                if not p.ready:
                    p.set_ready()
                    became = True
        if became:
            self._ready_changed()

    def get(self, name: str, source: str):
        """The ``Secret`` named ``name``: for an SDS reference (``source``: its config source's
        key) the one from that source, else the static one; for a static reference ("") the
        static one, else one SDS delivered under that name."""
        if source:
            s = self.dynamic.get((source, name))
            return s if s is not None else self.static.get(name)
        s = self.static.get(name)
        if s is None:
            for (_, n), d in self.dynamic.items():
                if n == name:
                    return d
        return s

    def clear(self) -> None:
        self.static = {}
        self.dynamic = {}
        self.meta = {}
        for p in self.providers.values():
            if p.timer is not None:
                p.timer.cancel()
        self.providers = {}
        self.hooks = []
        self.ready_hooks = []
        self.rejected_hooks = []
        self.generation += 1


STORE = SecretStore()

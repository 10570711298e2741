"""SDS client: the secrets TLS contexts name, fetched from where their ``sds_config`` says.

Each ``SecretProvider`` of the store (``tls.secrets``: one per config source and secret name, as
Envoy shares its ``SdsApi``) gets one subscription:

- a GRPC ``api_config_source`` (Istio's ``sds-grpc``: a STATIC cluster on the agent's unix socket
  ``./var/run/secrets/workload-spiffe-uds/socket``, resolved against the working directory pyproxy
  was started in) gets its own state-of-the-world ``StreamSecrets`` stream carrying that one name,
  the node on the first message (``set_node_on_first_message_only``), ACK/NACK, pushes at any time,
  and reconnection with jittered backoff when the server goes away (the secrets in force stay);
- ``ads: {}`` (istiod's ``kubernetes://`` credentials) adds the name to the ADS stream's Secret
  subscription.

A response must hold exactly the secret asked for (Envoy: "Missing SDS resources for X", an
unexpected name, more than one) and a secret every TLS context using it can be built from;
otherwise it is NACKed and the last good secret stays. An update rebuilds the SSL contexts at once
(never at a handshake); established connections keep theirs. A provider is ready — listeners and
clusters using it stop warming — when its first secret arrived, its first response was rejected,
or its ``initial_fetch_timeout`` elapsed (``0s``: wait forever); a server that is unreachable does
not end the wait.

Stats per secret name, as Envoy's: ``sds.<name>.update_attempt|update_success|update_rejected|
init_fetch_timeout``. ``server.days_until_first_cert_expiring`` follows the certificates in use.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config import ConfigError
from ..tls.secrets import STORE
from ..xds_client import SECRET, XdsClient
from ..xds_client.target import target_from_grpc_service

log = logging.getLogger("pyproxy.sds")

SWEEP_DELAY = 1.0   # an unused provider's stream is closed this long after its last user went


def _open_stream_secrets(channel):
    from envoy.service.secret.v3 import sds_pb2_grpc
    return sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()


class _Stats:
    __slots__ = ("attempt", "success", "rejected", "timeout")

    def __init__(self, store, name):
        s = store.scope("sds.%s." % name)
        self.attempt = s.counter("update_attempt")
        self.success = s.counter("update_success")
        self.rejected = s.counter("update_rejected")
        self.timeout = s.counter("init_fetch_timeout")


class _Subscription:
    """The ``XdsHandler`` of one secret's own stream."""

    def __init__(self, manager, provider):
        self.manager = manager
        self.provider = provider
        self.client: XdsClient | None = None
        self.counted = False

    def on_resources(self, type_url, version_info, added, removed, sotw):
        p = self.provider
        m = self.manager
        st = m.stats_for(p.name)
        st.attempt.inc()
        self.counted = True
        if type_url != SECRET:
            raise ConfigError("unexpected type URL '%s' on an SDS stream" % type_url)
        if p.name not in added:
            raise ConfigError("Missing SDS resources for %s in onConfigUpdate()" % p.name)
        if len(added) != 1:
            raise ConfigError("Unexpected SDS secrets length: %d" % len(added))
        # ConfigError: NACKed, the last good stays
        STORE.apply_sds(added, (), version_info, source=p.source_key)
        self.counted = False
        st.success.inc()
        m.applied(added, version_info, p.source_key)

    def on_rejected(self, type_url, version_info, message) -> None:
        """The client NACKed a response (here or before the handler: an unexpected name...)."""
        if not self.counted:
            self.manager.stats_for(self.provider.name).attempt.inc()
        self.counted = False
        self.manager.rejected(self.provider, message)

    def on_connection_state(self, connected: bool) -> None:
        self.manager.connection_state(self.provider, connected)


class SdsManager:
    """Opens and closes SDS subscriptions as TLS contexts start and stop naming secrets."""

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
        self.clusters = {c.name: c for c in server.bootstrap.static_resources.clusters}
        self.subs: dict = {}            # provider key -> _Subscription (own stream)
        self.ads_names: set = set()
        self._stats: dict = {}
        self._sweep_handle = None
        self._down_logged: set = set()
        self._node = None
        self.closed = False
        STORE.hooks.append(self._on_provider)
        STORE.ready_hooks.append(self._refresh_expiry)
        STORE.rejected_hooks.append(self._first_rejected)
        for p in list(STORE.providers.values()):
            if p.refs > 0:
                self._on_provider(p, True)

    def stats_for(self, name: str) -> _Stats:
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = _Stats(self.server.stats, name)
        return s

    # -- provider lifecycle ----------------------------------------------------------------------
    def _on_provider(self, p, wanted: bool) -> None:
        if self.closed:
            return
        if not wanted:
            if self._sweep_handle is None:
                self._sweep_handle = self.loop.call_later(SWEEP_DELAY, self._sweep)
            return
        if p.source_key != "ads" and p.key not in self.subs:
            client = self._client_for(p)   # ConfigError (an unknown cluster...) rejects the resource
        else:
            client = None
        if not p.ready and p.fetch_timeout > 0 and p.timer is None:
            p.timer = self.loop.call_later(p.fetch_timeout, self._timed_out, p)
        if p.source_key == "ads":
            self.loop.call_soon(self._update_ads)   # once the provider is registered
            return
        if client is None:
            return
        sub = _Subscription(self, p)
        sub.client = client
        client.handler = sub
        self.subs[p.key] = sub
        client.subscribe(SECRET, {p.name})
        client.start()

    def _client_for(self, p) -> XdsClient:
        from .sources import backoff, node_for_xds
        acs = p.source.api_config_source
        g = acs.grpc_services[0]
        target = target_from_grpc_service(g, self.clusters)
        if self._node is None:
            self._node = node_for_xds(self.server)
        return XdsClient(target=target, node=self._node, api_type="GRPC", handler=None,
                         set_node_on_first_message_only=acs.set_node_on_first_message_only,
                         open_stream=_open_stream_secrets, reject_unrequested=True, **backoff(g))

    def _update_ads(self) -> None:
        names = {p.name for p in STORE.providers.values() if p.source_key == "ads" and p.refs > 0}
        if names == self.ads_names:
            return
        glue = self.server.xds
        client = glue.client_for_type.get(SECRET) if glue is not None else None
        if client is None:
            if names - self.ads_names:
                log.error("SDS secrets %s use ADS, but the bootstrap has no ads_config",
                          ", ".join(sorted(names - self.ads_names)))
            self.ads_names = names
            return
        self.ads_names = names
        client.subscribe(SECRET, names)

    def _sweep(self) -> None:
        self._sweep_handle = None
        ads_changed = False
        for p in [p for p in STORE.providers.values() if p.refs <= 0]:
            sub = self.subs.pop(p.key, None)
            if sub is not None and sub.client is not None:
                log.info("SDS secret '%s' no longer used; closing its stream", p.name)
                self.loop.create_task(sub.client.stop())
            if p.source_key == "ads":
                ads_changed = True
            STORE.drop(p)
        if ads_changed:
            self._update_ads()

    def _timed_out(self, p) -> None:
        p.timer = None
        if p.ready:
            return
        log.warning("SDS: initial fetch of secret '%s' timed out after %ss; TLS contexts using it "
                    "refuse connections until it arrives", p.name, p.fetch_timeout)
        self.stats_for(p.name).timeout.inc()
        STORE.mark_ready(p)
        self._tell_workers(p)

    def _first_rejected(self, providers) -> None:
        workers = self.server.workers
        if workers is not None:
            for p in providers:
                workers.secret_ready(p.name, p.source_key)

    def _tell_workers(self, p) -> None:
        workers = self.server.workers
        if workers is not None:
            workers.secret_ready(p.name, p.source_key)

    # -- from the subscriptions ------------------------------------------------------------------
    def rejected(self, p, message) -> None:
        self.stats_for(p.name).rejected.inc()
        p.error = str(message)
        if not p.ready:   # as Envoy: a rejected first response ends the initial fetch
            STORE.mark_ready(p)
            self._tell_workers(p)

    def applied(self, added: dict, version_info: str, source: str) -> None:
        workers = self.server.workers
        if workers is not None:
            workers.forward_secrets(source, version_info, added)
        self._refresh_expiry()

    def connection_state(self, p, connected: bool) -> None:
        if connected:
            if p.key in self._down_logged:
                log.warning("SDS server for secret '%s' is back", p.name)
            self._down_logged.discard(p.key)
        elif p.key not in self._down_logged and not self.closed:
            self._down_logged.add(p.key)
            log.warning("SDS server for secret '%s' went away; serving with the secrets in force "
                        "and reconnecting", p.name)

    def _refresh_expiry(self) -> None:
        from ..tls.certs import days_until_first_cert_expiring
        days = days_until_first_cert_expiring()
        st = getattr(self.server, "st_days_cert", None)
        if st is not None:
            st.set(days if days is not None else 2147483647)

    async def close(self) -> None:
        self.closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for hooks, h in ((STORE.hooks, self._on_provider), (STORE.ready_hooks, self._refresh_expiry),
                         (STORE.rejected_hooks, self._first_rejected)):
            if h in hooks:
                hooks.remove(h)
        for p in STORE.providers.values():
            if p.timer is not None:
                p.timer.cancel()
                p.timer = None
        subs, self.subs = list(self.subs.values()), {}
        await asyncio.gather(*(s.client.stop() for s in subs if s.client is not None),
                             return_exceptions=True)

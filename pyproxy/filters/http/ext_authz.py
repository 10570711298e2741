"""``envoy.filters.http.ext_authz``: external authorization — enforced fail-closed.

Istio's CUSTOM ``AuthorizationPolicy`` renders this filter with ``filter_enabled_metadata`` pointing at
the shadow RBAC result (``istio_ext_authz_shadow_effective_policy_id``), so only requests that the
policy selects are checked. pyproxy does not call the authorization service yet. Instead of skipping
the filter (which would let through requests the policy meant to check), every request the filter
*would* check is handled exactly as Envoy handles an unreachable authorization service:

- ``failure_mode_allow: true`` → allowed, ``x-envoy-auth-failure-mode-allowed: true`` added when
  ``failure_mode_allow_header_add``; stat ``failure_mode_allowed``;
- otherwise → denied with ``status_on_error`` (default 403), response flag ``UAEX``; stat ``error``.

Requests the filter would not check (``filter_enabled`` fraction, ``filter_enabled_metadata`` not
matching, a route with ``ExtAuthzPerRoute.disabled``) pass untouched; ``deny_at_disable`` denies them
as Envoy does. Stats under ``http.<prefix>.ext_authz.`` (``<stat_prefix>.`` inserted when set).
"""

from __future__ import annotations

import logging

from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401

from ...config import ConfigError
from ...http.filter import CONTINUE, STOP, HttpFilter
from ..rbac_engine import compile_value_matcher
from .util import PerRoute, fraction, hit

log = logging.getLogger("pyproxy.filter")


class ExtAuthzFactory:
    def __init__(self, cfg, ctx):
        which = cfg.WhichOneof("services")
        if which == "grpc_service":
            gs = cfg.grpc_service
            kind = gs.WhichOneof("target_specifier")
            if kind == "envoy_grpc":
                if not gs.envoy_grpc.cluster_name:
                    raise ConfigError("envoy_grpc.cluster_name must not be empty",
                                      field="ExtAuthz.grpc_service.envoy_grpc.cluster_name")
                self.service = "gRPC cluster '%s'" % gs.envoy_grpc.cluster_name
            elif kind == "google_grpc":
                self.service = "gRPC target '%s'" % gs.google_grpc.target_uri
            else:
                raise ConfigError("grpc_service needs envoy_grpc or google_grpc", field="ExtAuthz.grpc_service")
        elif which == "http_service":
            hs = cfg.http_service
            if not hs.server_uri.cluster:
                raise ConfigError("http_service.server_uri.cluster must not be empty",
                                  field="ExtAuthz.http_service.server_uri.cluster")
            self.service = "HTTP cluster '%s'" % hs.server_uri.cluster
        else:
            raise ConfigError("one of grpc_service or http_service is required", field="ExtAuthz")
        self.failure_mode_allow = cfg.failure_mode_allow
        self.failure_header = cfg.failure_mode_allow_header_add
        self.status_on_error = cfg.status_on_error.code if cfg.HasField("status_on_error") and \
            cfg.status_on_error.code else 403
        self.enabled = fraction(cfg.filter_enabled.default_value, "ExtAuthz.filter_enabled", 1.0) \
            if cfg.HasField("filter_enabled") else 1.0
        self.enabled_md = None
        if cfg.HasField("filter_enabled_metadata"):
            m = cfg.filter_enabled_metadata
            path = tuple(s.key for s in m.path)
            if not path:
                raise ConfigError("path must not be empty", field="ExtAuthz.filter_enabled_metadata.path")
            self.enabled_md = (m.filter, path, compile_value_matcher(m.value, "ExtAuthz.filter_enabled_metadata.value"),
                               m.invert)
        self.deny_at_disable = cfg.deny_at_disable.default_value.value \
            if cfg.HasField("deny_at_disable") and cfg.deny_at_disable.HasField("default_value") else False
        self.per_route = PerRoute(("envoy.filters.http.ext_authz",), _compile_per_route)
        self.notes = ["authorization service calls (%s) are not implemented: requests the filter selects are "
                      "handled as if the service were unreachable (%s)"
                      % (self.service, "allowed: failure_mode_allow" if self.failure_mode_allow
                         else "denied with %d" % self.status_on_error)]
        self.store = ctx.stats
        self.stat_prefix = cfg.stat_prefix
        self._stats = {}
        self._warned = False

    def stats(self, stream):
        prefix = getattr(getattr(stream, "cfg", None), "stat_prefix", "") or "unknown"
        d = self._stats.get(prefix)
        if d is None:
            base = "http.%s.ext_authz.%s" % (prefix, self.stat_prefix + "." if self.stat_prefix else "")
            d = self._stats[prefix] = {n: self.store.counter(base + n) for n in (
                "error", "denied", "disabled", "failure_mode_allowed", "ok")}
        return d

    def selects(self, stream) -> bool:
        if not hit(self.enabled):
            return False
        md = self.enabled_md
        if md is not None:
            filt, path, vm, invert = md
            v = stream.stream_info.dynamic_metadata.get(filt)
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if vm(v) == invert:
                return False
        return True

    def create(self, stream):
        return ExtAuthzFilter(stream, self)


_DISABLED = object()


def _compile_per_route(msg):
    if msg.DESCRIPTOR.full_name != "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute":
        raise ConfigError("per-route ext_authz config must be ExtAuthzPerRoute")
    return _DISABLED if msg.disabled else True


class ExtAuthzFilter(HttpFilter):
    __slots__ = ("f",)

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f

    def decode_headers(self, headers, end_stream):
        f = self.f
        cb = self.callbacks
        if f.per_route.lookup(cb) is _DISABLED:
            return CONTINUE
        if not f.selects(cb):
            if f.deny_at_disable:
                f.stats(cb)["denied"].inc()
                cb.send_local_reply(403, "", "ext_authz_denied", flag="UAEX")
                return STOP
            f.stats(cb)["disabled"].inc()
            return CONTINUE
        st = f.stats(cb)
        st["error"].inc()
        if not f._warned:
            f._warned = True
            log.warning("ext_authz: %s", f.notes[0])
        if f.failure_mode_allow:
            st["failure_mode_allowed"].inc()
            if f.failure_header:
                headers.set("x-envoy-auth-failure-mode-allowed", "true")
            return CONTINUE
        cb.send_local_reply(f.status_on_error, "", "ext_authz_error", flag="UAEX")
        return STOP


def factory(cfg, ctx):
    return ExtAuthzFactory(cfg, ctx)

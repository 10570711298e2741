"""Aggregated Discovery Service (ADS) client: state-of-the-world and delta xDS over grpc.aio.

One bidirectional stream carries every resource type. State is kept per type URL:

* SotW (``api_type: GRPC``): the accepted ``version_info`` and the last ``nonce`` received. A
  response is ACKed with a request carrying its version and nonce; NACKed with the previous good
  version, its nonce and ``error_detail``. Listener and Cluster responses (and any wildcard
  subscription) hold the full set, so names missing from a response are removals; for the named types
  (routes, endpoints, secrets) a missing name is not a removal.
* Delta (``api_type: DELTA_GRPC``): per-resource versions; subscriptions are sent as
  subscribe/unsubscribe differences; ``removed_resources`` are removals; a new stream sends
  ``initial_resource_versions`` for the resources held so the server can skip them.

The handler is called exactly once per response, in arrival order, on the event loop. Anything it
raises NACKs that response (``ConfigError``'s text goes into ``error_detail``) and the stream goes
on. As Envoy does, a handler may apply the good resources of a response and reject the bad ones: it
then raises ``PartiallyApplied`` naming what it applied. The response is NACKed (SotW keeps the
previous ``version_info``), but what was applied is remembered: SotW's full-state types take the
response's names as the set held (so a later response's removals are computed against it), delta
records the per-resource versions of the applied resources. Responses the client cannot decode (unknown type URL,
garbage bytes, type mismatch) are NACKed without calling the handler.

When the stream fails or the server goes away the client reconnects with jittered exponential
backoff and re-sends every subscription; the config in force stays as it is meanwhile.

States of the connection loop::

    idle --start()--> connecting --first write ok--> connected --stream error/EOF--> backoff
    backoff --sleep(jittered)--> connecting        any --stop()--> stopped
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from typing import Protocol

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from pyproxy.config.errors import ConfigError

from . import resources as R

log = logging.getLogger("pyproxy.xds")

INVALID_ARGUMENT = 3
INTERNAL = 13

DEFAULT_CHANNEL_OPTIONS = [
    # Istio pushes can be large (thousands of clusters); gRPC's 4 MiB default is too small.
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
    # Reconnection pacing is ours (the bootstrap's retry_back_off, as Envoy paces it): each stream
    # gets a fresh channel with a subchannel of its own. gRPC's global subchannel pool would hand
    # the new channel the old subchannel, still in gRPC's own connect backoff (1 s growing to 120 s),
    # and a reconnect would wait for that instead of ours.
    ("grpc.enable_retries", 0),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class PartiallyApplied(ConfigError):
    """Raised by a handler that applied part of a response: ``applied`` names the added resources it
    installed (the removals were all done); the message names every rejected resource."""

    def __init__(self, reason: str, applied=()):
        super().__init__(reason)
        self.applied = frozenset(applied)


class XdsHandler(Protocol):
    def on_resources(self, type_url: str, version_info: str, added: dict[str, Message],
                     removed: set[str], sotw: bool) -> None: ...

    def on_connection_state(self, connected: bool) -> None: ...

    # optional: ``on_stream_failure()``, called each time a stream ends or fails to open (Envoy
    # counts an update_failure on every subscription then)


class _TypeState:
    """Everything the client knows about one type URL."""

    __slots__ = ("type_url", "wildcard", "names", "version", "nonce", "known", "resource_versions",
                 "digest", "last_updated", "last_error", "sent", "sent_wildcard", "sent_names",
                 "responses", "acks", "nacks", "partial")

    def __init__(self, type_url: str):
        self.type_url = type_url
        self.wildcard = False
        self.names: frozenset[str] = frozenset()
        self.version = ""            # last accepted version_info (SotW) / system_version_info (delta)
        self.nonce = ""              # last nonce received on the current stream
        self.known: set[str] = set()  # SotW: names in the last accepted full-state response
        self.resource_versions: dict[str, str] = {}  # delta: name -> version held
        self.digest = b""            # SotW: digest of the last accepted response's resources
        self.partial = False         # the last response handled was applied in part (delta)
        self.last_updated = 0.0
        self.last_error: dict | None = None
        # per stream
        self.sent = False            # an initial request went out on this stream
        self.sent_wildcard = False
        self.sent_names: frozenset[str] = frozenset()
        self.responses = 0
        self.acks = 0
        self.nacks = 0

    def info(self) -> dict:
        return {
            "type_url": self.type_url,
            "wildcard": self.wildcard,
            "names": sorted(self.names),
            "version_info": self.version,
            "nonce": self.nonce,
            "last_updated": self.last_updated,
            "last_error": dict(self.last_error) if self.last_error else None,
            "resource_versions": dict(self.resource_versions),
            "responses": self.responses,
            "acks": self.acks,
            "nacks": self.nacks,
        }


class _Malformed(Exception):
    """The server sent bytes that are not a discovery response."""


class XdsClient:
    """ADS client. ``subscribe`` declares interest; ``start`` runs the stream on the current loop."""

    def __init__(self, *, target: str, node, api_type: str, handler: XdsHandler, stats=None,
                 set_node_on_first_message_only: bool = False, initial_backoff: float = 0.5,
                 max_backoff: float = 30.0, channel_options: list | None = None,
                 open_stream=None, reject_unrequested: bool = False):
        """``open_stream(channel)`` opens the bidirectional call of a per-type (non-aggregated)
        discovery service, e.g. SDS's ``StreamSecrets``; by default the ADS call is used.
        ``reject_unrequested``: a SotW response naming a resource that was not subscribed is NACKed
        (SDS, as Envoy's ``SdsApi``) instead of skipped."""
        if api_type not in ("GRPC", "DELTA_GRPC"):
            raise ConfigError("unsupported api_type '%s' (GRPC or DELTA_GRPC)" % api_type,
                              field="ads_config.api_type")
        if initial_backoff <= 0 or max_backoff < initial_backoff:
            raise ValueError("backoff must satisfy 0 < initial_backoff <= max_backoff")
        self.target = target
        self.node = node
        self.api_type = api_type
        self.delta = api_type == "DELTA_GRPC"
        self.handler = handler
        self.node_first_only = set_node_on_first_message_only
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        opts = dict(DEFAULT_CHANNEL_OPTIONS)
        opts.update(dict(channel_options or ()))
        self.channel_options = list(opts.items())
        self.open_stream = open_stream
        self.reject_unrequested = reject_unrequested
        self.connected = False
        self.streams = 0             # streams opened so far
        self.last_stream_error = ""
        self._types: dict[str, _TypeState] = {}
        self._task: asyncio.Task | None = None
        self._queue: asyncio.Queue | None = None   # requests for the live stream, else None
        self._first_message = True
        self._in_response = False
        self._dirty: list[_TypeState] = []
        self._stopping = False
        # While the handler runs: the version of each resource in the response being applied
        # (delta: per resource; SotW: every name -> version_info), for config_dump.
        self.response_versions: dict[str, str] = {}
        self._gauge = stats.gauge("control_plane.connected_state", accumulate=False) if stats else None
        if self._gauge is not None:
            self._gauge.set(0)

    # ------------------------------------------------------------------ public API

    def subscribe(self, type_url: str, names: set[str] | None) -> None:
        """Declare the names wanted for ``type_url`` (None = wildcard). Sends only on a change."""
        ts = self._types.get(type_url)
        if ts is None:
            ts = self._types[type_url] = _TypeState(type_url)
        wildcard = names is None
        new = frozenset(names or ())
        if ts.wildcard == wildcard and ts.names == new and (ts.sent or self._queue is None):
            return
        ts.wildcard, ts.names = wildcard, new
        if not wildcard:
            # Resources we no longer want are not "held" any more: never claim them on reconnect.
            for n in [n for n in ts.resource_versions if n not in new]:
                del ts.resource_versions[n]
        if self._queue is None:
            return
        if self._in_response:
            if ts not in self._dirty:
                self._dirty.append(ts)
        else:
            self._send_subscription(ts)

    def unsubscribe(self, type_url: str) -> None:
        self.subscribe(type_url, set())

    def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="xds-client")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # already logged by the task
                pass
        self._set_connected(False)

    def type_state(self, type_url: str) -> dict | None:
        ts = self._types.get(type_url)
        return ts.info() if ts is not None else None

    def type_urls(self) -> list[str]:
        return sorted(self._types, key=R.order_key)

    # ------------------------------------------------------------------ connection loop

    def _backoff(self, attempt: int) -> float:
        """Envoy's JitteredExponentialBackOffStrategy: a uniform pick below base * 2^attempt, that
        bound capped at the maximum (full jitter)."""
        cap = min(self.max_backoff, self.initial_backoff * (2 ** min(attempt, 30)))
        return random.uniform(0.0, cap)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            got_response = False
            try:
                got_response = await self._one_stream()
                self.last_stream_error = "stream closed by the server"
                log.warning("xDS stream to %s closed by the server", self.target)
            except asyncio.CancelledError:
                raise
            except _Malformed as e:
                got_response = self._got_response
                self.last_stream_error = str(e)
                log.warning("xDS stream to %s: %s; reconnecting", self.target, e)
            except grpc.aio.AioRpcError as e:
                got_response = self._got_response
                self.last_stream_error = "%s: %s" % (e.code().name, e.details())
                log.warning("xDS stream to %s failed: %s", self.target, self.last_stream_error)
            except Exception as e:  # never let the client die
                got_response = self._got_response
                self.last_stream_error = repr(e)
                log.exception("xDS stream to %s failed", self.target)
            finally:
                self._queue = None
                self._set_connected(False)
            if self._stopping:
                break
            notify = getattr(self.handler, "on_stream_failure", None)
            if notify is not None:
                try:
                    notify()
                except Exception:
                    log.exception("xDS handler on_stream_failure failed")
            if got_response:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            log.info("xDS: reconnecting to %s in %.2fs", self.target, delay)
            await asyncio.sleep(delay)

    async def _one_stream(self) -> bool:
        """Run one stream until it ends. Returns whether any response arrived on it."""
        self._got_response = False
        channel = grpc.aio.insecure_channel(self.target, options=self.channel_options)
        writer = None
        call = None
        try:
            if self.open_stream is not None:
                call = self.open_stream(channel)
            else:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.DeltaAggregatedResources() if self.delta else stub.StreamAggregatedResources()
            self.streams += 1
            self._queue = asyncio.Queue()
            self._first_message = True
            self._dirty = []
            for ts in self._types.values():
                ts.sent = False
                ts.sent_wildcard = False
                ts.sent_names = frozenset()
                ts.nonce = ""
            for ts in sorted(self._types.values(), key=lambda t: R.order_key(t.type_url)):
                self._send_subscription(ts)
            write_failed: list = []
            writer = asyncio.get_running_loop().create_task(
                self._writer(call, self._queue, write_failed), name="xds-writer")
            while True:
                try:
                    resp = await call.read()
                except asyncio.CancelledError:
                    if write_failed and not asyncio.current_task().cancelling():
                        raise write_failed[0] from None
                    raise
                if resp is grpc.aio.EOF:
                    if write_failed:
                        raise write_failed[0]
                    return self._got_response
                if resp is None:
                    raise _Malformed("malformed discovery response (undecodable message)")
                self._got_response = True
                self._set_connected(True)
                self._on_response(resp)
                # let the writer send what this response made us ask for (the EDS names after a
                # CDS push) before the next response, already read, is applied: the server
                # prepares it meanwhile
                await asyncio.sleep(0)
        finally:
            self._queue = None
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    async def _writer(self, call, queue: asyncio.Queue, failed: list) -> None:
        try:
            while True:
                req = await queue.get()
                if self._first_message or not self.node_first_only:
                    req.node.CopyFrom(self.node)
                self._first_message = False
                await call.write(req)
                self._set_connected(True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The reader notices through the cancelled call and reports this error.
            failed.append(e if isinstance(e, grpc.aio.AioRpcError) else ConnectionError(repr(e)))
            call.cancel()

    def _set_connected(self, up: bool) -> None:
        if self.connected == up:
            return
        self.connected = up
        if self._gauge is not None:
            self._gauge.set(1 if up else 0)
        log.info("xDS: %s %s", "connected to" if up else "disconnected from", self.target)
        try:
            self.handler.on_connection_state(up)
        except Exception:
            log.exception("xDS handler on_connection_state failed")

    # ------------------------------------------------------------------ requests

    def _send_subscription(self, ts: _TypeState) -> None:
        q = self._queue
        if q is None:
            return
        if not ts.sent and not ts.wildcard and not ts.names:
            return  # nothing wanted yet: say nothing
        if self.delta:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=ts.type_url)
            if not ts.sent:
                if not ts.wildcard:
                    req.resource_names_subscribe.extend(sorted(ts.names))
                held = ts.resource_versions if ts.wildcard else {
                    n: v for n, v in ts.resource_versions.items() if n in ts.names}
                for n, v in held.items():
                    req.initial_resource_versions[n] = v
            else:
                sub, unsub = [], []
                if ts.wildcard and not ts.sent_wildcard:
                    sub.append("*")
                elif ts.sent_wildcard and not ts.wildcard:
                    unsub.append("*")
                sub.extend(sorted(ts.names - ts.sent_names))
                unsub.extend(sorted(ts.sent_names - ts.names))
                if not sub and not unsub:
                    return
                req.resource_names_subscribe.extend(sub)
                req.resource_names_unsubscribe.extend(unsub)
        else:
            req = discovery_pb2.DiscoveryRequest(type_url=ts.type_url, version_info=ts.version,
                                                 response_nonce=ts.nonce)
            if ts.sent and ts.sent_wildcard == ts.wildcard and ts.sent_names == ts.names:
                return  # already told (an ACK carried it)
            if ts.wildcard:
                if ts.sent and not ts.sent_wildcard:
                    req.resource_names.append("*")
            else:
                req.resource_names.extend(sorted(ts.names))
        ts.sent = True
        ts.sent_wildcard = ts.wildcard
        ts.sent_names = ts.names
        q.put_nowait(req)

    def _send_ack(self, ts: _TypeState | None, type_url: str, nonce: str, error: str | None,
                  code: int = INVALID_ARGUMENT) -> None:
        q = self._queue
        if q is None:
            return
        detail = status_pb2.Status(code=code, message=error) if error is not None else None
        if self.delta:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
        else:
            req = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce,
                                                 version_info=ts.version if ts else "")
            if ts is not None and ts.sent:
                if ts.wildcard:
                    if ts.sent_wildcard is False:
                        req.resource_names.append("*")
                else:
                    req.resource_names.extend(sorted(ts.names))
                ts.sent_wildcard, ts.sent_names = ts.wildcard, ts.names
        if detail is not None:
            req.error_detail.CopyFrom(detail)
        if ts is not None:
            if error is None:
                ts.acks += 1
            else:
                ts.nacks += 1
        q.put_nowait(req)

    # ------------------------------------------------------------------ responses

    def _on_response(self, resp) -> None:
        self._in_response = True
        self._dirty = []
        try:
            if self.delta:
                self._on_delta(resp)
            else:
                self._on_sotw(resp)
        finally:
            self._in_response = False
            dirty, self._dirty = self._dirty, []
            for ts in dirty:
                self._send_subscription(ts)

    def _subscribed(self, resp, version: str) -> _TypeState | None:
        """The subscription a response answers (nonce and count updated); None: rejected."""
        ts = self._types.get(resp.type_url)
        if ts is None or not ts.sent:
            self._reject(None, resp.type_url, resp.nonce, version,
                         ConfigError("no subscription for type URL '%s'" % resp.type_url))
            return None
        ts.nonce = resp.nonce
        ts.responses += 1
        return ts

    def _reject(self, ts: _TypeState | None, type_url: str, nonce: str, version: str,
                err: BaseException) -> None:
        if isinstance(err, ConfigError):
            msg, code = str(err), INVALID_ARGUMENT
        else:
            msg, code = "internal error applying %s: %r" % (type_url, err), INTERNAL
        log.warning("xDS: rejecting %s version %r (nonce %r): %s", type_url, version, nonce, msg)
        on_rejected = getattr(self.handler, "on_rejected", None)
        if on_rejected is not None and ts is not None:
            try:
                on_rejected(type_url, version, msg)
            except Exception:  # noqa: BLE001 - never let a hook break the stream
                log.exception("xDS handler on_rejected failed")
        if ts is not None:
            ts.last_error = {"version_info": version, "nonce": nonce, "message": msg, "code": code,
                             "time": time.time()}
        self._send_ack(ts, type_url, nonce, msg, INVALID_ARGUMENT if ts is None else code)

    def _call_handler(self, type_url: str, version: str, added: dict, removed: set, sotw: bool):
        self.handler.on_resources(type_url, version, added, removed, sotw)

    def _on_sotw(self, resp) -> None:
        t = resp.type_url
        ts = self._subscribed(resp, resp.version_info)
        if ts is None:
            return
        h = hashlib.blake2b(digest_size=16)
        for a in resp.resources:
            h.update(a.type_url.encode())
            h.update(len(a.value).to_bytes(8, "little"))
            h.update(a.value)
        digest = h.digest()
        if resp.version_info == ts.version and digest == ts.digest and ts.last_updated:
            log.debug("xDS: %s version %r unchanged; ACK without applying", t, ts.version)
            self._send_ack(ts, t, resp.nonce, None)
            return
        full_state = ts.wildcard or t in R.SOTW_FULL_STATE_TYPES
        try:
            cls = R.known_class(t)
            added: dict[str, Message] = {}
            for a in resp.resources:
                msg = R.decode_any(a, t, cls)
                name = R.resource_name(msg)
                if name in added:
                    raise ConfigError("duplicate resource name '%s' in response" % name)
                if not full_state and name not in ts.names:
                    if self.reject_unrequested:
                        raise ConfigError("unexpected resource '%s' (subscribed: %s)"
                                          % (name, ", ".join(sorted(ts.names))))
                    log.debug("xDS: ignoring unrequested %s '%s'", t, name)
                    continue
                added[name] = msg
            removed = (ts.known - added.keys()) if full_state else set()
            self.response_versions = dict.fromkeys(added, resp.version_info)
            self._call_handler(t, resp.version_info, added, removed, True)
        except PartiallyApplied as e:
            # the good resources are in force, the removals done: the response's names are what is
            # held now; the version and digest stay (Envoy NACKs with the previous version_info)
            if full_state:
                ts.known = set(added)
            ts.digest = b""     # what is in force is no longer the last accepted response
            self._reject(ts, t, resp.nonce, resp.version_info, e)
            return
        except Exception as e:  # NACK; the stream and the config in force stay
            if not isinstance(e, ConfigError):
                log.exception("xDS handler failed on %s", t)
            self._reject(ts, t, resp.nonce, resp.version_info, e)
            return
        ts.version = resp.version_info
        ts.digest = digest
        if full_state:
            ts.known = set(added)
        ts.last_updated = time.time()
        ts.last_error = None
        self._send_ack(ts, t, resp.nonce, None)

    def _on_delta(self, resp) -> None:
        t = resp.type_url
        ts = self._subscribed(resp, resp.system_version_info)
        if ts is None:
            return
        try:
            cls = R.known_class(t)
            added: dict[str, Message] = {}
            versions: dict[str, str] = {}
            for r in resp.resources:
                if not r.HasField("resource"):
                    continue  # a TTL heartbeat: nothing to apply
                msg = R.decode_any(r.resource, t, cls)
                name = r.name or R.resource_name(msg)
                if name in added:
                    raise ConfigError("duplicate resource name '%s' in response" % name)
                added[name] = msg
                versions[name] = r.version
            removed = set(resp.removed_resources)
            removed.update(rn.name for rn in resp.removed_resource_names)
            overlap = removed & added.keys()
            if overlap:
                raise ConfigError("resource '%s' both updated and removed" % sorted(overlap)[0])
            # (after a partly applied response the next one is always applied: the handler's state,
            # its error states among it, follows the latest response of the type, as Envoy's does)
            unchanged = (added and not removed and not ts.partial and all(
                v and ts.resource_versions.get(n) == v for n, v in versions.items()))
            if unchanged:
                log.debug("xDS: %s resources unchanged; ACK without applying", t)
            else:
                self.response_versions = versions
                self._call_handler(t, resp.system_version_info, added, removed, False)
        except PartiallyApplied as e:
            rv = ts.resource_versions
            for n in removed:
                rv.pop(n, None)
            for n in e.applied:
                if n in versions:
                    rv[n] = versions[n]
            ts.partial = True
            self._reject(ts, t, resp.nonce, resp.system_version_info, e)
            return
        except Exception as e:  # NACK; the stream and the config in force stay
            if not isinstance(e, ConfigError):
                log.exception("xDS handler failed on %s", t)
            self._reject(ts, t, resp.nonce, resp.system_version_info, e)
            return
        rv = ts.resource_versions
        for n in removed:
            rv.pop(n, None)
        rv.update(versions)
        ts.partial = False
        ts.version = resp.system_version_info
        ts.last_updated = time.time()
        ts.last_error = None
        self._send_ack(ts, t, resp.nonce, None)

"""The ADS server: serves the loaded snapshot over SotW and delta streams, pushes on change."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time

import grpc
from google.protobuf import json_format

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from pyproxy.config.errors import ConfigError
from pyproxy.xds_client import resources as R

from .loader import Resource, file_signature, load_dir

log = logging.getLogger("pyproxy.control_plane")

MAX_RECORDS = 10000
_CHANGED = object()   # queue marker: the snapshot changed


class _Sub:
    """One stream's view of one type URL."""

    __slots__ = ("wildcard", "names", "nonce", "sent_digest", "known", "pending")

    def __init__(self):
        self.wildcard = False
        self.names: set[str] = set()
        self.nonce = ""                 # latest nonce sent for this type
        self.sent_digest = None         # SotW: (name, version) pairs of the last response
        self.known: dict[str, str] = {}  # delta: name -> version the client is taken to hold
        self.pending: dict[str, dict] = {}  # delta: nonce -> {name: previous version or None}


class _Stream:
    __slots__ = ("id", "api", "node_id", "queue", "subs", "peer", "opened", "change_pending")

    def __init__(self, sid: int, api: str, peer: str):
        self.id = sid
        self.api = api
        self.node_id = ""
        self.queue: asyncio.Queue = asyncio.Queue()
        self.subs: dict[str, _Sub] = {}
        self.peer = peer
        self.opened = time.time()
        self.change_pending = False   # a _CHANGED marker is queued (coalesces bursts of reloads)


class ControlPlane(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """File-driven ADS server. ``await start()`` loads, binds and begins polling; ``await stop()``.

    After ``start()``, ``port`` is the bound TCP port (useful with ``port=0``). ``acks``, ``nacks``
    and ``requests`` record what clients sent (dicts; see ``_record``).
    """

    def __init__(self, config_dir: str, *, port: int | None = 0, address: str = "127.0.0.1",
                 uds: str | None = None, poll_interval: float = 0.3, status_file: str | None = None):
        self.config_dir = config_dir
        self.address = address
        self.requested_port = port
        self.port: int | None = None
        self.uds = uds
        self.poll_interval = max(0.05, min(poll_interval, 5.0))
        self.status_file = status_file
        self.snapshot: dict[str, dict[str, Resource]] = {}
        self.version = 0
        self.load_error: str | None = None
        self.acks: list[dict] = []
        self.nacks: list[dict] = []
        self.requests: list[dict] = []
        self.streams: dict[int, _Stream] = {}
        self.streams_total = 0
        self._sig = None
        self._nonces = itertools.count(1)
        self._sids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._poll_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._sig = file_signature(self.config_dir)
        try:
            self._install(await asyncio.to_thread(load_dir, self.config_dir))
        except ConfigError as e:
            self.load_error = str(e)
            log.error("control plane: cannot load %s: %s (serving nothing until fixed)",
                      self.config_dir, e)
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30),
                                          ("grpc.max_receive_message_length", 1 << 30),
                                          ("grpc.so_reuseport", 0)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        if self.requested_port is not None:
            host = "[%s]" % self.address if ":" in self.address else self.address
            self.port = server.add_insecure_port("%s:%d" % (host, self.requested_port))
            if not self.port:
                raise OSError("cannot listen on %s:%d" % (self.address, self.requested_port))
        if self.uds:
            path = os.path.abspath(self.uds)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            if not server.add_insecure_port("unix:" + path):
                raise OSError("cannot listen on unix socket %s" % path)
        await server.start()
        self._server = server
        self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="cp-poll")
        log.info("control plane: serving %s (version %d) on %s%s", self.config_dir, self.version,
                 "port %s" % self.port if self.port else "",
                 " unix:%s" % self.uds if self.uds else "")
        self._write_status()

    async def stop(self) -> None:
        task, self._poll_task = self._poll_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)
        if self.uds:
            try:
                os.unlink(os.path.abspath(self.uds))
            except OSError:
                pass

    # ------------------------------------------------------------------ snapshot

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.reload()
            except Exception:
                log.exception("control plane: reload failed")

    async def reload(self, force: bool = False) -> bool:
        """Re-read the directory if it changed. Returns True when a new version was installed."""
        sig = file_signature(self.config_dir)
        if sig == self._sig and not force:
            return False
        self._sig = sig
        try:
            snap = await asyncio.to_thread(load_dir, self.config_dir)
        except ConfigError as e:
            if self.load_error != str(e):
                log.error("control plane: invalid config, keeping version %d: %s", self.version, e)
            self.load_error = str(e)
            self._write_status()
            return False
        self.load_error = None
        return self._install(snap)

    def _install(self, snap: dict[str, dict[str, Resource]]) -> bool:
        def flat(s):
            return {t: {n: r.version for n, r in by.items()} for t, by in s.items() if by}
        if flat(snap) == flat(self.snapshot) and self.version:
            return False
        self.snapshot = snap
        self.version += 1
        log.info("control plane: version %d: %s", self.version,
                 ", ".join("%d %s" % (len(v), t.rpartition(".")[2]) for t, v in sorted(snap.items())))
        for st in self.streams.values():
            if not st.change_pending:
                st.change_pending = True
                st.queue.put_nowait(_CHANGED)
        self._write_status()
        return True

    def set_resources(self, resources: list) -> bool:
        """Install resources directly (tests): ``Resource`` objects or dicts in the file format."""
        from .loader import parse_resource
        snap: dict[str, dict[str, Resource]] = {}
        for r in resources:
            if isinstance(r, dict):
                r = parse_resource(r, "<api>")
            snap.setdefault(r.type_url, {})[r.name] = r
        return self._install(snap)

    # ------------------------------------------------------------------ records

    def _record(self, kind: str, st: _Stream, **kw) -> None:
        rec = {"stream": st.id, "api": st.api, "node": st.node_id, "time": time.time()}
        rec.update(kw)
        lst = {"ack": self.acks, "nack": self.nacks, "request": self.requests}[kind]
        lst.append(rec)
        if len(lst) > MAX_RECORDS:
            del lst[: len(lst) - MAX_RECORDS]
        if kind == "nack":
            log.warning("control plane: NACK from %s (stream %d) for %s nonce %s: %s", st.node_id,
                        st.id, rec.get("type_url"), rec.get("nonce"), rec.get("error"))
        elif kind == "ack":
            log.info("control plane: ACK from %s (stream %d) for %s version %s", st.node_id, st.id,
                     rec.get("type_url"), rec.get("version"))
        if kind != "request":
            self._write_status()

    def status(self) -> dict:
        return {
            "version": self.version,
            "port": self.port,
            "uds": self.uds,
            "load_error": self.load_error,
            "resources": {t: sorted(by) for t, by in self.snapshot.items()},
            "streams": [{"id": s.id, "api": s.api, "node": s.node_id, "peer": s.peer,
                         "types": {t: {"wildcard": sub.wildcard, "names": sorted(sub.names)}
                                   for t, sub in s.subs.items()}}
                        for s in self.streams.values()],
            "streams_total": self.streams_total,
            "acks": self.acks[-200:],
            "nacks": self.nacks[-200:],
            "requests": self.requests[-200:],
        }

    def _write_status(self) -> None:
        if not self.status_file:
            return
        tmp = self.status_file + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.status(), f, indent=1)
            os.replace(tmp, self.status_file)
        except OSError as e:
            log.warning("control plane: cannot write status file: %s", e)

    # ------------------------------------------------------------------ streams

    async def StreamAggregatedResources(self, request_iterator, context):
        await self._serve(context, "sotw")

    async def DeltaAggregatedResources(self, request_iterator, context):
        await self._serve(context, "delta")

    async def _serve(self, context, api: str) -> None:
        st = _Stream(next(self._sids), api, context.peer())
        self.streams[st.id] = st
        self.streams_total += 1
        log.info("control plane: %s stream %d opened from %s", api, st.id, st.peer)
        self._write_status()

        async def read():
            try:
                while True:
                    req = await context.read()
                    if req is grpc.aio.EOF:
                        break
                    st.queue.put_nowait(req)
            finally:
                st.queue.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            await context.send_initial_metadata(())
            while True:
                item = await st.queue.get()
                if item is None:
                    break
                if item is _CHANGED:
                    st.change_pending = False
                    for t in sorted(st.subs, key=R.order_key):
                        await self._push(context, st, t, first=False)
                    continue
                if not item.type_url:
                    log.warning("control plane: stream %d: request without type_url ignored", st.id)
                    continue
                try:
                    if api == "sotw":
                        await self._on_sotw(context, st, item)
                    else:
                        await self._on_delta(context, st, item)
                except ConfigError as e:
                    log.warning("control plane: stream %d: bad request: %s", st.id, e)
        except asyncio.CancelledError:
            # gRPC cancels handlers when the server stops or the peer goes away: a normal end.
            pass
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.streams.pop(st.id, None)
            log.info("control plane: %s stream %d closed", api, st.id)
            self._write_status()

    def _note_node(self, st: _Stream, req) -> None:
        if req.HasField("node") and req.node.id:
            st.node_id = req.node.id

    async def _on_sotw(self, context, st: _Stream, req) -> None:
        self._note_node(st, req)
        t = req.type_url
        names = set(req.resource_names)
        self._record("request", st, type_url=t, version=req.version_info, nonce=req.response_nonce,
                     resource_names=sorted(names), has_node=req.HasField("node"),
                     error=req.error_detail.message if req.HasField("error_detail") else None)
        sub = st.subs.get(t)
        first = sub is None
        if first:
            sub = st.subs[t] = _Sub()
        elif req.response_nonce != sub.nonce:
            log.debug("control plane: stream %d: stale nonce %r for %s (latest %r); ignored",
                      st.id, req.response_nonce, t, sub.nonce)
            return
        if req.response_nonce:
            if req.HasField("error_detail"):
                self._record("nack", st, type_url=t, version=req.version_info,
                             nonce=req.response_nonce, code=req.error_detail.code,
                             error=req.error_detail.message)
            else:
                self._record("ack", st, type_url=t, version=req.version_info,
                             nonce=req.response_nonce)
        if first:
            wildcard = not names or "*" in names
        else:
            wildcard = "*" in names or (sub.wildcard and not names)
        names.discard("*")
        if first or wildcard != sub.wildcard or names != sub.names:
            sub.wildcard, sub.names = wildcard, names
            await self._push(context, st, t, first=True)

    async def _on_delta(self, context, st: _Stream, req) -> None:
        self._note_node(st, req)
        t = req.type_url
        self._record("request", st, type_url=t, nonce=req.response_nonce,
                     subscribe=list(req.resource_names_subscribe),
                     unsubscribe=list(req.resource_names_unsubscribe),
                     initial_resource_versions=dict(req.initial_resource_versions),
                     has_node=req.HasField("node"),
                     error=req.error_detail.message if req.HasField("error_detail") else None)
        sub = st.subs.get(t)
        first = sub is None
        if first:
            sub = st.subs[t] = _Sub()
            sub.known = dict(req.initial_resource_versions)
            sub.wildcard = not req.resource_names_subscribe
        if req.response_nonce:
            prev = sub.pending.pop(req.response_nonce, None)
            if req.HasField("error_detail"):
                self._record("nack", st, type_url=t, nonce=req.response_nonce,
                             code=req.error_detail.code, error=req.error_detail.message)
                for n, v in (prev or {}).items():   # the client kept what it had
                    if v is None:
                        sub.known.pop(n, None)
                    else:
                        sub.known[n] = v
            else:
                self._record("ack", st, type_url=t, nonce=req.response_nonce,
                             version=str(self.version))
        changed = False
        for n in req.resource_names_subscribe:
            if n == "*":
                changed |= not sub.wildcard
                sub.wildcard = True
            elif n not in sub.names:
                sub.names.add(n)
                changed = True
        for n in req.resource_names_unsubscribe:
            if n == "*":
                changed |= sub.wildcard
                sub.wildcard = False
            else:
                changed |= n in sub.names
                sub.names.discard(n)
                if not sub.wildcard:
                    sub.known.pop(n, None)
        if first or changed:
            await self._push(context, st, t, first=first)

    async def _push(self, context, st: _Stream, t: str, first: bool) -> None:
        sub = st.subs[t]
        have = self.snapshot.get(t, {})
        if sub.wildcard:
            scope = have
        else:
            scope = {n: have[n] for n in sub.names if n in have}
        nonce = str(next(self._nonces))
        if st.api == "sotw":
            digest = tuple(sorted((n, r.version) for n, r in scope.items()))
            if not first and digest == sub.sent_digest:
                return
            resp = discovery_pb2.DiscoveryResponse(version_info=str(self.version), type_url=t,
                                                   nonce=nonce)
            resp.resources.extend(scope[n].any for n in sorted(scope))
            sub.sent_digest = digest
            sub.nonce = nonce
            await context.write(resp)
            return
        send = [r for n, r in sorted(scope.items()) if sub.known.get(n) != r.version]
        removed = sorted(n for n in sub.known if n not in scope)
        if not send and not removed and not first:
            return
        resp = discovery_pb2.DeltaDiscoveryResponse(system_version_info=str(self.version),
                                                    type_url=t, nonce=nonce)
        for r in send:
            resp.resources.add(name=r.name, version=r.version).resource.CopyFrom(r.any)
        resp.removed_resources.extend(removed)
        prev = {}
        for r in send:
            prev[r.name] = sub.known.get(r.name)
            sub.known[r.name] = r.version
        for n in removed:
            prev[n] = sub.known.pop(n)
        sub.pending[nonce] = prev
        if len(sub.pending) > 64:   # a client that never ACKs must not grow this without bound
            sub.pending.pop(next(iter(sub.pending)))
        sub.nonce = nonce
        await context.write(resp)


def status_json(cp: ControlPlane) -> str:
    return json.dumps(cp.status(), indent=1, default=lambda o: json_format.MessageToDict(o))

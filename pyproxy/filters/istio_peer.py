"""Istio's workload metadata, as the peer metadata exchange carries it and istio.stats reads it.

Shared by ``istio.metadata_exchange`` (TCP, ``filters/network/metadata_exchange.py``), the HTTP
``peer_metadata`` filter (``filters/http/peer_metadata.py``) and ``istio.stats``. The model and its
encodings follow istio/proxy's ``extensions/common/metadata_object``:

- the local node's ``metadata`` (NAME, NAMESPACE, OWNER, WORKLOAD_NAME, CLUSTER_ID, IDENTITY,
  LABELS, REGION, AVAILABILITY_ZONE) becomes a ``WorkloadMetadata``;
- on the wire it is a ``google.protobuf.Struct`` with only the non-empty keys (``LABELS`` always),
  serialised deterministically; ``x-envoy-peer-metadata`` is its standard base64;
- in filter state, ``downstream_peer``/``upstream_peer`` hold the ``Struct`` Istio's CEL reads
  (keys ``type, workload, name, cluster, namespace, service, revision, app, version, identity,
  region, availability_zone, labels``) and ``*_peer_obj`` the object itself (field access for
  ``%FILTER_STATE(downstream_peer_obj:FIELD:workload)%``); ``peer_not_found`` is ``True`` when the
  TCP exchange found nobody.
"""

from __future__ import annotations

import base64
import binascii
import logging

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

log = logging.getLogger("pyproxy.filter")

DOWNSTREAM_PEER = "downstream_peer"
UPSTREAM_PEER = "upstream_peer"
DOWNSTREAM_PEER_OBJ = "downstream_peer_obj"
UPSTREAM_PEER_OBJ = "upstream_peer_obj"
NO_PEER = "peer_not_found"
HEADER = "x-envoy-peer-metadata"
HEADER_ID = "x-envoy-peer-metadata-id"

CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
OWNER_PREFIX = "kubernetes://apis/apps/v1/namespaces/"
WORKLOAD_TYPES = ("pod", "deployment", "job", "cronjob")

MAX_HEADER_BYTES = 16 * 1024   # a larger x-envoy-peer-metadata is refused (counted, logged once)
PEER_CACHE_SIZE = 500          # Istio's per-worker cache of decoded peers, keyed by peer id


class WorkloadMetadata:
    """One workload's identity (immutable once built; shared by every stream that saw it)."""

    __slots__ = ("instance_name", "cluster_name", "namespace_name", "workload_name", "canonical_name",
                 "canonical_revision", "app_name", "app_version", "workload_type", "identity",
                 "region", "zone", "labels", "_struct")

    def __init__(self, instance_name="", cluster_name="", namespace_name="", workload_name="",
                 canonical_name="", canonical_revision="", app_name="", app_version="",
                 workload_type="", identity="", region="", zone="", labels=()):
        self.instance_name = instance_name
        self.cluster_name = cluster_name
        self.namespace_name = namespace_name
        self.workload_name = workload_name
        self.canonical_name = canonical_name
        self.canonical_revision = canonical_revision
        self.app_name = app_name
        self.app_version = app_version
        self.workload_type = workload_type  # "pod", "deployment", "job", "cronjob" or ""
        self.identity = identity
        self.region = region
        self.zone = zone
        self.labels = tuple(labels)  # the additional labels kept: ((name, value), ...)
        self._struct = None

    # -- filter-state views ----------------------------------------------------------------------
    def field(self, name: str):
        """``FIELD:<name>`` of ``%FILTER_STATE(..._peer_obj:FIELD:name)%`` (None if unknown)."""
        v = _FIELDS.get(name)
        if v is None:
            return None
        if v == "workload_type":
            return self.workload_type or "unknown"
        return getattr(self, v)

    def filter_state_struct(self) -> struct_pb2.Struct:
        """The ``downstream_peer``/``upstream_peer`` value (Istio's ``serializeAsProto``)."""
        s = self._struct
        if s is not None:
            return s
        s = struct_pb2.Struct()
        f = s.fields
        if self.workload_type:
            f["type"].string_value = self.workload_type
        if self.workload_name:
            f["workload"].string_value = self.workload_name
        if self.cluster_name:  # Istio's quirk: the instance name only with a cluster name
            f["name"].string_value = self.instance_name
            f["cluster"].string_value = self.cluster_name
        for key, attr in (("namespace", "namespace_name"), ("service", "canonical_name"),
                          ("revision", "canonical_revision"), ("app", "app_name"),
                          ("version", "app_version"), ("identity", "identity"),
                          ("region", "region"), ("availability_zone", "zone")):
            v = getattr(self, attr)
            if v:
                f[key].string_value = v
        if self.labels:
            lab = f["labels"].struct_value
            for k, v in self.labels:
                lab.fields[k].string_value = v
        self._struct = s
        return s

    def serialize_as_string(self) -> str:
        """What ``%FILTER_STATE(key)%`` prints for the object: its JSON."""
        from google.protobuf import json_format
        return json_format.MessageToJson(self.filter_state_struct(), indent=None, sort_keys=True)

    def owner(self) -> str:
        if not self.workload_type:
            return ""
        return "%s%s/%ss/%s" % (OWNER_PREFIX, self.namespace_name, self.workload_type, self.workload_name)

    # -- wire form ----------------------------------------------------------------------------------
    def to_struct(self) -> struct_pb2.Struct:
        """The exchanged Struct (``convertWorkloadMetadataToStruct``): non-empty keys, LABELS always."""
        s = struct_pb2.Struct()
        f = s.fields
        for key, attr in (("NAME", "instance_name"), ("NAMESPACE", "namespace_name"),
                          ("WORKLOAD_NAME", "workload_name"), ("CLUSTER_ID", "cluster_name"),
                          ("IDENTITY", "identity")):
            v = getattr(self, attr)
            if v:
                f[key].string_value = v
        labels = f["LABELS"].struct_value
        for key, attr in ((CANONICAL_NAME, "canonical_name"), (CANONICAL_REVISION, "canonical_revision"),
                          ("app", "app_name"), ("version", "app_version")):
            v = getattr(self, attr)
            if v:
                labels.fields[key].string_value = v
        for k, v in self.labels:
            labels.fields[k].string_value = v
        owner = self.owner()
        if owner:
            f["OWNER"].string_value = owner
        if self.region:
            f["REGION"].string_value = self.region
        if self.zone:
            f["AVAILABILITY_ZONE"].string_value = self.zone
        return s

    def __repr__(self):
        return "WorkloadMetadata(%s/%s)" % (self.namespace_name, self.workload_name)


_FIELDS = {"namespace": "namespace_name", "cluster": "cluster_name", "service": "canonical_name",
           "revision": "canonical_revision", "app": "app_name", "version": "app_version",
           "workload": "workload_name", "type": "workload_type", "name": "instance_name",
           "region": "region", "availability_zone": "zone", "identity": "identity"}


def _s(v) -> str:
    return v.string_value if v.WhichOneof("kind") == "string_value" else ""


def parse_owner(owner: str, workload: str) -> str:
    """The workload type in ``kubernetes://apis/apps/v1/namespaces/<ns>/<type>s/<workload>``."""
    if len(owner) > len(workload) + 2:
        head = owner[:len(owner) - len(workload) - 2]
        t = head.rpartition("/")[2]
        if t in WORKLOAD_TYPES:
            return t
    return ""


def from_struct(s: struct_pb2.Struct, additional_labels=frozenset(), locality=None) -> WorkloadMetadata:
    """``convertStructToWorkloadMetadata``: a peer's (or the local node's) metadata Struct."""
    vals = {}
    canonical_name = canonical_revision = app = app_q = version = version_q = ""
    extra = []
    for k, v in s.fields.items():
        if k == "LABELS":
            if v.WhichOneof("kind") != "struct_value":
                continue
            for lk, lv in v.struct_value.fields.items():
                if lk == CANONICAL_NAME:
                    canonical_name = _s(lv)
                elif lk == CANONICAL_REVISION:
                    canonical_revision = _s(lv)
                elif lk == "app.kubernetes.io/name":
                    app_q = _s(lv)
                elif lk == "app":
                    app = _s(lv)
                elif lk == "app.kubernetes.io/version":
                    version_q = _s(lv)
                elif lk == "version":
                    version = _s(lv)
                elif lk in additional_labels:
                    extra.append((lk, _s(lv)))
        else:
            vals[k] = v
    get = lambda key: _s(vals[key]) if key in vals else ""  # noqa: E731
    region, zone = get("REGION"), get("AVAILABILITY_ZONE")
    if locality is not None:
        region = region or locality.region
        zone = zone or locality.zone
    workload = get("WORKLOAD_NAME")
    extra.sort()
    return WorkloadMetadata(
        instance_name=get("NAME"), cluster_name=get("CLUSTER_ID"), namespace_name=get("NAMESPACE"),
        workload_name=workload, canonical_name=canonical_name, canonical_revision=canonical_revision,
        app_name=app_q or app, app_version=version_q or version,
        workload_type=parse_owner(get("OWNER"), workload), identity=get("IDENTITY"),
        region=region, zone=zone, labels=extra)


def from_endpoint_encoding(value: str):
    """Endpoint metadata ``istio.workload`` = ``<wl>;<ns>;<canonical svc>;<canonical rev>;<cluster>``."""
    parts = value.split(";")
    if len(parts) < 5:
        return None
    return WorkloadMetadata(cluster_name=parts[4], namespace_name=parts[1], workload_name=parts[0],
                            canonical_name=parts[2], canonical_revision=parts[3])


def serialize_deterministic(s: struct_pb2.Struct) -> bytes:
    return s.SerializeToString(deterministic=True)


class LocalNode:
    """The local workload, computed once per configuration from the bootstrap node."""

    __slots__ = ("node_id", "metadata", "header_value", "workload", "namespace", "cluster_id",
                 "canonical_name", "canonical_revision", "app", "version", "istio_version")

    def __init__(self, node, additional_labels=frozenset()):
        md = node.metadata if node is not None else struct_pb2.Struct()
        loc = node.locality if node is not None and node.HasField("locality") else None
        self.node_id = node.id if node is not None else ""
        self.metadata = from_struct(md, additional_labels, loc)
        raw = serialize_deterministic(self.metadata.to_struct())
        self.header_value = base64.b64encode(raw).decode("ascii")
        # istio.stats reads the local labels raw from node.metadata (not the normalised object)
        f = md.fields
        labels = f["LABELS"].struct_value.fields if "LABELS" in f and \
            f["LABELS"].WhichOneof("kind") == "struct_value" else {}
        get = lambda d, k: _s(d[k]) if k in d else ""  # noqa: E731
        self.workload = get(f, "WORKLOAD_NAME")
        self.namespace = get(f, "NAMESPACE")
        self.cluster_id = get(f, "CLUSTER_ID")
        self.istio_version = get(f, "ISTIO_VERSION")
        self.canonical_name = get(labels, CANONICAL_NAME)
        self.canonical_revision = get(labels, CANONICAL_REVISION)
        self.app = get(labels, "app")
        self.version = get(labels, "version")

    def exchange_frame(self) -> bytes:
        """The TCP exchange frame: magic, length, ``Any(Struct{x-envoy-peer-metadata, -id})``."""
        from google.protobuf import any_pb2
        data = struct_pb2.Struct()
        data.fields[HEADER].struct_value.CopyFrom(self.metadata.to_struct())
        if self.node_id:
            data.fields[HEADER_ID].string_value = self.node_id
        a = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Struct",
                        value=serialize_deterministic(data))
        body = a.SerializeToString(deterministic=True)
        return MAGIC.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


MAGIC = 0x3D230467
MAX_FRAME_BYTES = 64 * 1024  # a larger exchange frame is not a peer's metadata: passed through


class PeerCache:
    """Decoded ``x-envoy-peer-metadata`` values by peer id (Istio: 500 entries per worker; a full
    cache drops its oldest quarter). Without an id nothing is cached."""

    __slots__ = ("d", "size")

    def __init__(self, size: int = PEER_CACHE_SIZE):
        self.d: dict = {}
        self.size = size

    def get(self, peer_id: str, value: str, additional_labels):
        """The peer, or None for an undecodable value (counted by the caller)."""
        hit = self.entry(peer_id, value, additional_labels)
        return hit[1] if hit is not None else None

    def entry(self, peer_id: str, value: str, additional_labels):
        """``(value, peer, its filter-state wrapper)``, or None for an undecodable value. The
        entries are immutable: a stream's filter state may hold the wrapper itself."""
        d = self.d
        if peer_id:
            hit = d.get(peer_id)
            if hit is not None and hit[0] == value:
                return hit
        peer = decode_header(value, additional_labels)
        if peer is None:
            return None
        hit = (value, peer, _CelStruct(peer))
        if peer_id:
            if len(d) >= self.size:
                for k in list(d)[:max(1, self.size // 4)]:
                    del d[k]
            d[peer_id] = hit
        return hit


def decode_header(value: str, additional_labels=frozenset()):
    """``x-envoy-peer-metadata``: base64 (padded or not) of a serialized Struct; None if invalid."""
    if not value or len(value) > MAX_HEADER_BYTES:
        return None
    v = value.strip()
    try:
        raw = base64.b64decode(v + "=" * (-len(v) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    s = struct_pb2.Struct()
    try:
        s.ParseFromString(raw)
    except (DecodeError, ValueError):
        return None
    return from_struct(s, additional_labels)


def decode_frame_body(body: bytes, additional_labels=frozenset()):
    """The peer in an exchange frame's ``Any``: ``(peer or None, ok)``; ok False if unparsable."""
    from google.protobuf import any_pb2
    a = any_pb2.Any()
    try:
        a.ParseFromString(body)
    except (DecodeError, ValueError):
        return None, False
    s = struct_pb2.Struct()
    if a.type_url.rpartition("/")[2] != "google.protobuf.Struct":
        return None, False
    try:
        s.ParseFromString(a.value)
    except (DecodeError, ValueError):
        return None, False
    v = s.fields.get(HEADER)
    if v is None or v.WhichOneof("kind") != "struct_value":
        return None, True
    return from_struct(v.struct_value, additional_labels), True


def own_filter_state(si) -> dict:
    """The stream's own filter-state dict: a stream starts with its connection's (shared by every
    stream on it); the first write copies it, so a value set for one request never leaks into the
    next one on the connection."""
    fs = si.filter_state
    if not getattr(si, "own_filter_state", False):
        fs = dict(fs) if fs else {}
        si.filter_state = fs
        si.own_filter_state = True
    return fs


def set_peer(state: dict, downstream: bool, peer: WorkloadMetadata, cel=None) -> bool:
    """Write a peer into a filter-state dict (``cel``: its wrapper, if made already); the first
    value written wins."""
    key, obj_key = (DOWNSTREAM_PEER, DOWNSTREAM_PEER_OBJ) if downstream else (UPSTREAM_PEER, UPSTREAM_PEER_OBJ)
    if key in state:
        return False
    state[key] = _CelStruct(peer) if cel is None else cel
    state[obj_key] = peer
    return True


class _CelStruct:
    """``downstream_peer``/``upstream_peer``: the Struct CEL reads, printed as JSON by formatters."""

    __slots__ = ("peer",)

    def __init__(self, peer):
        self.peer = peer

    @property
    def value(self) -> struct_pb2.Struct:
        return self.peer.filter_state_struct()

    def serialize_as_string(self) -> str:
        return self.peer.serialize_as_string()


class BadInput:
    """Counts malformed peer metadata and logs the first one (never fails a request)."""

    __slots__ = ("counter", "logged", "what")

    def __init__(self, counter, what: str):
        self.counter = counter
        self.logged = False
        self.what = what

    def hit(self, detail: str = "") -> None:
        self.counter.value += 1
        if not self.logged:
            self.logged = True
            log.warning("%s: malformed peer metadata ignored%s (counted in %s; logged once)",
                        self.what, (": " + detail) if detail else "", self.counter.name)

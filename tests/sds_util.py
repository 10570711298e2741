"""A test SDS server shaped like pilot-agent's, and Istio-shaped mTLS config for the tests.

``AgentSds(root)`` serves ``envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets`` on the
unix socket ``<root>/var/run/secrets/workload-spiffe-uds/socket`` — the path Istio's bootstrap names
relative to the proxy's working directory (``./var/run/...``), so a proxy started with
``cwd=root`` finds it. Like pilot-agent (security/pkg/nodeagent/sds/sdsservice.go):

- state of the world only (``DeltaSecrets`` / ``FetchSecrets``: UNIMPLEMENTED);
- the first message of every stream must carry a node with an id, else the stream ends with
  INVALID_ARGUMENT "missing node information";
- each requested name is answered with ``version_info "<RFC3339>/<counter>"`` and a uuid4 nonce;
  ACKs (matching nonce) get no reply; NACKs (``error_detail``) are recorded and not resent;
- ``push(name)`` sends the current secret to every stream watching ``name`` (rotation);
- ``stop()`` / ``start()`` take the server away and bring it back on the same path.

Everything received is kept in ``requests`` as ``(stream id, DiscoveryRequest)``.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
import time
import uuid
from concurrent import futures

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SOCKET_REL = "./var/run/secrets/workload-spiffe-uds/socket"
TD = "cluster.local"


def spiffe(ns: str, sa: str) -> str:
    return "spiffe://%s/ns/%s/sa/%s" % (TD, ns, sa)


def cert_secret(name: str, issued) -> secret_pb2.Secret:
    s = secret_pb2.Secret(name=name)
    s.tls_certificate.certificate_chain.inline_bytes = issued.cert_pem
    s.tls_certificate.private_key.inline_bytes = issued.key_pem
    return s


def root_secret(name: str, ca_pem: bytes) -> secret_pb2.Secret:
    s = secret_pb2.Secret(name=name)
    s.validation_context.trusted_ca.inline_bytes = ca_pem
    return s


class _Stream:
    def __init__(self, sid):
        self.id = sid
        self.q: queue.Queue = queue.Queue()
        self.names: set = set()
        self.nonce = ""
        self.done = False


class _Servicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, agent):
        self.agent = agent

    def StreamSecrets(self, request_iterator, context):
        a = self.agent
        st = a._new_stream()

        def reader():
            try:
                for req in request_iterator:
                    st.q.put(("req", req))
            except Exception:  # noqa: BLE001 - the stream went away
                pass
            st.q.put(("end", None))

        threading.Thread(target=reader, daemon=True).start()
        first = True
        try:
            while True:
                kind, req = st.q.get()
                if kind == "end":
                    return
                if kind == "push":
                    if req in st.names:
                        resp = a._response(req, st)
                        if resp is not None:
                            yield resp
                    continue
                if kind == "abort":
                    context.abort(req[0], req[1])
                with a.lock:
                    a.requests.append((st.id, req))
                if first:
                    first = False
                    if not req.HasField("node") or not req.node.id:
                        with a.lock:
                            a.rejected_streams += 1
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing node information")
                if req.HasField("error_detail"):
                    with a.lock:
                        a.nacks.append((st.id, req))
                    continue
                names = set(req.resource_names)
                if not names:
                    st.names = set()
                    continue
                if req.response_nonce and req.response_nonce != st.nonce:
                    continue  # stale nonce
                if req.response_nonce and names <= st.names:
                    with a.lock:
                        a.acks.append((st.id, req))
                    continue  # an ACK
                new = names - st.names if req.response_nonce else names
                st.names = names
                for n in sorted(new):
                    resp = a._response(n, st)
                    if resp is not None:
                        yield resp
        finally:
            st.done = True
            with a.lock:
                a.streams.pop(st.id, None)


class AgentSds:
    def __init__(self, root: str, secrets: dict | None = None):
        self.root = str(root)
        self.path = os.path.join(self.root, SOCKET_REL[2:])
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.secrets: dict = dict(secrets or {})   # name -> Secret
        self.lock = threading.Lock()
        self.requests: list = []
        self.acks: list = []
        self.nacks: list = []
        self.rejected_streams = 0
        self.sent: list = []           # (stream id, name, version_info, nonce) of every response
        self.streams: dict = {}
        self.stream_names: dict = {}   # stream id -> names it asked for first
        self.counter = 0
        self.next_id = 0
        self.server = None
        self.override = None   # name -> list of Secrets to send instead (bad-input tests)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "AgentSds":
        if os.path.lexists(self.path):
            os.unlink(self.path)
        bind = self.path
        if len(bind.encode()) > 100:
            # a unix socket path holds 107 bytes: bind in a short directory, link it into the pod's
            # tree (connect() follows the link; the proxy's relative path stays short)
            import tempfile
            if getattr(self, "_short", None) is None:
                self._short = tempfile.mkdtemp(prefix="sds", dir="/tmp")
            bind = os.path.join(self._short, "socket")
            if os.path.exists(bind):
                os.unlink(bind)
            os.symlink(bind, self.path)
        s = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Servicer(self), s)
        s.add_insecure_port("unix:" + bind)
        s.start()
        self.server = s
        return self

    def stop(self) -> None:
        if self.server is not None:
            with self.lock:
                streams = list(self.streams.values())
            for st in streams:
                st.q.put(("end", None))
            self.server.stop(0).wait(5)
            self.server = None
        short = getattr(self, "_short", None)
        if short is not None and not self.server:
            import shutil
            shutil.rmtree(short, ignore_errors=True)
            self._short = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- behaviour ---------------------------------------------------------------------------------
    def _new_stream(self) -> _Stream:
        with self.lock:
            self.next_id += 1
            st = _Stream(self.next_id)
            self.streams[st.id] = st
            return st

    def _response(self, name, st):
        with self.lock:
            secs = None
            if self.override is not None and name in self.override:
                secs = self.override[name]
            else:
                s = self.secrets.get(name)
                if s is None:
                    return None   # pilot-agent would generate it; the tests say what exists
                secs = [s]
            self.counter += 1
            ver = "%s/%d" % (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                             self.counter)
            resp = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE, version_info=ver,
                                                   nonce=str(uuid.uuid4()))
            for s in secs:
                resp.resources.add().Pack(s)
            st.nonce = resp.nonce
            self.sent.append((st.id, name, ver, resp.nonce))
            return resp

    def set(self, name: str, secret, push: bool = True) -> None:
        with self.lock:
            self.secrets[name] = secret
            streams = [st for st in self.streams.values() if name in st.names]
        if push:
            for st in streams:
                st.q.put(("push", name))

    def push(self, name: str) -> None:
        with self.lock:
            streams = [st for st in self.streams.values() if name in st.names]
        for st in streams:
            st.q.put(("push", name))

    def close_streams(self, code=grpc.StatusCode.UNAVAILABLE, msg="CA unreachable") -> None:
        """End every stream with a status (pilot-agent does when generation fails)."""
        with self.lock:
            streams = list(self.streams.values())
        for st in streams:
            st.q.put(("abort", (code, msg)))

    # -- what the client did -----------------------------------------------------------------------
    def snapshot(self):
        with self.lock:
            return list(self.requests), list(self.acks), list(self.nacks)

    def wait(self, pred, timeout: float = 10.0, what: str = "condition"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = pred()
            if r:
                return r
            time.sleep(0.05)
        raise AssertionError("timed out waiting for %s; requests: %s" % (what, self.summary()))

    def summary(self) -> str:
        with self.lock:
            return "; ".join("s%d names=%s ver=%r nonce=%r node=%s err=%s" % (
                sid, list(r.resource_names), r.version_info, r.response_nonce[:8], bool(r.node.id),
                r.error_detail.message[:80] if r.HasField("error_detail") else "")
                for sid, r in self.requests[-30:])


# -- Istio-shaped config ---------------------------------------------------------------------------------

TP = "type.googleapis.com/"


def sds_ref(name: str, cluster: str = "sds-grpc", timeout: str = "0s") -> dict:
    """An ``SdsSecretConfig`` as istiod renders it (pkg/model/authentication.go)."""
    return {"name": name, "sds_config": {
        "api_config_source": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}],
                              "set_node_on_first_message_only": True, "transport_api_version": "V3"},
        "initial_fetch_timeout": timeout, "resource_api_version": "V3"}}


def sds_grpc_cluster(path: str = SOCKET_REL) -> dict:
    """The bootstrap's ``sds-grpc`` cluster (tools/packaging/common/envoy_bootstrap.json)."""
    return {"name": "sds-grpc", "alt_stat_name": "sds-grpc;", "type": "STATIC", "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TP + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": path}}}}]}]}}


def istio_upstream_tls(sans, sni: str, alpn=("istio-peer-exchange", "istio"), timeout: str = "0s") -> dict:
    """ISTIO_MUTUAL ``UpstreamTlsContext`` (pilot/pkg/networking/core/cluster_tls.go)."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TP + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "alpn_protocols": list(alpn),
            "tls_certificate_sds_secret_configs": [sds_ref("default", timeout=timeout)],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": s} for s in sans]},
                "validation_context_sds_secret_config": sds_ref("ROOTCA", timeout=timeout)}},
        "sni": sni}}


INBOUND_CIPHERS = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
                   "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                   "AES256-GCM-SHA384", "AES128-GCM-SHA256"]


def istio_downstream_tls(alpn=("h2", "http/1.1"), timeout: str = "0s", min_version: str = "TLSv1_2") -> dict:
    """Inbound ``DownstreamTlsContext`` (pilot/pkg/security/authn/utils/utils.go BuildInboundTLS)."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TP + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": min_version, "tls_maximum_protocol_version": "TLSv1_3",
                           "cipher_suites": INBOUND_CIPHERS},
            "alpn_protocols": list(alpn),
            "tls_certificate_sds_secret_configs": [sds_ref("default", timeout=timeout)],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"prefix": "spiffe://%s/" % TD}]},
                "validation_context_sds_secret_config": sds_ref("ROOTCA", timeout=timeout)}},
        "require_client_certificate": True}}


def ads_bootstrap(xds_port: int, node_id: str = "sidecar~127.0.0.1~server.default~default.svc.cluster.local",
                  api: str = "GRPC", static_listeners=()) -> dict:
    """Istio's bootstrap shape: ADS on ``xds-grpc`` (TCP here), SDS on ``sds-grpc`` (relative UDS)."""
    return {
        "node": {"id": node_id, "cluster": "server.default", "metadata": {"ISTIO_VERSION": "1.24.0"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api, "transport_api_version": "V3", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc", "retry_policy": {
                               "retry_back_off": {"base_interval": "0.1s", "max_interval": "0.4s"}}}}]},
            "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}},
        "static_resources": {"listeners": list(static_listeners), "clusters": [
            {"name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
             "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                 "@type": TP + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                 "explicit_http_config": {"http2_protocol_options": {}}}},
             "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]}},
            sds_grpc_cluster()]}}


def auto_mtls_cluster(name: str, port: int, sans, sni: str, alpn=("istio-peer-exchange", "istio"),
                      tls_mode: str = "istio") -> dict:
    """An outbound cluster with Istio's auto-mTLS ``transport_socket_matches`` (tlsMode: istio)."""
    md = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": tls_mode}}} if tls_mode else {}
    return {"@type": "Cluster", "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                dict({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}},
                     **({"metadata": md} if md else {}))]}]},
            "transport_socket_matches": [
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                 "transport_socket": istio_upstream_tls(sans, sni, alpn)},
                {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": TP + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}]}

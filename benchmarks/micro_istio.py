#!/usr/bin/env python3
"""The Python cost of one request through Istio's outbound sidecar HTTP chain, with and without
istio.stats, without sockets (micro_h1.py's in-memory stack and request/response):

    python3 benchmarks/micro_istio.py [-n 20000] [--profile | --opcodes [TOP]] [--no-stats]
                                      [--envoy-chain] [--peer] [--compare]

The chain is istiod's outbound one, as benchmarks/istio_stats.py runs it: istio.metadata_exchange
(peer_metadata, outbound config), istio.alpn, fault, cors, istio.stats, router; the node carries
Istio's metadata and the cluster ``istio.services``. ``--no-stats`` leaves istio.stats out;
``--envoy-chain`` runs what Envoy runs in that benchmark (fault, cors, router); ``--peer`` makes the
upstream answer as another sidecar does, with ``x-envoy-peer-metadata`` headers (the outbound side
strips them and labels the series with the peer). ``--compare`` prints the opcode counts of all
of these (deterministic, unlike timings on a shared machine).
"""

import base64
import json
import os
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import micro_h1  # noqa: E402

T = "type.googleapis.com/"
PEER_ID = "sidecar~10.0.0.2~backend-v1-xyz.default~default.svc.cluster.local"


def peer_value() -> str:
    from google.protobuf import struct_pb2
    s = struct_pb2.Struct()
    s.update({"NAME": "backend-v1-xyz", "NAMESPACE": "default", "WORKLOAD_NAME": "backend-v1",
              "CLUSTER_ID": "Kubernetes", "LABELS": {"app": "backend", "version": "v1",
                                                     "service.istio.io/canonical-name": "backend",
                                                     "service.istio.io/canonical-revision": "v1"}})
    return base64.b64encode(s.SerializeToString(deterministic=True)).decode()


def istio_bootstrap(stats: bool = True, envoy_chain: bool = False) -> str:
    doc = yaml.safe_load(micro_h1.BOOTSTRAP)
    doc["node"] = {"id": "sidecar~10.0.0.1~svc-a-abc.default~default.svc.cluster.local",
                   "metadata": {"NAMESPACE": "default", "WORKLOAD_NAME": "svc-a", "CLUSTER_ID": "Kubernetes",
                                "LABELS": {"app": "svc-a", "version": "v1"}}}
    lst = doc["static_resources"]["listeners"][0]
    lst["traffic_direction"] = "OUTBOUND"
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    router = hcm["http_filters"][-1]
    fault = {"name": "envoy.filters.http.fault",
             "typed_config": {"@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault"}}
    cors = {"name": "envoy.filters.http.cors", "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"}}
    if envoy_chain:
        chain = [fault, cors]
    else:
        chain = [
            {"name": "istio.metadata_exchange", "typed_config": {
                "@type": T + "io.istio.http.peer_metadata.Config",
                "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                "upstream_propagation": [{"istio_headers": {}}]}},
            {"name": "istio.alpn", "typed_config": {
                "@type": T + "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
                "alpn_override": [
                    {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                    {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                    {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}},
            fault, cors,
        ]
        if stats:
            chain.append({"name": "istio.stats", "typed_config": {
                "@type": T + "udpa.type.v1.TypedStruct", "type_url": T + "stats.PluginConfig", "value": {}}})
    hcm["http_filters"] = chain + [router]
    doc["static_resources"]["clusters"][0]["metadata"] = {"filter_metadata": {"istio": {"services": [
        {"host": "backend.default.svc.cluster.local", "name": "backend", "namespace": "default"}]}}}
    return json.dumps(doc)


VARIANTS = (("Envoy's chain (fault, cors, router)", ["--envoy-chain"]),
            ("telemetry without istio.stats", ["--no-stats"]),
            ("telemetry (peer_metadata, istio.alpn, istio.stats)", []),
            ("telemetry, upstream answers with peer metadata", ["--peer"]))


def compare() -> int:
    """Each variant's opcode count, in a fresh process (one stack per process)."""
    base = None
    for name, args in VARIANTS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--opcodes", "0"] + args,
                             capture_output=True, text=True, timeout=600, check=True).stdout
        line = [ln for ln in out.splitlines() if ln.startswith("python opcodes per proxied request")][0]
        n = int(line.split(":")[1].split(",")[0])
        base = base or n
        print("%-52s %6d opcodes/request  (%.2fx Envoy's chain)" % (name, n, n / base))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:
        return compare()
    stats = "--no-stats" not in argv
    envoy_chain = "--envoy-chain" in argv
    peer = "--peer" in argv
    argv = [a for a in argv if a not in ("--no-stats", "--envoy-chain", "--peer")]
    saved = micro_h1.BOOTSTRAP, micro_h1.REQUEST, micro_h1.RESPONSE
    micro_h1.BOOTSTRAP = istio_bootstrap(stats, envoy_chain)
    micro_h1.REQUEST = b"GET /r18/bench HTTP/1.1\r\nHost: backend.default:8080\r\nUser-Agent: wrk\r\n\r\n"
    if peer:
        head, _, body = micro_h1.RESPONSE.partition(b"\r\n\r\n")
        micro_h1.RESPONSE = head + ("\r\nx-envoy-peer-metadata-id: %s\r\nx-envoy-peer-metadata: %s" % (
            PEER_ID, peer_value())).encode() + b"\r\n\r\n" + body
    try:
        return micro_h1.main(argv)
    finally:  # the module is shared (tests/test_no_cycles.py drives it too)
        micro_h1.BOOTSTRAP, micro_h1.REQUEST, micro_h1.RESPONSE = saved


if __name__ == "__main__":
    sys.exit(main())

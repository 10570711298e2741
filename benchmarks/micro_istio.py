#!/usr/bin/env python3
"""The Python cost of one request through Istio's outbound sidecar HTTP chain, with and without
istio.stats, without sockets (micro_h1.py's in-memory stack and request/response):

    python3 benchmarks/micro_istio.py [-n 20000] [--profile] [--no-stats]

The chain is istiod's: istio.metadata_exchange (peer_metadata, outbound), istio.alpn, fault, cors,
istio.stats, router; the node carries Istio's metadata and the cluster ``istio.services``.
"""

import json
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import micro_h1  # noqa: E402

T = "type.googleapis.com/"


def istio_bootstrap(stats: bool = True) -> str:
    doc = yaml.safe_load(micro_h1.BOOTSTRAP)
    doc["node"] = {"id": "sidecar~10.0.0.1~svc-a-abc.default~default.svc.cluster.local",
                   "metadata": {"NAMESPACE": "default", "WORKLOAD_NAME": "svc-a", "CLUSTER_ID": "Kubernetes",
                                "LABELS": {"app": "svc-a", "version": "v1"}}}
    lst = doc["static_resources"]["listeners"][0]
    lst["traffic_direction"] = "OUTBOUND"
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    router = hcm["http_filters"][-1]
    chain = [
        {"name": "istio.metadata_exchange", "typed_config": {
            "@type": T + "io.istio.http.peer_metadata.Config",
            "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
            "upstream_propagation": [{"istio_headers": {}}]}},
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"}},
    ]
    if stats:
        chain.append({"name": "istio.stats", "typed_config": {
            "@type": T + "udpa.type.v1.TypedStruct", "type_url": T + "stats.PluginConfig", "value": {}}})
    hcm["http_filters"] = chain + [router]
    doc["static_resources"]["clusters"][0]["metadata"] = {"filter_metadata": {"istio": {"services": [
        {"host": "backend.default.svc.cluster.local", "name": "backend", "namespace": "default"}]}}}
    return json.dumps(doc)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stats = "--no-stats" not in argv
    argv = [a for a in argv if a != "--no-stats"]
    saved = micro_h1.BOOTSTRAP, micro_h1.REQUEST
    micro_h1.BOOTSTRAP = istio_bootstrap(stats)
    micro_h1.REQUEST = b"GET /r18/bench HTTP/1.1\r\nHost: backend.default:8080\r\nUser-Agent: wrk\r\n\r\n"
    try:
        return micro_h1.main(argv)
    finally:  # the module is shared (tests/test_no_cycles.py drives it too)
        micro_h1.BOOTSTRAP, micro_h1.REQUEST = saved


if __name__ == "__main__":
    sys.exit(main())

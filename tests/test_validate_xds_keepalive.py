"""The xDS cluster's ``upstream_connection_options.tcp_keepalive`` (review finding F48 note): the
xDS client's own channel is grpcio's, which sets no SO_KEEPALIVE (checked here on a real channel),
so a bootstrap whose xDS server is reached over TCP with tcp_keepalive gets the difference named by
``pyproxy validate`` (and a WARNING at startup); a unix-socket xDS server (Istio's agent) does not."""

from __future__ import annotations

import json
import socket
import subprocess
import threading

import grpc
import pytest

from pyproxy.validate import ACCEPTED, IGNORED, read_items, validate_items


def _bootstrap(address: dict, keepalive: bool) -> dict:
    c = {"name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
         "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
             "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
             "explicit_http_config": {"http2_protocol_options": {}}}},
         "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": address}}]}]}}
    if keepalive:
        c["upstream_connection_options"] = {"tcp_keepalive": {"keepalive_time": 300}}
    return {"node": {"id": "n", "cluster": "c"},
            "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                                                 "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
                                  "cds_config": {"ads": {}, "resource_api_version": "V3"},
                                  "lds_config": {"ads": {}, "resource_api_version": "V3"}},
            "static_resources": {"clusters": [c]}}


TCP = {"socket_address": {"address": "127.0.0.1", "port_value": 15010}}
PIPE = {"pipe": {"path": "./etc/istio/proxy/XDS"}}


@pytest.mark.parametrize("address,keepalive,named", [(TCP, True, True), (TCP, False, False), (PIPE, True, False)])
def test_xds_channel_keepalive_named_by_validate(tmp_path, address, keepalive, named):
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(_bootstrap(address, keepalive)))
    boot = [it for it in validate_items(read_items(str(path))) if it.kind == "bootstrap"][0]
    notes = [n for n in (boot.ignored or []) if "tcp_keepalive" in n]
    if named:
        assert boot.verdict == IGNORED and notes and "xds-grpc" in notes[0] and "SO_KEEPALIVE" in notes[0], boot.ignored
    else:
        assert not notes and boot.verdict in (ACCEPTED, IGNORED), boot.ignored


def test_grpcio_channel_sets_no_so_keepalive():
    """What the note rests on: a grpcio channel's TCP connection has no keepalive timer (``ss -o``)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    port = ls.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(ls.accept()[0])
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    ch = grpc.insecure_channel("127.0.0.1:%d" % port, options=[("grpc.keepalive_time_ms", 300000)])
    try:
        try:
            grpc.channel_ready_future(ch).result(timeout=1.0)  # (no HTTP/2 server: it only connects)
        except grpc.FutureTimeoutError:
            pass
        t.join(3)
        assert accepted, "grpcio did not connect"
        out = subprocess.run(["ss", "-tno", "state", "established", "( dport = :%d )" % port],
                             capture_output=True, text=True, timeout=5).stdout
        lines = [line for line in out.splitlines()[1:] if line.strip()]
        assert lines, out
        assert not any("keepalive" in line for line in lines), out
    finally:
        ch.close()
        for s in accepted:
            s.close()
        ls.close()

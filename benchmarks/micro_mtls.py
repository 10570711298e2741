"""Python cost of one proxied HTTP/1.1 request over downstream mTLS, without sockets.

The inbound chain of benchmarks/mtls.py (tls_inspector, Istio's DownstreamTlsContext with a
required client certificate and a SPIFFE SAN check; static secrets here instead of SDS) driven
through micro_h1's in-memory transports: a client ``ssl.SSLObject`` (mesh certificate) completes
the handshake, then encrypts ``-n`` keep-alive requests up front, so the timed loop is only the
proxy's work: ciphertext in downstream, request bytes out upstream, response bytes in upstream,
ciphertext out downstream (checked by the client after the run). The request is the one the
benchmark's client sidecar (Envoy) forwards for wrk's: with ``x-forwarded-proto``, ``x-request-id``
and ``x-envoy-expected-rq-timeout-ms``, which the inbound sidecar's request preparation handles,
and its route's ``x-bench-route``.

    python3 benchmarks/micro_mtls.py [-n 20000] [--profile | --opcodes [TOP]] [--plain] [--wrk]
                                     [--conns N] [--handshakes]

``--plain`` runs the same chain without the transport socket (the TLS layer's share is the
difference); ``--wrk`` sends wrk's own request instead (the mesh headers' share); ``--conns N``
takes the requests in turn from N downstream connections (each with its own TLS state, as the
benchmark's 50 keep-alive connections are) instead of one.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import micro_h1  # noqa: E402
from micro_h1 import RESPONSE, FakeTransport, build_stack, connect, count_opcodes, measure, profile  # noqa: E402

# what benchmarks/mtls.py's client sidecar (Envoy) sends the server sidecar for wrk's request (its
# route adds x-bench-route)
REQUEST = (b"GET /r18/bench HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nx-forwarded-proto: http\r\n"
           b"x-request-id: 0b9b2c8e-6b1e-4c8e-9a51-3f3f7d0c1a2b\r\n"
           b"x-envoy-expected-rq-timeout-ms: 15000\r\nx-bench-route: r18\r\n\r\n")
# --wrk: wrk's own request, as the plaintext h1 benchmark sends it
WRK_REQUEST = b"GET /r18/bench HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"


def handshake(cobj, cin, cout, down, dt) -> None:
    """The client ``SSLObject``'s handshake with the proxy's downstream connection, in memory."""
    for _ in range(20):
        try:
            cobj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if cout.pending:
            down.data_received(cout.read())
        if dt.out:
            cin.write(b"".join(dt.out))
            dt.out.clear()
        if done:
            return


def bootstrap(pki, server, plain: bool) -> str:
    import mtls
    from sds_util import spiffe
    boot = mtls._inbound(0, 9)
    boot["static_resources"]["clusters"] = [c for c in boot["static_resources"]["clusters"]
                                            if c["name"] != "sds-grpc"]
    chain = boot["static_resources"]["listeners"][0]["filter_chains"][0]
    if plain:
        del chain["transport_socket"]
        del chain["filter_chain_match"]
        boot["static_resources"]["listeners"][0]["listener_filters"] = []
    else:
        common = chain["transport_socket"]["typed_config"]["common_tls_context"]
        del common["tls_certificate_sds_secret_configs"]
        common["tls_certificates"] = [{"certificate_chain": {"inline_string": server.cert_pem.decode()},
                                       "private_key": {"inline_string": server.key_pem.decode()}}]
        cvc = common.pop("combined_validation_context")
        vc = cvc["default_validation_context"]
        vc["trusted_ca"] = {"inline_string": pki.ca_pem.decode()}
        common["validation_context"] = vc
        assert spiffe("default", "server")
    return json.dumps(boot)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--opcodes", type=int, nargs="?", const=15, default=None, metavar="TOP")
    ap.add_argument("--plain", action="store_true", help="the same chain without TLS")
    ap.add_argument("--conns", type=int, default=1, help="downstream connections taking turns (default 1)")
    ap.add_argument("--wrk", action="store_true",
                    help="wrk's request (as the plaintext h1 benchmark sends it) instead of the client sidecar's")
    ap.add_argument("--handshakes", action="store_true",
                    help="new connections instead: accept, mTLS handshake, one request, close (the "
                         "client's handshake work is in the timing; --opcodes counts only Python)")
    a = ap.parse_args(argv)
    from sds_util import spiffe
    from tls_certs import Pki
    tmp = tempfile.mkdtemp(prefix="micro_mtls")
    pki = Pki(os.path.join(tmp, "pki"))
    server = pki.issue("server", uri=[spiffe("default", "server")])
    client = pki.issue("client", uri=[spiffe("default", "client")])
    loop, lm, al, cluster, host, pool = build_stack(bootstrap(pki, server, a.plain), "backend")
    up, ut, down, dt = connect(loop, lm, al, cluster, host, pool)

    if a.handshakes:
        return handshakes(a, loop, lm, al, up, ut, pki, client)
    request = WRK_REQUEST if a.wrk else REQUEST
    n_total = a.n * (5 if not (a.profile or a.opcodes is not None) else 1) + 400 * a.conns
    downs = [(down, dt)]
    for _ in range(a.conns - 1):
        downs.append(new_downstream(loop, lm, al))
    clients = []
    if a.plain:
        records = [(d, request) for _ in range(n_total // a.conns + 1) for d, _t in downs][:n_total]
    else:
        cctx = client_context(pki, client)
        for d, t in downs:
            cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
            cobj = cctx.wrap_bio(cin, cout, server_side=False, server_hostname="server")
            handshake(cobj, cin, cout, d, t)
            assert d.ssl is not None and d.ssl.peer_uri_san == spiffe("default", "client"), "handshake failed"
            clients.append((cobj, cin, cout, t))
        records = []
        while len(records) < n_total:
            for (d, _t), (cobj, cin, cout, _t2) in zip(downs, clients):
                cobj.write(request)
                records.append((d, cout.read()))
    it = iter(records)

    def one():
        d, rec = next(it)
        d.data_received(rec)
        up.data_received(RESPONSE)

    for _ in range(200 * a.conns):
        one()
    for cobj, cin, cout, t in clients:
        cin.write(b"".join(t.out))
        got = b""
        try:
            while True:
                got += cobj.read(65536)
        except ssl.SSLWantReadError:
            pass
        assert got.count(b"HTTP/1.1 200") == 200 and got.endswith(micro_h1.BODY), got[-200:]
    if not clients:
        assert dt.out[-1].endswith(micro_h1.BODY)
    ut.out.clear()

    def tidy():
        for _d, t in downs:
            t.out.clear()
        ut.out.clear()
    tidy()
    return measure(a, one, tidy, "plaintext " if a.plain else "mTLS ")


def new_downstream(loop, lm, al):
    """Another downstream connection on ``al`` over a FakeTransport: ``(connection, transport)``."""
    from pyproxy.listeners.connection import DownstreamConnection
    down = DownstreamConnection(lm, al)
    dt = FakeTransport(("127.0.0.1", 50001), ("127.0.0.1", 8080))

    async def made():
        down.connection_made(dt)
    loop.run_until_complete(made())
    return down, dt


def client_context(pki, client):
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki.ca_path)
    cctx.check_hostname = False
    cctx.load_cert_chain(client.cert_path, client.key_path)
    cctx.set_alpn_protocols(["istio-http/1.1", "istio", "http/1.1"])
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return cctx


def handshakes(a, loop, lm, al, up, ut, pki, client) -> int:
    from pyproxy.listeners.connection import DownstreamConnection
    cctx = client_context(pki, client)

    async def made(down, dt):
        down.connection_made(dt)

    def one():
        down = DownstreamConnection(lm, al)
        dt = FakeTransport(("127.0.0.1", 50000), ("127.0.0.1", 8080))
        loop.run_until_complete(made(down, dt))
        cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        cobj = cctx.wrap_bio(cin, cout, server_side=False, server_hostname="server")
        handshake(cobj, cin, cout, down, dt)
        cobj.write(REQUEST)
        down.data_received(cout.read())
        up.data_received(RESPONSE)
        down.eof_received()
        down.connection_lost(None)
        assert dt.out, "no response"

    for _ in range(50):
        one()
    import gc
    gc.collect()
    if a.opcodes is not None:
        count_opcodes(one, 20, 1, a.opcodes, "mTLS new-connection ")
        return 0
    if a.profile:
        profile(one, a.n, time.process_time)
        return 0
    t = time.process_time()
    for _ in range(a.n):
        one()
    print("CPU per new mTLS connection (handshake, one request, close; client side included): %.0f us" % (
        (time.process_time() - t) / a.n * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())

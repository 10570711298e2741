"""TLS on listeners (DownstreamTlsContext): curl and h2load over TLS with ALPN, mTLS with SAN
matching, bad handshakes, the handshake timeout, tcp_proxy over a TLS chain, access-log operators,
and one behaviour compared with Envoy on the same bootstrap. Real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from proxy_util import (ENVOY, Envoy, HttpBackend, Pyproxy, TcpBackend, bootstrap, cluster, free_port,
                        http_listener, route, route_config, tcp_listener, with_fresh_ports)
from log_util import file_access_log
from tls_certs import Pki, cert_entry, downstream_tls, uri_san

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
AL_FORMAT = ("%PROTOCOL% tls=%DOWNSTREAM_TLS_VERSION% sni=%REQUESTED_SERVER_NAME% "
             "local=%DOWNSTREAM_LOCAL_URI_SAN% peer=%DOWNSTREAM_PEER_URI_SAN%\n")
SPIFFE_NS = "spiffe://cluster.local/ns/default/"
TCP_FORMAT = ("%DOWNSTREAM_TLS_VERSION% %DOWNSTREAM_TLS_CIPHER% sni=%REQUESTED_SERVER_NAME% "
              "peer=%DOWNSTREAM_PEER_SUBJECT%,%DOWNSTREAM_PEER_URI_SAN%,%DOWNSTREAM_PEER_ISSUER% "
              "local=%DOWNSTREAM_LOCAL_DNS_SAN% bytes=%BYTES_RECEIVED%\n")


def _access_log(path, fmt=AL_FORMAT):
    return file_access_log(path, fmt)


def _bootstrap(pki, srv, tmp, be_port, echo_port):
    p_tls, p_mtls, p_tcp = free_port(), free_port(), free_port()
    rc = route_config([route("/", "b")])
    l_tls = http_listener(p_tls, rc, name="tls", access_log=_access_log(os.path.join(tmp, "tls.log")))
    l_tls["filter_chains"][0]["transport_socket"] = downstream_tls(srv)
    l_mtls = http_listener(p_mtls, rc, name="mtls", access_log=_access_log(os.path.join(tmp, "mtls.log")))
    l_mtls["filter_chains"][0]["transport_socket"] = downstream_tls(
        srv, ca=pki, require=True, sans=[uri_san("prefix", SPIFFE_NS)])
    tcp_al = _access_log(os.path.join(tmp, "tcp.log"), TCP_FORMAT)
    l_tcp = tcp_listener(p_tcp, "echo", name="tcp", access_log=tcp_al)
    l_tcp["filter_chains"][0]["transport_socket"] = downstream_tls(srv, alpn=(), ca=pki)  # cert optional
    l_tcp["filter_chains"][0]["transport_socket_connect_timeout"] = "0.5s"
    bs = bootstrap([l_tls, l_mtls, l_tcp], [cluster("b", [be_port]), cluster("echo", [echo_port])])
    return bs, {"tls": p_tls, "mtls": p_mtls, "tcp": p_tcp}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("tlsd"))
    pki = Pki(os.path.join(tmp, "pki"))
    other = Pki(os.path.join(tmp, "pki-other"), name="untrusted CA")
    srv = pki.issue("server", dns=["localhost", "api.example.com"], uri=["spiffe://cluster.local/ns/default/sa/server"])
    good = pki.issue("client-good", uri=[SPIFFE_NS + "sa/client"])
    bad_san = pki.issue("client-badsan", uri=["spiffe://other.domain/ns/default/sa/client"])
    foreign = other.issue("client-foreign", uri=[SPIFFE_NS + "sa/client"])
    be = HttpBackend()
    echo = TcpBackend()  # (echoes; half-closes back when the client half-closes)
    bs, ports = _bootstrap(pki, srv, tmp, be.port, echo.port)
    px = Pyproxy(bs, extra_args=["--file-flush-interval-msec", "50"])
    try:
        yield {"px": px, "pki": pki, "other": other, "ports": ports, "tmp": tmp, "good": good,
               "bad_san": bad_san, "foreign": foreign, "be": be, "bs": bs}
    finally:
        px.stop()
        be.close()
        echo.close()


def curl(*args, timeout=10):
    return subprocess.run([CURL, "-sS", "--max-time", "5", *args], capture_output=True, text=True, timeout=timeout)


def _url(port, path="/x", host="localhost"):
    return "https://%s:%d%s" % (host, port, path)


def _stat(px, name):
    return px.stats().get(name, 0)


def _wait_line(path, pred, timeout=10.0):
    """The first access-log line ``pred`` accepts (the log is flushed every 50 ms), or all lines."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            if pred(line):
                return line
        time.sleep(0.05)
    return lines


pytestmark = pytest.mark.skipif(CURL is None, reason="curl not installed")


def _server_loads_static_secrets() -> bool:
    import inspect
    import pyproxy.server
    return "load_static" in inspect.getsource(pyproxy.server)


@pytest.mark.parametrize("version,proto", [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")])
def test_curl_https_alpn(env, version, proto):
    port = env["ports"]["tls"]
    before = _stat(env["px"], "listener.127.0.0.1_%d.ssl.handshake" % port)
    p = curl("-v", version, "--cacert", env["pki"].ca_path, _url(port))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("b GET /x"), p.stdout
    alpn = "h2" if proto == "HTTP/2" else "http/1.1"
    assert "ALPN: server accepted %s" % alpn in p.stderr, p.stderr
    assert _stat(env["px"], "listener.127.0.0.1_%d.ssl.handshake" % port) == before + 1


def test_access_log_tls_operators(env):
    port = env["ports"]["tls"]
    path = os.path.join(env["tmp"], "tls.log")
    p = curl("--http2", "--cacert", env["pki"].ca_path, "--resolve", "api.example.com:%d:127.0.0.1" % port,
             _url(port, host="api.example.com"))
    assert p.returncode == 0, p.stderr
    line = _wait_line(path, lambda ln: "sni=api.example.com" in ln)
    assert line == ("HTTP/2 tls=TLSv1.3 sni=api.example.com "
                    "local=spiffe://cluster.local/ns/default/sa/server peer=-"), line


def test_tls_versions_and_ciphers_from_tls_params(tmp_path):
    """tls_params: max TLS 1.2 and a cipher list are applied (a TLS 1.3-only client fails)."""
    pki = Pki(tmp_path / "pki")
    srv = pki.issue("server", dns=["localhost"])
    be = HttpBackend()
    port = free_port()
    l = http_listener(port, route_config([route("/", "b")]))
    l["filter_chains"][0]["transport_socket"] = downstream_tls(srv, tls_params={
        "tls_maximum_protocol_version": "TLSv1_2", "cipher_suites": ["ECDHE-ECDSA-AES256-GCM-SHA384"]})
    try:
        with Pyproxy(bootstrap([l], [cluster("b", [be.port])])) as px:
            ctx = ssl.create_default_context(cafile=pki.ca_path)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                with ctx.wrap_socket(s, server_hostname="localhost") as t:
                    assert t.version() == "TLSv1.2"
                    assert t.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
            p = curl("--tlsv1.3", "--cacert", pki.ca_path, _url(port))
            assert p.returncode != 0
            assert px.stat("listener.127.0.0.1_%d.ssl.connection_error" % port) == 1
    finally:
        be.close()


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_h2load_over_tls(env):
    port = env["ports"]["tls"]
    p = subprocess.run([H2LOAD, "-n", "200", "-c", "4", "-m", "5", _url(port, "/")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Application protocol: h2" in p.stdout, p.stdout
    assert "200 succeeded, 0 failed, 0 errored" in p.stdout, p.stdout


# -- mTLS ---------------------------------------------------------------------------------------------

def test_mtls_client_cert_and_san_accepted(env):
    port = env["ports"]["mtls"]
    good = env["good"]
    path = os.path.join(env["tmp"], "mtls.log")
    p = curl("--http1.1", "--cacert", env["pki"].ca_path, "--cert", good.cert_path, "--key", good.key_path, _url(port))
    assert p.returncode == 0, p.stderr
    line = _wait_line(path, lambda ln: ln.startswith("HTTP/1.1"))
    assert line == ("HTTP/1.1 tls=TLSv1.3 sni=localhost local=spiffe://cluster.local/ns/default/sa/server "
                    "peer=%ssa/client" % SPIFFE_NS), line


@pytest.mark.parametrize("who,stat", [
    ("bad_san", "fail_verify_san"),
    ("foreign", "fail_verify_error"),
    (None, "fail_verify_no_cert"),
])
def test_mtls_rejected(env, who, stat):
    px, port = env["px"], env["ports"]["mtls"]
    prefix = "listener.127.0.0.1_%d.ssl." % port
    before = px.stats()
    args = ["--http1.1", "--cacert", env["pki"].ca_path]
    if who is not None:
        args += ["--cert", env[who].cert_path, "--key", env[who].key_path]
    p = curl(*args, _url(port))
    assert p.returncode != 0 and not p.stdout, (p.returncode, p.stdout)
    after = px.stats()
    assert after.get(prefix + stat, 0) == before.get(prefix + stat, 0) + 1
    # as Envoy: a failed verification is not also a connection_error
    assert after.get(prefix + "connection_error", 0) == before.get(prefix + "connection_error", 0)
    # still serving
    good = env["good"]
    p = curl("--cacert", env["pki"].ca_path, "--cert", good.cert_path, "--key", good.key_path, _url(port))
    assert p.returncode == 0, p.stderr


# -- bad handshakes -------------------------------------------------------------------------------------

def test_plaintext_to_tls_port_closed_and_counted(env):
    px, port = env["px"], env["ports"]["tls"]
    name = "listener.127.0.0.1_%d.ssl.connection_error" % port
    before = _stat(px, name)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            d = s.recv(4096)  # an alert (or nothing), then EOF: never an HTTP response
            if not d:
                break
            data += d
    assert not data.startswith(b"HTTP/"), data
    assert _stat(px, name) == before + 1
    p = curl("--cacert", env["pki"].ca_path, _url(port))
    assert p.returncode == 0, p.stderr


def test_wrong_ca_client_side_closes_cleanly(env):
    """The client rejects our certificate (its CA differs): counted, and the proxy keeps serving."""
    px, port = env["px"], env["ports"]["tls"]
    name = "listener.127.0.0.1_%d.ssl.connection_error" % port
    before = _stat(px, name)
    p = curl("--cacert", env["other"].ca_path, _url(port))
    assert p.returncode == 60, p.stderr  # curl: peer certificate cannot be authenticated
    deadline = time.monotonic() + 3
    while _stat(px, name) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stat(px, name) == before + 1
    assert curl("--cacert", env["pki"].ca_path, _url(port)).returncode == 0


def test_handshake_timeout(env):
    """transport_socket_connect_timeout bounds a peer that never finishes the handshake."""
    px, port = env["px"], env["ports"]["tcp"]
    name = "listener.127.0.0.1_%d.downstream_cx_transport_socket_connect_timeout" % port
    before = _stat(px, name)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(100) == b""  # closed by the proxy, not by our 5 s timeout
    took = time.monotonic() - t0
    assert 0.4 < took < 3.0, took
    assert _stat(px, name) == before + 1


# -- tcp_proxy over TLS ---------------------------------------------------------------------------------

def test_tcp_proxy_over_tls_chain(env):
    port = env["ports"]["tcp"]
    ctx = ssl.create_default_context(cafile=env["pki"].ca_path)
    ctx.load_cert_chain(env["good"].cert_path, env["good"].key_path)
    path = os.path.join(env["tmp"], "tcp.log")
    payload = os.urandom(300 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            assert t.selected_alpn_protocol() is None
            t.sendall(payload)
            got = b""
            while len(got) < len(payload):
                d = t.recv(65536)
                if not d:
                    break
                got += d
            assert got == payload
            # close_notify from us: the proxy half-closes upstream, the echo closes, we see EOF
            t.unwrap()
    assert _stat(env["px"], "cluster.echo.upstream_cx_total") >= 1
    line = _wait_line(path, lambda ln: ln.startswith("TLSv1.3"))
    assert line == ("TLSv1.3 TLS_AES_128_GCM_SHA256 sni=localhost peer=CN=client-good,%ssa/client,"
                         "CN=pyproxy test CA local=localhost bytes=%d" % (SPIFFE_NS, len(payload))), line


# -- Envoy on the same bootstrap ------------------------------------------------------------------------

def _no_cert_client(port, ca_path):
    """Handshake without a client certificate, then read: what the server does next."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            try:
                d = t.recv(100)
                return "data %r" % d
            except ssl.SSLError as e:
                return e.reason
            except OSError as e:
                return type(e).__name__


@pytest.mark.skipif(ENVOY is None, reason="envoy not installed")
def test_no_client_cert_and_plaintext_same_as_envoy(env):
    """On a require_client_certificate chain, a client without a certificate finishes its TLS 1.3
    handshake, then its first read gets the 'certificate required' alert — from Envoy and pyproxy
    alike, with the same stats; plaintext to the port is a connection_error in both."""
    bs = with_fresh_ports(env["bs"])
    mtls = [l for l in bs["static_resources"]["listeners"] if l["name"] == "mtls"][0]
    mtls["filter_chains"][0]["filters"][0]["typed_config"].pop("access_log", None)
    bs["static_resources"]["listeners"] = [mtls]
    port = mtls["address"]["socket_address"]["port_value"]
    results = {}
    for kind in (Envoy, Pyproxy):
        with kind(bs) as px:
            seen = _no_cert_client(port, env["pki"].ca_path)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(100)
            time.sleep(0.2)
            st = {k.split(".ssl.")[1]: v for k, v in px.stats().items()
                  if ".ssl." in k and v and "certificate." not in k}
            results[kind.kind] = (seen, st)
    assert results["envoy"] == results["pyproxy"], results
    assert results["pyproxy"] == ("TLSV13_ALERT_CERTIFICATE_REQUIRED",
                                  {"fail_verify_no_cert": 1, "connection_error": 1}), results


def _session_tickets(port, ca_path, version, cert=None):
    """(a session ticket arrived, the second connection resumed) for a client at ``version``."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    ticket, resumed, session = False, False, None
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="localhost", session=session) as t:
                resumed = t.session_reused
                t.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert t.recv(100).startswith(b"HTTP/1.1 200"), "no answer"  # tickets come before it
                session = t.session
                ticket = ticket or bool(session is not None and session.has_ticket)
    return ticket, resumed


def _tls_listeners_only(bs):
    """A copy of the bootstrap on fresh ports with only its "tls" and "mtls" listeners (no access
    logs): (bootstrap, their ports)."""
    bs = with_fresh_ports(bs)
    lst = [l for l in bs["static_resources"]["listeners"] if l["name"] in ("tls", "mtls")]
    for l in lst:
        l["filter_chains"][0]["filters"][0]["typed_config"].pop("access_log", None)
    bs["static_resources"]["listeners"] = lst
    return bs, [l["address"]["socket_address"]["port_value"] for l in lst]


@pytest.mark.skipif(ENVOY is None, reason="envoy not installed")
def test_session_resumption_same_as_envoy(env):
    """Envoy (BoringSSL) hands out session tickets in TLS 1.3 and 1.2, on TLS and mTLS chains, and
    a second connection resumes with one; so does pyproxy (one TLS 1.3 ticket per handshake
    instead of OpenSSL's two, see tls/ssl_context.py)."""
    bs, ports = _tls_listeners_only(env["bs"])
    results = {}
    for kind in (Envoy, Pyproxy):
        with kind(bs):
            results[kind.kind] = [_session_tickets(port, env["pki"].ca_path, v, env["good"])
                                  for port in ports for v in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2)]
    assert results["pyproxy"] == results["envoy"] == [(True, True)] * 4, results


def _ticket_without_data(port, ca_path, cert, fin: bool):
    """A TLS 1.3 connection on which the server writes no application data: did a session ticket
    arrive? ``fin``: the client half-closes TCP after the handshake and reads until the server
    closes; else it waits 0.5 s for anything (a ticket sent at the handshake's end would be there)."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            if fin:
                socket.socket.shutdown(t, socket.SHUT_WR)  # (a TCP FIN, not SSLSocket's unwrap)
            else:
                t.settimeout(0.5)
            try:
                t.recv(100)  # records up to the server's close, or the wait: tickets processed
            except (ssl.SSLError, OSError):  # (socket.timeout included)
                pass
            session = t.session
    return bool(session is not None and session.has_ticket)


@pytest.mark.skipif(ENVOY is None, reason="envoy not installed")
def test_session_ticket_with_first_write_as_envoy(env):
    """BoringSSL (Envoy) sends its TLS 1.3 session ticket with the server's next write after the
    handshake (the first response, or the closing alert), not at the handshake's end: a connection
    idle after its handshake has none. pyproxy the same where OpenSSL can be asked for a ticket
    after the handshake (tls/tickets.py); one difference, on purpose: when the connection closes
    without the server having written anything, Envoy's closing alert still carries a ticket and
    pyproxy's does not (nobody resumes from it there, it is a sixth of the handshake's CPU, and a
    ticket that failed to be written would keep OpenSSL from sending close_notify:
    test_tls_units.test_close_notify_even_when_a_ticket_would_fail).
    Connections with a response get a ticket from both (test_session_resumption_same_as_envoy)."""
    from pyproxy.tls import tickets
    bs, ports = _tls_listeners_only(env["bs"])
    results = {}
    for kind in (Envoy, Pyproxy):
        with kind(bs):
            results[kind.kind] = [(_ticket_without_data(port, env["pki"].ca_path, env["good"], False),
                                   _ticket_without_data(port, env["pki"].ca_path, env["good"], True))
                                  for port in ports]
    assert results["envoy"] == [(False, True)] * 2, results
    assert results["pyproxy"] == [(False, False) if tickets.AVAILABLE else (True, True)] * 2, results


def _memory_pair(env, num_tickets=0):
    """A finished TLS 1.3 handshake in memory: (server SSLObject, client SSLObject, s->c BIO, c->s BIO)."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv = env["pki"].issue("memserver", dns=["localhost"])
    sctx.load_cert_chain(srv.cert_path, srv.key_path)
    sctx.num_tickets = num_tickets
    cctx = ssl.create_default_context(cafile=env["pki"].ca_path)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    so = sctx.wrap_bio(s_in, s_out, server_side=True)
    co = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = [False, False]
    for _ in range(10):
        for i, o in enumerate((co, so)):
            if not done[i]:
                try:
                    o.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
        if all(done):
            break
    assert all(done)
    return so, co, s_out, c_in


def test_deferred_ticket_mechanism(env):
    """tls/tickets.py binds OpenSSL only after its layout self-test (it passes on this CPython). A
    ticket asked for after the handshake goes out with the next write, or before the close_notify
    when flushed by do_handshake; asked for on a client side or before
    the handshake's end it is refused cleanly (False, no error left for the next ssl call)."""
    from pyproxy.tls import tickets
    assert tickets.AVAILABLE
    so, co, s_out, c_in = _memory_pair(env)
    assert not s_out.pending  # num_tickets 0: nothing after the handshake
    assert tickets.issue(so._sslobj)
    so.write(b"hello")
    c_in.write(s_out.read())
    assert co.read(100) == b"hello" and co.session.has_ticket
    so, co, s_out, c_in = _memory_pair(env)
    assert tickets.issue(so._sslobj)
    so.do_handshake()
    with pytest.raises(ssl.SSLWantReadError):
        so.unwrap()  # our close_notify out, the peer's not in yet
    c_in.write(s_out.read())
    try:
        got = co.read(100)
    except ssl.SSLZeroReturnError:
        got = b""
    assert got == b"" and co.session.has_ticket  # the ticket, then close_notify
    assert tickets.issue(co._sslobj) is False  # client side
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sobj = sctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert tickets.issue(sobj._sslobj) is False  # handshake not done
    with pytest.raises(ssl.SSLWantReadError):
        sobj.do_handshake()


def test_static_secret_by_name(tmp_path):
    """tls_certificate_sds_secret_configs naming a static_resources.secrets entry (no sds_config):
    Envoy serves it; so does pyproxy once the server loads static secrets into tls.secrets.STORE."""
    pki = Pki(tmp_path / "pki")
    srv = pki.issue("server", dns=["localhost"])
    be = HttpBackend()
    port = free_port()
    l = http_listener(port, route_config([route("/", "b")]))
    l["filter_chains"][0]["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "srv"}]}}}
    bs = bootstrap([l], [cluster("b", [be.port])])
    bs["static_resources"]["secrets"] = [{"name": "srv", "tls_certificate": cert_entry(srv)}]
    kinds = ([Envoy] if ENVOY else []) + ([Pyproxy] if _server_loads_static_secrets() else [])
    if not kinds:
        pytest.skip("no envoy, and the server does not load static secrets yet")
    try:
        for kind in kinds:
            with kind(bs):
                p = curl("--cacert", pki.ca_path, _url(port))
                assert p.returncode == 0 and p.stdout.startswith("b GET /x"), (kind.kind, p.stderr)
    finally:
        be.close()


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_large_bodies_both_ways_over_tls(tmp_path, version):
    """8 MiB down and 3 MiB up through a TLS listener: watermarks and TLS records keep bytes intact."""
    import hashlib
    pki = Pki(tmp_path / "pki")
    srv = pki.issue("server", dns=["localhost"])
    big = os.urandom(8 * 1024 * 1024)
    up = os.urandom(3 * 1024 * 1024)
    (tmp_path / "up.bin").write_bytes(up)

    def handler(req, sock):
        if req.method == "POST":
            body = hashlib.sha256(req.body).hexdigest().encode()
        else:
            body = big
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body

    be = HttpBackend(handler)
    port = free_port()
    l = http_listener(port, route_config([route("/", "b")]))
    l["per_connection_buffer_limit_bytes"] = 65536
    l["filter_chains"][0]["transport_socket"] = downstream_tls(srv)
    try:
        with Pyproxy(bootstrap([l], [cluster("b", [be.port], per_connection_buffer_limit_bytes=65536)])):
            out = tmp_path / "down.bin"
            p = curl(version, "--cacert", pki.ca_path, "-o", str(out), _url(port, "/big"), timeout=30)
            assert p.returncode == 0, p.stderr
            assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big).digest()
            p = curl(version, "--cacert", pki.ca_path, "--data-binary", "@" + str(tmp_path / "up.bin"),
                     _url(port, "/up"), timeout=30)
            assert p.returncode == 0 and p.stdout == hashlib.sha256(up).hexdigest(), (p.stdout, p.stderr)
    finally:
        be.close()


# -- RBAC on the TLS peer identity -----------------------------------------------------------------------

def test_rbac_authenticated_principal(env, tmp_path):
    """HTTP and network RBAC see the client certificate's SPIFFE identity (``authenticated``)."""
    pki, good, bad = env["pki"], env["good"], env["bad_san"]
    srv = pki.issue("server-rbac", dns=["localhost"])
    rbac_t = "type.googleapis.com/envoy.extensions.filters.%s.rbac.v3.RBAC"
    policy = {"action": "ALLOW", "policies": {"client-only": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": SPIFFE_NS + "sa/client"}}}]}}}
    p_http, p_tcp = free_port(), free_port()
    l_http = http_listener(p_http, route_config([route("/", "b")]), name="rbac-http", http_filters=[
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": rbac_t % "http", "rules": policy}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}])
    l_http["filter_chains"][0]["transport_socket"] = downstream_tls(srv, ca=pki)  # client cert optional
    l_tcp = http_listener(p_tcp, route_config([route("/", "b")]), name="rbac-net")
    l_tcp["filter_chains"][0]["filters"].insert(0, {"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": rbac_t % "network", "stat_prefix": "net.", "rules": policy}})
    l_tcp["filter_chains"][0]["transport_socket"] = downstream_tls(srv, ca=pki)
    px = Pyproxy(bootstrap([l_http, l_tcp], [cluster("b", [env["be"].port])]))
    try:
        for port in (p_http, p_tcp):
            ca = ["--http1.1", "--cacert", pki.ca_path]
            ok = curl(*ca, "-o", "/dev/null", "-w", "%{http_code}", "--cert", good.cert_path, "--key",
                      good.key_path, _url(port))
            assert ok.stdout == "200", (port, ok.stdout, ok.stderr)
            other = curl(*ca, "-o", "/dev/null", "-w", "%{http_code}", "--cert", bad.cert_path, "--key",
                         bad.key_path, _url(port))
            anon = curl(*ca, "-o", "/dev/null", "-w", "%{http_code}", _url(port))
            if port == p_http:
                assert other.stdout == "403" and anon.stdout == "403", (other.stdout, anon.stdout)
            else:  # network RBAC closes the connection: no HTTP response at all
                assert other.stdout == "000" and anon.stdout == "000", (other.stdout, anon.stdout)
        st = px.stats()
        assert st.get("http.ingress.rbac.allowed") == 1 and st.get("http.ingress.rbac.denied") == 2, st
        assert st.get("net.rbac.allowed") == 1 and st.get("net.rbac.denied") == 2
    finally:
        px.stop()

"""/config_dump never shows key material: fields annotated ``udpa.annotations.sensitive``
(a TLS certificate's private_key and password, wherever they sit: listeners, clusters, the
bootstrap, secrets) print as Envoy prints them, ``[redacted]``, in every form of the dump.
Each case runs through pyproxy and Envoy with the same bootstrap."""
from __future__ import annotations

import base64
import json

import pytest

from proxy_util import (Envoy, Pyproxy, bootstrap, cluster, free_port, http_listener, request, route,
                        route_config)
from tls_certs import Pki, downstream_tls, upstream_tls

FORMS = ("/config_dump", "/config_dump?resource=static_listeners", "/config_dump?resource=static_clusters",
         "/config_dump?resource=static_secrets", "/config_dump?include_eds", "/config_dump?mask=bootstrap")


def _keys(node, out):
    """Every ``private_key`` / ``password`` object in a dump, as sorted JSON strings."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("private_key", "password"):
                out.append(json.dumps(v, sort_keys=True))
            else:
                _keys(v, out)
    elif isinstance(node, list):
        for v in node:
            _keys(v, out)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def _bootstrap(pki) -> dict:
    srv = pki.issue("server", dns=["localhost"])
    l = http_listener(free_port(), route_config([route("/", "b")]), stat_prefix="in")
    l["filter_chains"][0]["transport_socket"] = downstream_tls(srv)  # inline_string key
    c = cluster("b", [free_port()])
    ts = upstream_tls(cert=srv)
    cert = ts["typed_config"]["common_tls_context"]["tls_certificates"][0]
    cert["private_key"] = {"inline_bytes": base64.b64encode(srv.key_pem).decode()}  # inline_bytes key
    c["transport_socket"] = ts
    bs = bootstrap([l], [c])
    bs["static_resources"]["secrets"] = [
        {"name": "s-inline", "tls_certificate": {"certificate_chain": {"inline_string": srv.cert_pem.decode()},
                                                 "private_key": {"inline_string": srv.key_pem.decode()}}},
        {"name": "s-file", "tls_certificate": {"certificate_chain": {"filename": srv.cert_path},
                                               "private_key": {"filename": srv.key_path}}},
    ]
    return bs, srv


@pytest.mark.parametrize("form", FORMS)
def test_config_dump_redacts_private_keys_as_envoy(pki, form):
    bs, srv = _bootstrap(pki)
    key_line = srv.key_pem.decode().splitlines()[1]
    key_b64 = base64.b64encode(srv.key_pem).decode()[:40]
    got = {}
    for kind in (Pyproxy, Envoy):
        with kind(bs) as p:
            st, _, body = request(p.admin_port, "GET", form)
            assert st == 200, (kind.__name__, form, body[:300])
            text = body.decode() if isinstance(body, bytes) else body
            assert "PRIVATE KEY" not in text and key_line not in text and key_b64 not in text, (kind.__name__, form)
            got[kind.__name__] = sorted(_keys(json.loads(text), []))
    assert got["Pyproxy"] == got["Envoy"], form
    if form in ("/config_dump", "/config_dump?resource=static_secrets"):
        assert any("[redacted]" in k for k in got["Pyproxy"])


def test_redaction_leaves_non_sensitive_fields_and_the_live_config_alone(pki):
    """The dump's copy is redacted, the config the proxy serves with is not: the listener still
    completes TLS handshakes with its key after the dump was taken."""
    import ssl
    import socket
    bs, srv = _bootstrap(pki)
    port = bs["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    with Pyproxy(bs) as p:
        st, _, body = request(p.admin_port, "GET", "/config_dump")
        text = body.decode() if isinstance(body, bytes) else body
        assert st == 200 and "BEGIN CERTIFICATE" in text  # certificate chains are not sensitive
        ctx = ssl.create_default_context(cafile=pki.ca_path if hasattr(pki, "ca_path") else None)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                assert t.getpeercert(binary_form=True)

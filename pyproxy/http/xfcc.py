"""``x-forwarded-client-cert``: this connection's XFCC element (Envoy's
``set_current_client_cert_details``), built from the verified peer certificate and cached on the
connection's TLS layer; the request preparation (``request_prep.py``) decides where it goes."""

from __future__ import annotations

import hashlib
from urllib.parse import quote

SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET, ALWAYS_FORWARD_ONLY = 0, 1, 2, 3, 4
CERT, CHAIN, SUBJECT, URI, DNS = "cert", "chain", "subject", "uri", "dns"


def _subject(cert) -> str:
    """The certificate subject as OpenSSL prints it with XN_FLAG_RFC2253."""
    from cryptography.x509.oid import NameOID  # (only connections with client certificates get here)
    try:
        return cert.subject.rfc4514_string({NameOID.EMAIL_ADDRESS: "emailAddress"})
    except Exception:
        return ""


def _url_pem(der: bytes) -> str:
    pem = ssl_der_to_pem(der)
    return quote(pem, safe="-._~")


def ssl_der_to_pem(der: bytes) -> str:
    import base64
    b = base64.b64encode(der).decode()
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + \
        "\n-----END CERTIFICATE-----\n"


def xfcc_value(tls, details: tuple) -> str | None:
    """This connection's XFCC element for ``details`` (cached on the connection's TLS layer), or
    None when the peer presented no verified certificate."""
    facts = tls.client_cert()
    if facts is None:
        return None
    cache = facts.xfcc
    v = cache.get(details)
    if v is not None:
        return v
    from cryptography import x509
    der = facts.der
    cert = x509.load_der_x509_certificate(der)
    parts = []
    # one By= per URI SAN of our certificate, as Envoy
    parts.extend("By=" + u for u in getattr(tls.tls, "local_uri_sans", ()))
    parts.append("Hash=" + hashlib.sha256(der).hexdigest())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    for d in details:
        if d == CERT:
            parts.append('Cert="%s"' % _url_pem(der))
        elif d == CHAIN:
            parts.append('Chain="%s"' % "".join(_url_pem(c) for c in facts.chain))
        elif d == SUBJECT:
            parts.append('Subject="%s"' % _subject(cert))
        elif d == URI:
            if uris:
                parts.extend("URI=" + u for u in uris)
            else:
                parts.append("URI=")
        elif d == DNS:
            parts.extend("DNS=" + x for x in dns)
    v = cache[details] = ";".join(parts)
    return v

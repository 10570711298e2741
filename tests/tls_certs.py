"""Test certificates generated at test time (nothing private is committed).

    pki = Pki(tmp_path)                     # a CA (and a second, untrusted one)
    srv = pki.issue("server", dns=["localhost"], uri=["spiffe://cluster.local/ns/default/sa/server"])
    srv.cert_path, srv.key_path, srv.cert_pem, srv.key_pem, pki.ca_path, pki.ca_pem
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Issued:
    def __init__(self, cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str):
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self.cert_path = cert_path
        self.key_path = key_path


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


class Pki:
    def __init__(self, directory, name: str = "pyproxy test CA"):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.name = name
        self.ca_key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.ca_cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj)
                        .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
                        .not_valid_before(now - datetime.timedelta(minutes=5))
                        .not_valid_after(now + datetime.timedelta(days=2))
                        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                       critical=True)
                        .sign(self.ca_key, hashes.SHA256()))
        self.ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_path = self._write(name.replace(" ", "_") + "-ca.pem", self.ca_pem)

    def _write(self, fname: str, data: bytes) -> str:
        p = os.path.join(self.dir, fname)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, 0o600)
        return p

    def issue(self, cn: str, dns=(), uri=(), ips=(), days: int = 2) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uri] + \
            [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.ca_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.ca_key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _pem_key(key)
        return Issued(cert_pem, key_pem, self._write(cn + ".pem", cert_pem), self._write(cn + "-key.pem", key_pem))


# -- config snippets ---------------------------------------------------------------------------------

TP = "type.googleapis.com/"
DTLS = TP + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UTLS = TP + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def cert_entry(issued: Issued, inline: bool = True) -> dict:
    if inline:
        return {"certificate_chain": {"inline_string": issued.cert_pem.decode()},
                "private_key": {"inline_string": issued.key_pem.decode()}}
    return {"certificate_chain": {"filename": issued.cert_path}, "private_key": {"filename": issued.key_path}}


def validation_context(ca: Pki, sans=None) -> dict:
    """A validation context trusting ``ca`` (``sans``: match_typed_subject_alt_names)."""
    vc = {"trusted_ca": {"inline_string": ca.ca_pem.decode()}}
    if sans:
        vc["match_typed_subject_alt_names"] = sans
    return vc


def downstream_tls(cert: Issued, *, alpn=("h2", "http/1.1"), ca: Pki | None = None, require: bool = False,
                   sans=None, **common_extra) -> dict:
    """A ``transport_socket`` with a DownstreamTlsContext (``sans``: match_typed_subject_alt_names)."""
    common = {"alpn_protocols": list(alpn), "tls_certificates": [cert_entry(cert)]}
    if ca is not None:
        common["validation_context"] = validation_context(ca, sans)
    common.update(common_extra)
    ctx = {"@type": DTLS, "common_tls_context": common}
    if require:
        ctx["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def upstream_tls(*, sni: str = "", alpn=(), ca: Pki | None = None, sans=None, cert: Issued | None = None,
                 **common_extra) -> dict:
    common: dict = {}
    if alpn:
        common["alpn_protocols"] = list(alpn)
    if cert is not None:
        common["tls_certificates"] = [cert_entry(cert)]
    if ca is not None:
        common["validation_context"] = validation_context(ca, sans)
    common.update(common_extra)
    ctx = {"@type": UTLS, "common_tls_context": common}
    if sni:
        ctx["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def uri_san(kind: str, value: str) -> dict:
    return {"san_type": "URI", "matcher": {kind: value}}

"""What pyproxy reads from a verified peer certificate, parsed once per distinct certificate.

The TLS layer (tls/socket.py) takes a ``PeerFacts`` for the peer leaf of every handshake that
OpenSSL completed and verified; the context's SAN matchers (tls/ssl_context.py ``check_peer``),
the connection's principal (RBAC, access logs) and istio_authn read it. A sidecar sees the same few
peer certificates over and over (one per client workload until it rotates), so the parsing is
cached by the certificate's DER.
"""

from __future__ import annotations

_RDN_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
              "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L"}


class PeerFacts:
    """What pyproxy reads from a verified peer leaf certificate: SANs (``sans``: the stdlib's
    ``subjectAltName`` pairs, for the SAN matchers), the first URI and DNS SAN, subject, issuer,
    serial, the principal and what RBAC's ``authenticated`` tries, in Envoy's order (every URI
    SAN, every DNS SAN, then the subject)."""

    __slots__ = ("sans", "uri", "dns", "subject", "issuer", "serial", "principal", "principals")

    def __init__(self, cert: dict):
        sans = self.sans = tuple(cert.get("subjectAltName", ()))
        uris = [v for k, v in sans if k == "URI"]
        dnss = [v for k, v in sans if k == "DNS"]
        self.uri = uris[0] if uris else ""
        self.dns = dnss[0] if dnss else ""
        self.subject = _rdn(cert.get("subject", ()))
        self.issuer = _rdn(cert.get("issuer", ()))
        self.serial = cert.get("serialNumber", "").lower()
        self.principal = self.uri or self.dns or self.subject
        self.principals = tuple(uris + dnss + [self.subject])


# Parsed facts of recent peer certificates, keyed by the certificate's DER itself (no hash that
# could collide). Only the parsing is cached: OpenSSL verifies the chain on every handshake
# against the context's current trust (so a rotated-out CA or an expired certificate is refused
# before this is consulted), and the SAN matchers and pins run on every handshake. Bounded: the
# oldest entry goes when full (one peer presents one certificate until it rotates).
_FACTS: dict = {}
FACTS_MAX = 512


def peer_facts(so, der: bytes) -> PeerFacts:
    """The facts of the verified peer certificate ``der`` of connection ``so``."""
    f = _FACTS.get(der)
    if f is None:
        f = PeerFacts(so.getpeercert() or {})
        if len(_FACTS) >= FACTS_MAX:
            try:
                del _FACTS[next(iter(_FACTS))]
            except (StopIteration, KeyError):
                pass
        _FACTS[der] = f
    return f



def _rdn(name) -> str:
    """An RFC 2253-ish string of a stdlib certificate name (most specific first, as Envoy prints)."""
    parts = []
    short = _RDN_SHORT
    for rdn in reversed(name):
        for k, v in rdn:
            parts.append("%s=%s" % (short.get(k, k), v))
    return ",".join(parts)

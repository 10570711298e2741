"""One ``ssl.SSLContext`` per distinct TLS configuration, built at config time (or when its SDS
secrets arrive), never per connection.

What stdlib ``ssl`` expresses is set on the context: certificates (one per key type), trusted CAs
and CRLs, peer-certificate requirement, protocol version range, TLS 1.2 cipher list, one ECDH
curve, ALPN. What it cannot express during the handshake — subject-alt-name matchers (SPIFFE URIs),
certificate hash / SPKI pins — is checked right after it (``check_peer``), and a failure closes the
connection as Envoy's failed verification does.

Certificates and keys given inline are handed to OpenSSL through anonymous memory files
(``memfd_create``) where the system has them, else through files in a private 0700 temp directory,
removed right after loading (and the directory at exit). Compiled contexts are cached by the
serialized TLS proto plus the secrets it resolved; the ``SSLContext`` inside by what actually
configures it, so clusters differing only in SNI or SAN matchers share one.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import logging
import os
import shutil
import ssl
import tempfile
import weakref

from ..config import ConfigError
from . import tickets
from .peer import PeerFacts

log = logging.getLogger("pyproxy.config")

_VERSIONS = {
    "TLSv1_0": ssl.TLSVersion.TLSv1, "TLSv1_1": ssl.TLSVersion.TLSv1_1,
    "TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3,
}
# Envoy's defaults: TLS 1.2 .. 1.3 for clients and servers
DEFAULT_MIN, DEFAULT_MAX = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
# Envoy's default TLS 1.2 cipher list (BoringSSL equal-preference groups flattened), OpenSSL names
DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
                   "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384")
_TLS13_SUITES = frozenset(("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"))
_CURVE_NAMES = {"P-256": "prime256v1", "P256": "prime256v1", "P-384": "secp384r1", "P384": "secp384r1",
                "P-521": "secp521r1", "P521": "secp521r1", "X25519": "X25519"}
# stdlib getpeercert() subjectAltName type names, by Envoy's SubjectAltNameMatcher.SanType name
_SAN_TYPES = {"DNS": ("DNS",), "URI": ("URI",), "EMAIL": ("email",), "IP_ADDRESS": ("IP Address",),
              "OTHER_NAME": ("othername",), "": ("DNS", "URI", "email", "IP Address")}

# compiled TLS per distinct proto + resolved secrets, and SSLContexts per distinct context
# properties; entries go when no factory holds them any more
_CACHE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_CTX_CACHE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


class CompiledTls:
    """An ``ssl.SSLContext`` and the checks made after its handshakes."""

    __slots__ = ("ctx", "server", "san_matchers", "hashes", "spki", "local_uri_san", "local_dns_san",
                 "local_uri_sans", "sni", "verifies", "resume", "session", "defer_ticket", "__weakref__")

    def __init__(self, ctx, server: bool):
        self.ctx = ctx
        self.server = server
        self.san_matchers = ()
        self.hashes = ()
        self.spki = ()
        self.local_uri_san = ""
        self.local_dns_san = ""
        self.local_uri_sans = ()  # every URI SAN of our certificate (XFCC names each as By=)
        self.sni = None
        self.verifies = False
        # client side: resume TLS sessions (UpstreamTlsContext.max_session_keys != 0), with the last
        # session a server gave (one, as Envoy's default max_session_keys); taken by the connection
        # that resumes with it, which leaves its own (TLS 1.3 tickets are single-use)
        self.resume = False
        self.session = None
        # server side: the TLS 1.3 session ticket goes out with the first write (tls/tickets.py)
        self.defer_ticket = False

    def check_peer(self, obj, facts=None) -> str:
        """'' if the peer certificate passes the post-handshake checks, else the failure kind
        (``fail_verify_san`` / ``fail_verify_cert_hash``). ``facts``: the ``PeerFacts`` of the
        verified peer certificate (tls/socket.py), None when the peer presented none."""
        if not (self.san_matchers or self.hashes or self.spki):
            return ""
        if facts is None:
            if obj.getpeercert(True) is None:
                return ""  # no certificate: required-ness was enforced by the handshake
            facts = PeerFacts(obj.getpeercert() or {})
        if self.hashes or self.spki:
            if not self._pinned(obj.getpeercert(True)):
                return "fail_verify_cert_hash"
        if self.san_matchers:
            sans = facts.sans
            for sm in self.san_matchers:
                kinds = _SAN_TYPES.get(sm.san_type, ())
                m = sm.matcher
                for kind, value in sans:
                    if kind in kinds and (m.match(value) or (kind == "DNS" and _dns_wildcard(m, value))):
                        return ""
            return "fail_verify_san"
        return ""

    def _pinned(self, der: bytes) -> bool:
        if self.hashes and hashlib.sha256(der).hexdigest() in self.hashes:
            return True
        if self.spki:
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization
            pub = x509.load_der_x509_certificate(der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if base64.b64encode(hashlib.sha256(pub).digest()).decode() in self.spki:
                return True
        return False


def _dns_wildcard(m, san: str) -> bool:
    """An exact matcher against a wildcard DNS SAN (``*.example.com`` matches ``a.example.com``)."""
    if m.kind != "exact" or not san.startswith("*."):
        return False
    v = m.value.lower()
    suffix = san[1:].lower()
    return v.endswith(suffix) and "." not in v[:-len(suffix)] and len(v) > len(suffix)


def compiled_for(key: bytes, build) -> CompiledTls:
    """The cached context for ``key``, or ``build()``'s, cached."""
    c = _CACHE.get(key)
    if c is None:
        c = build()
        _CACHE[key] = c
    return c


def build(f, certificates, ca_pem: bytes | None, crl_pem: bytes | None, validation=None) -> CompiledTls:
    """A ``CompiledTls`` for factory ``f`` with the given (chain PEM, key PEM, password)
    certificates and trust anchors. Its ``SSLContext`` is shared with every other factory that
    differs only in what is not a context property (SNI, SAN matchers, pins): Istio gives each
    outbound cluster its own SNI and SANs, and they all share one context. ConfigError if OpenSSL
    refuses a part."""
    server = f.side == "downstream"
    v = validation if validation is not None else f.validation  # (merged with an SDS context's)
    verifies = v is not None and bool(ca_pem or v.system_roots)
    key = (f.side, f.alpn, f.min_version, f.max_version, f.cipher_suites, f.ecdh_curves,
           f.require_client_certificate, tuple(certificates), ca_pem if verifies else None,
           crl_pem if verifies else None, bool(v and v.only_leaf_crl), bool(v and v.system_roots))
    ctx = _CTX_CACHE.get(key)
    if ctx is None:
        ctx = _CTX_CACHE[key] = _ssl_context(f, certificates, ca_pem, crl_pem, server, verifies, v)
    c = CompiledTls(ctx, server)
    if certificates:
        c.local_uri_sans, c.local_dns_san = _local_sans(certificates[0][0])
        c.local_uri_san = c.local_uri_sans[0] if c.local_uri_sans else ""
    if verifies:
        c.verifies = True
        c.san_matchers = v.san_matchers
        c.hashes = v.hashes
        c.spki = v.spki
    if not server:
        c.sni = f.sni or None
        c.resume = getattr(f, "max_session_keys", 1) != 0
    else:
        c.defer_ticket = ctx.num_tickets == 0 and tickets.AVAILABLE
    return c


def _ssl_context(f, certificates, ca_pem, crl_pem, server: bool, verifies: bool, v=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = _VERSIONS.get(f.min_version, DEFAULT_MIN)
    ctx.maximum_version = _VERSIONS.get(f.max_version, DEFAULT_MAX)
    ctx.options |= ssl.OP_NO_COMPRESSION
    if server:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
        # One TLS 1.3 session ticket per connection, not OpenSSL's two: each costs 15-20% of a
        # server handshake's CPU, and one is what a client resumes with (Envoy's upstream keeps one
        # session per context; TLS 1.3 tickets are single-use). Envoy 1.40 sends two, but only
        # once the connection carries data: so does pyproxy where tls/tickets.py can ask OpenSSL
        # for a ticket after the handshake (none during it, then one with the first write); else
        # OpenSSL's way, right after the handshake. TLS 1.2: one ticket, in the handshake.
        ctx.num_tickets = 0 if tickets.AVAILABLE else 1
    tickets.prefer_aes128(ctx)
    suites = [s for s in f.cipher_suites if s not in _TLS13_SUITES]
    try:
        ctx.set_ciphers(":".join(suites) if suites else DEFAULT_CIPHERS)
    except ssl.SSLError as e:
        raise ConfigError("cipher suites rejected: %s" % e, field="tls_params.cipher_suites") from None
    if len(f.ecdh_curves) == 1:
        try:
            ctx.set_ecdh_curve(_CURVE_NAMES.get(f.ecdh_curves[0], f.ecdh_curves[0]))
        except (ValueError, ssl.SSLError):
            pass  # a curve name OpenSSL does not know: its default group list stays
    if f.alpn:
        ctx.set_alpn_protocols(list(f.alpn))
    if server:
        ctx.sni_callback = _remember_sni
    for i, (chain, key, password) in enumerate(certificates):
        try:
            with _pem_file(chain) as cp, _pem_file(key) as kp:
                ctx.load_cert_chain(cp, kp, password=password)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError("certificate not usable: %s" % e, field="tls_certificates[%d]" % i) from None
    if v is None:
        v = f.validation
    if ca_pem:
        try:
            if crl_pem:
                with _pem_file(ca_pem + b"\n" + crl_pem) as p:
                    ctx.load_verify_locations(cafile=p)
                ctx.verify_flags |= (ssl.VERIFY_CRL_CHECK_LEAF if v.only_leaf_crl else ssl.VERIFY_CRL_CHECK_CHAIN)
            else:
                ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError, OSError) as e:
            raise ConfigError("trusted CA not usable: %s" % e, field="validation_context.trusted_ca") from None
    if v is not None and v.system_roots:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH if not server else ssl.Purpose.CLIENT_AUTH)
    if verifies:
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if f.require_client_certificate else ssl.CERT_OPTIONAL
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED
    elif server and f.require_client_certificate:
        raise ConfigError("require_client_certificate needs a trusted CA", field="validation_context")
    return ctx


def _remember_sni(obj, server_name, ctx):
    """Server side: keep the client's SNI on the SSLObject (``%REQUESTED_SERVER_NAME%`` when no
    tls_inspector read it)."""
    if server_name:
        try:
            obj.pyproxy_sni = server_name
        except AttributeError:
            pass
    return None


def _local_sans(chain_pem: bytes) -> tuple[tuple, str]:
    """Every URI subject-alt-name (XFCC's By=) and the first DNS one (access logs) of the leaf
    certificate."""
    try:
        from cryptography import x509
        from .parse import pem_blocks as _pem_blocks
        cert = x509.load_pem_x509_certificate(_pem_blocks(chain_pem)[0])
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = ext.get_values_for_type(x509.UniformResourceIdentifier)
        dns = ext.get_values_for_type(x509.DNSName)
        return tuple(uris), (dns[0] if dns else "")
    except Exception:
        return (), ""


# -- PEM handed to OpenSSL by path ----------------------------------------------------------------

_private_dir = None


class _pem_file:
    """A path OpenSSL can read ``data`` from, gone once the ``with`` block ends."""

    __slots__ = ("data", "fd", "path")

    def __init__(self, data: bytes):
        self.data = data
        self.fd = -1
        self.path = None

    def __enter__(self) -> str:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self.fd = os.memfd_create("pyproxy-pem", os.MFD_CLOEXEC)
            _write_all(self.fd, self.data)
            return "/proc/self/fd/%d" % self.fd
        fd, self.path = tempfile.mkstemp(dir=_dir(), suffix=".pem")  # mode 0600
        try:
            _write_all(fd, self.data)
        finally:
            os.close(fd)
        return self.path

    def __exit__(self, *exc):
        if self.fd >= 0:
            os.close(self.fd)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _dir() -> str:
    global _private_dir
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="pyproxy-tls-")  # 0700
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir

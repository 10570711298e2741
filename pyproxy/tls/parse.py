"""The parts of TLS protos, parsed and checked at config time: data sources (inline, file,
environment), certificate chains and private keys (the key must match the leaf), SDS secret
references, validation contexts (trusted CA, SAN matchers, certificate pins, CRL), TLS cipher suite
names, and SDS ``Secret`` resources (``validate_secret``). ``tls.context`` assembles them into a
``TlsSocketFactory``.
"""

from __future__ import annotations

import os
import ssl

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2  # noqa: F401

from ..config import ConfigError

_SAN = common_pb2.SubjectAltNameMatcher.SanType
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
REDACTED = b"[redacted]"


class SanMatcher:
    __slots__ = ("san_type", "matcher")

    def __init__(self, san_type: str, matcher):
        self.san_type = san_type  # "" (any type, legacy match_subject_alt_names), "URI", "DNS", ...
        self.matcher = matcher


class ValidationConfig:
    """What a peer certificate is checked against (merged ``combined_validation_context``)."""

    __slots__ = ("trusted_ca_pem", "ca_sds_name", "ca_sds_dynamic", "san_matchers", "spki", "hashes",
                 "allow_expired", "system_roots", "crl_pem", "only_leaf_crl")

    def __init__(self):
        self.trusted_ca_pem = None
        self.ca_sds_name = ""
        self.ca_sds_dynamic = ""        # the SDS source key ("" static)
        self.san_matchers = ()
        self.spki = ()
        self.hashes = ()
        self.allow_expired = False
        self.system_roots = False
        self.crl_pem = None
        self.only_leaf_crl = False


_cipher_cache: dict = {}
# TLS 1.3 suites are not configurable by name in Envoy/BoringSSL either; accept the standard names
_TLS13 = frozenset(("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"))


def cipher_known(name: str) -> bool:
    if name in _TLS13:
        return True
    r = _cipher_cache.get(name)
    if r is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.set_ciphers(name)
            r = bool(name) and not any(ch in name for ch in ":,! ")
        except ssl.SSLError:
            r = False
        _cipher_cache[name] = r
    return r


def data_source(ds, field: str, what: str) -> bytes | None:
    """Bytes of a ``DataSource`` (inline or a readable file); None when unset."""
    which = ds.WhichOneof("specifier")
    if which is None:
        return None
    if which == "filename":
        try:
            with open(ds.filename, "rb") as fh:
                return fh.read()
        except OSError as e:
            raise ConfigError("cannot read %s '%s': %s" % (what, ds.filename, e.strerror or e),
                              field=field + ".filename") from None
    if which == "inline_bytes":
        return ds.inline_bytes
    if which == "inline_string":
        return ds.inline_string.encode()
    if which == "environment_variable":
        v = os.environ.get(ds.environment_variable)
        if v is None:
            raise ConfigError("environment variable '%s' is not set" % ds.environment_variable,
                              field=field + ".environment_variable")
        return v.encode()
    raise ConfigError("data source '%s' is not supported" % which, field=field)


def pem_blocks(pem: bytes) -> list:
    """The ``BEGIN/END CERTIFICATE`` blocks of ``pem``, in one linear pass (a lazy regex took
    quadratic time on a secret full of BEGIN lines without an END: 50 s for 560 KB)."""
    out = []
    i = 0
    while True:
        s = pem.find(_PEM_BEGIN, i)
        if s < 0:
            return out
        e = pem.find(_PEM_END, s + len(_PEM_BEGIN) + 1)
        if e < 0:
            return out
        i = e + len(_PEM_END)
        out.append(pem[s:i])


def parse_cert_chain(pem: bytes, field: str) -> list:
    from cryptography import x509
    blocks = pem_blocks(pem)
    if not blocks:
        raise ConfigError("no PEM certificate found", field=field)
    out = []
    for b in blocks:
        try:
            out.append(x509.load_pem_x509_certificate(b))
        except ValueError as e:
            raise ConfigError("invalid PEM certificate: %s" % e, field=field) from None
    return out


def _public_bytes(k) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate(tc, field: str, notes: list):
    from cryptography.hazmat.primitives import serialization
    for unsupported in ("pkcs12", "private_key_provider", "watched_directory"):
        if tc.HasField(unsupported):
            raise ConfigError("%s is not supported" % unsupported, field="%s.%s" % (field, unsupported))
    chain = data_source(tc.certificate_chain, field + ".certificate_chain", "certificate chain")
    key = data_source(tc.private_key, field + ".private_key", "private key")
    if chain is None:
        raise ConfigError("certificate_chain is required", field=field + ".certificate_chain")
    certs = parse_cert_chain(chain, field + ".certificate_chain")
    if key is None:
        raise ConfigError("private_key is required", field=field + ".private_key")
    if key.strip() == REDACTED:
        notes.append("private key redacted (from a config dump); not checked")
        return chain, None, None
    password = None
    if tc.HasField("password"):
        password = data_source(tc.password, field + ".password", "password")
    try:
        pkey = serialization.load_pem_private_key(key, password)
    except (ValueError, TypeError) as e:
        raise ConfigError("invalid PEM private key: %s" % e, field=field + ".private_key") from None
    if _public_bytes(pkey.public_key()) != _public_bytes(certs[0].public_key()):
        raise ConfigError("private key does not match the certificate", field=field + ".private_key")
    return chain, key, password


def sds_ref(s, field: str) -> str:
    if not s.name:
        raise ConfigError("SDS secret name must not be empty", field=field + ".name")
    if s.HasField("sds_config"):
        kind = s.sds_config.WhichOneof("config_source_specifier")
        if kind is None:
            raise ConfigError("sds_config needs a config source (ads, api_config_source or path)",
                              field=field + ".sds_config")
        if kind == "api_config_source":
            acs = s.sds_config.api_config_source
            fld = field + ".sds_config.api_config_source"
            if not acs.grpc_services:
                raise ConfigError("api_config_source needs grpc_services", field=fld)
            if acs.api_type != acs.GRPC:
                raise ConfigError("SDS api_type %s is not supported (GRPC: state-of-the-world "
                                  "StreamSecrets)" % acs.ApiType.Name(acs.api_type), field=fld + ".api_type")
            if acs.grpc_services[0].WhichOneof("target_specifier") != "envoy_grpc":
                g = acs.grpc_services[0].google_grpc
                if g.HasField("channel_credentials") and g.channel_credentials.WhichOneof(
                        "credential_specifier") not in (None, "local_credentials"):
                    raise ConfigError("TLS/credentials to the SDS server are not supported",
                                      field=fld + ".grpc_services[0].google_grpc.channel_credentials")
        elif kind != "ads":
            raise ConfigError("SDS config source '%s' is not supported (ads or a GRPC api_config_source)"
                              % kind, field=field + ".sds_config")
    return s.name


def validation(vc, field: str, *, ca_from_sds: bool = False) -> ValidationConfig:
    from ..routing.matchers import compile_string_matcher
    v = ValidationConfig()
    ca = data_source(vc.trusted_ca, field + ".trusted_ca", "trusted CA") if vc.HasField("trusted_ca") else None
    if ca is not None:
        parse_cert_chain(ca, field + ".trusted_ca")
        v.trusted_ca_pem = ca
    v.system_roots = vc.HasField("system_root_certs")
    sans = []
    for i, m in enumerate(vc.match_subject_alt_names):
        sans.append(SanMatcher("", compile_string_matcher(m, "%s.match_subject_alt_names[%d]" % (field, i))))
    for i, m in enumerate(vc.match_typed_subject_alt_names):
        fld = "%s.match_typed_subject_alt_names[%d]" % (field, i)
        if m.san_type == _SAN.SAN_TYPE_UNSPECIFIED:
            raise ConfigError("san_type must be specified", field=fld + ".san_type")
        sans.append(SanMatcher(_SAN.Name(m.san_type), compile_string_matcher(m.matcher, fld + ".matcher")))
    v.san_matchers = tuple(sans)
    for i, h in enumerate(vc.verify_certificate_hash):
        hx = h.replace(":", "")
        if len(hx) != 64 or not all(c in "0123456789abcdefABCDEF" for c in hx):
            raise ConfigError("invalid SHA-256 certificate hash", field="%s.verify_certificate_hash[%d]" % (field, i))
    v.hashes = tuple(h.replace(":", "").lower() for h in vc.verify_certificate_hash)
    v.spki = tuple(vc.verify_certificate_spki)
    v.allow_expired = vc.allow_expired_certificate
    if vc.HasField("crl"):
        v.crl_pem = data_source(vc.crl, field + ".crl", "CRL")
        v.only_leaf_crl = vc.only_verify_leaf_cert_crl

    if vc.HasField("custom_validator_config"):
        raise ConfigError("custom_validator_config is not supported", field=field + ".custom_validator_config")
    if (sans or v.spki or v.hashes) and ca is None and not ca_from_sds and not v.system_roots:
        raise ConfigError("SAN-based verification of peer certificates without a trusted CA is insecure "
                          "and not allowed", field=field)
    return v


# -- SDS Secret resources -----------------------------------------------------------------------------

def validate_secret(sec) -> list:
    """Check an ``envoy.extensions.transport_sockets.tls.v3.Secret``; returns notes (ConfigError if bad)."""
    notes: list = []
    if not sec.name:
        raise ConfigError("secret name must not be empty", field="name")
    which = sec.WhichOneof("type")
    if which == "tls_certificate":
        certificate(sec.tls_certificate, "tls_certificate", notes)
    elif which == "validation_context":
        validation(sec.validation_context, "validation_context", ca_from_sds=True)
    elif which == "session_ticket_keys":
        for i, k in enumerate(sec.session_ticket_keys.keys):
            d = data_source(k, "session_ticket_keys.keys[%d]" % i, "session ticket key")
            if d is not None and len(d) != 80:
                raise ConfigError("session ticket key must be 80 bytes", field="session_ticket_keys.keys[%d]" % i)
    elif which == "generic_secret":
        pass
    else:
        notes.append("secret has no content yet (warming)")
    return notes

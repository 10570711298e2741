"""Compile ``DownstreamTlsContext`` / ``UpstreamTlsContext`` and validate SDS ``Secret`` resources.

Checks follow Envoy's rejections where they are cheap to make at config time: protocol version range,
cipher suite and curve names, ALPN entries, certificate/key PEM (inline or files), SDS secret
references (a name and a config source), subject-alt-name matchers, and "a server context needs a
certificate". The compiled factory (``TlsSocketFactory``) owns the ``ssl.SSLContext`` built from it
(``ssl_context``) and puts TLS on connections (``socket``).
"""

from __future__ import annotations

import logging
import os
import ssl
import weakref

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2  # noqa: F401

from ..config import ConfigError

log = logging.getLogger("pyproxy.config")

_TLS = common_pb2.TlsParameters.TlsProtocol
VERSION_NAMES = {v: k for k, v in _TLS.items()}
KNOWN_CURVES = frozenset(("X25519", "P-256", "P-384", "P-521", "X25519Kyber768Draft00",
                          "X25519MLKEM768", "P256", "P384", "P521", "prime256v1", "secp384r1",
                          "secp521r1"))
_SAN = common_pb2.SubjectAltNameMatcher.SanType
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
REDACTED = b"[redacted]"


class TlsNotReady(ConnectionError):
    """A TLS transport socket cannot carry a connection yet: its SDS secrets have not arrived, or
    its key is not usable. The connection is refused, never sent in plaintext."""


TlsNotImplemented = TlsNotReady  # the name this error had before TLS was implemented


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


class TlsSocketFactory:
    """A compiled TLS transport socket (one per filter chain or cluster ``transport_socket``).

    Its ``ssl.SSLContext`` is built once: at config time when every certificate is inline or a
    file, else when the SDS secrets it names are in ``secrets.STORE`` (re-checked only after the
    store changed). ``wrap_downstream`` / ``connect`` put TLS on a connection (``tls.socket``).
    """

    name = "tls"
    is_tls = True

    def __init__(self, side: str):
        self.side = side  # "downstream" | "upstream"
        self.alpn: tuple = ()
        self.min_version = "TLS_AUTO"
        self.max_version = "TLS_AUTO"
        self.cipher_suites: tuple = ()
        self.ecdh_curves: tuple = ()
        self.certificates: list = []      # (cert_chain_pem, key_pem, password) from inline/file config
        self.certificate_sds_names: tuple = ()
        self.certificate_sds_refs: tuple = ()  # (name, is_dynamic)
        self.validation: ValidationConfig | None = None
        self.require_client_certificate = False
        self.sni = ""
        self.notes: list = []             # parts accepted but without effect
        self.proto_key = b""
        self.refused = 0                  # connections refused: context not ready
        self.compiled_tls = None          # ssl_context.CompiledTls
        self.generation = -1              # secrets.STORE.generation the context was resolved at
        self.not_ready_reason = ""
        self.sds_sources: list = []       # (name, ConfigSource) of the SDS references
        self.secret_providers: tuple = ()

    @property
    def unsupported(self) -> int:  # older name of ``refused``
        return self.refused

    @property
    def sds_secret_names(self) -> tuple:
        names = list(self.certificate_sds_names)
        if self.validation is not None and self.validation.ca_sds_name:
            names.append(self.validation.ca_sds_name)
        return tuple(names)

    @property
    def uses_sds(self) -> bool:
        return bool(self.certificate_sds_refs) or (self.validation is not None and bool(self.validation.ca_sds_name))

    # -- the SSLContext ----------------------------------------------------------------------------
    def compiled(self):
        """The current ``CompiledTls``; raises ``TlsNotReady`` if it can't be built."""
        c = self.compiled_tls
        if c is not None and (not self.uses_sds or self.generation == _store().generation):
            return c
        return self._resolve()

    def _resolve(self, strict: bool = False):
        """Build the context from the secrets in the store now. ``strict`` (an SDS update being
        applied): a context OpenSSL refuses raises ConfigError, so the update can be refused."""
        from . import ssl_context
        if not self.uses_sds:
            if self.compiled_tls is None:
                raise TlsNotReady(self.not_ready_reason or "TLS context not usable")
            return self.compiled_tls
        store = _store()
        gen = store.generation
        certs = list(self.certificates)
        parts = [self.proto_key]
        missing = []
        for name, dyn in self.certificate_sds_refs:
            s = store.get(name, dyn)
            if s is None or s.WhichOneof("type") != "tls_certificate":
                missing.append(name)
                continue
            parts.append(s.SerializeToString(deterministic=True))
            certs.append(_certificate(s.tls_certificate, "secret '%s'" % name, []))
        v = self.validation
        ca, crl = (v.trusted_ca_pem, v.crl_pem) if v is not None else (None, None)
        if v is not None and v.ca_sds_name:
            s = store.get(v.ca_sds_name, v.ca_sds_dynamic)
            if s is None or s.WhichOneof("type") != "validation_context":
                missing.append(v.ca_sds_name)
            else:
                parts.append(s.SerializeToString(deterministic=True))
                sv = s.validation_context
                if sv.match_subject_alt_names or sv.match_typed_subject_alt_names or \
                        sv.verify_certificate_hash or sv.verify_certificate_spki:
                    # as Envoy's combined context: the default context MergeFrom the SDS one
                    extra = _validation(sv, "secret '%s'.validation_context" % v.ca_sds_name, ca_from_sds=True)
                    merged = ValidationConfig()
                    for k in ValidationConfig.__slots__:
                        setattr(merged, k, getattr(v, k))
                    merged.san_matchers = tuple(v.san_matchers) + tuple(extra.san_matchers)
                    merged.hashes = tuple(v.hashes) + tuple(extra.hashes)
                    merged.spki = tuple(v.spki) + tuple(extra.spki)
                    v = merged
                ca = _data_source(sv.trusted_ca, "trusted_ca", "trusted CA") if sv.HasField("trusted_ca") else ca
                if sv.HasField("crl"):
                    crl = _data_source(sv.crl, "crl", "CRL")
        if missing:
            self.compiled_tls = None
            self.generation = gen
            self.not_ready_reason = "TLS secrets not ready: %s" % ", ".join(missing)
            raise TlsNotReady(self.not_ready_reason)
        if any(k is None for _, k, _ in certs):
            self.generation = gen
            self.not_ready_reason = "TLS private key unavailable (redacted)"
            raise TlsNotReady(self.not_ready_reason)
        try:
            c = ssl_context.compiled_for(b"\0".join(parts),
                                         lambda: ssl_context.build(self, certs, ca, crl, v))
        except ConfigError as e:
            if strict:
                raise
            self.compiled_tls = None
            self.generation = gen
            self.not_ready_reason = "TLS context from SDS secrets not usable: %s" % e
            log.warning("%s", self.not_ready_reason)
            raise TlsNotReady(self.not_ready_reason) from None
        self.compiled_tls = c
        self.generation = gen
        return c

    def rebuild(self) -> None:
        """An SDS update changed a secret this socket uses: build its context now, off the
        connection path. ConfigError if OpenSSL refuses it (the caller undoes the update);
        TlsNotReady if another secret it needs is still missing."""
        self._resolve(strict=True)

    def depends_on(self, keys) -> bool:
        """Whether this socket uses one of the SDS secrets ``keys`` ((source key, name) pairs)."""
        if any((src, n) in keys for n, src in self.certificate_sds_refs):
            return True
        v = self.validation
        return v is not None and (v.ca_sds_dynamic, v.ca_sds_name) in keys

    def _watch_secrets(self) -> None:
        """Register this socket's SDS references (each one a shared ``SecretProvider``)."""
        store = _store()
        self.secret_providers = tuple(store.watch(name, src, self) for name, src in self.sds_sources)

    @property
    def secrets_ready(self) -> bool:
        """The init target: every SDS secret this socket names has arrived (or gave up waiting)."""
        return all(p.ready for p in self.secret_providers)

    def _compile_static(self) -> None:
        """Config time: build the context now if nothing comes from SDS."""
        from . import ssl_context
        if self.uses_sds:
            return
        if any(k is None for _, k, _ in self.certificates):
            self.not_ready_reason = "TLS private key unavailable (redacted)"
            return
        v = self.validation
        ca, crl = (v.trusted_ca_pem, v.crl_pem) if v is not None else (None, None)
        self.compiled_tls = ssl_context.compiled_for(
            self.proto_key, lambda: ssl_context.build(self, self.certificates, ca, crl))

    def with_alpn(self, alpn: tuple) -> "TlsSocketFactory":
        """This socket offering ``alpn`` instead of its ``alpn_protocols`` (istio.alpn); made once
        per list and kept, its context rebuilt with the secrets like this one's."""
        variants = self.__dict__.setdefault("_alpn_variants", {})
        v = variants.get(alpn)
        if v is None:
            import copy
            v = copy.copy(self)
            v.__dict__.pop("_alpn_variants", None)
            v.alpn = tuple(alpn)
            v.proto_key = self.proto_key + b"\0alpn=" + b",".join(a.encode() for a in alpn)
            v.compiled_tls = None
            v.generation = -1
            v.refused = 0
            v.secret_providers = ()
            v._compile_static()
            v._watch_secrets()
            variants[alpn] = v
        return v

    # -- on connections ----------------------------------------------------------------------------
    def _refuse(self, e: TlsNotReady) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("%s TLS connection refused: %s (%d so far)", self.side, e, self.refused)

    def wrap(self, transport):
        """Downstream: see ``wrap_downstream``. Kept for callers that only check readiness."""
        try:
            return self.compiled()
        except TlsNotReady as e:
            self._refuse(e)
            raise

    def wrap_downstream(self, conn, chain=None):
        """Put a TLS server over ``conn`` (a DownstreamConnection whose chain was just chosen)."""
        from .socket import ServerTls
        try:
            c = self.compiled()
        except TlsNotReady as e:
            self._refuse(e)
            raise
        return ServerTls(c, conn, chain)

    async def connect(self, loop, sock, protocol, timeout: float, scope):
        """Upstream: TLS client over connected ``sock``; ``protocol`` sees connection_made after
        the handshake. Raises OSError (ssl.SSLError, TlsNotReady) or asyncio.TimeoutError."""
        from .socket import connect_client
        try:
            c = self.compiled()
        except TlsNotReady as e:
            self._refuse(e)
            if scope is not None:
                scope.counter("client_ssl_socket_factory.upstream_context_secrets_not_ready").inc()
            sock.close()
            raise
        await connect_client(loop, c, sock, protocol, timeout, scope)

    def __repr__(self):
        return "TlsSocketFactory(%s, alpn=%s, sds=%s)" % (self.side, self.alpn, self.sds_secret_names)


def _store():
    from .secrets import STORE
    return STORE


_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def live_factories() -> list:
    """The TLS socket factories some listener or cluster (or validation run) still holds."""
    return list(_LIVE)


# -- factories registered under "transport_socket" ----------------------------------------------

def downstream_factory(cfg, ctx=None) -> TlsSocketFactory:
    f = TlsSocketFactory("downstream")
    try:
        _common(f, cfg.common_tls_context, "common_tls_context", server=True)
    except ConfigError as e:
        raise e.within(field="DownstreamTlsContext")
    f.require_client_certificate = cfg.require_client_certificate.value \
        if cfg.HasField("require_client_certificate") else False
    if f.require_client_certificate and f.validation is None:
        raise ConfigError("require_client_certificate needs a validation context (trusted CA)",
                          field="DownstreamTlsContext.require_client_certificate")
    if cfg.HasField("session_ticket_keys") or cfg.HasField("session_ticket_keys_sds_secret_config"):
        f.notes.append("session ticket keys not used (OpenSSL's own per-process ticket key is)")
    if cfg.ocsp_staple_policy:
        f.notes.append("OCSP stapling policy not used")
    f.proto_key = b"D" + cfg.SerializeToString(deterministic=True)
    try:
        f._compile_static()
    except ConfigError as e:
        raise e.within(field="DownstreamTlsContext.common_tls_context")
    f._watch_secrets()
    _LIVE.add(f)
    return f


def upstream_factory(cfg, ctx=None) -> TlsSocketFactory:
    f = TlsSocketFactory("upstream")
    try:
        _common(f, cfg.common_tls_context, "common_tls_context", server=False)
    except ConfigError as e:
        raise e.within(field="UpstreamTlsContext")
    if len(cfg.sni.encode()) > 255:
        raise ConfigError("sni is longer than 255 bytes", field="UpstreamTlsContext.sni")
    f.sni = cfg.sni
    if cfg.allow_renegotiation:
        f.notes.append("allow_renegotiation ignored (renegotiation is not supported)")
    f.proto_key = b"U" + cfg.SerializeToString(deterministic=True)
    try:
        f._compile_static()
    except ConfigError as e:
        raise e.within(field="UpstreamTlsContext.common_tls_context")
    f._watch_secrets()
    _LIVE.add(f)
    return f


def _store_source(ref) -> str:
    """The secret store namespace of an SDS reference: its config source's key, "" if static."""
    if not ref.HasField("sds_config"):
        return ""
    from .secrets import source_key
    return source_key(ref.sds_config)


# -- CommonTlsContext ------------------------------------------------------------------------------

def _common(f: TlsSocketFactory, c, field: str, *, server: bool) -> None:
    if c.HasField("tls_params"):
        _params(f, c.tls_params, field + ".tls_params")
    for i, p in enumerate(c.alpn_protocols):
        if not p or len(p.encode()) > 255:
            raise ConfigError("ALPN protocol must be 1..255 bytes", field="%s.alpn_protocols[%d]" % (field, i))
    f.alpn = tuple(c.alpn_protocols)
    for i, tc in enumerate(c.tls_certificates):
        fld = "%s.tls_certificates[%d]" % (field, i)
        f.certificates.append(_certificate(tc, fld, f.notes))
    refs = []
    for i, s in enumerate(c.tls_certificate_sds_secret_configs):
        # (name, source key): SDS secrets are kept per (config source, name), as Envoy keys its
        # SDS providers; "" for a static secret (no sds_config)
        refs.append((_sds_ref(s, "%s.tls_certificate_sds_secret_configs[%d]" % (field, i)),
                     _store_source(s)))
        if s.HasField("sds_config"):
            f.sds_sources.append((s.name, s.sds_config))
    f.certificate_sds_refs = tuple(refs)
    f.certificate_sds_names = tuple(n for n, _ in refs)
    for unsupported in ("tls_certificate_provider_instance", "tls_certificate_certificate_provider",
                        "tls_certificate_certificate_provider_instance", "custom_tls_certificate_selector",
                        "custom_handshaker", "validation_context_certificate_provider",
                        "validation_context_certificate_provider_instance"):
        if c.HasField(unsupported):
            raise ConfigError("%s is not supported" % unsupported, field="%s.%s" % (field, unsupported))
    if c.HasField("key_log"):
        f.notes.append("key_log not supported")
    which = c.WhichOneof("validation_context_type")
    if which == "validation_context":
        f.validation = _validation(c.validation_context, field + ".validation_context")
    elif which == "validation_context_sds_secret_config":
        v = f.validation = ValidationConfig()
        v.ca_sds_name = _sds_ref(c.validation_context_sds_secret_config,
                                 field + ".validation_context_sds_secret_config")
        v.ca_sds_dynamic = _store_source(c.validation_context_sds_secret_config)
        if v.ca_sds_dynamic:
            f.sds_sources.append((v.ca_sds_name, c.validation_context_sds_secret_config.sds_config))
    elif which == "combined_validation_context":
        cvc = c.combined_validation_context
        fld = field + ".combined_validation_context"
        if not cvc.HasField("validation_context_sds_secret_config"):
            raise ConfigError("validation_context_sds_secret_config is required",
                              field=fld + ".validation_context_sds_secret_config")
        v = f.validation = _validation(cvc.default_validation_context, fld + ".default_validation_context",
                                       ca_from_sds=True)
        v.ca_sds_name = _sds_ref(cvc.validation_context_sds_secret_config,
                                 fld + ".validation_context_sds_secret_config")
        v.ca_sds_dynamic = _store_source(cvc.validation_context_sds_secret_config)
        if v.ca_sds_dynamic:
            f.sds_sources.append((v.ca_sds_name, cvc.validation_context_sds_secret_config.sds_config))
    elif which is not None:
        raise ConfigError("%s is not supported" % which, field="%s.%s" % (field, which))
    if f.validation is not None and f.validation.allow_expired:
        f.notes.append("allow_expired_certificate not applied (expired peer certificates still fail)")
    if server and not f.certificates and not f.certificate_sds_names:
        raise ConfigError("no TLS certificates found for server context", field=field)


def _params(f: TlsSocketFactory, p, field: str) -> None:
    lo, hi = p.tls_minimum_protocol_version, p.tls_maximum_protocol_version
    if lo and hi and lo > hi:
        raise ConfigError("minimum protocol version %s is greater than maximum %s"
                          % (VERSION_NAMES[lo], VERSION_NAMES[hi]), field=field)
    f.min_version, f.max_version = VERSION_NAMES.get(lo, "TLS_AUTO"), VERSION_NAMES.get(hi, "TLS_AUTO")
    suites = []
    for i, cs in enumerate(p.cipher_suites):
        for name in cs.strip("[]").split("|"):
            if not _cipher_known(name.strip()):
                raise ConfigError("unknown cipher suite '%s'" % name, field="%s.cipher_suites[%d]" % (field, i))
            suites.append(name.strip())
    f.cipher_suites = tuple(suites)
    for i, cv in enumerate(p.ecdh_curves):
        if cv not in KNOWN_CURVES:
            raise ConfigError("unknown ECDH curve '%s'" % cv, field="%s.ecdh_curves[%d]" % (field, i))
    f.ecdh_curves = tuple(p.ecdh_curves)
    if p.signature_algorithms:
        f.notes.append("signature_algorithms not applied yet")


_cipher_cache: dict = {}
# TLS 1.3 suites are not configurable by name in Envoy/BoringSSL either; accept the standard names
_TLS13 = frozenset(("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"))


def _cipher_known(name: str) -> bool:
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


def _data_source(ds, field: str, what: str) -> bytes | None:
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


def _pem_blocks(pem: bytes) -> list:
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
    blocks = _pem_blocks(pem)
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


def _certificate(tc, field: str, notes: list):
    from cryptography.hazmat.primitives import serialization
    for unsupported in ("pkcs12", "private_key_provider", "watched_directory"):
        if tc.HasField(unsupported):
            raise ConfigError("%s is not supported" % unsupported, field="%s.%s" % (field, unsupported))
    chain = _data_source(tc.certificate_chain, field + ".certificate_chain", "certificate chain")
    key = _data_source(tc.private_key, field + ".private_key", "private key")
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
        password = _data_source(tc.password, field + ".password", "password")
    try:
        pkey = serialization.load_pem_private_key(key, password)
    except (ValueError, TypeError) as e:
        raise ConfigError("invalid PEM private key: %s" % e, field=field + ".private_key") from None
    if _public_bytes(pkey.public_key()) != _public_bytes(certs[0].public_key()):
        raise ConfigError("private key does not match the certificate", field=field + ".private_key")
    return chain, key, password


def _sds_ref(s, field: str) -> str:
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


def _validation(vc, field: str, *, ca_from_sds: bool = False) -> ValidationConfig:
    from ..routing.matchers import compile_string_matcher
    v = ValidationConfig()
    ca = _data_source(vc.trusted_ca, field + ".trusted_ca", "trusted CA") if vc.HasField("trusted_ca") else None
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
        v.crl_pem = _data_source(vc.crl, field + ".crl", "CRL")
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
        _certificate(sec.tls_certificate, "tls_certificate", notes)
    elif which == "validation_context":
        _validation(sec.validation_context, "validation_context", ca_from_sds=True)
    elif which == "session_ticket_keys":
        for i, k in enumerate(sec.session_ticket_keys.keys):
            d = _data_source(k, "session_ticket_keys.keys[%d]" % i, "session ticket key")
            if d is not None and len(d) != 80:
                raise ConfigError("session ticket key must be 80 bytes", field="session_ticket_keys.keys[%d]" % i)
    elif which == "generic_secret":
        pass
    else:
        notes.append("secret has no content yet (warming)")
    return notes

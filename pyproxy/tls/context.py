"""Compile ``DownstreamTlsContext`` / ``UpstreamTlsContext`` into a ``TlsSocketFactory``.

Checks follow Envoy's rejections where they are cheap to make at config time: protocol version range,
cipher suite and curve names, ALPN entries, certificate/key PEM (inline or files), SDS secret
references (a name and a config source), subject-alt-name matchers, and "a server context needs a
certificate" (the parts themselves are parsed in ``parse``, which also validates SDS ``Secret``
resources). The compiled factory owns the ``ssl.SSLContext`` built from it (``ssl_context``), follows
its SDS secrets (``secrets``), and puts TLS on connections (``socket`` downstream, ``client`` upstream).
"""

from __future__ import annotations

import logging
import weakref

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2  # noqa: F401

from ..config import ConfigError
from .parse import (REDACTED, SanMatcher, ValidationConfig, cipher_known, data_source, parse_cert_chain,  # noqa: F401
                    pem_blocks, validate_secret)
from .parse import certificate as _certificate, sds_ref as _sds_ref, validation as _validation
from .secrets import TlsNotReady

_ServerTls = None  # tls/socket.py's ServerTls, once a listener wraps a connection

# the names these had when they lived here
_data_source, _pem_blocks, _cipher_known = data_source, pem_blocks, cipher_known

log = logging.getLogger("pyproxy.config")

_TLS = common_pb2.TlsParameters.TlsProtocol
VERSION_NAMES = {v: k for k, v in _TLS.items()}
KNOWN_CURVES = frozenset(("X25519", "P-256", "P-384", "P-521", "X25519Kyber768Draft00",
                          "X25519MLKEM768", "P256", "P384", "P521", "prime256v1", "secp384r1",
                          "secp521r1"))


TlsNotImplemented = TlsNotReady  # the name this error had before TLS was implemented


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
        self.max_session_keys = 1         # upstream: 0 = no session resumption
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
        global _ServerTls
        try:
            c = self.compiled()
        except TlsNotReady as e:
            self._refuse(e)
            raise
        if _ServerTls is None:  # (imported at the first TLS connection, not per connection)
            from .socket import ServerTls
            _ServerTls = ServerTls
        return _ServerTls(c, conn, chain)

    async def connect(self, loop, sock, protocol, timeout: float, scope):
        """Upstream: TLS client over connected ``sock``; ``protocol`` sees connection_made after
        the handshake. Raises OSError (ssl.SSLError, TlsNotReady) or asyncio.TimeoutError."""
        from .client import connect_client
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
    return _finish(f, b"D", cfg, "DownstreamTlsContext")


def upstream_factory(cfg, ctx=None) -> TlsSocketFactory:
    f = TlsSocketFactory("upstream")
    try:
        _common(f, cfg.common_tls_context, "common_tls_context", server=False)
    except ConfigError as e:
        raise e.within(field="UpstreamTlsContext")
    if len(cfg.sni.encode()) > 255:
        raise ConfigError("sni is longer than 255 bytes", field="UpstreamTlsContext.sni")
    f.sni = cfg.sni
    if cfg.HasField("max_session_keys"):
        f.max_session_keys = cfg.max_session_keys.value
        if f.max_session_keys > 1:
            f.notes.append("max_session_keys %d: one session is kept (the most recent)" % f.max_session_keys)
    if cfg.allow_renegotiation:
        f.notes.append("allow_renegotiation ignored (renegotiation is not supported)")
    return _finish(f, b"U", cfg, "UpstreamTlsContext")


def _finish(f: TlsSocketFactory, side: bytes, cfg, field: str) -> TlsSocketFactory:
    """What both sides do last: the factory's identity key, the contexts built from static
    secrets, the watch on SDS secrets, and the factory counted as live."""
    f.proto_key = side + cfg.SerializeToString(deterministic=True)
    try:
        f._compile_static()
    except ConfigError as e:
        raise e.within(field=field + ".common_tls_context")
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

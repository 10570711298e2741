"""What the admin shows of the certificates in use: Envoy's ``/certs``, the stat
``server.days_until_first_cert_expiring`` and the ``SecretsConfigDump`` (private keys redacted).

Certificates are read with pyOpenSSL, from the static secrets, the SDS secrets in force and the
certificates TLS contexts name inline or by file.
"""

from __future__ import annotations

import time

from ..config import ConfigError
from .secrets import STORE

def _contexts_in_use():
    """(label, chain PEMs, CA PEM) of every live TLS socket factory: what its context holds now
    (inline or file certificates, and the SDS or static secrets it names), one entry per
    distinct combination."""
    from .context import live_factories
    out, seen = [], set()
    for f in live_factories():
        chains = [(c, "<inline>") for c, _, _ in f.certificates]
        for name, dyn in f.certificate_sds_refs:
            s = STORE.get(name, dyn)
            if s is not None and s.WhichOneof("type") == "tls_certificate":
                chains.append((_pem(s.tls_certificate.certificate_chain), "secret '%s'" % name))
        ca, ca_label = None, ""
        v = f.validation
        if v is not None:
            ca, ca_label = v.trusted_ca_pem, "<inline>"
            if v.ca_sds_name:
                s = STORE.get(v.ca_sds_name, v.ca_sds_dynamic)
                if s is not None and s.WhichOneof("type") == "validation_context" and \
                        s.validation_context.HasField("trusted_ca"):
                    ca, ca_label = _pem(s.validation_context.trusted_ca), "secret '%s'" % v.ca_sds_name
        key = (tuple(c for c, _ in chains), ca)
        if key in seen or (not chains and not ca):
            continue
        seen.add(key)
        out.append((chains, ca, ca_label))
    return out


def _pem(ds) -> bytes:
    from .parse import data_source as _data_source
    try:
        return _data_source(ds, "", "") or b""
    except ConfigError:
        return b""


def _x509_list(pem: bytes):
    from OpenSSL import crypto
    from .parse import pem_blocks as _pem_blocks
    out = []
    for block in _pem_blocks(pem or b""):
        try:
            out.append(crypto.load_certificate(crypto.FILETYPE_PEM, block))
        except crypto.Error:
            continue
    return out


def _asn1_time(b: bytes) -> float:
    import calendar
    t = time.strptime(b.decode()[:14], "%Y%m%d%H%M%S")
    return float(calendar.timegm(t))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _cert_details(x, path: str) -> dict:
    from cryptography import x509
    sans = []
    try:
        ext = x.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        ext = ()
    for gn in ext:
        if isinstance(gn, x509.UniformResourceIdentifier):
            sans.append({"uri": gn.value})
        elif isinstance(gn, x509.DNSName):
            sans.append({"dns": gn.value})
        elif isinstance(gn, x509.IPAddress):
            sans.append({"ip_address": str(gn.value)})
        elif isinstance(gn, x509.RFC822Name):
            sans.append({"email": gn.value})
    not_after = _asn1_time(x.get_notAfter())
    not_before = _asn1_time(x.get_notBefore())
    days = int((not_after - time.time()) // 86400)
    return {"path": path, "serial_number": "%x" % x.get_serial_number(),
            "subject_alt_names": sans, "days_until_expiration": str(max(days, 0)),
            "valid_from": _iso(not_before), "expiration_time": _iso(not_after)}


def certs_json() -> dict:
    """Envoy's ``/certs``: per TLS context, its trusted CA (``ca_cert``) and the leaf of each of its
    certificates (``cert_chain``)."""
    certs = []
    for chains, ca, ca_label in _contexts_in_use():
        entry = {"ca_cert": [], "cert_chain": []}
        if ca:
            xs = _x509_list(ca)
            if xs:
                entry["ca_cert"].append(_cert_details(xs[0], ca_label))
        for pem, label in chains:
            xs = _x509_list(pem)
            if xs:
                entry["cert_chain"].append(_cert_details(xs[0], label))
        certs.append(entry)
    return {"certificates": certs}


def days_until_first_cert_expiring():
    """Whole days until the first certificate in use (a leaf or a trusted CA) expires; None when
    no TLS context holds one."""
    best = None
    for chains, ca, _ in _contexts_in_use():
        xs = _x509_list(ca)[:1] + [x for pem, _ in chains for x in _x509_list(pem)[:1]]
        for x in xs:
            d = int((_asn1_time(x.get_notAfter()) - time.time()) // 86400)
            best = d if best is None else min(best, d)
    return None if best is None else max(best, 0)


def _ts(t) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000) if t else ""


def _secret_json(sec) -> dict:
    from ..config.dump import to_dict
    body = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"}
    body.update(to_dict(sec))  # to_dict redacts the private key and password
    return body


def secrets_config_dump(server) -> dict:
    """``SecretsConfigDump``: static secrets, SDS secrets in force, and the ones still awaited."""
    out = {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"}
    static = [{"name": n, "last_updated": _ts(server.start_time), "secret": _secret_json(s)}
              for n, s in STORE.static.items()]
    active, warming = [], []
    for key, s in STORE.dynamic.items():
        v, t = STORE.meta.get(key, ("", 0))
        active.append({"name": key[1], "version_info": v, "last_updated": _ts(t), "secret": _secret_json(s)})
    seen = set(STORE.dynamic)
    for p in STORE.providers.values():
        if p.refs > 0 and p.key not in seen:
            seen.add(p.key)
            warming.append({"name": p.name, "version_info": "uninitialized",
                            "last_updated": _ts(time.time()),
                            "secret": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets"
                                                ".tls.v3.Secret", "name": p.name}})
    if static:
        out["static_secrets"] = static
    if active:
        out["dynamic_active_secrets"] = active
    if warming:
        out["dynamic_warming_secrets"] = warming
    return out

"""TLS 1.3 session tickets sent with the server's first write, as Envoy (BoringSSL) sends them.

OpenSSL writes a server's TLS 1.3 NewSessionTicket messages the moment the handshake ends. Each
costs a serialization and a re-parse of the session, which holds the client's certificate on mTLS
chains: with OpenSSL 3.0 that is about a sixth of a server handshake's CPU, spent even on
connections that never carry a response and so never hand the ticket to anyone. BoringSSL, under
Envoy, sends its tickets with the connection's first application data instead; pyproxy the same
(but not with a close: see ``TlsLayer._close_notify``).

``ssl`` cannot ask for a ticket after the handshake, so this binds OpenSSL's
``SSL_new_session_ticket`` from the very libssl the ``_ssl`` module is linked to (``dlsym`` on
``_ssl``'s own handle) and finds the ``SSL *`` of an ``SSLObject`` in its C object. That layout is
CPython's, not a public API: it is checked once, at import, against a throwaway connection (the
context pointer next to it must be the ``SSLContext`` object itself; OpenSSL must give back that
context's ``SSL_CTX`` and call the connection a server). If anything does not match, ``AVAILABLE``
is False and contexts keep OpenSSL's way (one ticket right after the handshake).

The same binding orders a context's TLS 1.3 suites as Envoy does (``prefer_aes128``).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys

log = logging.getLogger("pyproxy.tls")

_P = ctypes.sizeof(ctypes.c_void_p)
# PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl, PySSLContext *ctx, ...
# PySSLContext: PyObject_HEAD, SSL_CTX *ctx, ...
_HEAD = 2 * _P
_SSL_AT = _HEAD + _P
_CTX_AT = _HEAD + 2 * _P

_new_ticket = None
_clear_errors = None
_set_suites = None


def _ptr(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


def _bind() -> bool:
    global _new_ticket, _clear_errors, _set_suites
    if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return False  # (a debug build's object header is larger)
    import _ssl
    lib = ctypes.CDLL(_ssl.__file__)  # dlsym searches _ssl's own dependencies: its libssl
    new_ticket = lib.SSL_new_session_ticket
    new_ticket.argtypes = [ctypes.c_void_p]
    new_ticket.restype = ctypes.c_int
    get_ctx = lib.SSL_get_SSL_CTX
    get_ctx.argtypes = [ctypes.c_void_p]
    get_ctx.restype = ctypes.c_void_p
    is_server = lib.SSL_is_server
    is_server.argtypes = [ctypes.c_void_p]
    is_server.restype = ctypes.c_int
    set_suites = lib.SSL_CTX_set_ciphersuites
    set_suites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    set_suites.restype = ctypes.c_int
    clear = lib.ERR_clear_error
    clear.argtypes = []
    clear.restype = None
    # the self-test: pointer comparisons first, OpenSSL calls only once the layout is confirmed
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    so = getattr(obj, "_sslobj", None)
    if so is None or _ptr(id(so) + _CTX_AT) != id(ctx):
        return False
    ssl_ptr = _ptr(id(so) + _SSL_AT)
    ctx_ptr = _ptr(id(ctx) + _HEAD)
    if not ssl_ptr or not ctx_ptr or get_ctx(ssl_ptr) != ctx_ptr or is_server(ssl_ptr) != 1:
        return False
    _new_ticket, _clear_errors, _set_suites = new_ticket, clear, set_suites
    return True


try:
    AVAILABLE = _bind()
except (OSError, AttributeError, TypeError, ValueError, ImportError) as e:
    log.debug("deferred TLS 1.3 session tickets unavailable: %s", e)
    AVAILABLE = False


def issue(so) -> bool:
    """Have OpenSSL send one session ticket with the next ``so.write`` (``so``: the C object of a
    server-side ``SSLObject``, handshake done, TLS 1.3). True if it will."""
    if _new_ticket is None or _ptr(id(so) + _CTX_AT) != id(so.context):
        return False
    ptr = _ptr(id(so) + _SSL_AT)
    if not ptr:
        return False
    if _new_ticket(ptr) == 1:
        return True
    _clear_errors()  # (nothing of it must reach the next ssl call's error report)
    return False


# TLS 1.3 suites in BoringSSL's order on hardware with AES instructions (what Envoy negotiates):
# AES-128-GCM first. OpenSSL's default puts AES-256-GCM/SHA-384 first; with server preference
# every connection paid SHA-384's slower key schedule (~5% of an mTLS server handshake) and
# AES-256 per record. The same three suites stay on offer.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def prefer_aes128(ctx: ssl.SSLContext) -> bool:
    """Order ``ctx``'s TLS 1.3 suites as Envoy does (``ssl`` has no setter for TLS 1.3 suites).
    True if done; else the context keeps OpenSSL's order."""
    if _set_suites is None:
        return False
    ptr = _ptr(id(ctx) + _HEAD)
    if ptr and _set_suites(ptr, TLS13_SUITES) == 1:
        return True
    _clear_errors()
    return False

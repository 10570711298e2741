"""The request authority (HTTP/1.1 ``Host`` or the request-target's, HTTP/2 ``:authority``) as
Envoy accepts it: printable ASCII but for ``" # / < > ? \\ ^ ` { | }`` (no space, no control
character, nothing above 0x7E): the characters of RFC 3986's host and port and nothing that would
start a path, a query or a fragment. HTTP/2 also refuses userinfo (``@``; RFC 9113 8.3.1); the
HTTP/1.1 codec lets it through, as Envoy's does. Both codecs call ``authority_ok``; values already
seen valid are remembered (bounded) so that the common case costs one set lookup."""

from __future__ import annotations

_ALLOWED = ("!$%&'()*+,-.0123456789:;=ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz~")
_MAX_REMEMBERED = 4096  # distinct valid values remembered
_MAX_LEN = 256  # (longer values are checked each time, not remembered)

OK: set = set()  # valid authorities without "@" (valid for both codecs)


def authority_ok(value: str, userinfo: bool = True) -> bool:
    """Whether ``value`` is an authority Envoy accepts; ``userinfo``: "@" is allowed (HTTP/1.1)."""
    if value in OK:
        return True
    if not value.isascii():
        return False
    rest = value.strip(_ALLOWED)
    if rest:
        # (strip works from both ends: a refused character anywhere stops it, so a non-empty
        # rest with only allowed characters and "@" means userinfo)
        if not userinfo or rest.replace("@", "").strip(_ALLOWED):
            return False
        return True
    if len(OK) < _MAX_REMEMBERED and len(value) <= _MAX_LEN:
        OK.add(value)
    return True

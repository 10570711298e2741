"""``*_headers_to_add`` / ``*_headers_to_remove`` compiled once, applied per request.

Envoy's rules (HeaderParser):
- removals first, then additions;
- each value is a ``%COMMAND%`` format (missing values are empty); an empty result is skipped unless
  ``keep_empty_value``;
- ``append_action``: APPEND_IF_EXISTS_OR_ADD (default) adds another value; ADD_IF_ABSENT adds only if
  the header was absent before this set of mutations; OVERWRITE_IF_EXISTS_OR_ADD replaces;
  OVERWRITE_IF_EXISTS replaces only an existing header. The deprecated ``append`` bool maps to
  APPEND_IF_EXISTS_OR_ADD (true) / OVERWRITE_IF_EXISTS_OR_ADD (false);
- all overwrites are applied before all appends;
- ``:``-prefixed pseudo-headers and ``host`` may not be added or removed.
"""

from __future__ import annotations

from operator import itemgetter

from ..config.errors import ConfigError
from ..formatter import compile_format

_first = itemgetter(0)

APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3


def _modifiable(name: str) -> bool:
    return bool(name) and name[0] != ":" and name != "host"


class HeaderMutation:
    """One compiled (to_add, to_remove) set. ``apply(headers, stream_info, req, resp, trailers)``."""

    __slots__ = ("remove", "add", "empty", "literal", "overwrite")

    def __init__(self, to_add=(), to_remove=()):
        self.remove = tuple(to_remove)
        # (name, formatter | None, literal value, action, keep_empty)
        self.add = tuple(to_add)
        self.empty = not self.remove and not self.add
        # the common case, applied without the general bookkeeping: only additions, literal
        # non-empty values, distinct names, all appends or all overwrites
        self.literal = None
        self.overwrite = False
        actions = {a[3] for a in self.add}
        if (self.add and not self.remove and all(a[1] is None and (a[2] or a[4]) for a in self.add)
                and len({a[0] for a in self.add}) == len(self.add)
                and actions in ({APPEND_IF_EXISTS_OR_ADD}, {OVERWRITE_IF_EXISTS_OR_ADD})):
            self.literal = tuple((a[0], a[2]) for a in self.add)
            self.overwrite = actions == {OVERWRITE_IF_EXISTS_OR_ADD}

    def apply(self, headers, si=None, rq=None, rs=None, rt=None) -> None:
        lit = self.literal
        if lit is not None:
            if not self.overwrite:
                headers._h.extend(lit)
                return
            for name, value in lit:
                if name in map(_first, headers._h):
                    # Envoy's set = remove + append: the header moves to the end
                    headers.remove(name)  # (a new list)
                headers._h.append((name, value))
            return
        for name in self.remove:
            headers.remove(name)
        if not self.add:
            return
        overwrite = None
        append = None
        for name, fmt, lit, action, keep_empty in self.add:
            value = lit if fmt is None else fmt.format(si, rq, rs, rt)
            if not value and not keep_empty:
                continue
            if action == APPEND_IF_EXISTS_OR_ADD:
                (append if append is not None else (append := [])).append((name, value))
            elif action == ADD_IF_ABSENT:
                if name not in headers:
                    (append if append is not None else (append := [])).append((name, value))
            elif action == OVERWRITE_IF_EXISTS and name not in headers:
                continue
            else:
                (overwrite if overwrite is not None else (overwrite := [])).append((name, value))
        if overwrite:
            for name, value in overwrite:
                # Envoy's set = remove + append: the header moves to the end
                headers.remove(name)
                headers.add(name, value)
        if append:
            for name, value in append:
                headers.add(name, value)


def literal_tail(mutations):
    """A sequence of mutation sets (a route's, applied in order) that needs nothing from the
    request but the absence of some names, compiled: ``(names, tail)``. On a header list that has
    none of ``names`` (frozenset) the sets, applied in order, append exactly ``tail`` (a tuple of
    ``(name, value)``). None when a value is formatted (it reads the request or the stream).
    ``names``: every name the sets remove, overwrite or add only if absent or present."""
    names = set()
    tail = []
    for m in mutations:  # (HeaderMutation.apply's rules: removals, then overwrites, then appends)
        for name in m.remove:
            names.add(name)
            tail = [kv for kv in tail if kv[0] != name]
        over = []
        app = []
        for name, fmt, lit, action, keep_empty in m.add:
            if fmt is not None:
                return None
            if not lit and not keep_empty:
                continue
            # (ADD_IF_ABSENT and OVERWRITE_IF_EXISTS look at the list before this set applies:
            # the request has no such name, so only what earlier sets appended counts)
            present = any(kv[0] == name for kv in tail)
            if action == APPEND_IF_EXISTS_OR_ADD:
                app.append((name, lit))
            elif action == ADD_IF_ABSENT:
                names.add(name)
                if not present:
                    app.append((name, lit))
            elif action == OVERWRITE_IF_EXISTS:
                names.add(name)
                if present:
                    over.append((name, lit))
            else:
                names.add(name)
                over.append((name, lit))
        for name, value in over:
            tail = [kv for kv in tail if kv[0] != name]
            tail.append((name, value))
        tail += app
    return frozenset(names), tuple(tail)


def literal_clear(mutations):
    """Of ``literal_tail``'s names, those whose presence in the request changes nothing the sets
    do but take the request's own lines out (a frozenset): the first thing the sets do with such a
    name removes every line of it (a removal, or an overwrite with a value), and no set up to that
    one checks whether it is present (ADD_IF_ABSENT, OVERWRITE_IF_EXISTS). On a header list that
    has none of the other names, the sets leave the list without its lines of these names
    (``take_out``), followed by ``literal_tail``'s tail."""
    decided = set()
    clear = set()
    for m in mutations:  # (HeaderMutation.apply's order: removals first, then the adds' checks)
        for name in m.remove:
            if name not in decided:
                decided.add(name)
                clear.add(name)
        for name, fmt, lit, action, keep_empty in m.add:
            if action == ADD_IF_ABSENT or action == OVERWRITE_IF_EXISTS:
                decided.add(name)  # (the check sees the request's line)
        for name, fmt, lit, action, keep_empty in m.add:
            if action == OVERWRITE_IF_EXISTS_OR_ADD and (lit or keep_empty) and name not in decided:
                decided.add(name)
                clear.add(name)
    return frozenset(clear)


def take_out(h, names) -> None:
    """Remove every line of ``names`` (an iterable of header names) from the header list ``h``."""
    for name in names:
        ks = [*map(_first, h)]
        if name in ks:
            if ks.count(name) == 1:
                del h[ks.index(name)]
            else:
                h[:] = [kv for kv in h if kv[0] != name]


def compile_header_mutation(to_add, to_remove, field_prefix: str) -> HeaderMutation:
    """``to_add``: repeated HeaderValueOption; ``to_remove``: repeated string."""
    adds = []
    for i, opt in enumerate(to_add):
        f = "%s_headers_to_add[%d]" % (field_prefix, i)
        h = opt.header
        name = h.key.lower()
        if not name:
            raise ConfigError("header key is required", f + ".header.key")
        if not _modifiable(name):
            raise ConfigError(":-prefixed or host headers may not be modified", f + ".header.key")
        raw = h.value if h.value or not h.raw_value else h.raw_value.decode("utf-8", "replace")
        if opt.HasField("append"):
            if opt.append_action != APPEND_IF_EXISTS_OR_ADD:
                raise ConfigError("Both append and append_action are set and it's not allowed", f)
            action = APPEND_IF_EXISTS_OR_ADD if opt.append.value else OVERWRITE_IF_EXISTS_OR_ADD
        else:
            action = opt.append_action
        try:
            fmt = compile_format(raw, omit_empty_values=True)
        except ConfigError as e:
            raise e.within(field=f + ".header.value")
        if fmt.is_literal:
            lit, fmt = fmt.format(None), None
        else:
            lit = ""
        adds.append((name, fmt, lit, action, opt.keep_empty_value))
    removes = []
    for i, name in enumerate(to_remove):
        n = name.lower()
        if not _modifiable(n):
            raise ConfigError(":-prefixed or host headers may not be removed",
                              "%s_headers_to_remove[%d]" % (field_prefix, i))
        removes.append(n)
    return HeaderMutation(adds, removes)


EMPTY = HeaderMutation()

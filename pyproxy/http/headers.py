"""Header maps shared by every codec and filter.

A ``Headers`` is an ordered list of ``(name, value)`` string pairs with lower-case names, as Envoy
keeps them. Request pseudo-headers (``:method``, ``:path``, ``:authority``, ``:scheme``) and the
response's ``:status`` live in the same list, first, so HTTP/1.1 and HTTP/2 codecs produce and
consume the same object and filters see one shape whatever the protocol.
"""

from __future__ import annotations


class Headers:
    __slots__ = ("_h",)

    def __init__(self, items=None):
        self._h: list = list(items) if items else []

    # -- reads --------------------------------------------------------------------------------
    def get(self, name: str, default=None):
        for k, v in self._h:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list:
        return [v for k, v in self._h if k == name]

    def __contains__(self, name: str) -> bool:
        # (a plain loop: on a head's ~10 entries it is about twice as fast as ``in map(...)``)
        for k, _ in self._h:
            if k == name:
                return True
        return False

    def __iter__(self):
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)

    def items(self) -> list:
        return self._h

    def byte_size(self) -> int:
        return sum(len(k) + len(v) for k, v in self._h)

    # -- writes -------------------------------------------------------------------------------
    def add(self, name: str, value: str) -> None:
        self._h.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one value (keeps the first position)."""
        h = self._h
        for kv in h:
            if kv[0] == name:
                break
        else:
            if name[0] == ":":
                # pseudo-headers stay ahead of regular ones
                j = 0
                while j < len(h) and h[j][0][0] == ":":
                    j += 1
                h.insert(j, (name, value))
            else:
                h.append((name, value))
            return
        i = h.index(kv)
        h[i] = (name, value)
        rest = h[i + 1:]
        for kv in rest:
            if kv[0] == name:
                self._h = h[: i + 1] + [x for x in rest if x[0] != name]
                return

    def set_default(self, name: str, value: str) -> None:
        if name not in self:
            self.set(name, value)

    def remove(self, name: str) -> bool:
        before = len(self._h)
        self._h = [kv for kv in self._h if kv[0] != name]
        return len(self._h) != before

    def remove_prefix(self, prefix: str) -> None:
        self._h = [kv for kv in self._h if not kv[0].startswith(prefix)]

    def copy(self) -> "Headers":
        return Headers(self._h)

    # -- convenience for requests -------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.get(":method", "")

    @property
    def path(self) -> str:
        return self.get(":path", "")

    @property
    def host(self) -> str:
        return self.get(":authority", "")

    @property
    def status(self) -> int:
        s = self.get(":status")
        return int(s) if s else 0

    def __repr__(self) -> str:
        return "Headers(%r)" % (self._h,)

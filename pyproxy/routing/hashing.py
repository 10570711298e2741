"""XXH64, the hash Envoy uses for hash policies (the request's key), ring-hash entries and Maglev
permutations (``HashUtil::xxHash64``, seed 0 unless given). Backed by the ``xxhash`` package (C)."""

from __future__ import annotations

from xxhash import xxh64_intdigest


def xxh64(data: bytes, seed: int = 0) -> int:
    return xxh64_intdigest(data, seed)


def xxh64_str(s: str) -> int:
    return xxh64_intdigest(s.encode("utf-8", "surrogateescape"))

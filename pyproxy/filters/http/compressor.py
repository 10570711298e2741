"""``envoy.filters.http.compressor``: compress responses (gzip; brotli/zstd when a module exists).

The library comes from ``compressor_library`` (registry category ``compressor``). A response is
compressed when the request accepts the library's encoding (``Accept-Encoding`` with q > 0, or
``*``), the response is not already encoded, has no ``Cache-Control: no-transform``, its content type
is in the list (Envoy's default list when empty), it is at least ``min_content_length`` (30) bytes
when its length is known, and it has no ETag when ``disable_on_etag_header``. Then: ``content-length``
removed, ``content-encoding`` set, ``vary: accept-encoding`` added, a strong ETag made weak.

Python has no brotli or zstd in the standard library: when the ``brotli`` / ``zstandard`` module is
missing that library's filter passes responses through unchanged and says so (an ignored part), which
is always valid HTTP. Stats under ``http.<prefix>.compressor.<library name>.<encoding>.``:
``compressed``, ``not_compressed``, ``no_accept_header``, ``total_uncompressed_bytes``,
``total_compressed_bytes``.
"""

from __future__ import annotations

import logging
import zlib

from envoy.extensions.filters.http.compressor.v3 import compressor_pb2  # noqa: F401

from ...config import ConfigError
from ...config.registry import REGISTRY
from ...http.filter import CONTINUE, STOP, HttpFilter

log = logging.getLogger("pyproxy.filter")

DEFAULT_TYPES = frozenset((
    "application/javascript", "application/json", "application/xhtml+xml", "image/svg+xml",
    "text/css", "text/html", "text/plain", "text/xml"))
DEFAULT_MIN_LENGTH = 30


# -- libraries (registered under "compressor") ---------------------------------------------------

class GzipLibrary:
    encoding = "gzip"
    available = True

    def __init__(self, cfg):
        from envoy.extensions.compression.gzip.compressor.v3 import gzip_pb2
        G = gzip_pb2.Gzip
        lvl = cfg.compression_level
        # DEFAULT_COMPRESSION (0) -> zlib's default (6); BEST_SPEED=1 ... BEST_COMPRESSION=9 map to themselves
        self.level = 6 if lvl == G.CompressionLevel.DEFAULT_COMPRESSION else int(lvl)
        self.mem_level = cfg.memory_level.value if cfg.HasField("memory_level") else 5
        self.window_bits = cfg.window_bits.value if cfg.HasField("window_bits") else 12
        if not 1 <= self.mem_level <= 9:
            raise ConfigError("memory_level must be in [1, 9]", field="Gzip.memory_level")
        if not 9 <= self.window_bits <= 15:
            raise ConfigError("window_bits must be in [9, 15]", field="Gzip.window_bits")
        strat = {0: zlib.Z_DEFAULT_STRATEGY, 1: zlib.Z_FILTERED, 2: zlib.Z_HUFFMAN_ONLY, 3: zlib.Z_RLE,
                 4: zlib.Z_FIXED}
        self.strategy = strat.get(cfg.compression_strategy, zlib.Z_DEFAULT_STRATEGY)

    def new(self):
        c = zlib.compressobj(self.level, zlib.DEFLATED, 16 + self.window_bits, self.mem_level, self.strategy)
        return c.compress, lambda: c.flush(zlib.Z_FINISH)


class _Unavailable:
    available = False

    def __init__(self, encoding, module):
        self.encoding = encoding
        self.notes = ["%s compression needs the Python module '%s', which is not installed; responses "
                      "pass through uncompressed" % (encoding, module)]


class BrotliLibrary:
    encoding = "br"
    available = True

    def __init__(self, cfg, mod):
        self.mod = mod
        self.quality = cfg.quality.value if cfg.HasField("quality") else 3

    def new(self):
        c = self.mod.Compressor(quality=self.quality)
        return c.process, c.finish


class ZstdLibrary:
    encoding = "zstd"
    available = True

    def __init__(self, cfg, mod):
        self.mod = mod
        self.level = cfg.compression_level.value if cfg.HasField("compression_level") else 3

    def new(self):
        c = self.mod.ZstdCompressor(level=self.level).compressobj()
        return c.compress, c.flush


def gzip_library(cfg, ctx=None):
    return GzipLibrary(cfg)


def brotli_library(cfg, ctx=None):
    try:
        import brotli
    except ImportError:
        return _Unavailable("br", "brotli")
    return BrotliLibrary(cfg, brotli)


def zstd_library(cfg, ctx=None):
    try:
        import zstandard
    except ImportError:
        return _Unavailable("zstd", "zstandard")
    return ZstdLibrary(cfg, zstandard)


# -- the filter ---------------------------------------------------------------------------------

def accepts(accept_encoding: str, encoding: str) -> bool:
    """Does an ``Accept-Encoding`` value allow ``encoding`` (q > 0, explicitly or through ``*``)?"""
    star = None
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if name == encoding:
            return q > 0
        if name == "*":
            star = q > 0
    return bool(star)


class CompressorFactory:
    def __init__(self, cfg, ctx):
        self.notes = []
        lib = cfg.compressor_library
        if not lib.HasField("typed_config"):
            raise ConfigError("compressor_library.typed_config is required", field="compressor_library")
        fac, lcfg = REGISTRY.resolve("compressor", lib.name, lib.typed_config, what="compressor library")
        if fac is None:
            raise ConfigError("compressor library '%s': %s" % (lib.name, lcfg), field="compressor_library")
        try:
            self.library = fac(lcfg)
        except ConfigError as e:
            raise e.within(field="compressor_library")
        self.notes.extend(getattr(self.library, "notes", ()))
        common = None
        self.remove_accept_encoding = False
        self.disable_on_etag = False
        if cfg.HasField("response_direction_config"):
            rd = cfg.response_direction_config
            common = rd.common_config if rd.HasField("common_config") else None
            self.remove_accept_encoding = rd.remove_accept_encoding_header
            self.disable_on_etag = rd.disable_on_etag_header
        else:
            self.remove_accept_encoding = cfg.remove_accept_encoding_header
            self.disable_on_etag = cfg.disable_on_etag_header
        types = list(common.content_type) if common is not None else list(cfg.content_type)
        self.content_types = frozenset(t.strip().lower() for t in types) if types else DEFAULT_TYPES
        ml = None
        if common is not None and common.HasField("min_content_length"):
            ml = common.min_content_length.value
        elif cfg.HasField("content_length"):
            ml = cfg.content_length.value
        self.min_length = DEFAULT_MIN_LENGTH if ml is None else ml
        self.enabled = True
        if common is not None and common.HasField("enabled"):
            self.enabled = common.enabled.default_value.value if common.enabled.HasField("default_value") else True
        if cfg.HasField("request_direction_config"):
            self.notes.append("request_direction_config (request compression) is not applied")
        self.store = ctx.stats
        self.lib_name = lib.name
        self._stats = {}

    def stats(self, stream):
        prefix = getattr(getattr(stream, "cfg", None), "stat_prefix", "") or "unknown"
        d = self._stats.get(prefix)
        if d is None:
            base = "http.%s.compressor.%s.%s." % (prefix, self.lib_name, self.library.encoding)
            d = self._stats[prefix] = {n: self.store.counter(base + n) for n in (
                "compressed", "not_compressed", "no_accept_header", "total_uncompressed_bytes",
                "total_compressed_bytes")}
        return d

    def create(self, stream):
        return CompressorFilter(stream, self)


class CompressorFilter(HttpFilter):
    __slots__ = ("f", "accepted", "head", "compress", "finish", "index", "st")

    def __init__(self, callbacks, f):
        self.callbacks = callbacks
        self.f = f
        self.accepted = False
        self.head = False
        self.compress = None
        self.finish = None
        self.index = -1
        self.st = None

    def decode_headers(self, headers, end_stream):
        f = self.f
        if not f.enabled or not f.library.available:
            return CONTINUE
        ae = headers.get("accept-encoding")
        self.head = headers.get(":method") == "HEAD"
        if ae is None:
            self.st = f.stats(self.callbacks)
            self.st["no_accept_header"].inc()
        else:
            self.accepted = accepts(ae, f.library.encoding)
            if f.remove_accept_encoding:
                headers.remove("accept-encoding")
        return CONTINUE

    def encode_headers(self, headers, end_stream):
        if not self.accepted:
            return CONTINUE
        f = self.f
        st = self.st = f.stats(self.callbacks)
        if end_stream or self.head or not self._eligible(headers):
            st["not_compressed"].inc()
            return CONTINUE
        st["compressed"].inc()
        headers.remove("content-length")
        headers.set("content-encoding", f.library.encoding)
        vary = headers.get("vary")
        if not vary:
            headers.set("vary", "accept-encoding")
        elif "accept-encoding" not in vary.lower():
            headers.set("vary", vary + ", accept-encoding")
        etag = headers.get("etag")
        if etag and not etag.startswith("W/"):
            headers.set("etag", "W/" + etag)
        self.compress, self.finish = f.library.new()
        return CONTINUE

    def _eligible(self, headers) -> bool:
        f = self.f
        ce = headers.get("content-encoding")
        if ce and ce.strip().lower() != "identity":
            return False
        cc = headers.get("cache-control")
        if cc and "no-transform" in cc.lower():
            return False
        if f.disable_on_etag and headers.get("etag"):
            return False
        ct = headers.get("content-type")
        if ct is not None:
            if ct.split(";", 1)[0].strip().lower() not in f.content_types:
                return False
        cl = headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) < f.min_length:
                    return False
            except ValueError:
                return False
        status = headers.get(":status")
        if status in ("204", "304"):
            return False
        return True

    def _my_index(self) -> int:
        if self.index < 0:
            self.index = self.callbacks.filters.index(self)
        return self.index

    def encode_data(self, data, end_stream):
        comp = self.compress
        if comp is None:
            return CONTINUE
        st = self.st
        st["total_uncompressed_bytes"].value += len(data)
        out = comp(data) if data else b""
        if end_stream:
            out += self.finish()
            self.compress = None
        if out or end_stream:
            st["total_compressed_bytes"].value += len(out)
            self.callbacks.encode_data(out, end_stream, from_filter=self._my_index())
        return STOP

    def encode_trailers(self, trailers):
        comp = self.compress
        if comp is not None:
            out = self.finish()
            self.compress = None
            self.st["total_compressed_bytes"].value += len(out)
            if out:
                self.callbacks.encode_data(out, False, from_filter=self._my_index())
        return CONTINUE


def factory(cfg, ctx):
    return CompressorFactory(cfg, ctx)

"""Buffered access-log files, flushed by one background thread.

``log()`` on the event loop only appends a line to an in-memory list under a short lock; a daemon
thread writes the buffers out every flush interval (``--file-flush-interval-msec``, default 1 s) or
sooner when a buffer passes 64 KiB. A slow disk or a full stdout pipe therefore stalls that thread,
never a request. Past 16 MiB of unwritten lines a file drops new lines and counts them.

Files are shared by path, like Envoy's ``AccessLogManager``: two listeners logging to the same path
write through one buffer. ``/dev/stdout`` and ``/dev/stderr`` write to fds 1 and 2.
"""

from __future__ import annotations

import errno
import os
import threading

from ..config.errors import ConfigError

FLUSH_BYTES = 64 * 1024
MAX_BUFFER_BYTES = 16 * 1024 * 1024

_lock = threading.Lock()          # guards _files and the flusher thread
_flush_lock = threading.Lock()    # one flush (or reopen) at a time
_files: dict = {}
_wake = threading.Event()
_interval = 1.0
_thread = None
_stop = False


class LogFile:
    __slots__ = ("path", "fd", "own_fd", "buf", "size", "lock", "dropped", "write_errors")

    def __init__(self, path: str):
        self.path = path
        self.buf: list = []
        self.size = 0
        self.lock = threading.Lock()
        self.dropped = 0
        self.write_errors = 0
        self.fd, self.own_fd = self._open()

    def _open(self):
        if self.path == "/dev/stdout":
            return 1, False
        if self.path == "/dev/stderr":
            return 2, False
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o644), True
        except OSError as e:
            raise ConfigError("Failed to open access log file '%s': %s" % (self.path, e.strerror),
                              "path") from None

    def write(self, line: str) -> None:
        with self.lock:
            if self.size > MAX_BUFFER_BYTES:
                self.dropped += 1
                return
            self.buf.append(line)
            self.size += len(line)
            big = self.size >= FLUSH_BYTES
        if big:
            _wake.set()

    def flush(self) -> None:
        with self.lock:
            if not self.buf:
                return
            data = "".join(self.buf).encode("utf-8", "replace")
            self.buf = []
            self.size = 0
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                # a non-blocking stdout: wait a little rather than spin (flusher thread only)
                threading.Event().wait(0.01)
                continue
            except OSError as e:
                self.write_errors += 1
                if e.errno != errno.EINTR:
                    return
                continue
            view = view[n:]

    def reopen(self) -> None:
        if not self.own_fd:
            return
        self.flush()
        old = self.fd
        try:
            self.fd, _ = self._open()
        except ConfigError:
            return
        try:
            os.close(old)
        except OSError:
            pass


def get_file(path: str) -> LogFile:
    global _thread
    with _lock:
        f = _files.get(path)
        if f is None:
            f = _files[path] = LogFile(path)
        if _thread is None:
            _thread = threading.Thread(target=_run, name="access-log-flush", daemon=True)
            _thread.start()
        return f


def _run() -> None:
    while not _stop:
        _wake.wait(_interval)
        _wake.clear()
        try:
            flush_all()
        except Exception:  # the flusher must survive anything a single file does
            pass


def flush_all() -> None:
    """Write out every buffered line now (also used at shutdown)."""
    with _lock:
        files = list(_files.values())
    with _flush_lock:
        for f in files:
            f.flush()


def reopen_all() -> None:
    """Reopen every file (admin ``/reopen_logs``, log rotation)."""
    with _lock:
        files = list(_files.values())
    with _flush_lock:
        for f in files:
            f.reopen()


def set_flush_interval(seconds: float) -> None:
    global _interval
    if seconds <= 0:
        raise ValueError("flush interval must be positive")
    _interval = seconds
    _wake.set()


def dropped_lines() -> int:
    with _lock:
        return sum(f.dropped for f in _files.values())

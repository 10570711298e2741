"""Write coalescing: bytes a connection writes while the loop dispatches one read go out in one send.

Downstream connections queue their writes here. A read callback that may cause writes (a downstream
or upstream ``data_received``) brackets its work with ``enter()`` / ``leave()``; the outermost
``leave()`` flushes every queued connection, so a response head and body produced by one upstream
read leave in one ``send`` and no extra loop iteration is needed. Writes made outside such a
callback (timers, tasks) are flushed on the next loop iteration via ``call_soon``.
"""

from __future__ import annotations

pending: list = []   # connections with queued bytes (each has .flush()); never rebound
depth = 0            # nesting of read callbacks being dispatched
_scheduled = False


def queue(conn, loop) -> None:
    """``conn`` has bytes queued: flush them at the end of this dispatch (or iteration)."""
    pending.append(conn)
    if depth == 0 and not _scheduled:
        schedule(loop)


def schedule(loop) -> None:
    """Bytes were queued outside a read callback: flush on the next loop iteration (once)."""
    global _scheduled
    if not _scheduled:
        _scheduled = True
        loop.call_soon(_flush_scheduled)


def _flush_scheduled() -> None:
    global _scheduled
    _scheduled = False
    flush()


def flush() -> None:
    p = pending
    if len(p) == 1:  # the usual dispatch: one connection wrote
        p.pop().flush()
    elif p:
        conns = p[:]
        p.clear()
        for c in conns:
            c.flush()


def enter() -> None:
    global depth
    depth += 1


def leave() -> None:
    global depth
    depth -= 1
    if depth == 0 and pending:
        flush()

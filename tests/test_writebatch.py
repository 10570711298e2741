"""pyproxy.writebatch: what connections write during one event-loop iteration goes out at its end."""

from __future__ import annotations

import asyncio

import uvloop

from pyproxy import writebatch


class Conn:
    """A connection with its own buffer (a DownstreamConnection's shape): one flush, one write."""

    def __init__(self, log):
        self.log = log
        self.buf = []
        self.closed = False

    def write(self, data):
        if not self.buf:
            writebatch.queue(self, None)
        self.buf.append(data)

    def flush(self):
        self.log.append(("flush", b"".join(self.buf)))
        self.buf = []


class Transport:
    def __init__(self, log):
        self.log = log

    def write(self, data):
        self.log.append(("write", data))

    def write_eof(self):
        self.log.append(("eof",))


class Up:
    """An upstream connection handing its writes over (``send``), as cluster/pool.py's."""

    def __init__(self, log):
        self.transport = Transport(log)
        self.closed = False


def _callback(fn):
    """``fn`` run as a read callback is (depth bracketing, as data_received inlines it)."""
    writebatch.enter()
    try:
        fn()
    finally:
        writebatch.leave()


def test_writes_leave_at_the_end_of_the_iteration_in_order():
    log = []
    down, up, gone = Conn(log), Up(log), Up(log)

    async def main():
        def read1():
            down.write(b"head ")
            writebatch.send(up, b"req1")
            writebatch.send(gone, b"lost")
            down.write(b"body")

        def read2():
            writebatch.send(up, b"req2")
            writebatch.send(up, None)  # write_eof after the writes before it
            gone.closed = True  # closed before the flush: its bytes are dropped
        _callback(read1)
        _callback(read2)
        assert log == []  # nothing before the iteration's end
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert log == [("flush", b"head body"), ("write", b"req1"), ("write", b"req2"), ("eof",)], log
    assert not writebatch.pending


def test_a_stopped_loop_does_not_strand_writes():
    """A loop stopped with a flush pending (never run again): the next loop's writes still go out,
    and the old callback, if that loop runs later, does nothing."""
    log = []
    old = uvloop.new_event_loop()
    # the state such a stop leaves: bytes pending, a flush scheduled on the old loop
    writebatch.pending.append((Up(log), b"a"))
    writebatch.scheduled, writebatch._loop = True, old
    old.call_soon(writebatch._run, old)
    new = asyncio.new_event_loop()
    try:
        async def more():
            _callback(lambda: writebatch.send(Up(log), b"b"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        new.run_until_complete(more())
    finally:
        new.close()
    assert log == [("write", b"a"), ("write", b"b")], log
    old.run_until_complete(asyncio.sleep(0))  # the stale callback runs: nothing more
    old.close()
    assert log == [("write", b"a"), ("write", b"b")], log


def test_without_a_loop_the_callback_end_flushes():
    """Tools driving protocols by hand (benchmarks/micro_*.py): no loop runs, the outermost
    leave() flushes at once."""
    log = []
    down, up = Conn(log), Up(log)

    def read():
        down.write(b"x")
        writebatch.send(up, b"y")
        down.write(b"z")
        assert log == []
    _callback(read)
    assert log == [("flush", b"xz"), ("write", b"y")], log


def test_a_failing_flush_does_not_lose_the_writes_queued_after_it():
    """One connection's flush raising (uvloop: a write after write_eof) must not drop what other
    connections queued behind it in the same pass."""
    log = []

    class Bad:
        closed = False

        def flush(self):
            raise RuntimeError("Cannot call write() after write_eof()")

    up, down = Up(log), Conn(log)

    def read():
        writebatch.queue(Bad(), None)
        writebatch.send(up, b"response for another client")
        down.write(b"and another")
    _callback(read)
    assert log == [("write", b"response for another client"), ("flush", b"and another")], log
    assert not writebatch.pending

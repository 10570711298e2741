"""The HTTP/2 pool's connection idle timeout (``common_http_protocol_options.idle_timeout``), driven
by a scripted clock: the timer stays armed while streams come and go, and the connection still
closes exactly ``idle_timeout`` after its last stream ended, never while it is busy."""

from clock_util import FakeLoop
from pyproxy.cluster.pool_h2 import Http2Pool


class Counter:
    value = 0


class Cluster:
    idle_timeout = 10.0
    st_cx_idle = Counter()  # (upstream_cx_idle_timeout)


class Conn:
    def __init__(self):
        self.bound = 0
        self.closed = False
        self.idle_handle = None
        self.idle_since = 0.0
        self.closed_at = None

    def close(self, reason):
        self.closed = True


def _pool():
    clock = FakeLoop()
    pool = Http2Pool(Cluster(), None, clock)
    conn = Conn()
    pool.conns.append(conn)
    orig = conn.close

    def close(reason):
        conn.closed_at = clock.now
        orig(reason)
    conn.close = close
    return clock, pool, conn


def test_idle_connection_closes_after_idle_timeout():
    clock, pool, conn = _pool()
    pool._idle(conn)
    clock.advance_to(9.9)
    assert not conn.closed
    clock.advance_to(20)
    assert conn.closed_at == 10.0 and conn not in pool.conns


def test_timer_not_recreated_per_stream_and_idle_time_counts_from_the_last_stream():
    clock, pool, conn = _pool()
    pool._idle(conn)
    assert len(clock.armed()) == 1
    for t in (1, 2, 3, 4, 5):  # a stream at a time, each ending a little later
        clock.advance_to(t)
        conn.bound += 1
        clock.advance_to(t + 0.5)
        conn.bound -= 1
        pool._idle(conn)
    assert len(clock.armed()) == 1  # the same timer all along
    clock.advance_to(15.4)  # fired at 10 (idle since 5.5 only): re-armed for the rest
    assert not conn.closed
    clock.advance_to(30)
    assert conn.closed_at == 15.5


def test_busy_connection_is_not_closed_and_rearms_when_idle_again():
    clock, pool, conn = _pool()
    pool._idle(conn)
    clock.advance_to(2)
    conn.bound = 1  # busy when the timer fires
    clock.advance_to(12)
    assert not conn.closed and conn.idle_handle is None and not clock.armed()
    clock.advance_to(13)
    conn.bound = 0
    pool._idle(conn)
    clock.advance_to(22.9)
    assert not conn.closed
    clock.advance_to(40)
    assert conn.closed_at == 23.0

"""The HTTP/2 pool's connection idle timeout (``common_http_protocol_options.idle_timeout``), driven
by a scripted clock: the timer stays armed while streams come and go, and the connection still
closes exactly ``idle_timeout`` after its last stream ended, never while it is busy."""

from pyproxy.cluster.pool_h2 import Http2Pool


class Clock:
    """``time`` / ``call_later`` of a loop whose time only moves when the test says so."""

    def __init__(self):
        self.now = 0.0
        self.timers = []

    def time(self):
        return self.now

    def call_later(self, delay, fn, *args):
        t = Timer(self.now + delay, fn, args)
        self.timers.append(t)
        return t

    def advance(self, to):
        """Move to ``to``, firing every due timer in order."""
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.when <= to), key=lambda t: t.when)
            if not due:
                break
            t = due[0]
            self.timers.remove(t)
            self.now = t.when
            t.fn(*t.args)
        self.now = to

    def armed(self):
        return [t for t in self.timers if not t.cancelled]


class Timer:
    def __init__(self, when, fn, args):
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self):
        self.cancelled = True


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
    clock = Clock()
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
    clock.advance(9.9)
    assert not conn.closed
    clock.advance(20)
    assert conn.closed_at == 10.0 and conn not in pool.conns


def test_timer_not_recreated_per_stream_and_idle_time_counts_from_the_last_stream():
    clock, pool, conn = _pool()
    pool._idle(conn)
    assert len(clock.armed()) == 1
    for t in (1, 2, 3, 4, 5):  # a stream at a time, each ending a little later
        clock.advance(t)
        conn.bound += 1
        clock.advance(t + 0.5)
        conn.bound -= 1
        pool._idle(conn)
    assert len(clock.armed()) == 1  # the same timer all along
    clock.advance(15.4)  # fired at 10 (idle since 5.5 only): re-armed for the rest
    assert not conn.closed
    clock.advance(30)
    assert conn.closed_at == 15.5


def test_busy_connection_is_not_closed_and_rearms_when_idle_again():
    clock, pool, conn = _pool()
    pool._idle(conn)
    clock.advance(2)
    conn.bound = 1  # busy when the timer fires
    clock.advance(12)
    assert not conn.closed and conn.idle_handle is None and not clock.armed()
    clock.advance(13)
    conn.bound = 0
    pool._idle(conn)
    clock.advance(22.9)
    assert not conn.closed
    clock.advance(40)
    assert conn.closed_at == 23.0

"""A scripted event-loop clock for unit tests: time moves only when the test says so, and the
timers due by then fire in order (no sockets, no sleeping)."""

from __future__ import annotations


class FakeLoop:
    """``time`` / ``call_later`` / ``call_soon`` of a loop whose time only moves on ``advance``."""

    def __init__(self):
        self.now = 0.0
        self.timers = []
        self.soon = []

    def time(self):
        return self.now

    def call_later(self, delay, fn, *args):
        t = Timer(self.now + delay, fn, args)
        self.timers.append(t)
        return t

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))

    def run_soon(self):
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)

    def advance_to(self, to):
        """Move to time ``to``, firing every due timer in order."""
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.when <= to), key=lambda t: t.when)
            if not due:
                break
            t = due[0]
            self.timers.remove(t)
            self.now = t.when
            t.fn(*t.args)
        self.now = to

    def advance(self, dt):
        """Move ``dt`` seconds on, firing every due timer in order."""
        self.advance_to(self.now + dt)

    def armed(self):
        return [t for t in self.timers if not t.cancelled]


class Timer:
    def __init__(self, when, fn, args):
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self):
        self.cancelled = True

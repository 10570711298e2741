"""Span export shared by the tracers: a bounded queue (a full queue drops and counts), drained in
batches once a second by at most one task, off the hot path. A failed send drops its batch, counts
it and is logged once. Each tracer supplies ``_send(batch)`` (its wire protocol)."""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger("pyproxy.tracing")

MAX_QUEUE = 1000
FLUSH_S = 1.0
MAX_BATCH = 200


class BatchExporter:
    """``name``: the stats and log name (``tracing.<name>.*``); ``cluster``: where spans go."""

    verb = "sent"   # for the log line: "spans could not be <verb> to cluster ..."

    def _init_export(self, ctx, name: str, cluster: str) -> None:
        self.loop = ctx.loop
        self.cm = ctx.cluster_manager
        self.export_name = name
        self.cluster = cluster
        st = ctx.stats
        self.st_dropped = st.counter("tracing.%s.spans_dropped" % name)
        self.st_sent = st.counter("tracing.%s.spans_sent" % name)
        self.st_reports = st.counter("tracing.%s.reports_sent" % name)
        self.st_failed = st.counter("tracing.%s.reports_failed" % name)
        self.queue: deque = deque()
        self.timer = None
        self.task = None
        self.logged = False

    def report(self, span) -> None:
        if len(self.queue) >= MAX_QUEUE:
            self.st_dropped.value += 1
            return
        self.queue.append(span)
        if self.timer is None and self.task is None:
            self.timer = self.loop.call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        self.timer = None
        if not self.queue or self.task is not None:
            return
        batch = [self.queue.popleft() for _ in range(min(MAX_BATCH, len(self.queue)))]
        self.task = self.loop.create_task(self._run(batch))

    def _host(self):
        c = self.cm.get(self.cluster) if self.cm is not None else None
        return c.choose_host(None) if c is not None else None

    async def _send(self, batch, host) -> bool:
        raise NotImplementedError

    async def _run(self, batch) -> None:
        try:
            host = self._host()
            ok = host is not None and await self._send(batch, host)
            if ok:
                self.st_reports.value += 1
                self.st_sent.value += len(batch)
            else:
                self.st_failed.value += 1
                self.st_dropped.value += len(batch)
                if not self.logged:
                    self.logged = True
                    log.warning("%s: spans could not be %s to cluster '%s' (%s); dropped and counted in "
                                "tracing.%s.spans_dropped (logged once)", self.export_name, self.verb, self.cluster,
                                "no host" if host is None else "%s:%s" % (host.address, host.port),
                                self.export_name)
        finally:
            self.task = None
            if self.queue and self.timer is None:
                self.timer = self.loop.call_later(FLUSH_S, self._flush)

"""The router's retry state (Envoy's ``RetryStateImpl``), a part of ``router.Router``.

An outcome (response headers, reset, connect failure, per-try timeout) that the route's policy
would retry takes one of the retries left (none left: ``upstream_rq_retry_limit_exceeded``, flag
URX), then one unit of the cluster's retry resource (``retry_allowed``; none free:
``upstream_rq_retry_overflow``, flag UO), held from the retry's backoff until that retry's own
outcome. While hedging (``hedge_on_per_try_timeout``) more than one attempt runs: the attempts in
flight are tracked here too (``upstream`` and ``others``).
"""

from __future__ import annotations

import random

from ...cluster.outlier import put_response
from ...http.grpc_timeout import grpc_timeout_ms, to_grpc_timeout
from .router_control import timeout_reply
from .router_steps import retries_reset

# a retry decision (Envoy's RetryStatus)
R_NO, R_YES, R_OVERFLOW, R_LIMIT = 0, 1, 2, 3


def retry_allowed(c) -> bool:
    """Whether cluster ``c`` has a retry to give (Envoy's ``retries().canCreate()``)."""
    b = c.retry_budget
    if b is None:
        return c.retries_active < c.max_retries
    pct, floor = b
    active = c.rq_active_total - c.retries_in_backoff  # active and pending, not waiting to retry
    return c.retries_active < max(int(pct / 100.0 * active), floor)


def expected_timeout(route, timeout: float) -> float:
    """What a first attempt's ``x-envoy-expected-rq-timeout-ms`` announces (Envoy's
    ``finalTimeout``): the route's per-try timeout when shorter than ``timeout``, unless hedging."""
    rp = route.retry
    pt = rp.per_try_timeout if rp is not None and not route.hedge_on_per_try_timeout else 0.0
    return pt if pt and (not timeout or pt < timeout) else timeout


def legacy_grpc_timeout(route, headers) -> float:
    """A gRPC request's timeout on a route with ``max_grpc_timeout`` (Envoy's ``finalTimeout``):
    its ``grpc-timeout`` (none: no limit) less ``grpc_timeout_offset`` when that leaves some time,
    capped at ``max_grpc_timeout`` (0: no cap); the header then announces what the upstream gets
    (the per-try timeout when shorter, as ``x-envoy-expected-rq-timeout-ms``)."""
    ms = grpc_timeout_ms(headers.get("grpc-timeout")) or 0
    off = route.grpc_timeout_offset
    if off is not None and off < ms:
        ms -= off
    cap = route.max_grpc_timeout
    if cap and (not ms or ms > cap):
        ms = cap
    timeout = ms / 1000.0
    exp = expected_timeout(route, timeout)
    if exp:
        headers.set("grpc-timeout", to_grpc_timeout(int(round(exp * 1000))))
    return timeout


class RetryState:
    """The retry-state and attempts-in-flight methods of ``router.Router`` (its slots hold the
    state: ``retry``, ``retries_left``, ``retry_timer``, ``retry_held``, ``attempts``,
    ``upstream``, ``others``, ``timeout_retry``)."""

    __slots__ = ()

    def _maybe_retry_reset(self, what: str, up) -> bool:
        """A reset, connect failure or per-try timeout of ``up``: retried when the policy says so
        (Envoy: connect failures by connect-failure, all of them by 5xx, gateway-error or reset)."""
        r = self.retry
        if r is None or self.response_started or up.retried:
            return False
        return self._retry_outcome(retries_reset(r.retry_on, what)) == R_YES

    def _retry_headers(self):
        """A retry's request headers, as Envoy's ``doRetry`` sets them: its attempt number
        (``include_request_attempt_count``), whether a per-try timeout caused it
        (``include_is_timeout_retry_header``), and in ``x-envoy-expected-rq-timeout-ms`` the time
        the request has left (the per-try timeout when shorter, unless hedging)."""
        route = self.route
        h = self.headers
        if route.include_request_attempt_count:
            h.set("x-envoy-attempt-count", str(self.attempts))
        if route.include_is_timeout_retry_header:
            h.set("x-envoy-is-timeout-retry", "true" if self.timeout_retry else "false")
        self.timeout_retry = False
        sup = self.cfg.suppress_envoy_headers
        # (on a route with max_grpc_timeout a gRPC request's grpc-timeout says the same)
        gt = self.grpc and route.max_grpc_timeout is not None
        if sup and not gt:
            return
        glob = int(self.timeout * 1000) if self.timeout else 0
        rp = self.retry
        exp = int(rp.per_try_timeout * 1000) if rp is not None and not self.hedge else 0
        if exp >= glob and glob:
            exp = 0
        exp = exp or glob
        if not exp:
            return
        d = self.s.deadline
        if glob and d is not None:
            # (the route timeout runs from the request's completion: the deadline is then + timeout)
            elapsed = int((self.cfg.loop.time() - (d - self.timeout)) * 1000)
            exp = 1 if elapsed >= glob else min(exp, glob - elapsed)
        if not sup:
            h.set("x-envoy-expected-rq-timeout-ms", str(exp))
        if gt:
            h.set("grpc-timeout", to_grpc_timeout(exp))

    def _retry_outcome(self, would_retry: bool, reset_after=None) -> int:
        """An attempt's outcome under the retry policy: release the previous retry's unit (a
        retry whose outcome needs no retry counts as a success), then maybe retry again."""
        if not would_retry:
            if self.retry_held:
                self.cluster.st_rq_retry_success.value += 1
            self._release_retry()
            return R_NO
        return self._should_retry(reset_after)

    def _should_retry(self, reset_after=None) -> int:
        """``reset_after``: the back-off a rate-limited response announced (seconds), if any."""
        c = self.cluster
        self._release_retry()
        si = self.s.stream_info
        if self.retries_left <= 0:
            if self.retries_left == 0:  # (-1: retries abandoned for the body's size; Envoy then has
                c.st_rq_retry_limit_exceeded.value += 1  # no retry state, so nothing is counted)
                si.response_flags.add("URX")
            return R_LIMIT
        self.retries_left -= 1
        if not retry_allowed(c):
            c.st_rq_retry_overflow.value += 1
            si.response_flags.add("UO")
            return R_OVERFLOW
        c.retries_active += 1
        self.retry_held = True
        c.st_rq_retry.value += 1
        if reset_after is not None:
            # (Envoy's jittered lower bound: from the announced interval up to half again)
            c.st_rq_retry_backoff_ratelimited.value += 1
            delay = random.uniform(reset_after, reset_after * 1.5)
        else:
            c.st_rq_retry_backoff_exponential.value += 1
            r = self.retry
            base = r.backoff_base
            mx = r.backoff_max
            n = self.attempts
            delay = random.uniform(0, min(mx, base * (2 ** (n - 1)))) if base else 0
        c.retries_in_backoff += 1
        self.retry_timer = self.cfg.loop.call_later(delay, self._do_retry)
        return R_YES

    def _start_per_try(self, up):
        """Envoy starts an attempt's per-try timeout and per-try idle timeout once it is bound and
        the whole request has been received."""
        r = self.retry
        if r is None or up.abandoned:
            return
        if r.per_try_timeout and up.per_try_timer is None:
            up.per_try_timer = self.cfg.loop.call_later(r.per_try_timeout, up.on_per_try_timeout)
        if r.per_try_idle_timeout and up.idle_timer is None:
            up.idle_timer = self.cfg.loop.call_later(r.per_try_idle_timeout, up.on_per_try_idle_timeout)

    def on_per_try_idle_timeout(self, up):
        """``per_try_idle_timeout``: nothing from attempt ``up`` for that long (Envoy's
        onPerTryIdleTimeout): as a per-try timeout (retried when the policy retries resets), counted
        and detailed apart; once the response started the stream is cut."""
        self.attempt_timed_out(up, "st_rq_per_try_idle_timeout", "upstream_per_try_idle_timeout", False)

    def attempt_timed_out(self, up, counter: str, details: str, hedge: bool):
        """Attempt ``up``'s per-try or per-try idle timer fired: the host and the outlier detector
        hear of it; with ``hedge`` (Envoy's soft per-try timeout) the attempt keeps going and
        another starts if a retry is left (always retriable, whatever retry_on says); otherwise the
        cluster's ``counter`` counts it, the attempt is abandoned, and it is retried as a reset
        when the policy allows, else the stream fails with ``details``."""
        if self.done or up is not self.upstream:
            return
        c = self.cluster
        c.report_timeout(up.host)
        if up.host is not None:
            up.host.rq_timeout += 1
        self.timeout_retry = True  # (the retry it may cause says so: _retry_headers)
        if hedge:
            if not self.response_started and self._should_retry() == R_YES:
                up.retried = True
                if self.others is None:
                    self.others = []
                self.others.append(up)
                self.upstream = None
            return
        getattr(c, counter).value += 1
        up.abandon()
        self.upstream = None
        if not self.response_started and self._maybe_retry_reset("reset", up):
            return
        if self._others_pending():
            return
        self._fail(*timeout_reply(self, details))

    def _release_retry(self):
        if self.retry_held:
            self.retry_held = False
            self.cluster.retries_active -= 1

    def _do_retry(self):
        self.retry_timer = None
        self.cluster.retries_in_backoff -= 1
        if self.done:
            return
        self._attempt()

    # -- attempts in flight (more than one only while hedging) ------------------------------------------
    def _forget(self, up) -> bool:
        """``up`` ended by itself (reset, failed): drop our reference. False if it was not ours."""
        if up is self.upstream:
            self.upstream = None
            return True
        o = self.others
        if o and up in o:
            o.remove(up)
            return True
        return False

    def _drop(self, up):
        """Stop attempt ``up`` (its response will not be used)."""
        self._forget(up)
        up.abandon()

    def _others_pending(self, besides=None) -> bool:
        """Whether an attempt other than ``besides`` is still running, or a retry is coming."""
        if self.retry_timer is not None:
            return True
        if self.upstream is not None and self.upstream is not besides:
            return True
        return bool(self.others) and any(o is not besides for o in self.others)

    def _choose(self, up):
        """``up``'s response goes downstream: every other attempt stops, no retry follows."""
        self._abandon_others(up)
        cur = self.upstream
        if cur is not None and cur is not up:
            cur.abandon()
        self.upstream = up
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
            self.cluster.retries_in_backoff -= 1

    def _abandon_others(self, keep):
        o = self.others
        if o:
            self.others = None
            for x in o:
                if x is not keep:
                    x.abandon()


def charge_retried(c, status: int, host, headers=None) -> None:
    """A response that is retried: Envoy charges it under ``cluster.<name>.retry.`` and not in
    the cluster's own ``upstream_rq_<code>``; outlier detection sees it like any other."""
    put_response(host, status, headers)
    sc = c.scope
    sc.counter("retry.upstream_rq_%d" % status).value += 1
    sc.counter("retry.upstream_rq_%dxx" % (status // 100)).value += 1
    sc.counter("retry.upstream_rq_completed").value += 1


def grpc_retry(retry, headers) -> bool:
    """Whether a gRPC response's ``grpc-status`` is one the policy retries (``retry_on`` gRPC codes)."""
    gs = headers.get("grpc-status")
    if gs is None:
        return False
    try:
        return retry.should_retry_grpc(int(gs))
    except ValueError:
        return False

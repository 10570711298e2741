"""routing/header_mutation.py ``literal_tail``: a route's literal request header mutations compiled
into "append this tail, unless the request has one of these names" must leave exactly the headers
that applying the mutation sets one by one (``HeaderMutation.apply``, Envoy's rules) leaves; and
``finalize_request`` (the router's and the stream's request step) takes it only when it applies."""

import random

from pyproxy.filters.http.router_steps import finalize_request
from pyproxy.http.headers import Headers
from pyproxy.routing.header_mutation import (ADD_IF_ABSENT, APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS,
                                             OVERWRITE_IF_EXISTS_OR_ADD, HeaderMutation, literal_clear, literal_tail,
                                             take_out)

from test_routing import one_route, req

NAMES = ("x-a", "x-b", "x-c", "x-d")
ACTIONS = (APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS)


def _random_set(rnd):
    adds = [(rnd.choice(NAMES), None, rnd.choice(("", "v1", "v2", "v3")), rnd.choice(ACTIONS),
             rnd.random() < 0.3) for _ in range(rnd.randrange(0, 4))]
    removes = rnd.sample(NAMES, rnd.randrange(0, 2))
    return HeaderMutation(adds, removes)


def test_literal_tail_equals_applying_the_sets_in_order():
    rnd = random.Random(7)
    checked = 0
    for _ in range(3000):
        sets = [_random_set(rnd) for _ in range(rnd.randrange(1, 4))]
        lit = literal_tail(sets)
        assert lit is not None
        names, tail = lit
        base = [(":method", "GET"), (":path", "/"), ("user-agent", "t")]
        # a request with some of the names (the compiled form must not be used) or none
        extra = [(n, "req") for n in rnd.sample(NAMES, rnd.randrange(0, 3))]
        h = Headers(base + extra)
        for m in sets:
            m.apply(h, None, h)
        if names.isdisjoint(k for k, _ in extra):
            assert h._h == base + extra + list(tail), (sets, extra)
            checked += 1
    assert checked > 500


def test_formatted_values_are_not_compiled():
    t = one_route("""  - match: {prefix: /}
    route: {cluster: c}
    request_headers_to_add: [{header: {key: x-ip, value: '%DOWNSTREAM_REMOTE_ADDRESS%'}}]
""")
    assert t.find(req()).req_lit is None


def test_finalize_request_uses_the_tail_only_when_the_request_lacks_its_names():
    t = one_route("""  - match: {prefix: /}
    route: {cluster: c, timeout: 3s}
    request_headers_to_add:
    - {header: {key: x-o, value: route}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
    - {header: {key: x-a, value: route}}
""", vhost_extra="  request_headers_to_add: [{header: {key: x-a, value: vhost}}]")
    route = t.find(req())
    assert route.req_lit == (frozenset({"x-o"}), (("x-o", "route"), ("x-a", "route"), ("x-a", "vhost")))
    h = req(user_agent="t")
    finalize_request(route, h, route.timeout, False, None, None, True, True)
    assert h._h[4:] == [("user-agent", "t"), ("x-envoy-expected-rq-timeout-ms", "3000"),
                        ("x-o", "route"), ("x-a", "route"), ("x-a", "vhost")]
    # the client sent x-o: overwritten (Envoy's set: removed, then appended)
    h = req(x_o="client", user_agent="t")
    finalize_request(route, h, route.timeout, False, None, None, True, True)
    assert h._h[4:] == [("user-agent", "t"), ("x-envoy-expected-rq-timeout-ms", "3000"),
                        ("x-o", "route"), ("x-a", "route"), ("x-a", "vhost")]


def _tail_applies(route, h, suppress, quiet):
    """What ``FirstAttempt.begin_first_attempt`` does with ``route.req_tail`` (routing/plan.py
    request_tail) for a request on the route's own cluster: True when it appended the tail."""
    t = route.req_tail
    if t is not None and (quiet or not t[3]) and (t[0] is None or t[0].isdisjoint(k for k, _ in h._h)):
        if t[4] is not None and not t[4].isdisjoint(k for k, _ in h._h):
            take_out(h._h, t[4])
            _tail_applies.cleared += 1
        h._h += t[2] if suppress else t[1]
        return True
    return False


_tail_applies.cleared = 0


def test_request_tail_equals_finalize_request():
    """The compiled tail leaves the headers ``finalize_request`` leaves, for random routes
    (literal and overwriting mutations on route and vhost, timeouts, attempt counts, rewrites,
    formatted values), requests with and without the names (those the route overwrites or
    removes whatever the request has, as a client sidecar's request carries its route's header,
    taken out first; once or twice), the router's suppress flag on and off, quiet or not."""
    rnd = random.Random(11)
    actions = ("APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS")
    names = NAMES + ("x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count")
    used = checked = 0
    for i in range(300):
        def adds():
            out = []
            for _ in range(rnd.randrange(0, 3)):
                v = rnd.choice(("v1", "v2", "%REQ(x-a)%", ""))
                out.append("{header: {key: %s, value: '%s'}, append_action: %s}"
                           % (rnd.choice(names), v, rnd.choice(actions)))
            return "[" + ", ".join(out) + "]"
        route_yaml = "  - match: {prefix: /}\n    route: {cluster: c%s%s}\n    request_headers_to_add: %s\n" % (
            rnd.choice(("", ", timeout: 0s", ", timeout: 2s")),
            rnd.choice(("", "", ", prefix_rewrite: /x")), adds())
        if rnd.random() < 0.3:
            route_yaml += "    request_headers_to_remove: [%s]\n" % rnd.choice(NAMES)
        vhost = "  request_headers_to_add: %s\n" % adds()
        if rnd.random() < 0.5:
            vhost += "  include_request_attempt_count: true\n"
        route = one_route(route_yaml, vhost_extra=vhost).find(req())
        for _ in range(4):
            extra = {n.replace("-", "_"): "req" for n in rnd.sample(names, rnd.randrange(0, 3))}
            suppress = rnd.random() < 0.3
            quiet = "x_envoy_attempt_count" not in extra and rnd.random() < 0.8
            twice = [(n.replace("_", "-"), "again") for n in extra if rnd.random() < 0.2]
            want = req(user_agent="t", **extra)
            want._h += twice + [("x-z", "after")]
            finalize_request(route, want, route.timeout, suppress, None, None, True, quiet)
            got = req(user_agent="t", **extra)
            got._h += twice + [("x-z", "after")]
            if _tail_applies(route, got, suppress, quiet):
                used += 1
                assert got._h == want._h, (route_yaml, vhost, extra, suppress)
            checked += 1
    assert used > 100 and checked == 1200 and _tail_applies.cleared > 10, (used, _tail_applies.cleared)


def test_literal_clear_with_the_names_present_equals_applying_the_sets():
    """``literal_clear``'s names, present in the request (once or twice, among other headers),
    change nothing but their own lines: ``take_out`` + the tail equals applying the sets."""
    rnd = random.Random(5)
    checked = 0
    for _ in range(3000):
        sets = [_random_set(rnd) for _ in range(rnd.randrange(1, 4))]
        names, tail = literal_tail(sets)
        clear = literal_clear(sets)
        assert clear <= names
        base = [(":method", "GET"), (":path", "/"), ("user-agent", "t")]
        extra = []
        for n in rnd.sample(NAMES, rnd.randrange(0, 4)):
            extra += [(n, "req")] * rnd.choice((1, 1, 2)) + [("x-other", n)]
        rnd.shuffle(extra)
        h = Headers(base + extra)
        for m in sets:
            m.apply(h, None, h)
        present = {k for k, _ in extra}
        if (names - clear).isdisjoint(present):
            got = base + extra
            take_out(got, clear)
            assert h._h == got + list(tail), (sets, extra)
            checked += present & clear != set()
    assert checked > 300, checked

"""routing/header_mutation.py ``literal_tail``: a route's literal request header mutations compiled
into "append this tail, unless the request has one of these names" must leave exactly the headers
that applying the mutation sets one by one (``HeaderMutation.apply``, Envoy's rules) leaves; and
``finalize_request`` (the router's and the stream's request step) takes it only when it applies."""

import random

from pyproxy.filters.http.router_steps import finalize_request
from pyproxy.http.headers import Headers
from pyproxy.routing.header_mutation import (ADD_IF_ABSENT, APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS,
                                             OVERWRITE_IF_EXISTS_OR_ADD, HeaderMutation, literal_tail)

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

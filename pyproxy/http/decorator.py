"""Envoy's decorator step: ``x-envoy-decorator-operation`` on the request and on the response, for
every request of an HCM with a ``tracing`` block (``PrepPlan.decorate``: egress on an OUTBOUND
listener, ingress otherwise), whichever path the request takes."""

from __future__ import annotations

DECORATE_EGRESS = 1
DECORATE_INGRESS = 2
_DECORATOR = "x-envoy-decorator-operation"


def decorate(mode: int, route, headers, absent: bool = False):
    """Envoy's decorator handling of the request headers, once per request after the route is
    chosen (every lane calls it when ``PrepPlan.decorate`` is set): on egress the route's decorator
    operation, unless ``propagate`` is false, replaces any ``x-envoy-decorator-operation``
    (otherwise the caller's passes through); on ingress the caller's header is removed and, when
    not empty, returned (a tracer names its span with it). ``absent``: the caller knows the
    request has no ``x-envoy-decorator-operation`` (the HTTP/1.1 codec's ``WATCH_BYTES`` note)."""
    if mode == DECORATE_EGRESS:
        if route is not None and route.decorator_propagate:
            op = route.decorator_operation
            if op:
                if absent:
                    headers._h.append((_DECORATOR, op))
                else:
                    headers.set(_DECORATOR, op)
        return None
    if absent:
        return None
    op = headers.get(_DECORATOR)
    if op is None:
        return None
    headers.remove(_DECORATOR)
    return op or None


def response_operation(mode: int, route, caller_op):
    """On ingress, the operation the response carries in ``x-envoy-decorator-operation`` (Envoy's
    encodeHeaders: the route's decorator operation, so that the caller can name its client span,
    unless ``propagate`` is false or the caller named the operation itself); None otherwise."""
    if mode == DECORATE_INGRESS and caller_op is None and route is not None and route.decorator_propagate:
        return route.decorator_operation or None
    return None


def decorate_response(mode: int, route, caller_op, headers) -> None:
    """Envoy's decorator handling of the response headers, when ``PrepPlan.decorate`` is set: on
    egress an upstream's ``x-envoy-decorator-operation`` is consumed (it would name the client
    span; it does not go on to the caller); on ingress ``response_operation`` is set."""
    if mode == DECORATE_EGRESS:
        if _DECORATOR in headers:
            headers.remove(_DECORATOR)
        return
    op = response_operation(mode, route, caller_op)
    if op is not None:
        headers.set(_DECORATOR, op)

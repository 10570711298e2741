"""Routing: ``RouteConfiguration`` protos compiled into immutable tables the router reads per request.

    table = compile_route_config(route_config_proto)      # ConfigError on bad/unsupported config
    entry = table.find(headers, stream_info, random_value)  # RouteEntry | None
"""

from .header_mutation import HeaderMutation, compile_header_mutation
from .matchers import (HeaderMatcher, StringMatcher, compile_header_matcher,
                       compile_string_matcher)
from .policies import GRPC_RETRY_ON, HTTP_RETRY_ON, HashPolicy, RetryPolicy, parse_retry_on
from .regex import compile_re2
from .route import (DEFAULT_TIMEOUT, DIRECT_RESPONSE, REDIRECT, ROUTE, ClusterChoice,
                    MirrorPolicy, RouteEntry)
from .table import RouteTable, VirtualHost, compile_route_config

__all__ = [
    "compile_route_config", "RouteTable", "VirtualHost", "RouteEntry", "ClusterChoice",
    "MirrorPolicy", "RetryPolicy", "HashPolicy", "ROUTE", "DIRECT_RESPONSE", "REDIRECT",
    "DEFAULT_TIMEOUT", "parse_retry_on", "HTTP_RETRY_ON", "GRPC_RETRY_ON", "HeaderMutation",
    "compile_header_mutation", "HeaderMatcher", "StringMatcher", "compile_header_matcher",
    "compile_string_matcher", "compile_re2",
]

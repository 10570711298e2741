"""xDS resource types: type URLs, decoding ``Any`` payloads, and resource names.

Shared by the ADS client and the file-driven control plane. Decoding goes through the config
registry's ``message_class`` so proto modules are imported only for the types actually used.
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from pyproxy.config.errors import ConfigError
from pyproxy.config.registry import TYPE_PREFIX, message_class

LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE = TYPE_PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration"
VIRTUAL_HOST = TYPE_PREFIX + "envoy.config.route.v3.VirtualHost"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
RUNTIME = TYPE_PREFIX + "envoy.service.runtime.v3.Runtime"
RESOURCE_WRAPPER = TYPE_PREFIX + "envoy.service.discovery.v3.Resource"

# Types whose SotW responses hold the full set (absent name = removed): wildcard-style types.
SOTW_FULL_STATE_TYPES = frozenset((LISTENER, CLUSTER, SCOPED_ROUTE))

# The order in which subscriptions are (re)sent on a new stream, as Envoy does: clusters and their
# endpoints before listeners and their routes, secrets last.
SUBSCRIBE_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, VIRTUAL_HOST, SECRET, RUNTIME)

# Short names accepted by the control plane's files (``"@type": "Cluster"``).
SHORT_NAMES = {
    "Listener": LISTENER, "Cluster": CLUSTER, "RouteConfiguration": ROUTE,
    "ScopedRouteConfiguration": SCOPED_ROUTE, "VirtualHost": VIRTUAL_HOST,
    "ClusterLoadAssignment": ENDPOINT, "Secret": SECRET, "Runtime": RUNTIME,
}

SHORT_TYPE = {LISTENER: "lds", CLUSTER: "cds", ROUTE: "rds", SCOPED_ROUTE: "srds", VIRTUAL_HOST: "vhds",
              ENDPOINT: "eds", SECRET: "sds", RUNTIME: "rtds"}


def order_key(type_url: str) -> tuple:
    try:
        return (SUBSCRIBE_ORDER.index(type_url), type_url)
    except ValueError:
        return (len(SUBSCRIBE_ORDER), type_url)


def resource_name(msg: Message) -> str:
    """The xDS name of a resource: ``name``, or ``cluster_name`` for ClusterLoadAssignment."""
    fields = msg.DESCRIPTOR.fields_by_name
    if "name" in fields:
        return getattr(msg, "name")
    if "cluster_name" in fields:
        return getattr(msg, "cluster_name")
    raise ConfigError("resource type %s has no name field" % msg.DESCRIPTOR.full_name)


def class_for_type_url(type_url: str):
    """The message class of a type URL, or None when no proto module defines it."""
    return message_class(type_url.rpartition("/")[2])


def known_class(type_url: str):
    """The message class of a type URL; ``ConfigError`` when no proto module defines it."""
    cls = class_for_type_url(type_url)
    if cls is None:
        raise ConfigError("unknown type URL '%s'" % type_url)
    return cls


def decode_any(a: any_pb2.Any, expected_type_url: str, cls=None) -> Message:
    """Unpack one resource of a response; ``ConfigError`` on a wrong type or undecodable bytes.

    A resource may come wrapped in ``envoy.service.discovery.v3.Resource`` (SotW TTL support); the
    wrapper is seen through.
    """
    if a.type_url == RESOURCE_WRAPPER:
        from envoy.service.discovery.v3 import discovery_pb2
        wrapper = discovery_pb2.Resource()
        try:
            wrapper.ParseFromString(a.value)
        except DecodeError as e:
            raise ConfigError("cannot decode Resource wrapper: %s" % e) from None
        if not wrapper.HasField("resource"):
            raise ConfigError("Resource wrapper '%s' has no resource" % wrapper.name)
        a = wrapper.resource
    if a.type_url != expected_type_url:
        raise ConfigError("type URL mismatch: resource is '%s', response is '%s'"
                          % (a.type_url, expected_type_url))
    if cls is None:
        cls = known_class(expected_type_url)
    msg = cls()
    try:
        msg.ParseFromString(a.value)
    except DecodeError as e:
        raise ConfigError("cannot decode %s: %s" % (expected_type_url.rpartition("/")[2], e)) from None
    return msg

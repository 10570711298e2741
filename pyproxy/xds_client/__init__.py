"""xDS client: ADS over gRPC, state-of-the-world and delta (see ``client``)."""

from .client import PartiallyApplied, XdsClient, XdsHandler  # noqa: F401
from .resources import (  # noqa: F401
    CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SCOPED_ROUTE, SECRET, VIRTUAL_HOST,
    decode_any, resource_name,
)
from .target import (  # noqa: F401
    target_from_address, target_from_api_config_source, target_from_cluster,
    target_from_grpc_service,
)

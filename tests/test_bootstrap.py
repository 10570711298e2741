"""load_bootstrap: JSON/YAML, --config-yaml merge, unknown fields, errors on one line."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from pyproxy.config import ConfigError
from pyproxy.config.bootstrap import load_bootstrap


def _file(tmp, text, name="b.yaml"):
    p = os.path.join(tmp, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def test_yaml_and_json_with_typed_config():
    tc = {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
          "stat_prefix": "t", "cluster": "c"}
    bs = {"static_resources": {"listeners": [{"name": "l", "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": tc}]}]}]}}
    with tempfile.TemporaryDirectory() as tmp:
        a = load_bootstrap(_file(tmp, json.dumps(bs), "b.json"), None)
        import yaml
        b = load_bootstrap(_file(tmp, yaml.safe_dump(bs)), None)
    assert a == b
    assert a.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.type_url.endswith("TcpProxy")


def test_config_yaml_merges_over_file():
    with tempfile.TemporaryDirectory() as tmp:
        p = _file(tmp, "node: {id: a, cluster: c1}\nstatic_resources: {clusters: [{name: one}]}\n")
        bs = load_bootstrap(p, "node: {id: b}\nstatic_resources: {clusters: [{name: two}]}")
    assert bs.node.id == "b" and bs.node.cluster == "c1"
    assert [c.name for c in bs.static_resources.clusters] == ["one", "two"]


def test_unknown_field_error_is_one_line_and_can_be_allowed():
    with tempfile.TemporaryDirectory() as tmp:
        p = _file(tmp, "static_resources: {bogus: 1}\n")
        with pytest.raises(ConfigError) as e:
            load_bootstrap(p, None)
        assert "\n" not in str(e.value) and "bogus" in str(e.value)
        load_bootstrap(p, None, allow_unknown=True)


def test_errors():
    with pytest.raises(ConfigError, match="required"):
        load_bootstrap(None, None)
    with pytest.raises(ConfigError, match="unable to read"):
        load_bootstrap("/nonexistent.yaml", None)
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ConfigError, match="mapping"):
            load_bootstrap(_file(tmp, "- a\n- b\n"), None)
        with pytest.raises(ConfigError, match="unable to parse"):
            load_bootstrap(_file(tmp, "a: [\n"), None)
        with pytest.raises(ConfigError):
            load_bootstrap(_file(tmp, "static_resources: {clusters: [{connect_timeout: forever}]}\n"), None)

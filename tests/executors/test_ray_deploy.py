"""deploy/ray/cluster.yaml is a valid Ray cluster launcher config (Ray's own schema, after Ray fills in the
provider's defaults, as `ray up` does) that installs kollm's ray extra and starts the Ray Client port the README names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "cluster.yaml"


def test_cluster_launcher_config_is_valid():
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'kollm[ray]'")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on a field Ray does not know or a wrong type
    assert config["provider"]["type"] == "local"
    assert any("kollm[ray" in c for c in config["setup_commands"])
    assert any("--head" in c and "--ray-client-server-port=10001" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])

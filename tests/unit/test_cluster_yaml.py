"""cluster.yaml is a valid Ray cluster-launcher config, and so is its commented local variant.

Validation goes through exactly what `ray up` runs before touching a cloud: `prepare_config`
(merge the provider's defaults, expand the local provider's node type) then `validate_config`
(Ray's bundled ray-schema.json plus its cross-field checks).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
REDIS_PORT = 6379
METRICS_PORT = 8080


def _aws_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _local_config() -> dict:
    """The lines between the BEGIN/END LOCAL VARIANT markers with their comment prefix removed."""
    lines = CLUSTER_YAML.read_text().splitlines()
    start = lines.index("# BEGIN LOCAL VARIANT")
    end = lines.index("# END LOCAL VARIANT")
    body = [re.sub(r"^# ?", "", line) for line in lines[start + 1 : end]]
    assert all(line.startswith("#") or line == "" for line in lines[start + 1 : end])
    return yaml.safe_load("\n".join(body))


def _prepared_and_validated(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _check_commands(config: dict) -> None:
    """Ray's GCS port and Redis do not collide, workers join the head's port, metrics are exported."""
    head_cmds = " ; ".join(config["head_start_ray_commands"])
    worker_cmds = " ; ".join(config["worker_start_ray_commands"])
    gcs_port = int(re.search(r"ray start --head .*?--port=(\d+)", head_cmds).group(1))
    assert gcs_port != REDIS_PORT
    assert f"--address=$RAY_HEAD_IP:{gcs_port}" in worker_cmds
    assert f"redis-server ~/.dvi/redis-auth.conf --daemonize yes --port {REDIS_PORT}" in head_cmds
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all(f"--metrics-export-port={METRICS_PORT}" in c for c in starts)
        assert all("RAY_AUTH_MODE=token" in c for c in starts)  # Ray token authentication on every node
    _check_secured(config, head_cmds)


SECRETS = ("weight-secret", "redis-password", "ray-auth-token")


def _check_secured(config: dict, head_cmds: str) -> None:
    """Issue 14: Redis needs a password and binds no wildcard, keeps an AOF; the dashboard is
    localhost-only; the secrets arrive as files, never as arguments."""
    redis_cmd = next(c for c in config["head_start_ray_commands"] if "redis-server" in c)
    assert "--protected-mode yes" in redis_cmd and "0.0.0.0" not in redis_cmd
    assert "--appendonly yes --appendfsync everysec" in redis_cmd
    assert "requirepass" in " ".join(config["head_setup_commands"])
    assert "--requirepass" not in redis_cmd  # not on the command line, where `ps` shows it
    assert "--dashboard-host=127.0.0.1" in head_cmds and "0.0.0.0" not in head_cmds
    assert config["file_mounts"] == {"~/dvi": ".", **{f"~/.dvi/{s}": f"~/.dvi/{s}" for s in SECRETS}}
    assert any("pip install -e ~/dvi" in c for c in config["setup_commands"])
    assert any("redis-server" in c for c in config["head_setup_commands"])


def test_aws_config_passes_ray_validation():
    config = _aws_config()
    assert config["provider"]["type"] == "aws"
    prepared = _prepared_and_validated(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["dvi_learner"] == 1
    assert head["max_workers"] == 0  # filled in by prepare_config: the head type is never scaled
    assert len(workers) == 1 and workers[0]["resources"]["GPU"] == 1
    assert 0 <= workers[0]["min_workers"] <= workers[0]["max_workers"] <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0
    _check_commands(config)


def test_commented_local_variant_passes_ray_validation():
    config = _local_config()
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    prepared = _prepared_and_validated(config)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(config["provider"]["worker_ips"])
    assert "dvi_learner" in " ".join(config["head_start_ray_commands"])
    _check_commands(config)


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c.update(gpu_nodes=2), jsonschema.ValidationError),  # unknown top-level key
        (lambda c: c.update(max_workers="four"), jsonschema.ValidationError),  # wrong type
        (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), jsonschema.ValidationError),
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
        (lambda c: c.update(head_node_type="no_such_type"), ValueError),
    ],
)
def test_broken_configs_are_rejected_by_the_same_validator(break_it, error):
    config = _aws_config()
    break_it(config)
    with pytest.raises(error):
        _prepared_and_validated(config)

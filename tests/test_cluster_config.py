"""The shipped cluster files pass Ray's own validation and keep the dashboard private."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssl_kd.cluster_config import validate_cluster_file
from ssl_kd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _start_commands(cfg: dict) -> str:
    return " ".join(cfg["head_start_ray_commands"])


def test_aws_cluster_file_is_valid_with_gpu_and_cpu_workers():
    cfg = validate_cluster_file(ROOT / "cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [
        n for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")
    ]
    assert gpu and cpu
    assert cfg["max_workers"] >= 1 and cfg["idle_timeout_minutes"] >= 1
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and "ssl_kd" in c]
    assert installs and all("-c /home/ubuntu/ssl_kd/constraints.txt" in c for c in installs)
    # The dashboard (and the Jobs API behind it) is reached through an SSH tunnel only.
    assert "--dashboard-host=127.0.0.1" in _start_commands(cfg)
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()


def test_onprem_cluster_file_is_valid():
    cfg = validate_cluster_file(ROOT / "cluster-onprem.yaml")
    assert cfg["provider"]["type"] == "local"
    assert "--dashboard-host=127.0.0.1" in _start_commands(cfg)
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and "ssl_kd" in c]
    assert installs and all("-c /home/ubuntu/ssl_kd/constraints.txt" in c for c in installs)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_files_start_every_node_with_the_token(name):
    """Ray's token goes to every node, and every node starts Ray in token mode (a head without
    RAY_AUTH_MODE=token starts unauthenticated when it finds no token)."""
    cfg = validate_cluster_file(ROOT / name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in cfg[key]
        if "ray start" in c
    ]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def test_invalid_cluster_file_is_one_clear_error(tmp_path):
    bad = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad["available_node_types"]["gpu_worker"]["resources"] = "lots"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="not a valid Ray cluster config"):
        validate_cluster_file(path)
    with pytest.raises(UserError, match="does not exist"):
        validate_cluster_file(tmp_path / "missing.yaml")


def test_check_cluster_command(capsys):
    from helpers import run_cli

    code, out, _ = run_cli(["check-cluster", str(ROOT / "cluster.yaml")], capsys)
    assert code == 0 and "valid Ray cluster config (aws: head, gpu_worker, cpu_worker)" in out
    code, _, err = run_cli(["check-cluster", str(ROOT / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err

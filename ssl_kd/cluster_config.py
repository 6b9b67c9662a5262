"""Offline validation of Ray autoscaler cluster files (``cluster.yaml``), as ``ray up`` reads them.

Ray has no dry run for ``ray up``; its own config preparation and JSON-schema validation are
private functions, reached through :mod:`ssl_kd.ray_internals` only, and their failures become
one :class:`UserError` line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_kd.config import option, read_yaml
from ssl_kd.errors import UserError
from ssl_kd.ray_internals import cluster_config_validators


@dataclass(frozen=True)
class CheckClusterConfig:
    """``ssl-kd check-cluster``: the cluster file to validate."""

    file: str = option(help="cluster YAML (e.g. cluster.yaml)", positional=True, metavar="FILE")


def validate_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a cluster file with Ray's own schema and defaults; returns the prepared config."""
    raw = read_yaml(path, what="cluster file")
    # A Ray whose private API moved says so (one UserError) rather than skip the check.
    prepare_config, validate_config = cluster_config_validators()
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except Exception as exc:  # jsonschema.ValidationError, ValueError, KeyError from Ray
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a valid Ray cluster config: {first}") from None
    return prepared


def check_cluster(cfg: CheckClusterConfig) -> dict[str, Any]:
    """``ssl-kd check-cluster``: the prepared config of a valid cluster file."""
    return validate_cluster_file(cfg.file)


def format_summary(cfg: CheckClusterConfig, prepared: dict[str, Any]) -> str:
    """The line ``ssl-kd check-cluster`` prints for a valid file."""
    types = ", ".join(prepared.get("available_node_types", {})) or "local provider"
    return f"{cfg.file}: valid Ray cluster config ({prepared['provider']['type']}: {types})"

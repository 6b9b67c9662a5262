"""Offline validation of Ray autoscaler cluster files (``cluster.yaml``), as ``ray up`` reads them.

Ray has no dry run for ``ray up``; its own config preparation and JSON-schema validation are
private functions (``ray.autoscaler._private.util``), so they are wrapped here, in one place, and
their failures become one :class:`UserError` line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ssl_kd.errors import UserError


def validate_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a cluster file with Ray's own schema and defaults; returns the prepared config."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"cluster file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{p} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise UserError(f"{p} must hold a mapping (a Ray cluster config)")
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # the private API moved: say so rather than skip the check
        raise UserError(f"this Ray version cannot validate cluster files offline ({exc})") from None
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except Exception as exc:  # jsonschema.ValidationError, ValueError, KeyError from Ray
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{p} is not a valid Ray cluster config: {first}") from None
    return prepared

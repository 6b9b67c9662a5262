"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` when set, else a Ray started in-process."""

from __future__ import annotations

import os
from typing import Any


def connect_ray() -> Any:
    """Connect to the cluster in ``RAY_ADDRESS`` when set, else start Ray in this process."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # "local", not None: with None, ray.init attaches to any cluster that `ray start`
        # left running on this machine (someone else's, or one about to be stopped).
        ray.init(address=address or "local", include_dashboard=False if not address else None,
                 log_to_driver=False)  # fmt: skip
    return ray

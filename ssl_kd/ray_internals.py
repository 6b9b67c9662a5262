"""Every private Ray name ssl_kd uses, in this one module, behind a check of Ray's version.

Ray has no public way to do two things ssl_kd needs:

- keep a node's address on 127.0.0.1 (:func:`local_only`): ``ray.init(_node_ip_address=
  "127.0.0.1")`` is swapped for this machine's address (``ray._private.services.
  resolve_ip_for_localhost``), and a ``RAY_ADDRESS`` of ``127.0.0.1:PORT`` is swapped the same
  way, where no node of a loopback-only cluster listens. Both keep 127.0.0.1 when Ray's
  local-only mode is on (``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` false, Ray's default
  on macOS and Windows). Its environment variable, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, is read
  once when ``ray`` is imported, so setting it later changes nothing;
- validate a cluster file offline as ``ray up`` would (:func:`cluster_config_validators`):
  ``ray up`` has no dry run, and its config preparation and schema check are
  ``ray.autoscaler._private.util.prepare_config`` / ``validate_config``.

These were tested with the Ray versions in :data:`TESTED_RAY` only (pyproject.toml admits no
other); with any other Ray, or when a name is gone, using them raises one :class:`UserError`
line saying how to install the tested version. ``tests/test_ray_internals.py`` holds every other
module of ``ssl_kd/`` and ``jobs/`` to Ray's public API.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ssl_kd.errors import UserError

# The Ray releases the private pieces below were tested with (pyproject.toml's range of ray).
TESTED_RAY = ">=2.60,<2.61"
_FIX = "install the tested version with `pip install -c constraints.txt -e .`"


def ray_version() -> str:
    """The installed Ray's version string."""
    import ray

    return str(ray.__version__)


def check_ray_version(what: str) -> None:
    """Raises a one-line UserError unless the installed Ray is in :data:`TESTED_RAY`; ``what``
    names the private piece about to be used."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = ray_version()
    try:
        tested = Version(found) in SpecifierSet(TESTED_RAY)
    except InvalidVersion:
        tested = False
    if not tested:
        raise UserError(
            f"Ray {found} is installed, but ssl_kd uses {what}, private to Ray and tested only "
            f"with Ray {TESTED_RAY}: {_FIX}"
        )


def _private(module: str, *names: str) -> Any:
    """Ray's private ``module``, after the version check, with ``names`` in it; a one-line
    UserError when the module or a name is missing."""
    what = f"{module}.{'/'.join(names)}"
    check_ray_version(what)
    try:
        found = importlib.import_module(module)
        for name in names:
            getattr(found, name)
    except (ImportError, AttributeError) as exc:
        raise UserError(
            f"Ray {ray_version()} lacks {what} ({exc}), which ssl_kd was tested with on "
            f"Ray {TESTED_RAY}: {_FIX}"
        ) from None
    return found


@contextmanager
def local_only() -> Iterator[None]:
    """Ray's local-only mode for a ``ray.init`` inside: node addresses stay 127.0.0.1.

    The flag is read when ``ray.init`` starts or joins a node, which hands the address to every
    process it starts; it is restored afterwards, so that a later connection to a real cluster
    from this process is unaffected."""
    constants = _private("ray._private.ray_constants", "ENABLE_RAY_CLUSTER")
    cluster = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = cluster


def cluster_config_validators() -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """Ray's ``(prepare_config, validate_config)``: what ``ray up`` does to a cluster file
    before it starts anything (defaults filled in, then the JSON schema checked)."""
    util = _private("ray.autoscaler._private.util", "prepare_config", "validate_config")
    return util.prepare_config, util.validate_config


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource an autoscaling cluster may grow to (its node types' limits),
    or None when it does not autoscale. Ray Train reads the same (its ``worker_group.py``) to
    refuse a request no node type can ever meet; there is no public API for it."""
    state = _private("ray._private.state", "state").state
    try:
        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # an older GCS or none at all: treat as not autoscaling
        return None
    return {k: float(v) for k, v in limits.items()} if limits else None

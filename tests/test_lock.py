"""The lock (constraints.txt, made by ``make lock``): exact pins of the tested versions, inside
pyproject.toml's ranges, never the project itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, Version]:
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin (a URL or a range works on one machine): {raw}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_the_tested_stack_inside_the_declared_ranges() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = _pins()
    assert "ssl-kd" not in pins  # the checkout is installed from itself
    tested = {"torch", "torchvision", "ray", "webdataset", "faiss-cpu", "pyarrow", "tensorboard"}
    assert tested <= set(pins)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    for dep in map(Requirement, project["dependencies"] + [d for e in extras for d in e]):
        pinned = pins.get(canonicalize_name(dep.name))
        # A dependency added since the last `make lock` is not pinned yet: installs take it
        # unpinned, and the next `make lock` pins it.
        if pinned is not None:
            assert dep.specifier.contains(pinned, prereleases=True), (
                f"pyproject.toml asks {dep}, the lock pins {pinned}: run make lock"
            )

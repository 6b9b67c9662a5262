"""Private Ray names live in ssl_kd/ray_internals.py only, and only a tested Ray reaches them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ssl_kd import ray_internals
from ssl_kd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ROOT / "ssl_kd" / "ray_internals.py"
# `ray._private`, `ray.train._internal`, `ray.train.torch.config._TorchBackend`, `ray._raylet`:
# a dotted name from `ray` with a part that starts with one underscore; anything `._internal`.
PRIVATE_TEXT = re.compile(r"\bray(?:\.\w+)*\._(?!_)\w*|\._internal\b")


def private_references(path: Path) -> list[str]:
    """``path:line: text`` of every private Ray name it mentions (code, comments or strings)."""
    found = []
    text = path.read_text()
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for n, line in enumerate(text.splitlines(), 1):
        if PRIVATE_TEXT.search(line):
            found.append(f"{name}:{n}: {line.strip()}")
    for node in ast.walk(ast.parse(text, str(path))):
        # `from ray.train.torch.config import _TorchBackend`: the private name is the import's
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name}:{node.lineno}: imports {alias.name}")
    return found


def test_no_module_but_ray_internals_names_a_private_ray_piece() -> None:
    files = sorted([*(ROOT / "ssl_kd").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")])
    assert ALLOWED in files
    found = [ref for f in files if f != ALLOWED for ref in private_references(f)]
    assert not found, "private Ray names outside ssl_kd/ray_internals.py:\n" + "\n".join(found)
    assert private_references(ALLOWED)  # the checker sees what is there


@pytest.mark.parametrize(
    "source",
    [
        "from ray._private import ray_constants\n",
        "from ray.train._internal.worker_group import WorkerGroup\n",
        "from ray.train.torch.config import _TorchBackend\n",
        "import ray\nx = ray._private.services\n",
        "# ray.autoscaler._private.util.validate_config\n",
    ],
)
def test_the_checker_sees_private_names(tmp_path: Path, source: str) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert private_references(bad)


def test_the_checker_leaves_public_names_alone(tmp_path: Path) -> None:
    ok = tmp_path / "ok.py"
    ok.write_text(
        "import ray\nfrom ray.train.backend import Backend\n"
        "print(ray.__version__, ray.train.get_context, ray.init, my_ray._x)\n"
    )
    assert not private_references(ok)


def test_pyproject_admits_only_the_tested_ray() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    assert ray.split("]", 1)[1] == ray_internals.TESTED_RAY


def test_the_installed_ray_is_the_tested_one() -> None:
    ray_internals.check_ray_version("anything")
    with ray_internals.local_only():
        pass
    prepare, validate = ray_internals.cluster_config_validators()
    assert callable(prepare) and callable(validate)


@pytest.mark.parametrize("version", ["2.59.1", "2.61.0", "3.0.0.dev0", "not-a-version"])
def test_another_ray_is_one_line_that_says_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    import ray
    from ray._private import ray_constants  # a test may look; ssl_kd may not

    monkeypatch.setattr(ray, "__version__", version)
    before = ray_constants.ENABLE_RAY_CLUSTER
    for use in (ray_internals.local_only().__enter__, ray_internals.cluster_config_validators):
        with pytest.raises(UserError) as err:
            use()
        message = str(err.value)
        assert "\n" not in message
        assert f"Ray {version} is installed" in message
        assert ray_internals.TESTED_RAY in message
        assert "pip install -c constraints.txt -e ." in message
    assert before == ray_constants.ENABLE_RAY_CLUSTER  # nothing was touched


def test_a_missing_private_name_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import ray_constants  # a test may look; ssl_kd may not

    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(UserError) as err, ray_internals.local_only():
        pass
    message = str(err.value)
    assert "\n" not in message and "lacks ray._private.ray_constants.ENABLE_RAY_CLUSTER" in message
    assert "pip install -c constraints.txt -e ." in message


def test_the_cli_prints_the_version_error_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from helpers import run_cli

    monkeypatch.setattr(ray, "__version__", "2.70.0")
    code, out, err = run_cli(["check-cluster", str(ROOT / "cluster.yaml")], capsys)
    assert code == 2 and not out
    assert err.strip().count("\n") == 0 and "Ray 2.70.0 is installed" in err, err

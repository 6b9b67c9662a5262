"""Config: YAML + flags into dataclasses; unknown keys, wrong types, bad ranges name the key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.errors import ConfigError, UserError


@dataclass(frozen=True)
class Demo:
    out: str = option(help="where")
    steps: int = option(10, min=1)
    lr: float = option(0.1, gt=0)
    flip: bool = option(True)
    kind: Literal["a", "b"] = option("a")
    limit: int | None = option(None, min=0)


def _resolve(argv: list[str]) -> Demo:
    parser = argparse.ArgumentParser()
    cfglib.add_arguments(parser, Demo)
    return cfglib.resolve(Demo, parser.parse_args(argv))


def test_defaults_yaml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"out": "o", "steps": 20, "lr": 0.5, "kind": "b"}))
    cfg = _resolve(["--config", str(path), "--steps", "30", "--flip", "false", "--limit", "3"])
    assert cfg == Demo(out="o", steps=30, lr=0.5, flip=False, kind="b", limit=3)
    assert _resolve(["--out", "x", "--limit", "none"]).limit is None
    assert _resolve(["--out", "x", "--steps", "1e3"]).steps == 1000
    # A bare boolean flag is true, so `--flag` and `--flag true` mean the same.
    path.write_text(yaml.safe_dump({"out": "o", "flip": False}))
    assert _resolve(["--config", str(path), "--flip"]).flip is True
    assert _resolve(["--config", str(path), "--flip", "yes", "--steps", "2"]).flip is True


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"out": "o", "stepz": 3}, "stepz", "unknown key"),
        ({"out": "o", "steps": "many"}, "steps", "expected an integer"),
        ({"out": "o", "steps": 2.5}, "steps", "expected an integer"),
        ({"out": "o", "steps": 0}, "steps", "must be >= 1"),
        ({"out": "o", "lr": 0}, "lr", "must be > 0"),
        ({"out": "o", "flip": "maybe"}, "flip", "expected true or false"),
        ({"out": "o", "kind": "c"}, "kind", "must be one of a, b"),
        ({"out": "o", "limit": -1}, "limit", "must be >= 0"),
        ({"out": ["x"]}, "out", "expected a string"),
        ({}, "out", "is required"),
    ],
)
def test_bad_values_name_the_key(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.from_dict(Demo, data)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        cfglib.read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        cfglib.read_yaml(tmp_path / "list.yaml")


def test_save_round_trips(tmp_path: Path) -> None:
    cfg = Demo(out="o", steps=5, limit=None)
    path = cfglib.save(cfg, tmp_path / "run" / "config.yaml")
    assert cfglib.from_dict(Demo, yaml.safe_load(Path(path).read_text())) == cfg

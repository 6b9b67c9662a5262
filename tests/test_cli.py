"""The ``ssl-kd`` command line: bad input ends in one error line and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_cli as _run

from ssl_kd.stages import COMMANDS


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("ssl-kd: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_config_key_type_and_range(
    separable_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--data", str(separable_shards["train"]), "--out", str(tmp_path / "o")]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"stepz": 3}))
    code, _, err = _run([*base, "--config", str(cfg)], capsys)
    assert code == 2 and "'stepz'" in _error_line(err)
    code, _, err = _run([*base, "--steps", "zero"], capsys)
    assert code == 2 and "'steps': expected an integer" in _error_line(err)
    code, _, err = _run([*base, "--steps", "0"], capsys)
    assert code == 2 and "'steps': must be >= 1" in _error_line(err)
    code, _, err = _run([*base, "--optimizer", "lbfgs"], capsys)
    assert code == 2 and "sgd, adamw" in _error_line(err)
    code, _, err = _run([*base, "--bogus-flag", "1"], capsys)
    assert code == 2 and "--bogus-flag" in _error_line(err)
    assert not (tmp_path / "o").exists()


def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["train", "--data", str(tmp_path / "no-*.tar"), "--out", "x"], capsys)
    assert code == 2 and "matched no files" in _error_line(err)
    code, _, err = _run(
        ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)], capsys
    )
    assert code == 2 and "does not exist" in _error_line(err)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(
        ["evaluate", "--checkpoint", str(tmp_path / "junk.pt"), "--data", str(tmp_path)], capsys
    )
    assert code == 2 and "not a readable ssl_kd checkpoint" in _error_line(err)


def test_unknown_arch_lists_the_choices(
    separable_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(separable_shards["train"])
    code, _, err = _run(
        [
            "train",
            "--data",
            data,
            "--out",
            str(tmp_path / "o"),
            "--num-classes",
            "4",
            "--arch",
            "nope",
        ],
        capsys,
    )
    assert code == 2 and "'nope'" in _error_line(err) and "resnet50" in _error_line(err)


def test_fashion_mnist_source_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = _run(
        ["data", "fashion-mnist", "--out", str(out), "--source", str(tmp_path / "none")], capsys
    )
    line = _error_line(err)
    assert code == 2 and "t10k-images-idx3-ubyte.gz" in line and "dataset-fashion-mnist" in line
    assert not out.exists()


def test_train_then_evaluate_via_cli(
    separable_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code, out, _ = _run(
        [
            "-q",
            "train",
            "--data",
            str(separable_shards["train"]),
            "--out",
            str(run),
            "--num-classes",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "16",
            "--no-progress",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0 and "trained cnn for 3 steps" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 3
    code, out, _ = _run(
        [
            "-q",
            "evaluate",
            "--checkpoint",
            str(run / "checkpoint.pt"),
            "--data",
            str(separable_shards["test"]),
            "--out",
            str(run / "eval.json"),
        ],
        capsys,
    )
    assert code == 0 and "top-1" in out and (run / "eval.json").is_file()


@pytest.mark.slow
def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ssl-kd"
    assert script.exists(), "install the package (pip install -e .) to get the ssl-kd script"
    done = subprocess.run([str(script), "models"], capture_output=True, text=True, check=True)
    assert "resnet50" in done.stdout.split()
    bad = subprocess.run([str(script), "evaluate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr


JOBS = sorted(p.name for p in (Path(__file__).parents[1] / "jobs").glob("[a-z]*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_every_job_entrypoint_takes_its_stage_flags(job: str) -> None:
    path = Path(__file__).parents[1] / "jobs" / job
    done = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--config YAML" in done.stdout


@pytest.mark.parametrize("words", [c.words for c in COMMANDS.values()], ids=list(COMMANDS))
def test_every_command_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run([*words, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: ssl-kd {' '.join(words)} ")
    cmd = COMMANDS[" ".join(words)]
    assert ("--config YAML" in out) == (cmd.config is not None and cmd.config_file)


def test_quiet_draws_no_training_bar(
    separable_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def stderr_of(out: str, before: list[str], after: list[str]) -> str:
        argv = [
            "train",
            "--data",
            str(separable_shards["train"]),
            "--out",
            str(tmp_path / out),
            "--num-classes",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
        code, stdout, err = _run([*before, *argv, *after], capsys)
        assert code == 0 and "trained cnn for 2 steps" in stdout, err
        return err

    assert "train:" in stderr_of("bar", [], [])  # the bar, as a baseline
    assert "train:" not in stderr_of("quiet", ["-q"], [])
    assert "train:" not in stderr_of("flag", [], ["--no-progress"])

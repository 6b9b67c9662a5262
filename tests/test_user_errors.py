"""Everything a user can fix is one ``ssl-kd: error:`` line and exit status 2 — bad label files,
a malformed dataset.json, a full disk, a bad ``run`` section — and a refused or concurrent run
leaves the recorded provenance and config true."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import (
    TINY,
    make_teacher,
    run_cli,
    separable_images,
    write_labeled_shards,
    write_unlabeled_shards,
)

from ssl_kd.label.files import label_files, recorded_shard_spec, shard_locations
from ssl_kd.select.files import shard_locations as selection_locations


def _one_error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln[:2].isdigit()]  # log lines: HH:MM:SS
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ssl-kd: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def labeled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """Two unlabeled shards labeled by a random teacher."""
    shards = tmp_path / "u"
    shards.mkdir()
    write_unlabeled_shards(shards, n_shards=2, per_shard=10)
    teacher = make_teacher(tmp_path / "t.pt")
    out = tmp_path / "labels"
    code, _, err = run_cli(
        f"-q label --teacher {teacher} --shards {shards} --out {out} --k 3 "
        "--executor local".split(),
        capsys,
    )
    assert code == 0, err
    return {"shards": shards, "teacher": teacher, "labels": out}


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t.drop(["topk_prob"]),
        lambda t: t.set_column(
            t.schema.get_field_index("topk_class"),
            "topk_class",
            pa.array(t.column("topk_class").to_pylist(), pa.list_(pa.int64())),
        ),
    ],
    ids=["missing-column", "variable-length-list"],
)
def test_select_on_a_damaged_label_file_is_one_line(
    labeled: dict[str, Path], damage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(label_files(labeled["labels"])[0])
    table = pq.read_table(path)
    metadata = table.schema.metadata
    pq.write_table(damage(table).replace_schema_metadata(metadata), path)
    code, _, err = run_cli(
        f"select --labels {labeled['labels']} --out {tmp_path / 'sel'} --per-class 2 "
        "--top-p 2 --executor local".split(),
        capsys,
    )
    assert path.name in _one_error_line(code, err)
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("text", ["{not json", '{"classes": 5}', "[1, 2]"])
def test_malformed_dataset_json_is_one_line(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = separable_images(4, 4, 16, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    write_labeled_shards(data, "l", images, labels, per_shard=8)
    (data / "dataset.json").write_text(text)
    code, _, err = run_cli(
        f"train --data {data} --out {tmp_path / 'run'} --steps 1 --executor local".split(), capsys
    )
    assert "dataset.json" in _one_error_line(code, err)
    assert not (tmp_path / "run").exists()


def test_evaluate_with_no_usable_image_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "e.tar"
    empty.write_bytes(b"")
    teacher = make_teacher(tmp_path / "t.pt")
    code, _, err = run_cli(
        [
            "-q",
            "evaluate",
            "--checkpoint",
            str(teacher),
            "--data",
            str(empty),
            "--latency",
            "false",
        ],
        capsys,
    )
    assert "no usable image" in _one_error_line(code, err)


def test_unknown_model_in_a_run_section_stops_before_any_stage(
    tmp_path: Path, fake_fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({**TINY, "source": str(fake_fmnist)}))
    out = tmp_path / "run"
    code, _, err = run_cli(
        f"run --config {config} --out {out} --set teacher.arch=nosuch".split(), capsys
    )
    assert "teacher.arch" in _one_error_line(code, err) and "nosuch" in err
    assert not (out / "data").exists()


def _full_disk(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Make ``module.name`` (a writer) fail as a full disk does."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    monkeypatch.setattr(module, name, no_space)


def test_full_disk_while_labeling_is_one_line_and_keeps_finished_files(
    labeled: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from ssl_kd.label import files

    more = labeled["shards"] / "more"
    more.mkdir()
    for path in write_unlabeled_shards(more, n_shards=2, per_shard=10, seed=1):
        Path(path).rename(Path(path).with_name("v" + Path(path).name[1:]))
    before = {p.name: p.read_bytes() for p in labeled["labels"].glob("*.parquet")}
    _full_disk(monkeypatch, files.pq, "write_table")
    code, _, err = run_cli(
        f"-q label --teacher {labeled['teacher']} --shards {more} --out {labeled['labels']} "
        "--k 3 --executor local".split(),
        capsys,
    )
    line = _one_error_line(code, err)
    assert "no space left" in line and "finished outputs are intact" in line
    after = {p.name: p.read_bytes() for p in labeled["labels"].glob("*.parquet")}
    assert after == before  # nothing half-written, nothing lost
    assert not list(labeled["labels"].glob(".*.tmp"))


def test_full_disk_on_a_real_tmpfs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Label and train into a 200 KB tmpfs until it is full (needs permission to mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shards = tmp_path / "u"
        shards.mkdir()
        write_unlabeled_shards(shards, n_shards=20, per_shard=200, size=28)
        teacher = make_teacher(tmp_path / "t.pt", size=28)
        out = mnt / "labels"
        code, _, err = run_cli(
            f"-q label --teacher {teacher} --shards {shards} --out {out} --k 4 --embeddings "
            "--executor local".split(),
            capsys,
        )
        assert "no space left" in _one_error_line(code, err)
        for path in label_files(out):  # every finished file is whole
            assert pq.read_table(path).num_rows == 200
        assert not list(out.glob(".*.tmp"))
        images, labels = separable_images(8, 4, 28, seed=0)
        write_labeled_shards(tmp_path, "l", images, labels, per_shard=32)
        (mnt / "filler").write_bytes(b"\0" * (os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize))
        code, _, err = run_cli(
            f"-q train --data {tmp_path}/l-000000.tar --out {mnt / 'train'} --steps 2 "
            "--num-classes 4 --arch cnn_deep --executor local".split(),
            capsys,
        )
        assert "no space left" in _one_error_line(code, err)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_adding_shards_extends_the_recorded_sources(
    labeled: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    more = labeled["shards"].parent / "more"
    more.mkdir()
    write_unlabeled_shards(more, n_shards=1, per_shard=5, seed=3)
    (more / "u-000000.tar").rename(more / "v-000000.tar")
    code, _, err = run_cli(
        f"-q label --teacher {labeled['teacher']} --shards {more} --out {labeled['labels']} "
        "--k 3 --executor local".split(),
        capsys,
    )
    assert code == 0, err
    assert recorded_shard_spec(labeled["labels"]) == f"{labeled['shards']},{more}"
    both = ["u-000000.tar", "u-000001.tar", "v-000000.tar"]
    assert sorted(shard_locations(labeled["labels"])) == both
    # A selection of the directory finds the images of both specs too.
    sel = labeled["labels"].parent / "sel"
    code, _, err = run_cli(
        f"-q select --labels {labeled['labels']} --out {sel} --per-class 3 --top-p 2 "
        "--executor local".split(),
        capsys,
    )
    assert code == 0, err
    assert sorted(selection_locations(sel)) == both


def test_a_refused_rerun_writes_nothing(
    labeled: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_teacher(tmp_path / "other.pt", seed=1)
    before = {p.name: p.read_bytes() for p in labeled["labels"].iterdir()}
    code, _, err = run_cli(
        f"label --teacher {other} --shards {labeled['shards']} --out {labeled['labels']} "
        "--k 3 --executor local".split(),
        capsys,
    )
    _one_error_line(code, err)
    assert {p.name: p.read_bytes() for p in labeled["labels"].iterdir()} == before


def test_a_second_labeler_is_refused_and_a_dead_ones_lock_taken_over(
    labeled: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    lock = labeled["labels"] / ".label.lock"
    argv = (
        f"-q label --teacher {labeled['teacher']} --shards {labeled['shards']} "
        f"--out {labeled['labels']} --k 3 --executor local"
    ).split()
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": live.pid}))
        code, _, err = run_cli(argv, capsys)
        assert f"pid {live.pid}" in _one_error_line(code, err)
    finally:
        live.kill()
        live.wait()
    # The holder is gone (killed): its lock no longer blocks the rerun.
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert not lock.exists()


def test_full_disk_error_names_the_directory() -> None:
    from ssl_kd.errors import environment_error

    err = environment_error(OSError(errno.ENOSPC, "No space left", "/data/out/.x.parquet.tmp"))
    assert err is not None and "(writing in /data/out)" in str(err)
    assert environment_error(OSError(errno.ENOENT, "missing")) is None


def test_a_run_directory_given_as_checkpoint_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["evaluate", "--checkpoint", str(tmp_path), "--data", "x.tar"], capsys)
    assert "checkpoint.pt" in _one_error_line(code, err)

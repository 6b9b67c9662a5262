"""Every stage end to end with every path in a real S3-compatible server on loopback.

Credentials reach the SDK through the environment only; the tests check that the secret never
shows in any output or stored object, and that nothing is written to the local disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import S3_SECRET, make_teacher, run_cli, separable_images

from ssl_kd import storage
from ssl_kd.models.checkpoint import load_checkpoint
from ssl_kd.shards import array_samples, write_shards


def _write_data(bucket: str) -> dict[str, str]:
    """Labeled train/test shards (4 classes, 16x16) and unlabeled shards, straight to S3."""
    train_x, train_y = separable_images(16, 4, 16, seed=1)
    test_x, test_y = separable_images(8, 4, 16, seed=2)
    pool_x, _ = separable_images(20, 4, 16, seed=3)
    root = storage.join(bucket, "data")
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y), ("u", pool_x, None)):
        keys = [f"{name}-{i:04d}" for i in range(len(x))]
        write_shards(array_samples(x, y, keys), storage.join(root, name, f"{name}-%06d.tar"), 30)
    return {k: storage.join(root, k) for k in ("train", "test", "u")}


def _objects(bucket: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(bucket)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {
        i.path: storage.read_bytes(f"s3://{i.path}") for i in infos if i.type == pafs.FileType.File
    }


def test_pipeline_stages_on_s3(
    s3: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths would land here: nothing may
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    data = _write_data(s3)
    run = storage.join(s3, "run")
    common = ["--num-classes", "4", "--batch-size", "16"]
    printed = []

    def cli(*argv: str) -> str:
        code, out, err = run_cli(list(argv), capsys)
        printed.append(out + err)
        assert code == 0, err
        return out

    cli(
        "train",
        "--data",
        data["train"],
        "--val-data",
        data["test"],
        "--out",
        f"{run}/teacher",
        "--arch",
        "cnn",
        "--width",
        "0.5",
        "--steps",
        "40",
        "--lr",
        "0.05",
        "--no-progress",
        *common,
    )
    teacher = f"{run}/teacher/checkpoint.pt"
    assert load_checkpoint(teacher)["step"] == 40

    label = ["label", "--teacher", teacher, "--shards", data["u"], "--out", f"{run}/labels"]
    label += ["--k", "2", "--executor", "local"]
    cli(*label)
    summary = json.loads(storage.read_text(f"{run}/labels/run_summary.json"))
    assert summary["labeled"] == 3 and summary["rows"] == 80 and not summary["failed"]
    label_files = storage.list_dir(f"{run}/labels", "*.parquet")
    assert summary["bytes"] == sum(storage.size(f) for f in label_files)
    labels = pq.read_table(f"{run}/labels/u-000000.parquet")
    assert labels.num_rows == 30 and labels.column("key")[0].as_py() == "u-0000"
    cli(*label)
    rerun = json.loads(storage.read_text(f"{run}/labels/run_summary.json"))
    assert rerun["already_done"] == 3 and rerun["labeled"] == 0  # a rerun relabels nothing

    cli(
        "select",
        "--labels",
        f"{run}/labels",
        "--out",
        f"{run}/selection",
        "--per-class",
        "10",
        "--top-p",
        "2",
        "--executor",
        "local",
    )
    selection = pq.read_table(f"{run}/selection/selection.parquet")
    report = json.loads(storage.read_text(f"{run}/selection/report.json"))
    assert selection.num_rows == sum(c["selected"] for c in report["per_class"]) > 0

    cli(
        "materialize",
        "--selection",
        f"{run}/selection",
        "--out",
        f"{run}/pseudo",
        "--samples-per-shard",
        "8",
        "--executor",
        "local",
    )
    manifest = json.loads(storage.read_text(f"{run}/pseudo/materialize.json"))
    shards = storage.list_dir(f"{run}/pseudo", "train-*.tar")
    assert [storage.name(s) for s in shards] == manifest["shards"]
    assert manifest["samples"] == selection.num_rows
    assert not storage.exists(f"{run}/pseudo/.buckets")  # spill objects removed

    cli(
        "pretrain",
        "--data",
        f"{run}/pseudo",
        "--out",
        f"{run}/student",
        "--arch",
        "cnn",
        "--width",
        "0.5",
        "--steps",
        "12",
        "--ckpt-every",
        "6",
        "--executor",
        "local",
        "--loss",
        "soft",
        *common,
    )
    cli(
        "finetune",
        "--data",
        data["train"],
        "--init",
        f"{run}/student/checkpoint.pt",
        "--out",
        f"{run}/finetune",
        "--steps",
        "6",
        "--executor",
        "local",
        *common,
    )
    metrics = storage.read_text(f"{run}/finetune/metrics.jsonl").splitlines()
    assert json.loads(metrics[-1])["step"] == 6

    cli(
        "evaluate",
        "--checkpoint",
        f"{run}/finetune/checkpoint.pt",
        "--data",
        data["test"],
        "--teacher",
        teacher,
        "--out",
        f"{run}/eval/metrics.json",
        "--latency",
        "false",
    )
    result = json.loads(storage.read_text(f"{run}/eval/metrics.json"))
    assert result["n"] == 32 and 0.0 <= result["top1"] <= 1.0

    out = cli("inspect", "labels", f"{run}/labels", "--json")
    assert json.loads(out)["rows"] == 80
    out = cli(
        "inspect",
        "selection",
        f"{run}/selection",
        "--contact-sheet",
        "0",
        "--out",
        str(tmp_path / "sheet.png"),
    )
    assert (tmp_path / "sheet.png").stat().st_size > 0

    # Nothing half-written or temporary remains, nothing went to the local disk, and the
    # secret is in no output, log record or stored object.
    objects = _objects(s3)
    assert not [k for k in objects if k.endswith(".tmp") or "/.buckets/" in k]
    assert os.listdir(work) == []
    assert not any(S3_SECRET in text for text in printed)
    assert S3_SECRET not in caplog.text
    assert not [k for k, v in objects.items() if S3_SECRET.encode() in v]
    stages = {k.split("/")[2] for k in objects if k.split("/")[1] == "run"}
    assert stages == {"teacher", "labels", "selection", "pseudo", "student", "finetune", "eval"}
    assert os.listdir(staging) == []  # every staged upload was cleaned up


@pytest.mark.slow
def test_ray_tasks_and_ray_train_on_s3(
    s3: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray label and materialize tasks, and two Ray Train workers, reading and writing S3; the
    workers get the credentials from the environment they inherit, as on a cluster node."""
    import ray

    data = _write_data(s3)
    run = storage.join(s3, "ray-run")
    teacher = str(make_teacher(f"{run}/teacher.pt"))  # type: ignore[arg-type]
    ray.shutdown()  # workers must start after the environment points at the test server
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        for argv in (
            [
                "label",
                "--teacher",
                teacher,
                "--shards",
                data["u"],
                "--out",
                f"{run}/labels",
                "--k",
                "2",
                "--executor",
                "ray",
                "--workers",
                "2",
            ],
            [
                "select",
                "--labels",
                f"{run}/labels",
                "--out",
                f"{run}/selection",
                "--per-class",
                "10",
                "--top-p",
                "2",
            ],
            [
                "materialize",
                "--selection",
                f"{run}/selection",
                "--out",
                f"{run}/pseudo",
                "--samples-per-shard",
                "8",
                "--executor",
                "ray",
            ],
            [
                "pretrain",
                "--data",
                f"{run}/pseudo",
                "--out",
                f"{run}/student",
                "--arch",
                "cnn",
                "--width",
                "0.5",
                "--steps",
                "6",
                "--ckpt-every",
                "3",
                "--batch-size",
                "8",
                "--num-classes",
                "4",
                "--executor",
                "ray",
                "--workers",
                "2",
            ],
        ):
            code, _, err = run_cli(argv, capsys)
            assert code == 0, err
            assert S3_SECRET not in err
    finally:
        ray.shutdown()
    summary = json.loads(storage.read_text(f"{run}/labels/run_summary.json"))
    assert summary["labeled"] == 3 and summary["rows"] == 80
    manifest = json.loads(storage.read_text(f"{run}/pseudo/materialize.json"))
    assert manifest["samples"] == pq.read_table(f"{run}/selection/selection.parquet").num_rows
    student = json.loads(storage.read_text(f"{run}/student/summary.json"))
    assert student["step"] == 6 and student["steps_per_rank"] == [6, 6]
    assert load_checkpoint(f"{run}/student/checkpoint.pt")["step"] == 6
    ray_checkpoints = [k for k in _objects(s3) if "/student/ray/" in k and k.endswith(".pt")]
    assert ray_checkpoints  # Ray Train kept its checkpoints in the bucket too


def test_whole_pipeline_into_a_bucket(
    s3: str, tmp_path: Path, fake_fmnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ssl-kd run --out s3://…``: the import, every stage, markers and results in the bucket;
    a rerun finds every stage done there."""
    from helpers import TINY

    from ssl_kd import config as cfglib
    from ssl_kd.pipeline.config import PipelineConfig
    from ssl_kd.pipeline.run import run_pipeline

    monkeypatch.chdir(tmp_path)
    run = storage.join(s3, "pipeline")
    cfg = cfglib.from_dict(
        PipelineConfig,
        {**TINY, "seeds": [0], "rounds": 2, "out": run, "source": str(fake_fmnist)},
    )
    first = run_pipeline(cfg, progress=False)
    assert {s["status"] for s in first["stages"]} == {"ran"}
    assert storage.is_file(f"{run}/data/dataset.json")
    assert storage.list_dir(f"{run}/data/unlabeled", "*.tar")
    assert storage.is_file(f"{run}/round2/seed0/finetune/checkpoint.pt")
    assert storage.read_bytes(f"{run}/results/results.png")[:4] == b"\x89PNG"
    doc = json.loads(storage.read_text(f"{run}/results/results.json"))
    assert [p["round"] for p in doc["selection_precision"]] == [1, 2]
    assert {(m["model"], m["round"]) for m in doc["models"]} >= {("finetuned", 2)}
    again = run_pipeline(cfg, progress=False)
    assert {s["status"] for s in again["stages"]} == {"skipped"}
    assert os.listdir(tmp_path) == ["fmnist"]  # the source only: nothing written locally


def test_weights_files_are_read_from_the_bucket(s3: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ssl_kd.models.weights_file import load_state_dict_file

    sd = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):  # each format, told apart by content
        storage.upload(tmp_path / name, f"{s3}/weights/{name}")
        got = load_state_dict_file(f"{s3}/weights/{name}")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name

"""Teacher labeling: labels equal in-process predictions, bad input recorded, reruns idempotent."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_teacher, write_plain_tar, write_unlabeled_shards

from ssl_kd.cli import main
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelSet
from ssl_kd.label.run import LabelConfig, format_problems, format_summary, run_label
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint
from ssl_kd.models.preprocess import Preprocess, fit_size, normalize
from ssl_kd.shards import ReadStats, encode_image, iter_samples
from ssl_kd.shards.reader import decode_image, image_bytes


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "shards").mkdir()
    write_unlabeled_shards(tmp_path / "shards", n_shards=3, per_shard=40)
    return {
        "teacher": make_teacher(tmp_path / "teacher.pt"),
        "shards": tmp_path / "shards",
        "out": tmp_path / "labels",
    }


def _cfg(setup: dict[str, Path], **kw: object) -> LabelConfig:
    base = LabelConfig(
        teacher=str(setup["teacher"]),
        shards=str(setup["shards"]),
        out=str(setup["out"]),
        k=3,
        temperature=2.0,
        embeddings=True,
        batch_size=16,
        executor="local",
        device="cpu",
    )
    return replace(base, **kw)


def _reference(teacher: Path, shards: Path, temperature: float) -> dict[str, tuple]:
    model, meta = model_from_checkpoint(load_checkpoint(teacher))
    model.eval()
    pp = Preprocess.from_dict(meta["preprocess"])
    out = {}
    for sample in iter_samples(sorted(str(p) for p in shards.glob("*.tar")), ReadStats()):
        x = normalize(fit_size(pp)(decode_image(image_bytes(sample), pp.channels))[None], pp)
        with torch.no_grad():
            feats = model.features(x)
            probs = torch.softmax(model.head(feats) / temperature, dim=1)[0]
        emb = torch.nn.functional.normalize(feats, dim=1)[0]
        out[sample["__key__"]] = (probs.numpy(), emb.numpy())
    return out


def test_labels_equal_in_process_predictions(setup: dict[str, Path]) -> None:
    summary = run_label(_cfg(setup), progress=False)
    assert summary["rows"] == 120 and summary["labeled"] == 3 and not summary["failed"]
    ref = _reference(setup["teacher"], setup["shards"], temperature=2.0)
    labels = LabelSet(setup["out"])
    assert labels.meta.k == 3 and labels.meta.temperature == 2.0
    assert labels.meta.embedding_dim > 0 and len(labels.meta.teacher_sha256) == 64
    rows = [r for b in labels.iter_batches() for r in b.to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(ref)
    for r in rows:
        probs, emb = ref[r["key"]]
        top = np.argsort(-probs)[:3]
        assert r["topk_class"][0] == top[0]
        np.testing.assert_allclose(r["topk_prob"], probs[r["topk_class"]], atol=1e-3)
        np.testing.assert_allclose(r["topk_prob"], probs[top], atol=1e-3)
        np.testing.assert_allclose(r["embedding"], emb, atol=2e-3)
        assert r["shard"].startswith("u-") and r["shard"].endswith(".tar")


def test_rerun_labels_nothing(setup: dict[str, Path]) -> None:
    run_label(_cfg(setup), progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in setup["out"].glob("*.parquet")}
    again = run_label(_cfg(setup), progress=False)
    assert again["already_done"] == 3 and again["labeled"] == 0 and again["rows"] == 0
    assert {p: p.stat().st_mtime_ns for p in setup["out"].glob("*.parquet")} == mtimes
    cfg = _cfg(setup)
    assert (
        format_summary(cfg, again) == f"nothing to label: all 3 shards already labeled in {cfg.out}"
    )
    assert format_problems(cfg, again) == []


def test_different_teacher_into_the_same_dir_is_refused(setup: dict[str, Path]) -> None:
    run_label(_cfg(setup), progress=False)
    other = make_teacher(setup["out"].parent / "other.pt", seed=1)
    with pytest.raises(UserError, match="teacher_sha256"):
        run_label(_cfg(setup, teacher=str(other)), progress=False)
    with pytest.raises(UserError, match="temperature"):
        run_label(_cfg(setup, temperature=1.0), progress=False)


def test_bad_input_is_recorded_and_the_rest_labeled(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    good = encode_image(np.full((16, 16), 99, np.uint8))
    write_plain_tar(
        d / "a-bad.tar",
        {
            "ok1.png": good,
            "broken.png": b"\x89PNG not really",
            "meta-only.json": b"{}",
            "nolabel.txt": b"caption without image",
            "ok2.png": good,
        },
    )
    write_plain_tar(
        d / "b-trunc.tar",
        {f"t{i}.png": encode_image(np.full((64, 64), i, np.uint8)) for i in range(6)},
    )
    data = (d / "b-trunc.tar").read_bytes()
    (d / "b-trunc.tar").write_bytes(data[:2000])
    write_plain_tar(d / "c-empty.tar", {})
    out = tmp_path / "labels"
    cfg = LabelConfig(
        teacher=str(make_teacher(tmp_path / "t.pt")),
        shards=str(d),
        out=str(out),
        executor="local",
        device="cpu",
        k=2,
    )
    summary = run_label(cfg, progress=False)
    assert summary["truncated_shards"] == ["b-trunc.tar"]
    assert summary["empty_shards"] == ["c-empty.tar"]
    assert pq.read_table(out / "a-bad.parquet").column("key").to_pylist() == ["ok1", "ok2"]
    assert pq.read_table(out / "c-empty.parquet").num_rows == 0
    errors = [json.loads(x) for x in (out / "a-bad.errors.jsonl").read_text().splitlines()]
    by_key = {e["key"]: e["reason"] for e in errors}
    assert set(by_key) == {"broken", "meta-only", "nolabel"}
    assert by_key["broken"].startswith("corrupt image")
    assert by_key["nolabel"].startswith("no image member")
    trunc = [json.loads(x) for x in (out / "b-trunc.errors.jsonl").read_text().splitlines()]
    assert trunc[0]["reason"].startswith("truncated tar")
    # Every shard's record streamed to the shard log as it finished.
    lines = (out / summary["shard_log"]).read_text().splitlines()
    per_shard = {s["shard"]: s for s in map(json.loads, lines)}
    assert set(per_shard) == {"a-bad.tar", "b-trunc.tar", "c-empty.tar"}
    assert per_shard["a-bad.tar"]["skipped"] == 3 and per_shard["b-trunc.tar"]["truncated"]
    assert per_shard["a-bad.tar"]["reasons"] == {"corrupt image": 1, "no image member": 2}


def test_img2dataset_rgb_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    members = {}
    for i in range(5):
        key = f"{i:09d}"
        members[f"{key}.jpg"] = encode_image(rng.integers(0, 255, (20, 24, 3), np.uint8), "jpeg")
        members[f"{key}.json"] = json.dumps({"key": key, "status": "success"}).encode()
        members[f"{key}.txt"] = b"a caption"
    (tmp_path / "s").mkdir()
    write_plain_tar(tmp_path / "s" / "00000.tar", members)
    teacher = make_teacher(tmp_path / "t.pt", arch="resnet18", channels=3, size=16, num_classes=5)
    cfg = LabelConfig(
        teacher=str(teacher),
        shards=str(tmp_path / "s"),
        out=str(tmp_path / "l"),
        executor="local",
        device="cpu",
        k=5,
    )
    assert run_label(cfg, progress=False)["rows"] == 5
    table = pq.read_table(tmp_path / "l" / "00000.parquet")
    assert table.column("key").to_pylist() == [f"{i:09d}" for i in range(5)]
    assert all(abs(sum(p) - 1) < 5e-3 for p in table.column("topk_prob").to_pylist())


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_teacher_or_spec_exits_2_and_writes_nothing(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = setup["out"]
    base = ["-q", "label", "--out", str(out), "--executor", "local"]
    shards = ["--shards", str(setup["shards"])]
    teacher = ["--teacher", str(setup["teacher"])]
    cases = [
        ([*base, *shards, "--teacher", str(out.parent / "missing.pt")], "does not exist"),
        ([*base, *shards, *teacher, "--k", "9"], "does not fit the teacher's 4 classes"),
        ([*base, "--shards", str(out.parent / "none-*.tar"), *teacher], "matched no files"),
    ]
    ckpt = load_checkpoint(setup["teacher"])
    ckpt["meta"]["preprocess"]["channels"] = 3  # weights expect 1 channel
    torch.save(ckpt, out.parent / "misfit.pt")
    cases.append(([*base, *shards, "--teacher", str(out.parent / "misfit.pt")], "do not fit"))
    for argv, fragment in cases:
        code, err = _cli(argv, capsys)
        assert code == 2, argv
        lines = [ln for ln in err.splitlines() if ln.startswith("ssl-kd: error:")]
        assert len(lines) == 1 and fragment in lines[0], err
        assert not out.exists()


@pytest.mark.slow
def test_ray_executor_equals_local(setup: dict[str, Path], tmp_path: Path) -> None:
    local = run_label(_cfg(setup, out=str(tmp_path / "local")), progress=False)
    distributed = run_label(_cfg(setup, out=str(tmp_path / "ray"), executor="ray"), progress=False)
    assert distributed["rows"] == local["rows"] == 120
    for path in sorted((tmp_path / "local").glob("*.parquet")):
        assert pq.read_table(path).equals(pq.read_table(tmp_path / "ray" / path.name))


def test_readme_duckdb_query_runs_on_label_files(setup: dict[str, Path]) -> None:
    duckdb = pytest.importorskip("duckdb")
    run_label(_cfg(setup, embeddings=False), progress=False)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    query = readme.split('duckdb.sql("""', 1)[1].split('""")', 1)[0]
    rows = duckdb.sql(query.replace("runs/demo/round1/labels", str(setup["out"]))).fetchall()
    assert sum(n for _, n, _ in rows) == 120
    assert all(0 < conf <= 1 for _, _, conf in rows)


@pytest.mark.slow  # a subprocess that imports torch
def test_job_entrypoint(setup: dict[str, Path]) -> None:
    import subprocess
    import sys

    job = Path(__file__).parents[1] / "jobs" / "label.py"
    done = subprocess.run(
        [
            sys.executable,
            str(job),
            "--teacher",
            str(setup["teacher"]),
            "--shards",
            str(setup["shards"]),
            "--out",
            str(setup["out"]),
            "--executor",
            "local",
            "--k",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "labeled 3 shards" in done.stdout
    assert LabelSet(setup["out"]).num_rows == 120

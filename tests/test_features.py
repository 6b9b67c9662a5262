"""Feature distillation: the teacher's embeddings from the labels through selection and
materialisation to the reader, the feature loss by hand, a student that learns them, bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import make_teacher, separable_images, write_unlabeled_shards

from ssl_kd.cli import main
from ssl_kd.errors import UserError
from ssl_kd.evaluate.cka import linear_cka
from ssl_kd.label.files import fixed_list
from ssl_kd.label.run import LabelConfig, run_label
from ssl_kd.materialize.run import MaterializeConfig, run_materialize
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint
from ssl_kd.models.preprocess import Preprocess, normalize
from ssl_kd.select.run import SelectConfig, run_select
from ssl_kd.shards import ReadStats, array_samples, expand_shards, iter_samples, write_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.shards.soft_label import decode_embedding, encode_embedding
from ssl_kd.train.fault_hooks import FAIL_ONCE_ENV
from ssl_kd.train.features import FeatureDistiller, feature_distance, with_feature_loss
from ssl_kd.train.losses import joint_loss, student_loss
from ssl_kd.train.options import StudentConfig
from ssl_kd.train.run import run_student

C = 4


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """192 noise images labeled with embeddings by a random cnn, all selected (top-1)."""
    root = tmp_path_factory.mktemp("features")
    (root / "shards").mkdir()
    write_unlabeled_shards(root / "shards", n_shards=3, per_shard=64, seed=7)
    labels = LabelConfig(
        teacher=str(make_teacher(root / "teacher.pt", arch="cnn_deep")),
        shards=str(root / "shards"),
        out=str(root / "labels"),
        k=3,
        embeddings=True,
        executor="local",
        device="cpu",
    )
    run_label(labels, progress=False)
    select = SelectConfig(
        labels=str(root / "labels"), out=str(root / "sel"), per_class=192, top_p=1
    )
    run_select(replace(select, executor="local"))
    materialize = MaterializeConfig(
        selection=str(root / "sel"), out=str(root / "pseudo"), samples_per_shard=64
    )
    run_materialize(replace(materialize, executor="local"), progress=False)
    return {"root": root, "labels": root / "labels", "sel": root / "sel", "pseudo": root / "pseudo"}


def _label_embeddings(labels: Path) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for path in sorted(labels.glob("*.parquet")):
        t = pq.read_table(path)
        emb = fixed_list(t.column("embedding"), t.num_rows)
        for shard, key, e in zip(t["shard"].to_pylist(), t["key"].to_pylist(), emb, strict=True):
            out[shard, key] = e
    return out


def test_embeddings_travel_from_labels_to_the_reader(pseudo: dict[str, Path]) -> None:
    stored = _label_embeddings(pseudo["labels"])
    dim = next(iter(stored.values())).shape[0]
    assert dim > 0 and len(stored) == 192

    selection = pq.read_table(pseudo["sel"] / "selection.parquet")
    assert selection.schema.field("embedding").type.list_size == dim
    sel_emb = fixed_list(selection.column("embedding"), selection.num_rows)
    for shard, key, e in zip(
        selection["shard"].to_pylist(), selection["key"].to_pylist(), sel_emb, strict=True
    ):
        assert np.array_equal(e, stored[shard, key])

    info = json.loads((pseudo["pseudo"] / "dataset.json").read_text())
    assert info["embedding"]["dim"] == dim and info["embedding"]["dtype"] == "float16"
    samples = list(iter_samples(expand_shards(str(pseudo["pseudo"])), ReadStats()))
    assert len(samples) == 192
    for s in samples:
        meta = json.loads(s["json"])
        want = stored[meta["source_shard"], meta["source_key"]]
        assert s["emb"] == want.astype("<f2").tobytes()  # the float16 bytes, unchanged
        assert np.array_equal(decode_embedding(s, dim), want.astype(np.float32))

    ds = ShardImageDataset(
        expand_shards(str(pseudo["pseudo"])),
        lambda x: x,
        channels=1,
        num_classes=C,
        soft_k=3,
        embedding_dim=dim,
        with_keys=True,
    )
    items = list(ds)
    assert len(items) == 192 and ds.stats.skipped == 0
    by_key = {s["__key__"]: s for s in samples}
    for key, _, target in items:
        meta = json.loads(by_key[key]["json"])
        assert set(target) == {"label", "topk_class", "topk_prob", "embedding"}
        want = stored[meta["source_shard"], meta["source_key"]].astype(np.float32)
        assert np.array_equal(target["embedding"], want)
        assert target["label"] == meta["class"]


def test_embedding_member_round_trip_and_bad_sizes() -> None:
    e = np.array([0.6, -0.8, 0.0], np.float32)
    raw = encode_embedding(e)
    assert len(raw) == 6
    assert np.array_equal(decode_embedding({"emb": raw}, 3), e.astype(np.float16))
    from ssl_kd.shards.skips import SampleError

    with pytest.raises(SampleError, match=r"6 bytes, expected 8 \(4 float16\)"):
        decode_embedding({"emb": raw}, 4)
    with pytest.raises(SampleError, match=r"no \.emb member"):
        decode_embedding({}, 3)


def test_feature_loss_against_hand_computation() -> None:
    projected = torch.tensor([[1.0, 2.0, 2.0], [0.0, -1.0, 0.0], [3.0, 0.0, 4.0]])
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.6, 0.0, 0.8]])
    # cos: (1/3), (-0.6), (0.6*3 + 0.8*4)/5 = 1.0
    cosine = ((1 - 1 / 3) + (1 + 0.6) + (1 - 1.0)) / 3
    assert feature_distance("cosine", projected, emb).item() == pytest.approx(cosine, 1e-6)
    # squared distances: 0+4+4, 0+2.56+0.64, 5.76+0+10.24
    assert feature_distance("mse", projected, emb).item() == pytest.approx((8 + 3.2 + 16) / 3, 1e-6)
    with pytest.raises(ValueError, match="cosine, mse"):
        feature_distance("l1", projected, emb)

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1, 3])
    base = student_loss("hard")
    targets = {"label": labels, "embedding": emb, "student_features": projected}
    parts = with_feature_loss(base, "cosine", 0.5)(logits, targets)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    assert parts["ce"].item() == pytest.approx(ce, 1e-6)
    assert parts["feature"].item() == pytest.approx(cosine, 1e-6)
    assert parts["loss"].item() == pytest.approx(ce + 0.5 * cosine, 1e-6)

    # Joint training: the last image is true-labeled and has no embedding.
    joint = with_feature_loss(joint_loss(base, 1), "mse", 2.0)
    targets = {
        "label": labels[:2],
        "true_label": labels[2:],
        "embedding": emb[:2],
        "student_features": projected,
    }
    parts = joint(logits, targets)
    assert parts["feature"].item() == pytest.approx((8 + 3.2) / 2, 1e-6)
    first = torch.nn.functional.cross_entropy(logits[:2], labels[:2]).item()
    last = torch.nn.functional.cross_entropy(logits[2:], labels[2:]).item()
    assert parts["loss"].item() == pytest.approx((2 * first + last) / 3 + 2 * 5.6, 1e-5)


def test_distiller_logits_are_the_students() -> None:
    from ssl_kd.models.registry import create_model

    torch.manual_seed(0)
    student = create_model("cnn", C, 1, 16, 0.5, dropout=0.3).eval()
    distiller = FeatureDistiller(student, 24).eval()
    x = torch.randn(5, 1, 16, 16)
    logits, projected = distiller(x)
    assert torch.equal(logits, student(x)) and projected.shape == (5, 24)


def _cfg(pseudo: dict[str, Path], out: Path, **kw: object) -> StudentConfig:
    base = StudentConfig(
        data=str(pseudo["pseudo"]),
        out=str(out),
        arch="cnn",
        width=0.5,
        loss="soft",
        temperature=2.0,
        steps=40,
        batch_size=32,
        lr=0.05,
        warmup_steps=2,
        ckpt_every=20,
        log_every=10,
        shuffle_buffer=64,
        executor="local",
        device="cpu",
    )
    return replace(base, **kw)


def write_designed(root: Path, dim: int = 8) -> Path:
    """Pseudo-labeled shards whose stored embeddings carry what the labels do not: the images'
    class is a horizontal band, and half of them also have a faint checkerboard on the left,
    which moves the embedding (``u[class] ± 1.5 v``) but not the soft label."""
    root.mkdir(parents=True)
    images, labels = separable_images(64, C, 16, seed=5)
    rng = np.random.default_rng(1)
    bit = rng.integers(0, 2, len(images))
    checker = np.indices((16, 16)).sum(0) % 2 == 0
    checker[:, 8:] = False
    images = images.astype(np.int64)
    images[bit == 1] += 80 * checker
    u, v = rng.normal(size=(C, dim)), rng.normal(size=dim)
    emb = u[labels] + 1.5 * (2 * bit[:, None] - 1) * v
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"s-{i:05d}" for i in range(len(images))]
    samples = []
    pixels = np.clip(images, 0, 255).astype(np.uint8)
    for sample, label, e in zip(array_samples(pixels, labels, keys), labels, emb, strict=True):
        others = [c for c in range(C) if c != label][:2]
        soft = {"topk_class": [int(label), *others], "topk_prob": [0.8, 0.15, 0.05]}
        members = {"json": json.dumps(soft).encode(), "emb": encode_embedding(e)}
        samples.append({**sample, **members})
    write_shards(iter(samples), str(root / "train-%06d.tar"), 64)
    info = {
        "classes": [f"c{i}" for i in range(C)],
        "soft_label": {"k": 3, "temperature": 1.0},
        "embedding": {"dim": dim, "member": "emb", "dtype": "float16", "normalized": True},
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _similarity(checkpoint: Path, shards: Path, dim: int) -> tuple[float, float]:
    """How much of the stored embeddings a student's penultimate features carry: their linear
    CKA, and the mean cosine similarity of the best linear map of the features (least squares
    on half the images, measured on the others; both sides centred, so that a bias alone
    scores nothing)."""
    model, meta = model_from_checkpoint(load_checkpoint(checkpoint))
    pp = Preprocess.from_dict(meta["preprocess"])
    ds = ShardImageDataset(
        expand_shards(str(shards)), lambda x: x, 1, num_classes=C, soft_k=1, embedding_dim=dim
    )
    images, targets = zip(*list(ds), strict=True)
    with torch.no_grad():
        feats = model.eval().features(normalize(torch.stack(images), pp)).double()
    emb = torch.tensor(np.stack([t["embedding"] for t in targets])).double()
    cka = linear_cka(feats, emb)
    design = np.hstack([feats.numpy(), np.ones((len(feats), 1))])
    centred = emb.numpy() - emb.numpy().mean(0)
    fit = np.arange(len(design)) % 2 == 0
    w, *_ = np.linalg.lstsq(design[fit], centred[fit], rcond=None)
    pred, want = design[~fit] @ w, centred[~fit]
    cos = (pred * want).sum(1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(want, axis=1))
    return cka, float(cos.mean())


def test_feature_loss_drives_the_students_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    designed = {"pseudo": write_designed(tmp_path / "designed")}
    plain = run_student(_cfg(designed, tmp_path / "plain"), progress=False)
    cfg = _cfg(designed, tmp_path / "feat", feature_loss="cosine", feature_weight=5.0)
    feat = run_student(cfg, progress=False)
    assert plain["embedding_dim"] == 0 and feat["embedding_dim"] == 8
    assert feat["feature_loss"] == "cosine"
    lines = [json.loads(x) for x in (tmp_path / "feat" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kd", "feature"} <= set(lines[0])
    assert lines[-1]["feature"] < lines[0]["feature"] / 3  # it learns the embeddings
    ckpt = load_checkpoint(tmp_path / "feat" / "checkpoint.pt")
    assert "projection" not in ckpt  # dropped: the student is the plain classifier
    model_from_checkpoint(ckpt)  # and loads like any other

    cka_feat, cos_feat = _similarity(tmp_path / "feat" / "checkpoint.pt", designed["pseudo"], 8)
    cka_plain, cos_plain = _similarity(tmp_path / "plain" / "checkpoint.pt", designed["pseudo"], 8)
    assert cka_feat > cka_plain + 0.3, (cka_feat, cka_plain)
    assert 1 - cos_feat < (1 - cos_plain) / 5, (cos_feat, cos_plain)

    # Kept on request; the projection resumes with the rest, to the same weights.
    kept = replace(cfg, out=str(tmp_path / "kept"), keep_projection=True)
    monkeypatch.setenv(FAIL_ONCE_ENV, f"{tmp_path / 'failed'}:30")  # after the step-20 checkpoint
    with pytest.raises(RuntimeError, match="injected failure"):
        run_student(kept, progress=False)
    assert run_student(kept, progress=False)["resumed_at"] == 20
    a, b = ckpt, load_checkpoint(tmp_path / "kept" / "checkpoint.pt")
    feature_dim = model_from_checkpoint(b)[0].feature_dim
    assert b["projection"]["weight"].shape == (8, feature_dim)
    for name in a["model"]:
        assert torch.allclose(a["model"][name].float(), b["model"][name].float(), atol=1e-6)


def test_bad_input_is_one_error_line(
    pseudo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Shards without embeddings: the same images with the emb members left out.
    bare = tmp_path / "bare"
    bare.mkdir()
    samples = iter_samples(expand_shards(str(pseudo["pseudo"])), ReadStats())
    write_shards(
        ({k: v for k, v in s.items() if k not in ("emb", "__url__")} for s in samples),
        str(bare / "train-%06d.tar"),
        64,
    )
    info = json.loads((pseudo["pseudo"] / "dataset.json").read_text())
    (bare / "dataset.json").write_text(
        json.dumps({k: v for k, v in info.items() if k != "embedding"})
    )
    # Shards whose dataset.json names another dimension than the members hold.
    wrong = tmp_path / "wrong"
    shutil.copytree(pseudo["pseudo"], wrong)
    info["embedding"]["dim"] = 7
    (wrong / "dataset.json").write_text(json.dumps(info))

    for data, expected in (
        (bare, "needs the teacher's embeddings"),
        (wrong, "where dataset.json says 7-d"),
    ):
        argv = ["pretrain", "--data", str(data), "--out", str(tmp_path / "out"), "--loss", "soft"]
        assert main([*argv, "--executor", "local", "--feature-loss", "cosine"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, err
        assert expected in err, err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="feature_weight"):
        from ssl_kd import config as cfglib

        cfglib.from_dict(StudentConfig, {"data": "x", "out": "y", "feature_weight": 0})


@pytest.mark.slow
def test_two_ddp_ranks_distil_features(tmp_path: Path) -> None:
    """The distiller (logits and projected features from one forward) under DDP over gloo."""
    import ray

    designed = {"pseudo": write_designed(tmp_path / "designed")}
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = _cfg(designed, tmp_path / "ray", executor="ray", workers=2, steps=6, ckpt_every=3)
        s = run_student(replace(cfg, feature_loss="mse", feature_weight=1.0), progress=False)
    finally:
        ray.shutdown()
    assert s["step"] == 6 and s["steps_per_rank"] == [6, 6] and s["embedding_dim"] == 8
    lines = [json.loads(x) for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["feature"]) for line in lines if "feature" in line)
    assert "projection" not in load_checkpoint(tmp_path / "ray" / "checkpoint.pt")

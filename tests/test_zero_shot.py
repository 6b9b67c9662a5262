"""Zero-shot CLIP teachers (open_clip): a tiny randomly initialised CLIP, saved to a local
weights file, gives the logits of CLIP's own zero-shot computation, labels shards with
embeddings, and starts an ``ssl-kd run`` without being trained; bad input is one line."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY, run_cli, write_mixed_shards
from torchvision.transforms import v2

from ssl_kd import config as cfglib
from ssl_kd.errors import UserError
from ssl_kd.label.files import label_files, read_meta
from ssl_kd.models.checkpoint import load_checkpoint, save_checkpoint
from ssl_kd.models.external import TeacherSpec, load_teacher, teacher_checkpoint
from ssl_kd.models.zero_shot import DEFAULT_TEMPLATES
from ssl_kd.shards.decode import decode_image

ARCH = "TinyCLIP"
SIZE = 32
CLASSES = ["cat", "dog", "car", "tree"]
# The smallest CLIP that open_clip builds: one block per tower, 16-d embeddings, 32 px images.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def clip_files(tmp_path: Path) -> dict[str, str]:
    """A model config .json, random weights (logit scale 30, not the init's 1/0.07) and the
    class names."""
    config = tmp_path / f"{ARCH}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    torch.save(model.state_dict(), tmp_path / "tiny_clip.pt")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {
        "config": str(config),
        "weights": str(tmp_path / "tiny_clip.pt"),
        "class_names": str(tmp_path / "classes.txt"),
    }


def _clip_logits(weights: str, x: torch.Tensor, templates: list[str]) -> tuple:
    """open_clip's own zero-shot computation: normalised image features, and logit scale x
    their product with the averaged, renormalised text embeddings of each class's prompts."""
    model = open_clip.create_model(ARCH, pretrained=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    tokenizer = open_clip.get_tokenizer(ARCH)
    with torch.no_grad():
        rows = []
        for name in CLASSES:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True)
            mean = emb.mean(0)
            rows.append(mean / mean.norm())
        text = torch.stack(rows)
        image = model.encode_image(x, normalize=True)
        return model.logit_scale.exp() * image @ text.T, image


@pytest.mark.parametrize("prompts", [None, ["a photo of a {}.", "a {} in the wild"]])
def test_logits_are_clips_zero_shot_logits(
    clip_files: dict[str, str], tmp_path: Path, prompts: list[str] | None
) -> None:
    path = None
    if prompts:
        path = tmp_path / "prompts.txt"
        path.write_text("\n".join(prompts) + "\n")
    spec = TeacherSpec(
        f"open_clip:{clip_files['config']}",
        weights=clip_files["weights"],
        class_names=clip_files["class_names"],
        prompts=str(path) if path else None,
    )
    loaded = load_teacher(spec)
    x = torch.randn(5, 3, SIZE, SIZE)
    want, image = _clip_logits(clip_files["weights"], x, prompts or list(DEFAULT_TEMPLATES))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded.model.features(x), image, atol=1e-5, rtol=1e-5)
    assert loaded.has_features and loaded.meta["arch"] == f"open_clip:{ARCH}"
    assert loaded.source["templates"] == (prompts or list(DEFAULT_TEMPLATES))
    # CLIP's own input transform: the tower's size, no extra margin, bicubic, OpenAI's statistics.
    assert loaded.meta["preprocess"] == {
        "channels": 3,
        "image_size": SIZE,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "resize": 0,
        "interpolation": "bicubic",
    }

    # Imported into a checkpoint, the image tower and head are copied in: same logits again.
    ckpt = tmp_path / "imported.pt"
    save_checkpoint(ckpt, teacher_checkpoint(loaded, {}))
    again = load_teacher(TeacherSpec(str(ckpt)))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), want, atol=1e-4, rtol=1e-4)
    assert not any(k.startswith("text") for k in load_checkpoint(ckpt)["model"])


def _images(shard_dir: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[m.name.rsplit(".", 1)[0]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


def test_labels_a_shard_with_embeddings(
    clip_files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "u"
    shards.mkdir()
    write_mixed_shards(shards, "u", 8, 8)
    keep = tmp_path / "keep.txt"
    keep.write_text("car\ncat\n")
    out = tmp_path / "labels"
    argv = ["label", "--teacher", f"open_clip:{clip_files['config']}"]
    argv += ["--weights", clip_files["weights"], "--class-names", clip_files["class_names"]]
    argv += ["--keep-classes", str(keep), "--embeddings", "--k", "2", "--shards", str(shards)]
    code, _, err = run_cli([*argv, "--out", str(out), "--executor", "local"], capsys)
    assert code == 0, err

    table = pq.read_table(label_files(out)[0]).to_pydict()
    images = _images(shards)
    assert sorted(table["key"]) == sorted(images)
    prepare = v2.Compose(
        [
            v2.Resize(SIZE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(SIZE),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        ]
    )
    x = torch.stack([prepare(decode_image(images[k], 3, size=SIZE)) for k in table["key"]])
    logits, image = _clip_logits(clip_files["weights"], x, list(DEFAULT_TEMPLATES))
    probs = torch.softmax(logits[:, [2, 0]].double(), 1).numpy()  # car, cat
    got = np.zeros_like(probs)
    np.put_along_axis(got, np.array(table["topk_class"]), np.array(table["topk_prob"]), axis=1)
    np.testing.assert_allclose(got, probs, atol=2e-3)
    emb = np.array(table["embedding"], dtype=np.float32)
    assert emb.shape == (8, 16)
    np.testing.assert_allclose(emb, image.numpy(), atol=3e-3)  # float16, as stored

    meta = read_meta(label_files(out)[0])
    assert meta.classes == ["car", "cat"] and meta.teacher_arch == f"open_clip:{ARCH}"
    digest = hashlib.sha256(Path(clip_files["weights"]).read_bytes()).hexdigest()
    assert meta.teacher_sha256 == digest and meta.embedding_dim == 16
    teacher = meta.extra["teacher"]
    assert teacher["source"] == "open_clip" and teacher["weights"] == "tiny_clip.pt"
    assert teacher["kept_classes"] == [2, 0] and teacher["templates"] == list(DEFAULT_TEMPLATES)


def test_run_starts_from_a_zero_shot_teacher(clip_files: dict[str, str], tmp_path: Path) -> None:
    from ssl_kd.pipeline.config import PipelineConfig
    from ssl_kd.pipeline.run import run_pipeline

    splits = {}
    for split, n, labeled in (("labeled", 16, True), ("unlabeled", 40, False), ("test", 12, True)):
        root = tmp_path / split
        root.mkdir()
        write_mixed_shards(root, split, n, 10, len(CLASSES) if labeled else None, seed=len(split))
        splits[split] = str(root)
    teacher = {"source": f"open_clip:{clip_files['config']}", **clip_files}
    del teacher["config"]
    student = {"arch": "cnn", "image_size": SIZE}
    data = {
        **TINY,
        **splits,
        "out": str(tmp_path / "run"),
        "seeds": [0],
        "class_names": clip_files["class_names"],
        "teacher": teacher,
        "label": {"k": 2, "batch_size": 16, "embeddings": True},
        "select": {"per_class": 5, "top_p": 2},
        "pretrain": {**TINY["pretrain"], **student},
        "baseline": {**TINY["baseline"], "image_size": SIZE},
    }
    summary = run_pipeline(cfglib.from_dict(PipelineConfig, data), progress=False)
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert all(v == "ran" for v in statuses.values()), statuses

    run = tmp_path / "run"
    meta = load_checkpoint(run / "teacher" / "checkpoint.pt")["meta"]
    assert meta["arch"] == f"open_clip:{ARCH}" and meta["classes"] == CLASSES
    assert meta["open_clip"]["embed_dim"] == 16
    assert not (run / "teacher" / "metrics.jsonl").exists()  # imported, not trained
    labels = label_files(run / "round1" / "labels")
    assert read_meta(labels[0]).extra["teacher"]["source"] == "open_clip"
    assert pq.read_schema(labels[0]).field("embedding").type.list_size == 16
    assert (run / "round1" / "selection").is_dir()


def _bad_inputs(clip_files: dict[str, str], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    teacher = ["--teacher", f"open_clip:{clip_files['config']}"]
    full = [*teacher, "--weights", clip_files["weights"]]
    full += ["--class-names", clip_files["class_names"]]
    no_slot = tmp_path / "no_slot.txt"
    no_slot.write_text("a photo of a {}.\na photo of a cat\n")
    other = tmp_path / "Other.json"
    other.write_text(json.dumps({**TINY_CLIP, "embed_dim": 8}))
    return {
        "no class names": ([*teacher, "--weights", clip_files["weights"]], "--class-names FILE"),
        "no weights": ([*teacher, "--class-names", clip_files["class_names"]], "--weights FILE"),
        "prompt without slot": (
            [*full, "--prompts", str(no_slot)],
            "'a photo of a cat' is not a template",
        ),
        "weights of another config": (
            [*full[:1], f"open_clip:{other}", *full[2:]],
            "do not fit open_clip:Other",
        ),
        "unknown arch": ([*full[:1], "open_clip:ViT-B-33", *full[2:]], "open_clip:ViT-B-32"),
        "hub name": ([*full[:1], "open_clip:hf-hub:org/model", *full[2:]], "nothing is down"),
        "image size": ([*full, "--image-size", "64"], "--image-size does not apply"),
    }


def test_bad_zero_shot_teachers_are_one_line_errors(
    clip_files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "u"
    shards.mkdir()
    write_mixed_shards(shards, "u", 2, 2)
    for case, (teacher_args, expected) in _bad_inputs(clip_files, tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        argv = ["label", *teacher_args, "--shards", str(shards), "--out", str(out), "--k", "2"]
        code, _, err = run_cli([*argv, "--executor", "local"], capsys)
        assert code == 2, (case, err)
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, (case, err)
        assert expected in err, (case, err)


def test_missing_open_clip_says_how_to_install_it(
    clip_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    spec = TeacherSpec(
        f"open_clip:{clip_files['config']}",
        weights=clip_files["weights"],
        class_names=clip_files["class_names"],
    )
    with pytest.raises(UserError, match=r"pip install 'ssl_kd\[clip\]'") as err:
        load_teacher(spec)
    assert "\n" not in str(err.value)


def test_an_open_clip_without_its_tower_builder_is_one_line(
    clip_files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = TeacherSpec(
        f"open_clip:{clip_files['config']}",
        weights=clip_files["weights"],
        class_names=clip_files["class_names"],
    )
    ckpt = tmp_path / "imported.pt"
    save_checkpoint(ckpt, teacher_checkpoint(load_teacher(spec), {}))
    # An imported teacher is rebuilt with a private open_clip function; a release without it
    # gets the supported range, not an ImportError.
    monkeypatch.delattr(open_clip.model, "_build_vision_tower")
    with pytest.raises(UserError, match=r"open_clip_torch>=3.0,<4") as err:
        load_teacher(TeacherSpec(str(ckpt)))
    assert "\n" not in str(err.value)

"""``ssl-kd run``: the whole pipeline on tiny data, its resumability, its config and results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import TINY, run_cli

from ssl_kd import config as cfglib
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.pipeline.config import PipelineConfig, stage_config
from ssl_kd.pipeline.oracle import read_truth
from ssl_kd.pipeline.plan import build_plan
from ssl_kd.pipeline.precision import precision_curve
from ssl_kd.pipeline.results import collect, format_markdown
from ssl_kd.pipeline.stages import Stage, marker_path, run_stages
from ssl_kd.shards import ReadStats, expand_shards, iter_samples


def tiny_config(tmp_path: Path, source: Path, **over: object) -> PipelineConfig:
    data = {**TINY, "out": str(tmp_path / "run"), "source": str(source), **over}
    return cfglib.from_dict(PipelineConfig, data)


def _statuses(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["stages"]}


def test_pipeline_end_to_end_then_rerun_skips_everything(tmp_path, fake_fmnist):
    from ssl_kd.pipeline.run import run_pipeline

    cfg = tiny_config(tmp_path, fake_fmnist, rounds=2)
    first = run_pipeline(cfg, progress=False)
    root = Path(cfg.out)
    assert set(_statuses(first).values()) == {"ran"}
    names = set(_statuses(first))
    for seed in (0, 1):
        assert {
            f"baseline/seed{seed}",
            f"round1/seed{seed}/pretrain",
            f"round2/seed{seed}/labels",
            f"round2/seed{seed}/finetune",
            f"eval/round2-seed{seed}-finetuned",
        } <= names
        for r in (1, 2):
            for stage in ("pretrain", "finetune"):
                assert (root / f"round{r}/seed{seed}/{stage}/checkpoint.pt").is_file()
    # One set of round-1 labels for every seed, one per seed in round 2.
    assert len(list((root / "round1/labels").glob("*.parquet"))) == 1
    assert len(list((root / "round2/seed1/labels").glob("*.parquet"))) == 1
    precision = json.loads((root / "round1/selection/precision.json").read_text())
    report = json.loads((root / "round1/selection/report.json").read_text())
    assert precision["images"] == report["selected"] > 0
    assert 0 <= precision["precision"] <= 1
    # The curve at the selection's K is the selection's precision; it is a PNG and JSON too.
    at_k = precision_curve(
        str(root / "round1/labels"), str(root / "data/unlabeled_truth.parquet"), 2, ks=[6]
    )
    assert at_k["selected"] == [report["selected"]]
    assert at_k["precision"][0] == pytest.approx(precision["precision"])
    curve = json.loads((root / "round1/selection/precision_curve.json").read_text())
    assert (
        curve["k"][0] == 1
        and curve["k"] == sorted(curve["k"])
        and len(curve["precision"]) == len(curve["k"])
    )
    assert (root / "round1/selection/precision_curve.png").read_bytes()[:4] == b"\x89PNG"

    doc = json.loads((root / "results/results.json").read_text())
    rows = {(m["model"], m["round"]): m for m in doc["models"]}
    assert set(rows) == {
        ("teacher", 0),
        ("baseline", 0),
        ("pretrained", 1),
        ("finetuned", 1),
        ("pretrained", 2),
        ("finetuned", 2),
        ("oracle", 1),
    }
    assert rows["baseline", 0]["seeds"] == [0, 1]
    # The table's figures are those of the evaluation files, summarised over seeds.
    per_seed = [
        json.loads((root / f"eval/round1-seed{s}-finetuned/metrics.json").read_text())
        for s in (0, 1)
    ]
    mean = sum(m["top1"] for m in per_seed) / 2
    assert rows["finetuned", 1]["top1"]["mean"] == pytest.approx(mean)
    # Each teacher ran once on the test set for its students' fidelity: the round-1 teacher,
    # and each seed's round-1 student, which teaches round 2.
    assert len(list((root / "eval/teacher_outputs").glob("*.pt"))) == 3
    assert [g["round"] for g in doc["goals"]] == [1, 2]
    gain = 100 * (rows["finetuned", 1]["top1"]["mean"] - rows["baseline", 0]["top1"]["mean"])
    assert doc["goals"][0]["gain_over_baseline_points"] == pytest.approx(gain)
    assert (root / "results/results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| finetuned | 2 |" in (root / "results/results.md").read_text()

    # The oracle: the round-1 shards labeled with the truth, and the student trained on them.
    truth = read_truth(str(root / "data/unlabeled_truth.parquet"))

    def samples(spec: Path) -> list[dict]:
        return list(iter_samples(expand_shards(str(spec)), ReadStats()))

    oracle, pseudo = samples(root / "round1/oracle"), samples(root / "round1/pseudo")
    assert [s["__key__"] for s in oracle] == [s["__key__"] for s in pseudo]
    wrong = 0
    for o, p in zip(oracle, pseudo, strict=True):
        soft = json.loads(o["json"])
        true = truth[soft["source_shard"], soft["source_key"]]
        assert int(o["cls"]) == soft["class"] == true and soft["topk_class"] == [true]
        assert o["png"] == p["png"]
        wrong += int(p["cls"]) != true
    figures = json.loads((root / "stages/round1__oracle.json").read_text())["figures"]
    assert figures == {"samples": len(pseudo), "relabeled": wrong}
    saved = yaml.safe_load((root / "oracle/seed0/pretrain/config.yaml").read_text())
    assert saved["loss"] == "hard" and saved["steps"] == TINY["pretrain"]["steps"]
    lost = 100 * (rows["oracle", 1]["top1"]["mean"] - rows["finetuned", 1]["top1"]["mean"])
    assert doc["goals"][0]["lost_to_label_errors_points"] == pytest.approx(lost)
    assert "| oracle | 1 |" in (root / "results/results.md").read_text()

    # `tensorboard --logdir` on the run directory finds every training stage's curves.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    board = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(root))
    board.Reload()
    runs = {run: tags["scalars"] for run, tags in board.Runs().items()}
    for stage in ("teacher", "baseline/seed0", "round1/seed0/pretrain", "round2/seed1/finetune"):
        run = os.path.join(stage, "tensorboard")
        assert "train/loss" in runs[run], (stage, sorted(runs))
        steps = [e.step for e in board.Scalars(run, "train/loss")]
        assert steps and steps == sorted(set(steps)), stage

    again = run_pipeline(cfg, progress=False)
    assert set(_statuses(again).values()) == {"skipped"}
    names = {s.name for s in build_plan(tiny_config(tmp_path, fake_fmnist, oracle_seeds=0)).stages}
    assert not any("oracle" in name for name in names)


def test_changed_key_reruns_only_what_it_affects(tmp_path, fake_fmnist):
    from ssl_kd.pipeline.run import run_pipeline

    run_pipeline(tiny_config(tmp_path, fake_fmnist, seeds=[0]), progress=False)
    changed = tiny_config(
        tmp_path, fake_fmnist, seeds=[0], finetune={**TINY["finetune"], "steps": 3}
    )
    status = _statuses(run_pipeline(changed, progress=False))
    ran = {name for name, s in status.items() if s == "ran"}
    # The baseline's default budget is the fine-tuning budget, so it follows too.
    assert ran == {
        "round1/seed0/finetune",
        "eval/round1-seed0-finetuned",
        "baseline/seed0",
        "eval/baseline-seed0",
        "oracle/seed0/finetune",
        "eval/oracle-seed0",
    }
    summary = json.loads((Path(changed.out) / "round1/seed0/finetune/summary.json").read_text())
    assert summary["step"] == 3

    # Joint training: the section's labeled_share mixes the run's labeled split into pretraining.
    joint = tiny_config(
        tmp_path,
        fake_fmnist,
        seeds=[0],
        finetune={**TINY["finetune"], "steps": 3},
        pretrain={**TINY["pretrain"], "labeled_share": 0.25},
    )
    status = _statuses(run_pipeline(joint, progress=False))
    ran = {name for name, s in status.items() if s == "ran"}
    assert ran == {
        "round1/seed0/pretrain",
        "round1/seed0/finetune",
        "eval/round1-seed0-pretrained",
        "eval/round1-seed0-finetuned",
        "oracle/seed0/pretrain",  # the same recipe on the true labels: joint too
        "oracle/seed0/finetune",
        "eval/oracle-seed0",
    }
    pretrain = Path(joint.out) / "round1/seed0/pretrain"
    assert json.loads((pretrain / "summary.json").read_text())["labeled_per_batch"] == 2
    saved = yaml.safe_load((pretrain / "config.yaml").read_text())
    assert saved["labeled_data"] == str(Path(joint.out) / "data/labeled")
    with pytest.raises(ConfigError, match=r"pretrain.labeled_data.*set by the pipeline"):
        cfglib.from_dict(PipelineConfig, {"pretrain": {"labeled_data": "x"}})


def test_own_shards_instead_of_fashion_mnist(tmp_path, separable_shards):
    from helpers import write_unlabeled_shards

    from ssl_kd.pipeline.run import run_pipeline

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    write_unlabeled_shards(unlabeled, n_shards=2, per_shard=20)
    data = {
        **TINY,
        "out": str(tmp_path / "run"),
        "seeds": [3],
        "num_classes": 4,
        "labeled": str(separable_shards["train"]),
        "unlabeled": str(unlabeled),
        "test": str(separable_shards["test"]),
        "label": {"k": 4},
        "select": {"per_class": 5, "top_p": 2},
    }
    summary = run_pipeline(cfglib.from_dict(PipelineConfig, data), progress=False)
    assert _statuses(summary)["data"] == "ran"
    assert not (tmp_path / "run" / "data").exists() or not any((tmp_path / "run/data").iterdir())
    doc = json.loads((tmp_path / "run/results/results.json").read_text())
    assert doc["selection_precision"] == []  # no truth file given
    assert {m["model"] for m in doc["models"]} == {"teacher", "baseline", "pretrained", "finetuned"}


def _stage(tmp_path: Path, name: str, params: dict, log: list[str], deps=()) -> Stage:
    directory = tmp_path / name

    def run() -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "out.txt").write_text(json.dumps(params))
        log.append(name)
        return {"value": params.get("x")}

    return Stage(name, directory, params, run, tuple(deps))


def test_stage_engine_fingerprints_and_downstream(tmp_path):
    log: list[str] = []
    stages = [
        _stage(tmp_path, "a", {"x": 1}, log),
        _stage(tmp_path, "b", {"y": 2}, log, ["a"]),
        _stage(tmp_path, "c", {"z": 3}, log),
    ]
    run_stages(stages, tmp_path, announce=lambda _: None)
    assert log == ["a", "b", "c"]
    log.clear()
    stages[0] = _stage(tmp_path, "a", {"x": 5}, log)
    results = run_stages(stages, tmp_path, announce=lambda _: None)
    assert log == ["a", "b"]  # b reads a; c does not
    assert [r.status for r in results] == ["ran", "ran", "skipped"]
    assert json.loads((tmp_path / "a/out.txt").read_text()) == {"x": 5}


def test_interrupted_stage_resumes_in_place_and_stale_outputs_go(tmp_path):
    log: list[str] = []
    stage = _stage(tmp_path, "a", {"x": 1}, log)
    marker = Path(marker_path(tmp_path, "a"))
    run_stages([stage], tmp_path, announce=lambda _: None)
    # Pretend it died mid-way: the marker says not done, a partial file is there.
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "done": False}))
    (tmp_path / "a/partial").write_text("kept")
    [result] = run_stages([stage], tmp_path, announce=lambda _: None)
    assert result.status == "resumed" and (tmp_path / "a/partial").exists()
    # Another fingerprint: the old outputs are cleared first.
    [result] = run_stages([_stage(tmp_path, "a", {"x": 2}, log)], tmp_path, lambda _: None)
    assert result.status == "ran" and not (tmp_path / "a/partial").exists()


def test_foreign_directory_is_not_deleted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/precious.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        run_stages([_stage(tmp_path, "a", {"x": 1}, [])], tmp_path, lambda _: None)
    assert (tmp_path / "a/precious.txt").read_text() == "mine"


def test_section_keys_are_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"pretrain.stepz"):
        cfglib.from_dict(PipelineConfig, {"pretrain": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"'select.per_class'.*>= 1"):
        cfglib.from_dict(PipelineConfig, {"select": {"per_class": 0}})
    with pytest.raises(ConfigError, match=r"finetune.init.*set by the pipeline"):
        cfglib.from_dict(PipelineConfig, {"finetune": {"init": "x.pt"}})
    with pytest.raises(UserError, match="all three"):
        cfglib.from_dict(PipelineConfig, {"labeled": "a", "test": "b"})
    with pytest.raises(ConfigError, match=r"label.k.*more than the 4 classes"):
        cfglib.from_dict(PipelineConfig, {"num_classes": 4})
    with pytest.raises(ConfigError, match=r"select.top_p.*label.k"):
        cfglib.from_dict(PipelineConfig, {"label": {"k": 3}})
    with pytest.raises(ConfigError, match="seeds"):
        cfglib.from_dict(PipelineConfig, {"seeds": [1, 1]})


def test_baseline_defaults_to_student_arch_and_finetune_budget():
    cfg = cfglib.from_dict(
        PipelineConfig, {"pretrain": {"arch": "cnn_deep", "width": 0.5}, "finetune": {"steps": 321}}
    )
    base = stage_config(cfg, "baseline", {"data": "d", "out": "o", "seed": 4})
    assert (base.arch, base.width, base.steps, base.seed) == ("cnn_deep", 0.5, 321, 4)
    own = cfglib.from_dict(PipelineConfig, {"baseline": {"steps": 50}, "finetune": {"steps": 9}})
    assert stage_config(own, "baseline", {"data": "d", "out": "o", "seed": 0}).steps == 50


def test_set_overrides():
    sets = ["select.top_p=3", "rounds=2", "pretrain.loss=soft"]
    data = cfglib.apply_overrides(PipelineConfig, {"select": {"per_class": 5}}, sets)
    expected = {"select": {"per_class": 5, "top_p": 3}, "rounds": 2, "pretrain": {"loss": "soft"}}
    assert data == expected
    message = "unknown section 'pretrian'; choose one of teacher, adapt, label"
    with pytest.raises(UserError, match=message):
        cfglib.apply_overrides(PipelineConfig, {}, ["pretrian.steps=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        cfglib.apply_overrides(PipelineConfig, {}, ["steps"])


def test_goals_and_markdown_from_known_figures(tmp_path):
    from ssl_kd.pipeline.builder import Model

    def metrics(top1: float) -> dict:
        return {
            "top1": top1,
            "top5": 0.99,
            "calibration": {"ece": 0.02},
            "arch": "cnn",
            "model": {"params": 10, "macs": 20},
            "cpu": None,
            "fidelity": {"agreement": 0.9, "kl": 0.1},
        }

    models = []
    figures = [
        ("t", "teacher", 0, None, 0.82),
        ("b0", "baseline", 0, 0, 0.80),
        ("b1", "baseline", 0, 1, 0.82),
        ("f0", "finetuned", 1, 0, 0.84),
        ("f1", "finetuned", 1, 1, 0.86),
    ]
    for slug, role, rnd, seed, top1 in figures:
        (tmp_path / "eval" / slug).mkdir(parents=True)
        (tmp_path / "eval" / slug / "metrics.json").write_text(json.dumps(metrics(top1)))
        models.append(Model(slug, role, rnd, seed, slug, "", None, None))
    doc = collect(tmp_path, models)
    [goal] = doc["goals"]
    assert goal["gain_over_baseline_points"] == pytest.approx(4.0)
    assert goal["goal_met"] and goal["above_teacher"]
    assert goal["gain_over_teacher_points"] == pytest.approx(3.0)
    base = next(m for m in doc["models"] if m["model"] == "baseline")
    assert base["top1"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    text = format_markdown(doc, "T")
    assert "| baseline | – | cnn | 2 | 81.00 ± 1.41 |" in text
    assert "+4.00 points over the baseline (goal +3.0: met)" in text
    [strict] = collect(tmp_path, models, goal_points=5.0)["goals"]  # a config's own goal line
    assert strict["goal_points"] == 5.0 and not strict["goal_met"]


def test_cli_run_reports_and_rejects_bad_keys(tmp_path, fake_fmnist, capsys):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seeds": [0], "source": str(fake_fmnist)}))
    argv = [
        "-q",
        "run",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "pretrain.steps=2",
    ]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "round 1: fine-tuned student" in out and "results.md" in out
    cfg = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert cfg["pretrain"]["steps"] == 2
    code, _, err = run_cli(["run", "--config", str(config), "--set", "pretrain.stepz=2"], capsys)
    assert code == 2 and "pretrain.stepz" in err and len(err.strip().splitlines()) == 1


def test_results_read_the_selections_the_plan_recorded(tmp_path, fake_fmnist):
    from ssl_kd.pipeline.builder import Selection
    from ssl_kd.pipeline.plan import build_plan

    plan = build_plan(tiny_config(tmp_path, fake_fmnist, rounds=2), progress=False)
    run = tmp_path / "run"
    assert plan.selections == [
        Selection(1, None, str(run / "round1" / "selection")),
        Selection(2, 0, str(run / "round2" / "seed0" / "selection")),
        Selection(2, 1, str(run / "round2" / "seed1" / "selection")),
    ]
    for sel, value in zip(plan.selections, (0.5, 0.8, 0.6), strict=True):
        Path(sel.dir).mkdir(parents=True)
        (Path(sel.dir) / "precision.json").write_text(json.dumps({"images": 7, "precision": value}))
    doc = collect(str(run), [], plan.selections)
    assert [p["round"] for p in doc["selection_precision"]] == [1, 2]
    assert doc["selection_precision"][1]["precision"]["mean"] == pytest.approx(0.7)
    (Path(plan.selections[2].dir) / "precision.json").unlink()
    with pytest.raises(UserError, match=r"precision\.json is missing"):
        collect(str(run), [], plan.selections)


def test_round_one_labels_from_a_teacher_ensemble_with_tta(tmp_path, fake_fmnist):
    from ssl_kd.label.files import label_files, read_meta
    from ssl_kd.pipeline.run import run_pipeline

    ensemble = {"members": [{"seed": 1}, {"arch": "cnn", "width": 0.5}], "tta": ["flip"]}
    cfg = tiny_config(tmp_path, fake_fmnist, seeds=[0], oracle_seeds=0, ensemble=ensemble)
    status = _statuses(run_pipeline(cfg, progress=False))
    assert {"teachers/member1", "teachers/member2", "teachers/ensemble"} <= set(status)
    root = Path(cfg.out)
    member = yaml.safe_load((root / "teachers/member2/config.yaml").read_text())
    assert (member["arch"], member["width"]) == ("cnn", 0.5)
    meta = read_meta(label_files(root / "round1/labels")[0])
    assert meta.teacher_arch == "ensemble" and meta.extra["tta"] == ["flip"]
    assert [m["width"] for m in meta.extra["members"]] == [1.0, 1.0, 0.5]
    doc = json.loads((root / "results/results.json").read_text())
    teacher = next(m for m in doc["models"] if m["model"] == "teacher")
    assert teacher["arch"] == "ensemble"

    for bad, expected in (
        ({"members": [{"stepz": 3}]}, r"ensemble.members\[0\].stepz"),
        ({"members": [{"data": "x"}]}, r"ensemble.members\[0\].data.*set by the pipeline"),
        ({"tta": ["rotate"]}, r"ensemble.tta.*choose from flip, shift"),
        ({"tta": ["flip"], "membrs": []}, r"ensemble.membrs"),
    ):
        with pytest.raises(ConfigError, match=expected):
            tiny_config(tmp_path, fake_fmnist, ensemble=bad)


def test_the_chain_of_students_sets_each_rounds_architecture_and_noise(tmp_path, fake_fmnist):
    from ssl_kd.pipeline.run import run_pipeline

    bigger = {"arch": "cnn_deep", "width": 0.5, "randaugment": 1, "dropout": 0.2}
    cfg = tiny_config(
        tmp_path, fake_fmnist, seeds=[0], rounds=2, oracle_seeds=0, students=[{}, bigger]
    )
    run_pipeline(cfg, progress=False)
    root = Path(cfg.out)
    first = yaml.safe_load((root / "round1/seed0/pretrain/config.yaml").read_text())
    second = yaml.safe_load((root / "round2/seed0/pretrain/config.yaml").read_text())
    assert (first["arch"], first["randaugment"]) == ("cnn", 0)
    assert {k: second[k] for k in bigger} == bigger
    doc = json.loads((root / "results/results.json").read_text())
    archs = {(m["model"], m["round"]): m["arch"] for m in doc["models"]}
    assert archs["finetuned", 2] == "cnn_deep" and archs["finetuned", 1] == "cnn"
    # Round 2's teacher is round 1's student: its labels name it.
    from ssl_kd.label.files import label_files, read_meta

    assert read_meta(label_files(root / "round2/seed0/labels")[0]).teacher_arch == "cnn"

    for students, expected in (
        ([{}, {}, {}], "students.*3 entries for 2 round"),
        ([{"stepz": 1}], r"students\[0\].stepz"),
        ([{}, {"data": "x"}], r"students\[1\].data.*set by the pipeline"),
    ):
        with pytest.raises(ConfigError, match=expected):
            tiny_config(tmp_path, fake_fmnist, rounds=2, students=students)


def test_open_set_pool_counts_the_selected_images_of_no_class(tmp_path, fake_fmnist):
    from ssl_kd.pipeline.run import run_pipeline

    cfg = tiny_config(
        tmp_path,
        fake_fmnist,
        seeds=[0],
        open_set=[1, 8],
        label={"batch_size": 32, "k": 8},
        select={"per_class": 6, "top_p": 2, "score_floor": "otsu"},
    )
    run_pipeline(cfg, progress=False)
    root = Path(cfg.out)
    truth = read_truth(str(root / "data/unlabeled_truth.parquet"))
    selected = pq.read_table(root / "round1/selection/selection.parquet").to_pylist()
    no_class = sum(truth[r["shard"], r["key"]] < 0 for r in selected)
    precision = json.loads((root / "round1/selection/precision.json").read_text())
    assert precision["no_class"] == no_class > 0
    report = json.loads((root / "round1/selection/report.json").read_text())
    assert report["config"]["score_floor"] == "otsu" and "below_floor_removed" in report
    # The oracle trains on the selected images that have a true class only.
    figures = json.loads((root / "stages/round1__oracle.json").read_text())["figures"]
    assert figures["samples"] == len(selected) - no_class
    md = (root / "results/results.md").read_text()
    assert f"| {precision['images']:,} | " in md and "of no class" in md


def test_joint_row_beside_pretrain_then_fine_tune(tmp_path, fake_fmnist):
    from ssl_kd.pipeline.run import run_pipeline

    cfg = tiny_config(tmp_path, fake_fmnist, seeds=[0], oracle_seeds=0, joint_share=0.25)
    run_pipeline(cfg, progress=False)
    root = Path(cfg.out)
    joint = json.loads((root / "round1/seed0/joint/summary.json").read_text())
    assert joint["labeled_per_batch"] == 2 and joint["step"] == TINY["pretrain"]["steps"]
    plain = json.loads((root / "round1/seed0/pretrain/summary.json").read_text())
    assert plain["labeled_per_batch"] == 0
    doc = json.loads((root / "results/results.json").read_text())
    rows = [(m["model"], m["round"]) for m in doc["models"]]
    assert rows.index(("finetuned", 1)) < rows.index(("joint", 1))
    assert "| joint | 1 |" in (root / "results/results.md").read_text()


def test_feature_rows_turn_on_embeddings_and_report_cka(tmp_path, fake_fmnist):
    from ssl_kd.label.files import label_files, read_meta
    from ssl_kd.pipeline.run import run_pipeline

    cfg = tiny_config(tmp_path, fake_fmnist, seeds=[0], oracle_seeds=0, feature_weights=[0.5])
    assert cfg.distils_features() and cfg.feature_loss() == "cosine"
    run_pipeline(cfg, progress=False)
    root = Path(cfg.out)
    assert read_meta(label_files(root / "round1/labels")[0]).embedding_dim > 0
    info = json.loads((root / "round1/pseudo/dataset.json").read_text())
    assert info["embedding"]["dim"] > 0
    feat = json.loads((root / "round1/seed0/features0.5/pretrain/summary.json").read_text())
    assert feat["feature_loss"] == "cosine" and feat["embedding_dim"] == info["embedding"]["dim"]
    plain = json.loads((root / "round1/seed0/pretrain/summary.json").read_text())
    assert plain["feature_loss"] == "none"  # the section's student stays as it was
    doc = json.loads((root / "results/results.json").read_text())
    rows = [(m["model"], m["variant"]) for m in doc["models"] if m["round"] == 1]
    assert rows.index(("finetuned", "")) < rows.index(("finetuned", "cosine β=0.5"))
    assert len(doc["goals"]) == 1  # the goal line is the plain student's
    row = next(m for m in doc["models"] if m["variant"] and m["model"] == "finetuned")
    assert 0 <= row["cka"]["mean"] <= 1
    assert "| finetuned (cosine β=0.5) | 1 |" in (root / "results/results.md").read_text()

    # Without any feature loss, labeling stores no embeddings.
    assert not tiny_config(tmp_path, fake_fmnist).distils_features()
    on = tiny_config(tmp_path, fake_fmnist, pretrain={**TINY["pretrain"], "feature_loss": "mse"})
    assert on.distils_features() and on.feature_loss() == "mse"
    with pytest.raises(ConfigError, match=r"feature_weights.*repeats"):
        tiny_config(tmp_path, fake_fmnist, feature_weights=[1, 1])


def test_variant_rows_follow_the_plain_ones_in_plan_order(tmp_path):
    from ssl_kd.pipeline.builder import Model

    metrics = {
        "top1": 0.8,
        "top5": 0.9,
        "calibration": {"ece": 0.02},
        "arch": "cnn",
        "model": {"params": 10, "macs": 20},
    }
    models = []
    for slug, role, variant in (
        ("p", "pretrained", ""),
        ("f", "finetuned", ""),
        ("p4", "pretrained", "cosine β=4"),
        ("f4", "finetuned", "cosine β=4"),
        ("p16", "pretrained", "cosine β=16"),
        ("f16", "finetuned", "cosine β=16"),
    ):
        (tmp_path / "eval" / slug).mkdir(parents=True)
        (tmp_path / "eval" / slug / "metrics.json").write_text(json.dumps(metrics))
        models.append(Model(slug, role, 1, 0, slug, "", None, None, variant))
    doc = collect(tmp_path, models[::-1])  # the plan's order, whatever the strings say
    rows = [(m["model"], m["variant"]) for m in doc["models"]]
    assert rows == [
        ("pretrained", ""),
        ("finetuned", ""),
        ("pretrained", "cosine β=16"),
        ("finetuned", "cosine β=16"),
        ("pretrained", "cosine β=4"),
        ("finetuned", "cosine β=4"),
    ]
    assert "| finetuned (cosine β=16) | 1 |" in format_markdown(doc, "T")


def test_neighbour_checks_and_sample_weights_are_checked_with_the_config(tmp_path, fake_fmnist):
    # The pipeline labels the labeled split itself and passes it as labeled_labels.
    select = {**TINY["select"], "rank_by": "propagation"}
    with pytest.raises(ConfigError, match=r"select\.labeled_labels.*set by the pipeline"):
        tiny_config(tmp_path, fake_fmnist, select={**select, "labeled_labels": "x"})
    weighted = {**TINY["pretrain"], "sample_weights": True}
    with pytest.raises(ConfigError, match=r"pretrain\.sample_weights.*select\.weights"):
        tiny_config(tmp_path, fake_fmnist, pretrain=weighted)
    select = {**select, "weights": "certainty"}
    cfg = tiny_config(tmp_path, fake_fmnist, select=select, pretrain=weighted)
    paths = {"labels": "l", "out": "o", "labeled_labels": "ll"}
    assert stage_config(cfg, "select", paths).rank_by == "propagation"

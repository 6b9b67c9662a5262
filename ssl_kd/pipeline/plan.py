"""The pipeline as a list of stages: which stage reads what, writes where, and depends on what.

Layout of a run directory (``out``)::

    data/                      Fashion-MNIST as labeled / unlabeled / test shards (skipped when
                               you name your own shards)
    teacher/                   the round-1 teacher (ssl-kd train)
    baseline/seed{S}/          the supervised baseline: student architecture, labels only
    round1/labels|selection|pseudo/      labels, top-K selection and materialised shards
    round{R}/seed{S}/pretrain|finetune/  the student of round R
    round{R>1}/seed{S}/labels|selection|pseudo/  later rounds: each seed's student teaches on
    eval/{model}/metrics.json  test metrics (fidelity to the model's teacher, size, CPU speed)
    results/                   results.json, results.md, results.png
    stages/                    one marker per stage (fingerprint, seconds, figures)

Round 1 shares one teacher, labels and selection across seeds; the seeds vary the student's
and the baseline's initialisation, data order and augmentation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.errors import UserError
from ssl_kd.pipeline.config import PIPELINE_KEYS, PipelineConfig, stage_config
from ssl_kd.pipeline.stages import Stage


@dataclass(frozen=True)
class DataPaths:
    """Where the three splits and the unlabeled ground truth (if any) are."""

    labeled: str
    unlabeled: str
    test: str
    truth: str | None


@dataclass(frozen=True)
class Model:
    """A trained model the results table reports on."""

    slug: str  # eval/<slug>
    role: str  # teacher, baseline, pretrained, finetuned
    round: int
    seed: int | None
    stage: str
    checkpoint: str
    teacher_stage: str | None
    teacher_checkpoint: str | None


def params_of(cfg: Any, section: str) -> dict[str, Any]:
    """The keys of a stage config that decide its outputs (no paths, no operational keys)."""
    values = cfglib.to_dict(cfg)
    skip = (PIPELINE_KEYS[section] - {"seed"}) | cfglib.operational_keys(type(cfg))
    return {k: v for k, v in values.items() if k not in skip}


def data_paths(cfg: PipelineConfig, root: str) -> DataPaths:
    """The splits: the user's shards, or the Fashion-MNIST import under ``root/data``."""
    if cfg.uses_own_data():
        assert cfg.labeled and cfg.unlabeled and cfg.test
        return DataPaths(cfg.labeled, cfg.unlabeled, cfg.test, cfg.truth)
    data = storage.join(root, "data")
    truth = cfg.truth or storage.join(data, "unlabeled_truth.parquet")
    return DataPaths(
        storage.join(data, "labeled"),
        storage.join(data, "unlabeled"),
        storage.join(data, "test"),
        truth,
    )


class PlanBuilder:
    """Collects stages in run order; each ``add_*`` returns the stage name."""

    def __init__(self, cfg: PipelineConfig, root: str, progress: bool) -> None:
        self.cfg = cfg
        self.root = root
        self.progress = progress
        self.stages: list[Stage] = []
        self.models: list[Model] = []
        self.data = data_paths(cfg, root)

    def _add(
        self, name: str, directory: str, params: dict[str, Any], run: Callable[[], dict[str, Any]],
        deps: tuple[str, ...] = (),
    ) -> str:  # fmt: skip
        self.stages.append(Stage(name, directory, params, run, tuple(d for d in deps if d)))
        return name

    def add_data(self) -> str:
        from ssl_kd.datasets.fashion_mnist import FashionMnistConfig, import_fashion_mnist

        if self.cfg.uses_own_data():
            return self._add_own_data()
        fm = FashionMnistConfig(
            out=storage.join(self.root, "data"), labeled_per_class=self.cfg.labeled_per_class,
            seed=self.cfg.data_seed, source=self.cfg.source,
        )  # fmt: skip
        params = {k: v for k, v in cfglib.to_dict(fm).items() if k not in ("out", "source")}

        def run() -> dict[str, Any]:
            return dict(import_fashion_mnist(fm)["counts"])

        return self._add("data", storage.join(self.root, "data"), params, run)

    def _add_own_data(self) -> str:
        from ssl_kd.shards import expand_shards

        d = self.data
        params = {"labeled": d.labeled, "unlabeled": d.unlabeled, "test": d.test, "truth": d.truth}

        def run() -> dict[str, Any]:  # checks that every split names shards
            return {f"{split}_shards": len(expand_shards(spec))
                    for split, spec in (("labeled", d.labeled), ("unlabeled", d.unlabeled),
                                        ("test", d.test))}  # fmt: skip

        return self._add("data", storage.join(self.root, "data"), params, run)

    def add_train(self, name: str, section: str, directory: str, seed: int | None,
                  data_stage: str) -> str:  # fmt: skip
        from ssl_kd.train.supervised import run_train

        paths: dict[str, Any] = {"data": self.data.labeled, "out": directory}
        if seed is not None:
            paths["seed"] = seed
        tc = stage_config(self.cfg, section, paths)

        def run() -> dict[str, Any]:
            s = run_train(tc, progress=self.progress)
            return {"steps": s["step"], "img_s": s["images_per_s"]}

        return self._add(name, directory, params_of(tc, section), run, (data_stage,))

    def add_label(self, name: str, directory: str, teacher: str, deps: tuple[str, ...]) -> str:
        from ssl_kd.label.run import run_label

        lc = stage_config(self.cfg, "label", {"teacher": teacher, "shards": self.data.unlabeled,
                                               "out": directory})  # fmt: skip

        def run() -> dict[str, Any]:
            s = run_label(lc, progress=self.progress)
            if s["failed"]:
                raise UserError(
                    f"{len(s['failed'])} shard(s) failed to label (see {directory}/"
                    "run_summary.json); rerun the same command to retry them"
                )
            return {"images": s["rows"], "img_s": s["images_per_s"]}

        return self._add(name, directory, params_of(lc, "label"), run, deps)

    def add_select(self, name: str, directory: str, labels: str, deps: tuple[str, ...]) -> str:
        from ssl_kd.pipeline.precision import selection_precision
        from ssl_kd.select.run import run_select

        sc = stage_config(self.cfg, "select", {"labels": labels, "out": directory})
        truth = self.data.truth

        def run() -> dict[str, Any]:
            report = run_select(sc)
            figures: dict[str, Any] = {"selected": report["selected"],
                                       "short_classes": len(report["short_classes"])}  # fmt: skip
            if truth and storage.is_file(truth):
                precision = selection_precision(directory, truth)
                atomic.write_text(
                    storage.join(directory, "precision.json"), json.dumps(precision, indent=2)
                )
                figures["precision"] = precision["precision"]
            return figures

        return self._add(name, directory, {**params_of(sc, "select"), "truth": truth}, run, deps)

    def add_materialize(
        self, name: str, directory: str, selection: str, deps: tuple[str, ...]
    ) -> str:
        from ssl_kd.materialize.run import run_materialize

        paths = {"selection": selection, "out": directory, "shards": None}
        mc = stage_config(self.cfg, "materialize", paths)

        def run() -> dict[str, Any]:
            m = run_materialize(mc, progress=self.progress)
            return {"samples": m["samples"], "shards": len(m["shards"])}

        return self._add(name, directory, params_of(mc, "materialize"), run, deps)

    def add_student(self, name: str, section: str, directory: str, seed: int, data: str,
                    init: str | None, deps: tuple[str, ...]) -> str:  # fmt: skip
        from ssl_kd.train.student import run_student

        paths: dict[str, Any] = {"data": data, "out": directory, "seed": seed}
        if section == "finetune":
            paths["init"] = init
        sc = stage_config(self.cfg, section, paths)

        def run() -> dict[str, Any]:
            s = run_student(sc, progress=self.progress)
            return {"steps": s["step"], "img_s": s["images_per_s"]}

        return self._add(name, directory, params_of(sc, section), run, deps)

    def add_eval(self, model: Model, deps: tuple[str, ...]) -> str:
        from ssl_kd.evaluate.run import run_evaluate

        directory = storage.join(self.root, "eval", model.slug)
        paths = {
            "checkpoint": model.checkpoint,
            "data": self.data.test,
            "teacher": model.teacher_checkpoint,
            "out": storage.join(directory, "metrics.json"),
        }
        ec = stage_config(self.cfg, "evaluate", paths)

        def run() -> dict[str, Any]:
            r = run_evaluate(ec)
            figures = {"top1": r["top1"], "top5": r["top5"]}
            if r.get("fidelity"):
                figures["agreement"] = r["fidelity"]["agreement"]
            return figures

        self.models.append(model)
        return self._add(f"eval/{model.slug}", directory, params_of(ec, "evaluate"), run,
                         (*deps, model.stage, model.teacher_stage or ""))  # fmt: skip


def build_plan(cfg: PipelineConfig, progress: bool = True) -> PlanBuilder:
    """Every stage of ``cfg``'s pipeline in run order, and the models to report."""
    root = cfg.out
    at = storage.join  # the run directory may be a path or an s3:// prefix
    b = PlanBuilder(cfg, root, progress)
    data = b.add_data()
    test_dep = (data,)
    teacher = b.add_train("teacher", "teacher", at(root, "teacher"), None, data)
    teacher_ckpt = at(root, "teacher", "checkpoint.pt")
    b.add_eval(Model("teacher", "teacher", 0, None, teacher, teacher_ckpt, None, None), test_dep)
    for seed in cfg.seeds:
        here = at(root, "baseline", f"seed{seed}")
        base = b.add_train(f"baseline/seed{seed}", "baseline", here, seed, data)
        ckpt = at(here, "checkpoint.pt")
        b.add_eval(Model(f"baseline-seed{seed}", "baseline", 0, seed, base, ckpt, teacher,
                         teacher_ckpt), test_dep)  # fmt: skip

    # Round 1: one teacher, so the labels, selection and shards are shared by every seed.
    shared = at(root, "round1")
    labels = b.add_label("round1/labels", at(shared, "labels"), teacher_ckpt, (data, teacher))
    selection = b.add_select("round1/selection", at(shared, "selection"), at(shared, "labels"),
                             (labels,))  # fmt: skip
    pseudo = b.add_materialize("round1/pseudo", at(shared, "pseudo"), at(shared, "selection"),
                               (selection, data))  # fmt: skip
    for seed in cfg.seeds:
        round_teacher, round_teacher_ckpt = teacher, teacher_ckpt
        pseudo_stage, pseudo_dir = pseudo, at(shared, "pseudo")
        for r in range(1, cfg.rounds + 1):
            here = at(root, f"round{r}", f"seed{seed}")
            name = f"round{r}/seed{seed}"
            if r > 1:  # this seed's previous student labels the unlabeled set again
                lab = b.add_label(f"{name}/labels", at(here, "labels"), round_teacher_ckpt,
                                  (data, round_teacher))  # fmt: skip
                sel = b.add_select(f"{name}/selection", at(here, "selection"),
                                   at(here, "labels"), (lab,))  # fmt: skip
                pseudo_stage = b.add_materialize(f"{name}/pseudo", at(here, "pseudo"),
                                                 at(here, "selection"), (sel, data))  # fmt: skip
                pseudo_dir = at(here, "pseudo")
            pre = b.add_student(f"{name}/pretrain", "pretrain", at(here, "pretrain"), seed,
                                pseudo_dir, None, (pseudo_stage,))  # fmt: skip
            pre_ckpt = at(here, "pretrain", "checkpoint.pt")
            fin = b.add_student(f"{name}/finetune", "finetune", at(here, "finetune"), seed,
                                b.data.labeled, pre_ckpt, (pre, data))  # fmt: skip
            fin_ckpt = at(here, "finetune", "checkpoint.pt")
            for role, stage, ckpt in (("pretrained", pre, pre_ckpt), ("finetuned", fin, fin_ckpt)):
                b.add_eval(Model(f"round{r}-seed{seed}-{role}", role, r, seed, stage, ckpt,
                                 round_teacher, round_teacher_ckpt), test_dep)  # fmt: skip
            round_teacher, round_teacher_ckpt = fin, fin_ckpt
    return b

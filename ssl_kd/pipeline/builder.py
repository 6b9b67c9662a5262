"""The stages a pipeline plan is made of: :class:`PlanBuilder` adds one stage at a time (which
stage reads what, writes where, and depends on what), and the records the results table reads
(:class:`Model`, :class:`Selection`). :mod:`ssl_kd.pipeline.plan` composes them into a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.errors import UserError
from ssl_kd.pipeline.config import (
    PipelineConfig,
    pipeline_keys,
    stage_config,
    stage_runner,
    uses_pool,
)
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
    role: str  # teacher, baseline, pretrained, finetuned, joint, oracle
    round: int
    seed: int | None
    stage: str
    checkpoint: str
    teacher_stage: str | None
    teacher_checkpoint: str | None
    variant: str = ""  # tells apart rows of one role, e.g. the feature weight of a features row


@dataclass(frozen=True)
class Selection:
    """A selection whose pseudo-label precision the results table reports."""

    round: int
    seed: int | None  # None: shared by every seed (round 1)
    dir: str  # holds precision.json once the stage has run


def params_of(cfg: Any, section: str) -> dict[str, Any]:
    """The keys of a stage config that decide its outputs (no paths, no operational keys)."""
    values = cfglib.to_dict(cfg)
    skip = (pipeline_keys(section) - {"seed"}) | cfglib.operational_keys(type(cfg))
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
        self.selections: list[Selection] = []
        self.data = data_paths(cfg, root)

    def _add(
        self,
        name: str,
        directory: str,
        params: dict[str, Any],
        run: Callable[[], dict[str, Any]],
        deps: tuple[str, ...] = (),
    ) -> str:
        self.stages.append(Stage(name, directory, params, run, tuple(d for d in deps if d)))
        return name

    def add_data(self) -> str:
        """The labeled, unlabeled and test splits: the Fashion-MNIST import, or the user's."""
        from ssl_kd.datasets.fashion_mnist import FashionMnistConfig, import_fashion_mnist

        if self.cfg.uses_own_data():
            return self._add_own_data()
        fm = FashionMnistConfig(
            out=storage.join(self.root, "data"),
            labeled_per_class=self.cfg.labeled_per_class,
            seed=self.cfg.data_seed,
            source=self.cfg.source,
            open_set=self.cfg.open_set,
        )
        params = {k: v for k, v in cfglib.to_dict(fm).items() if k not in ("out", "source")}

        def run() -> dict[str, Any]:
            return dict(import_fashion_mnist(fm, progress=self.progress)["counts"])

        return self._add("data", storage.join(self.root, "data"), params, run)

    def _add_own_data(self) -> str:
        from ssl_kd.shards import expand_shards

        d = self.data
        splits = {"labeled": d.labeled, "unlabeled": d.unlabeled, "test": d.test}
        params = {**splits, "truth": d.truth}

        def run() -> dict[str, Any]:  # checks that every split names shards
            return {f"{split}_shards": len(expand_shards(spec)) for split, spec in splits.items()}

        return self._add("data", storage.join(self.root, "data"), params, run)

    def add_train(
        self,
        name: str,
        section: str,
        directory: str,
        seed: int | None,
        data_stage: str,
        overrides: dict[str, Any] | None = None,
        after: str = "",
    ) -> str:
        """A model of ``ssl-kd train`` (the teacher, its adaptation, a baseline) with the
        section's keys and ``overrides``, run after ``data_stage`` (and ``after``)."""
        paths: dict[str, Any] = {**(overrides or {}), "data": self.data.labeled, "out": directory}
        if uses_pool({**getattr(self.cfg, section), **paths}):  # a semi-supervised teacher
            paths["unlabeled"] = self.data.unlabeled
        if seed is not None:
            paths["seed"] = seed
        tc = stage_config(self.cfg, section, paths)
        run_train = stage_runner(section)

        def run() -> dict[str, Any]:
            s = run_train(tc, progress=self.progress)
            return {"steps": s["step"], "img_s": s["images_per_s"]}

        return self._add(name, directory, params_of(tc, section), run, (data_stage, after))

    def add_ensemble(
        self, name: str, directory: str, members: list[str], deps: tuple[str, ...]
    ) -> str:
        """The member checkpoints and the TTA views as one teacher (``ssl-kd ensemble``)."""
        from ssl_kd.models.checkpoint import save_checkpoint
        from ssl_kd.models.combine import combine

        ens = self.cfg.teacher_ensemble()
        assert ens is not None
        params = {"members": len(members), "tta": ens.tta, "shift": ens.shift}

        def run() -> dict[str, Any]:
            ckpt = combine(members, ens.tta, ens.shift)
            save_checkpoint(storage.join(directory, "checkpoint.pt"), ckpt)
            return {"members": len(members), "views": 1 + len(ens.tta)}

        return self._add(name, directory, params, run, deps)

    def add_teacher_import(self, name: str, directory: str, data_stage: str) -> str:
        """An external teacher written as an ssl_kd checkpoint (no training), checked against
        the labeled data's classes."""
        from ssl_kd.pipeline.teacher_import import import_params, import_teacher

        ext = self.cfg.external_teacher()
        assert ext is not None
        params = import_params(ext)
        cfg, labeled = self.cfg, self.data.labeled

        def run() -> dict[str, Any]:
            return import_teacher(ext, params, labeled, cfg.class_names, directory)

        return self._add(name, directory, params, run, (data_stage,))

    def add_label(
        self, name: str, directory: str, teacher: str, deps: tuple[str, ...], split: str = ""
    ) -> str:
        """Pseudo-labels of the unlabeled split (or of ``split``'s shards) by the ``teacher``
        checkpoint."""
        paths = {"teacher": teacher, "shards": split or self.data.unlabeled, "out": directory}
        # The students match the teacher's embeddings, or the selection asks the labeled
        # images' neighbours.
        if self.cfg.distils_features() or self.selects_by_neighbours():
            paths["embeddings"] = True
        lc = stage_config(self.cfg, "label", paths)
        run_label = stage_runner("label")

        def run() -> dict[str, Any]:
            s = run_label(lc, progress=self.progress)
            if s["failed"]:
                raise UserError(
                    f"{len(s['failed'])} shard(s) failed to label (see {directory}/"
                    "run_summary.json); rerun the same command to retry them"
                )
            return {"images": s["rows"], "img_s": s["images_per_s"]}

        return self._add(name, directory, params_of(lc, "label"), run, deps)

    def selects_by_neighbours(self) -> bool:
        """Whether the selection ranks, weighs or filters by the labeled images' neighbours
        (so labeling stores embeddings, and the labeled split is labeled too)."""
        from ssl_kd.select.neighbours import asked

        dry = {"labels": "-", "out": "-", "labeled_labels": "-"}
        return asked(stage_config(self.cfg, "select", dry))

    def add_select(
        self,
        name: str,
        directory: str,
        labels: str,
        deps: tuple[str, ...],
        round: int,
        seed: int | None,
        labeled_labels: str | None = None,
    ) -> str:
        """The top-K selection of ``labels`` (with the labeled images' own labels, when the
        selection asks their neighbours), and its precision when the true labels are known."""
        from ssl_kd.pipeline.precision import plot_curve, precision_curve, selection_precision

        paths = {"labels": labels, "out": directory, "labeled_labels": labeled_labels}
        sc = stage_config(self.cfg, "select", paths)
        run_select = stage_runner("select")
        truth = self.data.truth
        if truth:
            self.selections.append(Selection(round, seed, directory))

        def run() -> dict[str, Any]:
            report = run_select(sc)
            figures: dict[str, Any] = {
                "selected": report["selected"],
                "short_classes": len(report["short_classes"]),
            }
            if truth:
                if not storage.is_file(truth):
                    raise UserError(f"truth file {truth} does not exist")
                precision = selection_precision(directory, truth)
                atomic.write_text(
                    storage.join(directory, "precision.json"), json.dumps(precision, indent=2)
                )
                figures["precision"] = precision["precision"]
                curve = precision_curve(labels, truth, sc.top_p)
                atomic.write_text(
                    storage.join(directory, "precision_curve.json"), json.dumps(curve, indent=2)
                )
                plot_curve(curve, storage.join(directory, "precision_curve.png"), sc.per_class)
            return figures

        return self._add(name, directory, {**params_of(sc, "select"), "truth": truth}, run, deps)

    def add_materialize(
        self, name: str, directory: str, selection: str, deps: tuple[str, ...]
    ) -> str:
        """The selection copied into shuffled pseudo-labeled shards."""
        paths = {"selection": selection, "out": directory, "shards": None}
        mc = stage_config(self.cfg, "materialize", paths)
        run_materialize = stage_runner("materialize")

        def run() -> dict[str, Any]:
            m = run_materialize(mc, progress=self.progress)
            return {"samples": m["samples"], "shards": len(m["shards"])}

        return self._add(name, directory, params_of(mc, "materialize"), run, deps)

    def add_oracle_shards(
        self, name: str, directory: str, pseudo: str, deps: tuple[str, ...]
    ) -> str:
        """The ``pseudo`` shards with every sample labeled by the truth (the oracle's data)."""
        from ssl_kd.pipeline.oracle import oracle_shards

        truth = self.data.truth
        assert truth is not None

        def run() -> dict[str, Any]:
            counts = oracle_shards(pseudo, truth, directory)
            figures = {"samples": counts["samples"], "relabeled": counts["relabeled"]}
            return figures | ({"no_class": counts["no_class"]} if counts["no_class"] else {})

        return self._add(name, directory, {"truth": truth}, run, deps)

    def add_student(
        self,
        name: str,
        section: str,
        directory: str,
        seed: int,
        data: str,
        init: str | None,
        deps: tuple[str, ...],
        overrides: dict[str, Any] | None = None,
    ) -> str:
        """A student stage (``pretrain`` or ``finetune``, which starts from ``init``), with the
        section's keys and ``overrides``."""
        paths: dict[str, Any] = {"data": data, "out": directory, "seed": seed, **(overrides or {})}
        if section == "finetune":
            paths["init"] = init
        if section == "pretrain" and "labeled_share" in {**self.cfg.pretrain, **paths}:
            paths["labeled_data"] = self.data.labeled  # joint training on the labeled split
        if uses_pool({**getattr(self.cfg, section), **paths}):  # consistency on the pool
            paths["unlabeled"] = self.data.unlabeled
        sc = stage_config(self.cfg, section, paths)
        run_student = stage_runner(section)
        params = params_of(sc, section)
        if "labeled_data" in paths:  # a path, so not a parameter; that it is used is one
            params["joint"] = True

        def run() -> dict[str, Any]:
            s = run_student(sc, progress=self.progress)
            return {"steps": s["step"], "img_s": s["images_per_s"]}

        return self._add(name, directory, params, run, deps)

    def add_eval(self, model: Model, deps: tuple[str, ...]) -> str:
        """Test metrics of ``model``, which the results table reports."""
        directory = storage.join(self.root, "eval", model.slug)
        paths = {
            "checkpoint": model.checkpoint,
            "data": self.data.test,
            "teacher": model.teacher_checkpoint,
            "out": storage.join(directory, "metrics.json"),
            # Every student of a teacher is scored against it: its outputs are computed once.
            "teacher_cache": storage.join(self.root, "eval", "teacher_outputs"),
        }
        ec = stage_config(self.cfg, "evaluate", paths)
        run_evaluate = stage_runner("evaluate")

        def run() -> dict[str, Any]:
            r = run_evaluate(ec)
            figures = {"top1": r["top1"], "top5": r["top5"]}
            if r.get("fidelity"):
                figures["agreement"] = r["fidelity"]["agreement"]
            return figures

        self.models.append(model)
        deps = (*deps, model.stage, model.teacher_stage or "")
        return self._add(f"eval/{model.slug}", directory, params_of(ec, "evaluate"), run, deps)

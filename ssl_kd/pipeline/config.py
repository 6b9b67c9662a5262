"""``ssl-kd run``: one YAML file for the whole pipeline, one section per stage.

Top-level keys say where the data is and how many seeds and rounds to run; each section
(``teacher``, ``label``, ``select``, ``materialize``, ``pretrain``, ``finetune``, ``baseline``,
``evaluate``) holds that stage's own config keys, exactly as its ``ssl-kd`` command takes them,
minus the paths, which the pipeline fills in. Sections are checked when the config is loaded, so a
misspelt key fails before any stage runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.stages import command, load

# Each section is one stage of the command table; the seeded ones get the seed of their run.
SECTION_STAGES = {
    "teacher": "train",
    "adapt": "train",
    "label": "label",
    "select": "select",
    "materialize": "materialize",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "baseline": "train",
    "evaluate": "evaluate",
}
SEEDED = frozenset({"pretrain", "finetune", "baseline"})
SECTIONS = tuple(SECTION_STAGES)


def pipeline_keys(section: str) -> frozenset[str]:
    """Keys the pipeline sets itself: paths between stages, and the seed of seeded stages."""
    keys = command(SECTION_STAGES[section]).pipeline_keys
    if section == "adapt":  # it starts from the teacher's checkpoint
        keys = keys | {"init"}
    return keys | {"seed"} if section in SEEDED else keys


@dataclass(frozen=True)
class TeacherEnsemble:
    """An ``ensemble:`` section: the round-1 labels come from several teachers, averaged."""

    members: list[dict[str, Any]] = option(
        [],
        help="more teachers, each trained like the teacher with these teacher keys changed "
        "(e.g. [{seed: 1}, {seed: 2, arch: cnn}])",
    )
    tta: list[str] = option([], help="test-time augmentation views: flip, shift")
    shift: int | None = option(None, help="pixels of the shift views (default: side / 14)", min=1)


@dataclass(frozen=True)
class ExternalTeacher:
    """A ``teacher:`` section naming a teacher to start from instead of training one."""

    source: str = option(
        help="torchvision:NAME or timm:NAME[.TAG] (with weights), a TorchScript archive, an "
        "exported program (torch.export), open_clip:ARCH (zero-shot CLIP, with weights and "
        "class_names) or an ssl_kd checkpoint"
    )
    weights: str | None = option(
        None,
        help="torchvision:NAME, timm:NAME, open_clip:ARCH: the state_dict file (safetensors or "
        "torch)",
    )
    class_names: str | None = option(None, help="one class name per line, the teacher's order")
    keep_classes: str | None = option(None, help="the task's classes (names or indices)")
    image_size: int | None = option(
        None, help="centre-crop side (default 224, timm: its config's)", min=8
    )
    resize: int | None = option(
        None, help="shorter side before the crop (timm: from its config's crop_pct)", min=8
    )
    mean: list[float] | None = option(
        None, help="per-channel mean (default ImageNet's, timm: its config's)"
    )
    std: list[float] | None = option(
        None, help="per-channel std (default ImageNet's, timm: its config's)"
    )
    prompts: str | None = option(None, help="open_clip:ARCH: prompt templates, one per line")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """``ssl-kd run``: data, teacher, labels, selection, student, baseline and results."""

    out: str = option("runs/fashion_mnist", help="run directory; every stage writes under it")
    source: str | None = option(
        None, help="directory of the four Fashion-MNIST idx files (default: the Debian package's)"
    )
    labeled_per_class: int = option(100, help="Fashion-MNIST: labeled images per class", min=1)
    data_seed: int = option(0, help="Fashion-MNIST: seed of the labeled/unlabeled split")
    open_set: list[int] = option(
        [],
        help="Fashion-MNIST: classes left out of the task but kept in the unlabeled pool (an "
        "open-set pool)",
        min=0,
        max=9,
    )
    labeled: str | None = option(None, help="your labeled shards (instead of Fashion-MNIST)")
    unlabeled: str | None = option(None, help="your unlabeled shards (with --labeled, --test)")
    test: str | None = option(None, help="your labeled test shards (with --labeled, --unlabeled)")
    num_classes: int | None = option(
        None, help="your shards: number of classes (else from a dataset.json beside them)", min=1
    )
    class_names: str | None = option(None, help="your shards: file with one class name per line")
    truth: str | None = option(
        None, help="Parquet (shard, key, label) of the unlabeled images: pseudo-label precision"
    )
    seeds: list[int] = option([0], help="seeds of the students and baselines (mean and spread)")
    rounds: int = option(1, help="rounds; each fine-tuned student teaches the next round", min=1)
    students: list[dict[str, Any]] = option(
        [],
        help="the chain of students (Noisy Student): per round, from round 1, the pretrain keys "
        "that differ from the pretrain section (e.g. a larger arch and RandAugment in round 2, "
        "the target arch in the last); rounds without an entry use the section as it is",
    )
    joint_share: float = option(
        0.0,
        help="also train each seed's round-1 student jointly, this share of every pretraining "
        "batch from the labeled split (the results table's joint row); 0: not",
        min=0,
        max=0.9,
    )
    feature_weights: list[float] = option(
        [],
        help="also train each seed's round-1 student with feature distillation at each of these "
        "weights β (pretrain.feature_loss, or cosine; the results table's features rows)",
        gt=0,
    )
    goal_points: float = option(
        3.0, help="the results' goal line: the fine-tuned student's top-1 points over the baseline"
    )
    oracle_seeds: int = option(
        1,
        help="with the truth of the unlabeled images: train the oracle (the student on the true "
        "labels of the same selected images, same budget) for the first N seeds; 0: none",
        min=0,
    )
    executor: Literal["ray", "local"] = option(
        "ray", help="run the stages on Ray (tasks, actors, Ray Train) or in this process"
    )
    teacher: dict[str, Any] = option(
        {},
        help="ssl-kd train keys of the teacher, or an external teacher to start from "
        "(source, weights, class_names, keep_classes, image_size, resize, mean, std)",
    )
    adapt: dict[str, Any] = option(
        {},
        help="ssl-kd train keys of a second teacher stage that starts from the teacher (trained "
        "or imported) and adapts it, e.g. {ssl: fixmatch} to learn from the unlabeled split; "
        "it then labels. Empty: none",
    )
    label: dict[str, Any] = option({}, help="ssl-kd label keys")
    select: dict[str, Any] = option({"per_class": 5000}, help="ssl-kd select keys")
    materialize: dict[str, Any] = option({}, help="ssl-kd materialize keys")
    pretrain: dict[str, Any] = option({}, help="ssl-kd pretrain keys of the student")
    finetune: dict[str, Any] = option({}, help="ssl-kd finetune keys")
    baseline: dict[str, Any] = option(
        {},
        help="ssl-kd train keys of the supervised baseline (default: the student's "
        "architecture and the fine-tuning steps)",
    )
    evaluate: dict[str, Any] = option({}, help="ssl-kd evaluate keys")
    ensemble: dict[str, Any] = option(
        {},
        help="label with several teachers and/or test-time augmentation: members (teacher keys "
        "per extra teacher), tta, shift",
    )

    def validate(self) -> None:
        """Cross-field checks and a dry build of every stage's config."""
        own = [self.labeled, self.unlabeled, self.test]
        if any(own) and not all(own):
            raise UserError("give all three of labeled, unlabeled and test shards, or none")
        if not self.seeds:
            raise ConfigError("seeds", "needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"has repeats: {self.seeds}")
        built = {
            section: stage_config(self, section, _placeholders(section, getattr(self, section)))
            for section in SECTIONS
            if not (section == "teacher" and self.external_teacher())
            and not (section == "adapt" and not self.adapt)
        }
        self._validate_variants()
        if built["pretrain"].sample_weights and built["select"].weights == "none":
            raise ConfigError("pretrain.sample_weights", "needs select.weights to weigh the images")
        k, top_p = built["label"].k, built["select"].top_p
        if self.num_classes is not None and k > self.num_classes:
            raise ConfigError("label.k", f"is {k}, more than the {self.num_classes} classes")
        if top_p > k:
            raise ConfigError(
                "select.top_p", f"is {top_p}, more than the {k} classes kept per image (label.k)"
            )

    def _validate_variants(self) -> None:
        """The open-set pool, the chain of students and the teacher ensemble."""
        if self.open_set and self.uses_own_data():
            raise ConfigError("open_set", "builds a Fashion-MNIST variant; your shards are given")
        if len(set(self.open_set)) != len(self.open_set) or len(self.open_set) > 8:
            raise ConfigError("open_set", "needs distinct classes, at least 2 left in the task")
        if len(set(self.feature_weights)) != len(self.feature_weights):
            raise ConfigError("feature_weights", f"has repeats: {self.feature_weights}")
        if len(self.students) > self.rounds:
            raise ConfigError(
                "students", f"has {len(self.students)} entries for {self.rounds} round(s)"
            )
        for i, student in enumerate(self.students):
            _check_overrides(self, "pretrain", student, f"students[{i}]")
        ensemble = self.teacher_ensemble()
        if ensemble is not None:
            if self.adapt:
                raise ConfigError("adapt", "adapts one teacher; an ensemble labels with several")
            if ensemble.members and self.external_teacher():
                raise ConfigError(
                    "ensemble.members", "train teachers; an external teacher is imported"
                )
            for i, member in enumerate(ensemble.members):
                _check_overrides(self, "teacher", member, f"ensemble.members[{i}]")

    def feature_loss(self) -> str:
        """The feature loss of the pretrain section, or ``cosine`` where only the
        ``feature_weights`` rows distil features."""
        kind = self.pretrain.get("feature_loss", "none")
        return kind if kind != "none" else "cosine"

    def distils_features(self) -> bool:
        """True when some student matches the teacher's embeddings, so labeling stores them."""
        students = [self.pretrain, *({**self.pretrain, **s} for s in self.students)]
        used = any(r.get("feature_loss", "none") != "none" for r in students)
        return used or bool(self.feature_weights)

    def external_teacher(self) -> ExternalTeacher | None:
        """The ``teacher:`` section as an external teacher (it names a ``source``), else None."""
        if "source" not in self.teacher:
            return None
        try:
            return cfglib.from_dict(ExternalTeacher, self.teacher)
        except ConfigError as exc:
            raise ConfigError(f"teacher.{exc.key}", str(exc).split(": ", 1)[1]) from None

    def teacher_ensemble(self) -> TeacherEnsemble | None:
        """The ``ensemble:`` section, checked, or None when it is empty."""
        if not self.ensemble:
            return None
        try:
            ens = cfglib.from_dict(TeacherEnsemble, self.ensemble)
        except ConfigError as exc:
            raise ConfigError(f"ensemble.{exc.key}", str(exc).split(": ", 1)[1]) from None
        from ssl_kd.models.ensemble import check_tta

        try:
            check_tta(ens.tta)
        except ValueError as exc:
            raise ConfigError("ensemble.tta", str(exc)) from None
        return ens if ens.members or ens.tta else None

    def uses_own_data(self) -> bool:
        """True when the user named their shards (no Fashion-MNIST import)."""
        return self.labeled is not None


def _check_overrides(
    cfg: PipelineConfig, section: str, overrides: dict[str, Any], where: str
) -> None:
    """ConfigError unless ``overrides`` are keys of ``section`` the pipeline does not set."""
    clash = sorted(set(overrides) & pipeline_keys(section))
    if clash:
        raise ConfigError(f"{where}.{clash[0]}", "is set by the pipeline")
    try:
        values = {**getattr(cfg, section), **overrides}
        stage_config(cfg, section, {**_placeholders(section, values), **overrides})
    except ConfigError as exc:
        key = exc.key.split(".", 1)[-1]
        raise ConfigError(f"{where}.{key}", str(exc).split(": ", 1)[1]) from None


def student_overrides(cfg: PipelineConfig, round: int) -> dict[str, Any]:
    """The pretrain keys of round ``round``'s student that differ from the section."""
    return dict(cfg.students[round - 1]) if round <= len(cfg.students) else {}


def _placeholders(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Stand-ins for the paths and seed, for a dry build of a section's stage config with the
    section's ``values``."""
    keys = pipeline_keys(section)
    if "unlabeled" in keys and not uses_pool(values):
        keys = keys - {"unlabeled"}
    return {k: 0 if k == "seed" else "-" for k in keys}


def uses_pool(values: dict[str, Any]) -> bool:
    """Whether a training section's ``values`` learn from the unlabeled pool (``ssl``), which
    the pipeline then passes as ``unlabeled``."""
    return values.get("ssl", "none") != "none"


def _stage_class(section: str) -> type:
    spec = command(SECTION_STAGES[section]).config
    assert spec is not None, section
    return load(spec)


def stage_runner(section: str) -> Callable[..., Any]:
    """The function that runs a section's stage (as ``ssl-kd <stage>`` does)."""
    return load(command(SECTION_STAGES[section]).runner)


def section_values(cfg: PipelineConfig, section: str) -> dict[str, Any]:
    """The section's keys with the pipeline-wide defaults filled in (no paths)."""
    values: dict[str, Any] = dict(getattr(cfg, section))
    fields = {f.name for f in dataclasses.fields(_stage_class(section))}
    # The teacher and the baseline train in this process unless their section asks for Ray,
    # as they did before ``ssl-kd train`` could run on Ray Train.
    if "executor" in fields and SECTION_STAGES[section] != "train":
        values.setdefault("executor", cfg.executor)
    for key in ("num_classes", "class_names"):
        if key in fields and getattr(cfg, key) is not None:
            values.setdefault(key, getattr(cfg, key))
    if section == "baseline":  # the student's architecture and fine-tuning budget
        student = {**cfg.pretrain}
        for key in ("arch", "width", "image_size", "channels"):
            if key in student:
                values.setdefault(key, student[key])
        values.setdefault("steps", cfg.finetune.get("steps", _stage_class("finetune").steps))
    return values


def stage_config(cfg: PipelineConfig, section: str, paths: dict[str, Any]) -> Any:
    """The validated config of one stage: the section's keys plus the pipeline's ``paths``."""
    values = section_values(cfg, section)
    clash = sorted(set(values) & pipeline_keys(section))
    if clash:
        raise ConfigError(
            f"{section}.{clash[0]}", "is set by the pipeline; remove it from the section"
        )
    try:
        return cfglib.from_dict(_stage_class(section), {**values, **paths})
    except ConfigError as exc:
        raise ConfigError(f"{section}.{exc.key}", str(exc).split(": ", 1)[1]) from None

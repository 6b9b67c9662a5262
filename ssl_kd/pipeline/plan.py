"""The pipeline as a list of stages: which stage reads what, writes where, and depends on what.

Layout of a run directory (``out``)::

    data/                      Fashion-MNIST as labeled / unlabeled / test shards (skipped when
                               you name your own shards)
    teacher/                   the round-1 teacher (ssl-kd train)
    teacher_adapted/           with an adapt section: the teacher after adaptation (e.g.
                               FixMatch on the unlabeled split), which then labels round 1
    teachers/member{I}/, teachers/ensemble/   with an ensemble: the other teachers, and all
                               of them (with TTA) as the one that labels round 1
    baseline/seed{S}/          the supervised baseline: student architecture, labels only
    round1/labels|selection|pseudo/      labels, top-K selection and materialised shards
    round1/labeled_labels/     when the selection asks neighbours (select.rank_by, weights,
                               far_floor): the labeled split labeled too, with embeddings
    round{R}/seed{S}/pretrain|finetune/  the student of round R
    round1/seed{S}/joint/      with joint_share: the student trained jointly instead
    round1/seed{S}/features{β}/pretrain|finetune/  with feature_weights: the student that also
                               matches the teacher's embeddings, at weight β
    round{R>1}/seed{S}/labels|selection|pseudo/  later rounds: each seed's student teaches on
    round1/oracle/             the round-1 shards labeled with the truth (when it is known)
    oracle/seed{S}/pretrain|finetune/    the oracle: the student on those true labels
    eval/{model}/metrics.json  test metrics (fidelity to the model's teacher, size, CPU speed)
    eval/teacher_outputs/      each teacher's outputs on the test set, computed once for its
                               students' fidelity figures
    results/                   results.json, results.md, results.png
    stages/                    one marker per stage (fingerprint, seconds, figures)

Round 1 shares one teacher, labels and selection across seeds; the seeds vary the student's
and the baseline's initialisation, data order and augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ssl_kd import storage
from ssl_kd.pipeline.builder import Model, PlanBuilder
from ssl_kd.pipeline.config import PipelineConfig, student_overrides


@dataclass(frozen=True)
class Pseudo:
    """The pseudo-labeled shards a student pretrains on, and the teacher that labeled them."""

    stage: str
    dir: str
    teacher: str  # the teacher's stage
    teacher_checkpoint: str


def _add_pseudo(
    b: PlanBuilder,
    here: str,
    name: str,
    teacher: tuple[str, str],
    data: str,
    round: int,
    seed: int | None,
) -> Pseudo:
    """Labels, selection and materialised shards under ``here`` from ``teacher`` (stage, ckpt)."""
    at = storage.join
    labels = b.add_label(f"{name}/labels", at(here, "labels"), teacher[1], (data, teacher[0]))
    deps, labeled_labels = (labels,), None
    if b.selects_by_neighbours():  # the labeled images, with their embeddings, as anchors
        labeled_labels = at(here, "labeled_labels")
        deps += (
            b.add_label(
                f"{name}/labeled_labels",
                labeled_labels,
                teacher[1],
                (data, teacher[0]),
                split=b.data.labeled,
            ),
        )
    selection = b.add_select(
        f"{name}/selection",
        at(here, "selection"),
        at(here, "labels"),
        deps,
        round,
        seed,
        labeled_labels,
    )
    pseudo = b.add_materialize(
        f"{name}/pseudo", at(here, "pseudo"), at(here, "selection"), (selection, data)
    )
    return Pseudo(pseudo, at(here, "pseudo"), *teacher)


def _add_student_rounds(b: PlanBuilder, seed: int, round1: Pseudo, data: str) -> None:
    """Every round of one seed's student; from round 2 on, its last student is the teacher."""
    at = storage.join
    pseudo = round1
    for r in range(1, b.cfg.rounds + 1):
        here = at(b.root, f"round{r}", f"seed{seed}")
        name = f"round{r}/seed{seed}"
        if r > 1:  # this seed's previous student labels the unlabeled set again
            teacher = (pseudo.teacher, pseudo.teacher_checkpoint)
            pseudo = _add_pseudo(b, here, name, teacher, data, r, seed)
        (pre, pre_ckpt), (fin, fin_ckpt) = _add_pretrain_finetune(
            b, name, here, seed, (pseudo.dir, pseudo.stage), data, student_overrides(b.cfg, r)
        )
        for role, trained in (("pretrained", (pre, pre_ckpt)), ("finetuned", (fin, fin_ckpt))):
            _add_student_eval(
                b, pseudo, data, f"round{r}-seed{seed}-{role}", role, r, seed, trained
            )
        if r == 1 and b.cfg.joint_share:
            _add_joint(b, seed, here, pseudo, data)
        if r == 1:
            for weight in b.cfg.feature_weights:
                _add_features(b, seed, here, pseudo, data, weight)
        pseudo = Pseudo(pseudo.stage, pseudo.dir, fin, fin_ckpt)


def _add_joint(b: PlanBuilder, seed: int, here: str, pseudo: Pseudo, data: str) -> None:
    """Round 1's student trained jointly on the pseudo-labeled and the labeled images (the
    results table's ``joint`` row), beside pretrain-then-fine-tune."""
    at = storage.join
    overrides = {**student_overrides(b.cfg, 1), "labeled_share": b.cfg.joint_share}
    stage = b.add_student(
        f"round1/seed{seed}/joint",
        "pretrain",
        at(here, "joint"),
        seed,
        pseudo.dir,
        None,
        (pseudo.stage, data),
        overrides,
    )
    trained = (stage, at(here, "joint", "checkpoint.pt"))
    _add_student_eval(b, pseudo, data, f"round1-seed{seed}-joint", "joint", 1, seed, trained)


def _add_features(
    b: PlanBuilder, seed: int, here: str, pseudo: Pseudo, data: str, weight: float
) -> None:
    """Round 1's student pretrained with feature distillation at weight ``weight``, then
    fine-tuned (the results table's ``features`` rows), beside the section's student."""
    overrides = {
        **student_overrides(b.cfg, 1),
        "feature_loss": b.cfg.feature_loss(),
        "feature_weight": weight,
    }
    name, where = f"round1/seed{seed}/features{weight:g}", storage.join(here, f"features{weight:g}")
    stages = _add_pretrain_finetune(
        b, name, where, seed, (pseudo.dir, pseudo.stage), data, overrides
    )
    variant = f"{b.cfg.feature_loss()} β={weight:g}"
    for role, trained in zip(("pretrained", "finetuned"), stages, strict=True):
        slug = f"round1-seed{seed}-features{weight:g}-{role}"
        _add_student_eval(b, pseudo, data, slug, role, 1, seed, trained, variant)


def _add_student_eval(
    b: PlanBuilder,
    pseudo: Pseudo,
    data: str,
    slug: str,
    role: str,
    round: int,
    seed: int,
    trained: tuple[str, str],
    variant: str = "",
) -> None:
    """The test metrics of a student (stage, checkpoint) taught by ``pseudo``'s teacher: its
    row of the results table."""
    stage, ckpt = trained
    model = Model(
        slug, role, round, seed, stage, ckpt, pseudo.teacher, pseudo.teacher_checkpoint, variant
    )
    b.add_eval(model, (data,))


def _add_pretrain_finetune(
    b: PlanBuilder,
    name: str,
    here: str,
    seed: int,
    shards: tuple[str, str],
    data: str,
    overrides: dict[str, Any],
) -> tuple[tuple[str, str], tuple[str, str]]:
    """A student pretrained on ``shards`` (directory, stage) with the pretrain section and
    ``overrides``, then fine-tuned on the labeled split, under ``here``; their (stage,
    checkpoint) pairs."""
    at = storage.join
    pre_ckpt = at(here, "pretrain", "checkpoint.pt")
    pre = b.add_student(
        f"{name}/pretrain",
        "pretrain",
        at(here, "pretrain"),
        seed,
        shards[0],
        None,
        (shards[1],),
        overrides,
    )
    fin_ckpt = at(here, "finetune", "checkpoint.pt")
    fin = b.add_student(
        f"{name}/finetune",
        "finetune",
        at(here, "finetune"),
        seed,
        b.data.labeled,
        pre_ckpt,
        (pre, data),
    )
    return (pre, pre_ckpt), (fin, fin_ckpt)


def _add_teacher_ensemble(
    b: PlanBuilder, first: str, first_ckpt: str, data: str
) -> tuple[str, str]:
    """The ensemble's other members, trained, and the ensemble of all; its (stage, checkpoint)."""
    at = storage.join
    ens = b.cfg.teacher_ensemble()
    assert ens is not None
    stages, ckpts = [first], [first_ckpt]
    for i, overrides in enumerate(ens.members, 1):
        here = at(b.root, "teachers", f"member{i}")
        stages.append(b.add_train(f"teachers/member{i}", "teacher", here, None, data, overrides))
        ckpts.append(at(here, "checkpoint.pt"))
    here = at(b.root, "teachers", "ensemble")
    stage = b.add_ensemble("teachers/ensemble", here, ckpts, tuple(stages))
    return stage, at(here, "checkpoint.pt")


def _add_oracle(b: PlanBuilder, seed: int, round1: Pseudo, shards: str, data: str) -> None:
    """One seed's oracle: the student's pretraining and fine-tuning, on the true labels of the
    round-1 selection (cross-entropy: the truth has no soft label)."""
    at = storage.join
    here = at(b.root, "oracle", f"seed{seed}")
    overrides = {**student_overrides(b.cfg, 1), "loss": "hard"}  # round 1's student, on the truth
    _, (fin, fin_ckpt) = _add_pretrain_finetune(
        b,
        f"oracle/seed{seed}",
        here,
        seed,
        (at(b.root, "round1", "oracle"), shards),
        data,
        overrides,
    )
    model = Model(
        f"oracle-seed{seed}",
        "oracle",
        1,
        seed,
        fin,
        fin_ckpt,
        round1.teacher,
        round1.teacher_checkpoint,
    )
    b.add_eval(model, (data,))


def build_plan(cfg: PipelineConfig, progress: bool = True) -> PlanBuilder:
    """Every stage of ``cfg``'s pipeline in run order, and the models to report."""
    root = cfg.out
    at = storage.join  # the run directory may be a path or an s3:// prefix
    b = PlanBuilder(cfg, root, progress)
    data = b.add_data()
    test_dep = (data,)
    if cfg.external_teacher():  # a teacher to start from: imported, not trained
        teacher = b.add_teacher_import("teacher", at(root, "teacher"), data)
    else:
        teacher = b.add_train("teacher", "teacher", at(root, "teacher"), None, data)
    teacher_ckpt = at(root, "teacher", "checkpoint.pt")
    if cfg.adapt:  # the teacher, adapted (to the unlabeled split, say) before it labels
        here = at(root, "teacher_adapted")
        init = {"init": teacher_ckpt}
        teacher = b.add_train("teacher_adapted", "adapt", here, None, data, init, after=teacher)
        teacher_ckpt = at(here, "checkpoint.pt")
    if cfg.teacher_ensemble():
        teacher, teacher_ckpt = _add_teacher_ensemble(b, teacher, teacher_ckpt, data)
    b.add_eval(Model("teacher", "teacher", 0, None, teacher, teacher_ckpt, None, None), test_dep)
    for seed in cfg.seeds:
        here = at(root, "baseline", f"seed{seed}")
        base = b.add_train(f"baseline/seed{seed}", "baseline", here, seed, data)
        ckpt = at(here, "checkpoint.pt")
        model = Model(
            f"baseline-seed{seed}", "baseline", 0, seed, base, ckpt, teacher, teacher_ckpt
        )
        b.add_eval(model, test_dep)
    # Round 1: one teacher, so the labels, selection and shards are shared by every seed.
    round1 = _add_pseudo(b, at(root, "round1"), "round1", (teacher, teacher_ckpt), data, 1, None)
    for seed in cfg.seeds:
        _add_student_rounds(b, seed, round1, data)
    if cfg.oracle_seeds and b.data.truth:
        shards = b.add_oracle_shards(
            "round1/oracle", at(root, "round1", "oracle"), round1.dir, (round1.stage, data)
        )
        for seed in cfg.seeds[: cfg.oracle_seeds]:
            _add_oracle(b, seed, round1, shards, data)
    return b

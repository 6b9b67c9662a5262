"""Every ``ssl-kd`` command in one table, read by the command line and by the pipeline.

An entry names its config class, runner and summary formatter as ``"module:attr"`` strings, so
that only the modules of the command being run are imported (``ssl-kd models`` does not load
torch). The command line calls every command the same way::

    cfg = resolve(config, args)                  # defaults < --config YAML < flags < --set
    summary = runner(cfg, **shell_kwargs)        # the keyword arguments in ``runner_kwargs``
    print(formatter(cfg, summary))               # or the summary as JSON with --json

Extra flags that are not config keys have one meaning each, wherever they appear: ``--set``
(dest ``set``) overrides a section key, ``--json`` (dest ``json``) prints the summary as one
JSON document, and ``--no-progress`` (dest ``no_progress``) draws no progress bar, as ``-q``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Flag:
    """A command-line flag that is not a config key: its name and argparse keyword arguments."""

    name: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Group:
    """A command that only groups subcommands (``ssl-kd data ...``, ``ssl-kd inspect ...``)."""

    help: str
    dest: str  # argparse names it in "the following arguments are required: <dest>"


@dataclass(frozen=True)
class Command:
    """One ``ssl-kd`` command; ``name`` is its words after ``ssl-kd`` (``"inspect labels"``)."""

    name: str
    help: str
    runner: str  # "module:function": (cfg, **runner_kwargs) -> summary, or () when no config
    formatter: str  # "module:function": (cfg, summary) -> the text printed on stdout
    config: str | None = None  # "module:Class" whose fields become the flags
    description: str | None = None  # the subcommand's --help text (default: ``help``)
    config_file: bool = True  # takes --config YAML; without it, errors name the flag
    runner_kwargs: tuple[str, ...] = ()  # of "progress" and "config_path"
    flags: tuple[Flag, ...] = ()
    problems: str | None = None  # "module:function": (cfg, summary) -> lines for stderr
    fails_on: str | None = None  # a summary key that, when not empty, makes the exit status 1
    pipeline_keys: frozenset[str] = field(default_factory=frozenset)  # paths ssl-kd run fills

    @property
    def words(self) -> list[str]:
        """The command's words: ``[group, name]`` or ``[name]``."""
        return self.name.split()


def load(spec: str) -> Any:
    """The object named by ``"module:attr"``, importing the module."""
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def format_lines(cfg: Any, items: list[str]) -> str:
    """One item per line (``ssl-kd models``)."""
    return "\n".join(items)


NO_PROGRESS = Flag("--no-progress", {"action": "store_true", "help": "no progress bar"})
SET = Flag(
    "--set",
    {
        "action": "append",
        "metavar": "SECTION.KEY=VALUE",
        "help": "override one key of a section (repeatable), e.g. --set pretrain.steps=3000",
    },
)


def _json(help: str) -> Flag:
    return Flag("--json", {"action": "store_true", "help": help})


# unlabeled: the run's pool, when a training section sets ssl
_TRAIN_PATHS = frozenset({"data", "out", "val_data", "unlabeled"})
_INSPECT = "ssl_kd.inspect.commands"

GROUPS = {
    "data": Group("import a built-in dataset as shards", dest="dataset"),
    "inspect": Group("summaries, views, charts and contact sheets", dest="what"),
}

# In the order of ``ssl-kd --help``.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "data fashion-mnist",
            "Fashion-MNIST as labeled / unlabeled / test shards",
            runner="ssl_kd.datasets.fashion_mnist:import_fashion_mnist",
            formatter="ssl_kd.datasets.fashion_mnist:format_summary",
            config="ssl_kd.datasets.fashion_mnist:FashionMnistConfig",
            runner_kwargs=("progress",),
        ),
        Command(
            "train",
            "supervised training on shards",
            runner="ssl_kd.train.run:run_train",
            formatter="ssl_kd.train.run:format_summary",
            config="ssl_kd.train.options:TrainConfig",
            runner_kwargs=("progress",),
            flags=(NO_PROGRESS,),
            pipeline_keys=_TRAIN_PATHS,
        ),
        Command(
            "evaluate",
            "metrics of a checkpoint",
            runner="ssl_kd.evaluate.run:run_evaluate",
            formatter="ssl_kd.evaluate.run:format_summary",
            config="ssl_kd.evaluate.run:EvalConfig",
            runner_kwargs=("progress",),
            pipeline_keys=frozenset({"checkpoint", "data", "teacher", "out", "teacher_cache"}),
        ),
        Command(
            "ensemble",
            "combine teacher checkpoints, with test-time augmentation, into one teacher",
            runner="ssl_kd.models.combine:run_ensemble",
            formatter="ssl_kd.models.combine:format_summary",
            config="ssl_kd.models.combine:EnsembleConfig",
            config_file=False,
        ),
        Command(
            "label",
            "top-k pseudo-labels of shards (Ray)",
            runner="ssl_kd.label.run:run_label",
            formatter="ssl_kd.label.run:format_summary",
            config="ssl_kd.label.config:LabelConfig",
            runner_kwargs=("progress",),
            problems="ssl_kd.label.run:format_problems",
            fails_on="failed",
            pipeline_keys=frozenset({"teacher", "shards", "out"}),
        ),
        Command(
            "select",
            "class-balanced top-K per class",
            runner="ssl_kd.select.run:run_select",
            formatter="ssl_kd.select.report:format_summary",
            config="ssl_kd.select.run:SelectConfig",
            pipeline_keys=frozenset({"labels", "out", "labeled_labels"}),
        ),
        Command(
            "materialize",
            "copy the selection into shuffled pseudo-labeled shards",
            runner="ssl_kd.materialize.run:run_materialize",
            formatter="ssl_kd.materialize.run:format_summary",
            config="ssl_kd.materialize.run:MaterializeConfig",
            runner_kwargs=("progress",),
            pipeline_keys=frozenset({"selection", "out", "shards"}),
        ),
        Command(
            "pretrain",
            "train the student on pseudo-labeled shards (Ray Train)",
            runner="ssl_kd.train.run:run_student",
            formatter="ssl_kd.train.run:format_summary",
            config="ssl_kd.train.options:StudentConfig",
            runner_kwargs=("progress",),
            # labeled_data: the run's labeled split, when the section sets labeled_share
            pipeline_keys=_TRAIN_PATHS | {"init", "labeled_data"},
        ),
        Command(
            "finetune",
            "fine-tune a pretrained student on the true labels (Ray Train)",
            runner="ssl_kd.train.run:run_student",
            formatter="ssl_kd.train.run:format_summary",
            config="ssl_kd.train.options:FinetuneConfig",
            runner_kwargs=("progress",),
            pipeline_keys=_TRAIN_PATHS | {"init"},
        ),
        Command(
            "inspect labels",
            "a label directory: summary, one class, one key, or a comparison",
            runner=f"{_INSPECT}:inspect_labels",
            formatter=f"{_INSPECT}:format_document",
            config=f"{_INSPECT}:InspectLabelsConfig",
            description="Summarise a label directory (default), or show the --top N most "
            "confident images of a --class, the labels of a --key, or top-1 agreement with "
            "--compare DIR.",
            config_file=False,
            flags=(_json("print one JSON document"),),
        ),
        Command(
            "inspect selection",
            "a selection directory: per-class counts, scores, repeats, removals",
            runner=f"{_INSPECT}:inspect_selection",
            formatter=f"{_INSPECT}:format_document",
            config=f"{_INSPECT}:InspectSelectionConfig",
            description="Per-class table of selection.parquet and report.json (ssl-kd select).",
            config_file=False,
            flags=(_json("print one JSON document"),),
        ),
        Command(
            "run",
            "the whole pipeline, data to results table; reruns only what changed",
            runner="ssl_kd.pipeline.run:run_pipeline",
            formatter="ssl_kd.pipeline.run:format_summary",
            config="ssl_kd.pipeline.config:PipelineConfig",
            runner_kwargs=("progress", "config_path"),
            flags=(SET,),
        ),
        Command(
            "estimate",
            "project labeling hours and storage to N images from measured throughput",
            runner="ssl_kd.pipeline.estimate:estimate",
            formatter="ssl_kd.pipeline.estimate:format_summary",
            config="ssl_kd.pipeline.estimate:EstimateConfig",
            flags=(_json("print the JSON document"),),
        ),
        Command(
            "check-cluster",
            "validate a Ray cluster file offline",
            runner="ssl_kd.cluster_config:check_cluster",
            formatter="ssl_kd.cluster_config:format_summary",
            config="ssl_kd.cluster_config:CheckClusterConfig",
            config_file=False,
        ),
        Command(
            "models",
            "list model architectures",
            runner="ssl_kd.models.registry:list_models",
            formatter="ssl_kd.stages:format_lines",
        ),
    )
}


def command(name: str) -> Command:
    """The table entry of ``ssl-kd <name>`` (e.g. ``"train"``, ``"inspect labels"``)."""
    return COMMANDS[name]

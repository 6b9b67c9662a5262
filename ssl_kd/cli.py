"""``ssl-kd`` command line: a thin shell that resolves configs and calls the stage functions.

Bad input of any kind (flags, config keys, paths, files) ends with one ``ssl-kd: error:`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ssl_kd import __version__
from ssl_kd import config as cfglib
from ssl_kd.errors import UserError

log = logging.getLogger("ssl_kd")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2, like every other input error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ssl-kd: error: {message} (see {self.prog} --help)\n")


def _cmd_fashion_mnist(args: argparse.Namespace) -> int:
    from ssl_kd.datasets.fashion_mnist import FashionMnistConfig, import_fashion_mnist

    cfg = cfglib.resolve(FashionMnistConfig, args)
    info = import_fashion_mnist(cfg)
    counts = info["counts"]
    print(
        f"Fashion-MNIST in {cfg.out}: {counts['labeled']} labeled, {counts['unlabeled']} "
        f"unlabeled, {counts['test']} test images "
        f"({sum(len(v) for v in info['shards'].values())} shards)"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ssl_kd.train.supervised import TrainConfig, run_train

    cfg = cfglib.resolve(TrainConfig, args)
    log.info("ssl_kd %s train config: %s", __version__, json.dumps(cfglib.to_dict(cfg)))
    summary = run_train(cfg, progress=not args.no_progress)
    verb = "already trained" if summary["resumed_at"] == summary["step"] else "trained"
    line = f"{verb} {summary['arch']} for {summary['step']} steps -> {summary['checkpoint']}"
    if "val" in summary:
        line += f"; val top-1 {100 * summary['val']['top1']:.2f}%"
    print(line)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ssl_kd.evaluate.run import EvalConfig, format_report, run_evaluate

    cfg = cfglib.resolve(EvalConfig, args)
    print(format_report(run_evaluate(cfg, progress=not args.quiet)))
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from ssl_kd.label.run import LabelConfig, run_label

    cfg = cfglib.resolve(LabelConfig, args)
    s = run_label(cfg, progress=not args.quiet)
    if s["labeled"] == 0 and not s["failed"]:
        print(f"nothing to label: all {s['shards']} shards already labeled in {cfg.out}")
        return 0
    print(
        f"labeled {s['labeled']} shards ({s['already_done']} already done): {s['rows']} images, "
        f"{s['skipped_samples']} skipped, {s['bytes_per_image']} bytes/image, "
        f"{s['images_per_s']} img/s -> {cfg.out}"
    )
    if s["truncated_shards"]:
        print(f"truncated shards: {', '.join(s['truncated_shards'])}", file=sys.stderr)
    if s["failed"]:
        print(
            f"ssl-kd: {len(s['failed'])} shard(s) failed after retries (see "
            f"{cfg.out}/run_summary.json); rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from ssl_kd.select.run import SelectConfig, format_report, run_select

    cfg = cfglib.resolve(SelectConfig, args)
    report = run_select(cfg)
    print(format_report(report))
    print(
        f"selected {report['selected']} images ({report['with_repeats']} with repeats), "
        f"{len(report['short_classes'])} classes short of {cfg.per_class} -> {cfg.out}"
    )
    return 0


def _cmd_materialize(args: argparse.Namespace) -> int:
    from ssl_kd.materialize.run import MaterializeConfig, run_materialize

    cfg = cfglib.resolve(MaterializeConfig, args)
    m = run_materialize(cfg, progress=not args.quiet)
    verb = "already materialized" if m["already_done"] else "materialized"
    print(
        f"{verb} {m['samples']} samples ({m['selected_rows']} selected rows) from "
        f"{m['source_shards']} source shards into {len(m['shards'])} shards -> {cfg.out}"
    )
    return 0


def _student(cls_name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from ssl_kd.train import student

        cfg = cfglib.resolve(getattr(student, cls_name), args)
        log.info("ssl_kd %s config: %s", __version__, json.dumps(cfglib.to_dict(cfg)))
        s = student.run_student(cfg, progress=not args.quiet)
        verb = "already trained" if s["resumed_at"] == s["step"] else "trained"
        line = (
            f"{verb} {s['arch']} ({s['loss']} loss, {s['workers']} worker(s)) for {s['step']} "
            f"steps -> {s['checkpoint']}"
        )
        if "val" in s:
            line += f"; val top-1 {100 * s['val']['top1']:.2f}%"
        print(line)
        return 0

    return command


def _cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from ssl_kd.pipeline.config import PipelineConfig, apply_overrides
    from ssl_kd.pipeline.run import run_pipeline

    data: dict[str, Any] = cfglib.read_yaml(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    cfg = cfglib.from_dict(PipelineConfig, apply_overrides(data, args.set or []))
    log.info("ssl_kd %s run config: %s", __version__, json.dumps(cfglib.to_dict(cfg)))
    title = f"Results of {args.config}" if args.config else ""
    s = run_pipeline(cfg, progress=not args.quiet, title=title)
    print(s["table"])
    for g in s["goals"]:
        print(
            f"round {g['round']}: fine-tuned student {g['gain_over_baseline_points']:+.2f} points "
            f"over the baseline, {g['gain_over_teacher_points']:+.2f} over its teacher"
        )
    print(f"results -> {s['results']}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from ssl_kd.estimate import EstimateConfig, estimate, format_estimate

    e = estimate(cfglib.resolve(EstimateConfig, args))
    print(json.dumps(e, indent=2) if args.json else format_estimate(e))
    return 0


def _cmd_check_cluster(args: argparse.Namespace) -> int:
    from ssl_kd.cluster_config import validate_cluster_file

    cfg = validate_cluster_file(args.file)
    types = ", ".join(cfg.get("available_node_types", {})) or "local provider"
    print(f"{args.file}: valid Ray cluster config ({cfg['provider']['type']}: {types})")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from ssl_kd.models.registry import list_models

    print("\n".join(list_models()))
    return 0


def _print_inspect(doc: dict[str, Any], as_json: bool) -> int:
    from ssl_kd.inspect.commands import format_document

    print(json.dumps(doc, indent=2) if as_json else format_document(doc))
    return 0


def _cmd_inspect_labels(args: argparse.Namespace) -> int:
    from ssl_kd.inspect.commands import InspectLabelsConfig, inspect_labels

    cfg = InspectLabelsConfig(
        directory=args.dir, cls=args.cls, key=args.key, compare=args.compare, top=args.top,
        plots=args.plots, contact_sheet=args.contact_sheet, out=args.out, shards=args.shards,
    )  # fmt: skip
    return _print_inspect(inspect_labels(cfg), args.json)


def _cmd_inspect_selection(args: argparse.Namespace) -> int:
    from ssl_kd.inspect.commands import InspectSelectionConfig, inspect_selection

    cfg = InspectSelectionConfig(
        directory=args.dir, top=args.top, plots=args.plots, contact_sheet=args.contact_sheet,
        out=args.out, shards=args.shards,
    )  # fmt: skip
    return _print_inspect(inspect_selection(cfg), args.json)


def _inspect_parser(sub: Any) -> None:
    inspect = sub.add_parser("inspect", help="summaries, views, charts and contact sheets")
    what = inspect.add_subparsers(dest="what", required=True, parser_class=_Parser)
    labels = what.add_parser(
        "labels", help="a label directory: summary, one class, one key, or a comparison",
        description="Summarise a label directory (default), or show the --top N most confident "
        "images of a --class, the labels of a --key, or top-1 agreement with --compare DIR.",
    )  # fmt: skip
    labels.add_argument("dir", metavar="DIR", help="directory of label files (ssl-kd label)")
    view = labels.add_mutually_exclusive_group()
    view.add_argument("--class", dest="cls", metavar="C", help="class name or index")
    view.add_argument("--key", help="show this image's labels in every shard that has it")
    view.add_argument("--compare", metavar="OTHER_DIR", help="top-1 agreement with these labels")
    selection = what.add_parser(
        "selection", help="a selection directory: per-class counts, scores, repeats, removals",
        description="Per-class table of selection.parquet and report.json (ssl-kd select).",
    )  # fmt: skip
    selection.add_argument("dir", metavar="DIR", help="directory written by ssl-kd select")
    for p, fn in ((labels, _cmd_inspect_labels), (selection, _cmd_inspect_selection)):
        p.add_argument("--top", type=int, default=16, metavar="N",
                       help="images per class view or contact sheet (default: 16)")  # fmt: skip
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.add_argument("--plots", metavar="DIR", help="write PNG charts into DIR")
        p.add_argument("--contact-sheet", metavar="CLASS", help="draw the class's top images")
        p.add_argument("--out", metavar="FILE.png", help="where --contact-sheet writes")
        p.add_argument("--shards", metavar="DIR_OR_SPEC",
                       help="where the shards are (default: as recorded at labeling)")  # fmt: skip
        p.set_defaults(func=fn)


def _stage_parser(
    sub: Any, name: str, config: str | None, fn: Callable[[argparse.Namespace], int], help: str,
    wanted: set[str],
) -> argparse.ArgumentParser:  # fmt: skip
    """A subcommand; its flags come from the ``module:Class`` config, imported only when the
    command line names this command (importing every stage would load torch for each run)."""
    p = sub.add_parser(name, help=help, description=help)
    if config is not None and name in wanted:
        module, cls = config.split(":")
        cfglib.add_arguments(p, getattr(importlib.import_module(module), cls))
    p.set_defaults(func=fn)
    return p


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ssl-kd`` parser; stage flags are added for the commands named in ``argv`` (all of
    them when ``argv`` is None)."""
    wanted = set(_STAGES) | {"fashion-mnist"} if argv is None else set(argv)
    parser = _Parser(prog="ssl-kd", description="Semi-supervised teacher/student training.")
    parser.add_argument("--version", action="version", version=f"ssl-kd {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="import a built-in dataset as shards")
    data_sub = data.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    _stage_parser(
        data_sub, "fashion-mnist", "ssl_kd.datasets.fashion_mnist:FashionMnistConfig",
        _cmd_fashion_mnist, "Fashion-MNIST as labeled / unlabeled / test shards", wanted,
    )  # fmt: skip
    for name, (config, fn, help) in _STAGES.items():
        p = _stage_parser(sub, name, config, fn, help, wanted)
        if name == "train":
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "run":
            p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                           help="override one key of a section (repeatable), e.g. "
                           "--set pretrain.steps=3000")  # fmt: skip
        if name == "estimate":
            p.add_argument("--json", action="store_true", help="print the JSON document")
        if name == "finetune":
            _inspect_parser(sub)
    check = _stage_parser(sub, "check-cluster", None, _cmd_check_cluster,
                          "validate a Ray cluster file offline", wanted)  # fmt: skip
    check.add_argument("file", metavar="FILE", help="cluster YAML (e.g. cluster.yaml)")
    _stage_parser(sub, "models", None, _cmd_models, "list model architectures", wanted)
    return parser


_STAGES: dict[str, tuple[str, Callable[[argparse.Namespace], int], str]] = {
    "train": ("ssl_kd.train.supervised:TrainConfig", _cmd_train, "supervised training on shards"),
    "evaluate": ("ssl_kd.evaluate.run:EvalConfig", _cmd_evaluate, "metrics of a checkpoint"),
    "label": ("ssl_kd.label.run:LabelConfig", _cmd_label, "top-k pseudo-labels of shards (Ray)"),
    "select": ("ssl_kd.select.run:SelectConfig", _cmd_select, "class-balanced top-K per class"),
    "materialize": ("ssl_kd.materialize.run:MaterializeConfig", _cmd_materialize,
                    "copy the selection into shuffled pseudo-labeled shards"),
    "pretrain": ("ssl_kd.train.student:StudentConfig", _student("StudentConfig"),
                 "train the student on pseudo-labeled shards (Ray Train)"),
    "finetune": ("ssl_kd.train.student:FinetuneConfig", _student("FinetuneConfig"),
                 "fine-tune a pretrained student on the true labels (Ray Train)"),
    "run": ("ssl_kd.pipeline.config:PipelineConfig", _cmd_run,
            "the whole pipeline, data to results table; reruns only what changed"),
    "estimate": ("ssl_kd.estimate:EstimateConfig", _cmd_estimate,
                 "project labeling hours and storage to N images from measured throughput"),
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssl-kd`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except UserError as exc:
        print(f"ssl-kd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssl-kd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

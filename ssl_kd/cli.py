"""``ssl-kd`` command line: a thin shell that resolves configs and calls the stage functions.

Bad input of any kind (flags, config keys, paths, files) ends with one ``ssl-kd: error:`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
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
    from ssl_kd.evaluate import EvalConfig, run_evaluate

    cfg = cfglib.resolve(EvalConfig, args)
    r = run_evaluate(cfg, progress=not args.quiet)
    print(
        f"{r['arch']} on {r['n']} images: top-1 {100 * r['top1']:.2f}%  "
        f"top-5 {100 * r['top5']:.2f}%  ({r['seconds']:.1f} s, {r['images_per_s']} img/s)"
        + (f" -> {cfg.out}" if cfg.out else "")
    )
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from ssl_kd.label_job import LabelConfig, run_label

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
    from ssl_kd.select import SelectConfig, format_report, run_select

    cfg = cfglib.resolve(SelectConfig, args)
    report = run_select(cfg)
    print(format_report(report))
    print(
        f"selected {report['selected']} images ({report['with_repeats']} with repeats), "
        f"{len(report['short_classes'])} classes short of {cfg.per_class} -> {cfg.out}"
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from ssl_kd.models import list_models

    print("\n".join(list_models()))
    return 0


def _stage_parser(
    sub: Any, name: str, cls: type | None, fn: Callable[[argparse.Namespace], int], help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    if cls is not None:
        cfglib.add_arguments(p, cls)
    p.set_defaults(func=fn)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full ``ssl-kd`` parser (config classes are imported lazily by each command)."""
    from ssl_kd.datasets.fashion_mnist import FashionMnistConfig
    from ssl_kd.evaluate import EvalConfig
    from ssl_kd.label_job import LabelConfig
    from ssl_kd.select import SelectConfig
    from ssl_kd.train.supervised import TrainConfig

    parser = _Parser(prog="ssl-kd", description="Semi-supervised teacher/student training.")
    parser.add_argument("--version", action="version", version=f"ssl-kd {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="import a built-in dataset as shards")
    data_sub = data.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    _stage_parser(
        data_sub,
        "fashion-mnist",
        FashionMnistConfig,
        _cmd_fashion_mnist,
        "Fashion-MNIST as labeled / unlabeled / test shards",
    )
    train = _stage_parser(sub, "train", TrainConfig, _cmd_train, "supervised training on shards")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _stage_parser(sub, "evaluate", EvalConfig, _cmd_evaluate, "top-1/top-5 of a checkpoint")
    _stage_parser(sub, "label", LabelConfig, _cmd_label, "top-k pseudo-labels of shards (Ray)")
    _stage_parser(sub, "select", SelectConfig, _cmd_select, "class-balanced top-K per class")
    _stage_parser(sub, "models", None, _cmd_models, "list model architectures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssl-kd`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
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

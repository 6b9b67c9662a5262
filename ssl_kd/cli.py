"""``ssl-kd`` command line: a thin shell over the command table in :mod:`ssl_kd.stages`.

Every command runs the same way: resolve its config, log it, call its runner, print what its
formatter makes of the summary. Bad input of any kind (flags, config keys, paths, files) ends with
one ``ssl-kd: error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ssl_kd import __version__
from ssl_kd import config as cfglib
from ssl_kd.errors import UserError, environment_error
from ssl_kd.stages import COMMANDS, GROUPS, Command, load

log = logging.getLogger("ssl_kd")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2, like every other input error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ssl-kd: error: {message} (see {self.prog} --help)\n")


def run_command(cmd: Command, args: argparse.Namespace) -> int:
    """Run one table command with parsed ``args``; returns the exit status."""
    cfg = None
    if cmd.config is not None:
        overrides = getattr(args, "set", None) or ()
        cfg = cfglib.resolve(load(cmd.config), args, overrides, name_flags=not cmd.config_file)
        log.info("ssl_kd %s %s config: %s", __version__, cmd.name, json.dumps(cfglib.to_dict(cfg)))
    shell = {
        "progress": not (args.quiet or getattr(args, "no_progress", False)),
        "config_path": getattr(args, "config", None),
    }
    kwargs = {k: shell[k] for k in cmd.runner_kwargs}
    runner = load(cmd.runner)
    summary = runner(**kwargs) if cfg is None else runner(cfg, **kwargs)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        print(load(cmd.formatter)(cfg, summary))
    if cmd.problems is not None:
        for line in load(cmd.problems)(cfg, summary):
            print(line, file=sys.stderr)
    return 1 if cmd.fails_on is not None and summary[cmd.fails_on] else 0


def _add_command(sub: Any, cmd: Command, wanted: set[str]) -> None:
    """A subcommand; its flags come from the ``module:Class`` config, imported only when the
    command line names this command (importing every stage would load torch for each run)."""
    word = cmd.words[-1]
    p = sub.add_parser(word, help=cmd.help, description=cmd.description or cmd.help)
    if cmd.config is not None and word in wanted:
        cfglib.add_arguments(p, load(cmd.config), config_file=cmd.config_file)
    for flag in cmd.flags:
        p.add_argument(flag.name, **flag.options)
    p.set_defaults(command_entry=cmd)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ssl-kd`` parser; stage flags are added for the commands named in ``argv`` (all of
    them when ``argv`` is None)."""
    wanted = {c.words[-1] for c in COMMANDS.values()} if argv is None else set(argv)
    parser = _Parser(prog="ssl-kd", description="Semi-supervised teacher/student training.")
    parser.add_argument("--version", action="version", version=f"ssl-kd {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, Any] = {}
    for cmd in COMMANDS.values():
        target = sub
        if len(cmd.words) > 1:  # a subcommand of a group, which is listed where it first appears
            name = cmd.words[0]
            if name not in groups:
                group = sub.add_parser(name, help=GROUPS[name].help)
                groups[name] = group.add_subparsers(
                    dest=GROUPS[name].dest, required=True, parser_class=_Parser
                )
            target = groups[name]
        _add_command(target, cmd, wanted)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssl-kd`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # faiss's loader reports at INFO each CPU variant it could not load before the one it can.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return run_command(args.command_entry, args)
    except UserError as exc:
        print(f"ssl-kd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if (error := environment_error(exc)) is None:
            raise
        print(f"ssl-kd: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssl-kd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

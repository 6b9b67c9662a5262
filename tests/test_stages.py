"""The command table: every ``module:attr`` string in it names an object of the right kind."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from ssl_kd import config as cfglib
from ssl_kd.pipeline.config import SECTION_STAGES, pipeline_keys
from ssl_kd.stages import COMMANDS, GROUPS, Command, load

ENTRIES = list(COMMANDS.values())


@pytest.mark.parametrize("cmd", ENTRIES, ids=[c.name for c in ENTRIES])
def test_every_string_imports_as_the_right_kind(cmd: Command) -> None:
    if cmd.config is not None:
        cls = load(cmd.config)
        assert isinstance(cls, type) and dataclasses.is_dataclass(cls), cmd.config
    runner = load(cmd.runner)
    params = inspect.signature(runner).parameters
    assert all(k in params for k in cmd.runner_kwargs), (cmd.runner, cmd.runner_kwargs)
    positional = [p for p in params.values() if p.default is inspect.Parameter.empty]
    assert len(positional) == (0 if cmd.config is None else 1), cmd.runner
    for spec in (cmd.formatter, cmd.problems):
        if spec is not None:
            assert len(inspect.signature(load(spec)).parameters) == 2, spec  # (cfg, summary)


@pytest.mark.parametrize("cmd", ENTRIES, ids=[c.name for c in ENTRIES])
def test_flags_and_keys_fit_the_config(cmd: Command) -> None:
    assert len(cmd.words) == 1 or cmd.words[0] in GROUPS
    assert set(cmd.runner_kwargs) <= {"progress", "config_path"}
    if cmd.config is None:
        assert not cmd.pipeline_keys and not cmd.flags
        return
    fields = {f.name for f in dataclasses.fields(load(cmd.config))}
    assert cmd.pipeline_keys <= fields
    assert not {f.name.lstrip("-").replace("-", "_") for f in cmd.flags} & fields


def test_every_pipeline_section_is_a_stage_whose_keys_it_fills() -> None:
    for section, stage in SECTION_STAGES.items():
        assert COMMANDS[stage].pipeline_keys, section
        fields = {f.name for f in dataclasses.fields(load(COMMANDS[stage].config or ""))}
        assert pipeline_keys(section) <= fields
        # what the pipeline fills is never a fingerprint key, except the seed
        assert "seed" not in cfglib.operational_keys(load(COMMANDS[stage].config or ""))

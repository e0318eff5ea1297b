"""The options of `train`: each phase's dataclass (training/options.py, decoder/config.py) is the one
source of its options, their defaults and help; an option that the phase about to run does not
take is refused in one line, the same way from the command line and from `legende.train`."""

from __future__ import annotations

import re
import shutil
from dataclasses import MISSING, fields

import click
import pytest
from click.testing import CliRunner

import legende
from cli import main
from store.errors import UserError
from tests.helpers import one_line_error
from training.options import PHASES, all_options

RUN_ARGUMENTS = {"run_dir", "phase", "resume", "members", "max_minutes", "help"}  # every phase's


def train_options() -> dict[str, click.Option]:
    """{field name: click option} of `train`, the options that belong to phases."""
    params = main.commands["train"].params
    return {p.name: p for p in params if isinstance(p, click.Option) and p.name not in RUN_ARGUMENTS}


def a_value(option: click.Option) -> tuple[list[str], object]:
    """(command-line arguments, Python value) that give the option a valid value."""
    if option.is_bool_flag:
        return [option.opts[0]], True
    if isinstance(option.type, click.Choice):
        return [option.opts[0], option.type.choices[0]], option.type.choices[0]
    value = {click.INT: 1, click.FLOAT: 0.5}.get(option.type, "x")
    return [option.opts[0], str(value)], value


def test_every_command_line_option_of_train_is_a_field_of_a_phase_and_every_field_an_option():
    fields_ = {f.name for configs in PHASES.values() for c in configs for f in fields(c) if "help" in f.metadata}
    assert set(train_options()) == fields_ == set(all_options())


@pytest.mark.parametrize("phase", [None, "decoder", "joint", "scst"])
def test_every_misplaced_option_is_refused_in_one_line_naming_the_phases_that_take_it(phase, tmp_path):
    """Without --phase a new run follows the recipe, whose options are the decoder phase's. The
    refusal comes before anything is read or written, and legende.train says the same. (WORKDIR
    does not exist: an option let through fails on that, not by training on data/work.)"""
    runs = phase or "decoder"
    work, run = tmp_path / "nowhere", tmp_path / "run"
    misplaced = 0
    for name, option in train_options().items():
        takers = [p for p, configs in PHASES.items() if any(name in {f.name for f in fields(c)} for c in configs)]
        if runs in takers:
            continue
        misplaced += 1
        args, value = a_value(option)
        phase_args = ["--phase", phase] if phase else []
        line = one_line_error(CliRunner().invoke(main, ["train", str(work), "--run", str(run), *phase_args, *args]))
        which = " and ".join(takers) + (" phases" if len(takers) > 1 else " phase")
        expected = f"{option.opts[0]} is an option of the {which}, not of the {runs} phase"
        assert line == f"Error: {expected}"
        with pytest.raises(UserError) as refused:
            legende.train(work, run, phase=phase, **{name: value})
        assert str(refused.value) == expected
    assert misplaced >= {"decoder": 8, "joint": 14, "scst": 16}[runs]  # the walk saw them all
    assert not run.exists()


def test_a_resume_refuses_an_option_of_another_phase_than_where_the_run_stopped(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    line = one_line_error(CliRunner().invoke(main, ["train", "--run", str(run), "--resume", "--cnn-lr", "1e-5"]))
    assert line == "Error: --cnn-lr is an option of the joint phase, not of the decoder phase"
    line = one_line_error(CliRunner().invoke(main, ["train", "--run", str(run), "--resume", "--samples", "3"]))
    assert line == "Error: --samples is an option of the scst phase, not of the decoder phase"


def help_defaults() -> dict[str, dict[str, str]]:
    """{flag: {phase: its default as `train --help` says it}}, from the bracket ending each option's help."""
    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=10_000, max_content_width=10_000).output
    entries: list[str] = []  # one per option: its line, and the next when its flags fill the first column
    for line in out.split("Options:")[1].splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries:
            entries[-1] += line
    said = {}
    for entry in entries:
        if m := re.match(r"\s*(--[a-z-]+).*\[([^]]*)\]$", entry):
            said[m.group(1)] = {
                phase: default
                for part in m.group(2).split("; ")
                for phases, default in [part.split(": ", 1)]
                for phase in phases.split(", ")
            }
    return said


def same(shown: str, value: object) -> bool:
    """Whether the help's text for a default shows `value`."""
    if isinstance(value, bool):
        return shown == ("on" if value else "off")
    if isinstance(value, int | float):
        return float(shown) == value
    return shown == value


def test_the_help_states_each_phases_defaults_as_its_dataclass_holds_them():
    said = help_defaults()
    for phase, configs in PHASES.items():
        for config in configs:
            for f in fields(config):
                if "help" not in f.metadata:
                    continue
                flag = "--" + f.name.replace("_", "-")
                shown = said[flag][phase]
                if "default_text" in f.metadata:
                    assert shown == f.metadata["default_text"], flag
                elif f.metadata.get("inherit"):
                    assert f.default is MISSING and shown == "the decoder phase's", flag
                else:
                    plain, *variants = re.split(r", (?=\S+ for )", shown)
                    assert same(plain, f.default), (flag, phase, shown)
                    expected = f.metadata.get("variants", {})
                    assert len(variants) == len(expected), (flag, phase, shown)
                    for text, (when, value) in zip(variants, expected.items(), strict=True):
                        value_shown, label = text.split(" for ", 1)
                        assert same(value_shown, value) and label == when.label, (flag, phase, shown)
    assert said["--batch-size"]["scst"] == "16" and said["--lr"]["scst"] == "5e-05"  # ScstConfig's, not 32 / 3e-4
    assert said["--batch-size"]["decoder"] == "32, 64 for the attention decoder from 20,000 training captions"

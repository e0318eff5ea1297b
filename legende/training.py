"""Training from Python: the `train` command as a function, with its options checked by name and type.

    import legende
    outcome = legende.train("data/work", epochs=20, hidden_size=256)   # a new run under runs/<timestamp>
    legende.train(run_dir=outcome.run_dir, phase="joint", max_minutes=60)
    legende.train(resume=True)                                         # the latest run, where it stopped

The options are the fields of the dataclasses that document them:
training.phases.decoder.TrainConfig, decoder.model.CaptionerConfig, training.phases.joint.JointConfig
and training.phases.scst.ScstConfig. A misspelt name or a value of the wrong type is a TypeError at
once, rather than a silently ignored option or a failure after the data is loaded. Training says
nothing unless `console` asks it to.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

from rich.console import Console

from training.loop import Outcome

# Fields the phases fill in themselves, from the data and the feature store.
NOT_OPTIONS = frozenset({"workdir", "store", "vocab_size", "feature_dim"})


@functools.cache
def option_types() -> dict[str, type]:
    """{option name: its type} over the four options dataclasses (imported on use: the joint
    phase's module pulls in the CNN)."""
    from decoder.model import CaptionerConfig
    from training.phases.decoder import TrainConfig
    from training.phases.joint import JointConfig
    from training.phases.scst import ScstConfig

    types: dict[str, type] = {}
    for config in (TrainConfig, CaptionerConfig, JointConfig, ScstConfig):
        hints = get_type_hints(config)
        types.update({f.name: hints[f.name] for f in fields(config) if f.name not in NOT_OPTIONS})
    return types


def check_options(options: dict) -> dict:
    """The options with float fields as floats and paths as strings; TypeError naming the first
    unknown option or wrongly typed value."""
    types, checked = option_types(), {}
    for name, value in options.items():
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TypeError(f"unknown training option {name!r}{hint}; the options are {', '.join(sorted(types))}")
        expected = types[name]
        if expected is float and isinstance(value, int | float) and not isinstance(value, bool):
            checked[name] = float(value)
        elif expected is str and isinstance(value, str | os.PathLike):
            checked[name] = os.fspath(value)  # --init FILE; the recipe keeps options as JSON
        elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            checked[name] = value
        else:
            raise TypeError(f"training option {name} must be {getattr(expected, '__name__', expected)}, not {value!r}")
    return checked


def train(
    workdir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    *,
    phase: str | None = None,
    members: int | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    weights: str | None = None,
    console: Console | bool = False,
    **options,
) -> Outcome:
    """`python cli.py train`, from Python; returns the outcome (status, position, run_dir).

    `workdir`: the prepared and featurized dataset (default: the run's, or data/work). `run_dir`:
    the run (default: a new runs/<timestamp>; with `resume` or a joint or scst `phase`, the latest).
    `phase`: decoder, joint or scst (default: the recipe; with `resume`, where the run stopped).
    `members`: train an ensemble of this many decoders. `max_minutes`: stop cleanly with a
    checkpoint after this long. `weights`: which feature store of `workdir`. `console`: False says
    nothing, True prints the CLI's progress on stderr, or give a rich Console. `options`: epochs,
    batch_size, lr, hidden_size, ... (see option_types())."""
    from training.recipe import train_run

    if console is True:
        console = Console(stderr=True)
    elif console is False:
        console = Console(quiet=True)
    return train_run(
        None if workdir is None else Path(workdir),
        None if run_dir is None else Path(run_dir),
        phase=phase,
        members=members,
        resume=resume,
        max_minutes=max_minutes,
        options=check_options(options),
        console=console,
        weights=weights,
    )

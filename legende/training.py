"""Training from Python: the `train` command as a function, which the command line calls too.

    import legende
    outcome = legende.train("data/work", epochs=20, hidden_size=256)   # a new run under runs/<timestamp>
    legende.train(run_dir=outcome.run_dir, phase="joint", max_minutes=60)
    legende.train(resume=True)                                         # the latest run, where it stopped

The options are the fields of the phases' dataclasses (training/options.py: DecoderConfig and
decoder.config.CaptionerConfig for the decoder phase, JointConfig, ScstConfig). A misspelt name or
a value of the wrong type is a TypeError at once, and an option that the phase about to run does not
take is a UserError naming the phases that take it, rather than a silently ignored option or a
failure after the data is loaded. Training says nothing unless `console` asks it to.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from training.loop import Outcome
from training.options import check_types


def train(
    workdir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    *,
    phase: str | None = None,
    members: int | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    console: Console | bool = False,
    **options,
) -> Outcome:
    """`python cli.py train`, from Python; returns the outcome (status, position, run_dir).

    `workdir`: the prepared and featurized dataset (default: the run's, or data/work). `run_dir`:
    the run (default: a new runs/<timestamp>; with `resume` or a joint or scst `phase`, the latest).
    `phase`: decoder, joint or scst (default: the recipe, which starts with the decoder phase; with
    `resume`, where the run stopped). `members`: train an ensemble of this many decoders.
    `max_minutes`: stop cleanly with a checkpoint after this long. `console`: False says nothing,
    True prints the CLI's progress on stderr, or give a rich Console. `options`: epochs, batch_size,
    lr, hidden_size, weights, ... (training.options.all_options()); None means the default."""
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
        options=check_types({k: v for k, v in options.items() if v is not None}),
        console=console,
    )

"""The training skeleton every phase shares: which run, resume, option merging, seeds, the loop.

A phase (training/phases/: decoder.py, joint.py, scst.py) states only what is its own, as a
`Phase`: its name, its options dataclass, which options a resume may change, how a fresh session
fills its options, and how to build its network, optimizer and data (`build` returns a `Built`).
The rest is here, once: the run directory, loading last.pt (or previous.pt), refusing an option
that would change the run, the seeds (the same initial weights on every torchrun rank, then each
rank its own dropout stream), config.json, the time limit and signals, and the loop itself
(training/loop.py).

Order of a session, which resume exactness depends on: seed the global RNG from the run's seed,
build (every random initialisation happens here), then restore the checkpoint's RNG state on
resume or re-seed per rank on a fresh start, then train.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console

from decoder.model import CaptionerConfig
from store.checkpoints import load_resumable
from store.distributed import Dist, barrier, broadcast_object, process_group
from store.errors import UserError
from store.rundir import RunDir
from store.seeds import derive_seed
from training.loop import Fit, Outcome, Position, resume_from
from training.loop import run as run_loop
from training.stopping import StopRequest


@dataclass
class Built:
    """What a phase builds for one session."""

    fit: Fit
    config: dict  # saved as config.json and in every checkpoint
    start: Position  # where a fresh session starts (a resumed one starts from its checkpoint)
    banner: str  # said when a fresh session starts


class Phase(Protocol):
    name: str  # the checkpoint's "phase" and the metrics' phase column
    options_key: str  # state["config"][options_key] holds the phase's options
    changeable_on_resume: frozenset[str]  # options a resumed session may change
    follows_a_run: bool  # starts from a run's checkpoint, so its default run is the latest one
    options_type: type  # a frozen dataclass with at least `seed` and `epochs`

    def fresh_options(
        self, run: RunDir, workdir: Path | None, options: dict, weights: str | None
    ) -> tuple[Any, dict | None]:
        """(options, checkpoint to start from or None) for a session that is not a resume."""

    def build(self, ctx: Dist, run: RunDir, cfg: Any, state: dict | None, stack: ExitStack) -> Built:
        """Network, optimizer and data, with weights from `state` (the resumed or initial checkpoint)."""


def train_phase(
    phase: Phase,
    workdir: Path | None,
    run_dir: Path | None,
    *,
    resume: bool,
    max_minutes: float | None,
    options: dict,
    console: Console,
    weights: str | None = None,
) -> Outcome:
    """Train (or resume) one phase of a run; `options` holds the explicitly given CLI options."""
    with process_group() as ctx:  # left after the training's objects (DDP among them) are gone
        return _train(ctx, phase, workdir, run_dir, resume, max_minutes, options, console, weights)


def _train(ctx: Dist, phase: Phase, workdir, run_dir, resume, max_minutes, options, console, weights) -> Outcome:
    threads = torch.get_num_threads()
    console = console if ctx.is_main else Console(quiet=True)
    default_latest = resume or phase.follows_a_run
    run = broadcast_object(ctx, resolve_run(run_dir, resume, default_latest) if ctx.is_main else None)
    if resume:
        state, path = load_resumable(run.checkpoints)
        if state["phase"] != phase.name:
            hint = f"resume it with --phase {state['phase']}"
            if phase.follows_a_run:
                hint = f"start the {phase.name} phase without --resume"
            raise UserError(f"{path} is a {state['phase']}-phase checkpoint: {hint}")
        saved = state["config"][phase.options_key]
        model = {**MODEL_DEFAULTS, **state["config"].get("model", {})}  # a config from before a field existed
        check_options_unchanged({**model, **saved}, options, phase.changeable_on_resume)
        changed = {k: v for k, v in options.items() if k in phase.changeable_on_resume and v is not None}
        cfg = phase.options_type(**{**saved, **changed})
        console.print(
            f"resuming {phase.name} phase of {run} from {path.name}: epoch {state['epoch'] + 1}, "
            f"batch {state.get('batch_in_epoch', 0)}, step {state['step']}, CPU threads: {threads}"
        )
    else:
        cfg, state = phase.fresh_options(run, workdir, options, weights)
    with ExitStack() as stack:
        torch.manual_seed(cfg.seed)
        built = phase.build(ctx, run, cfg, state, stack)
        if resume:
            pos = resume_from(state, built.fit.optimizer, run, ctx, console)
        else:
            pos = built.start
            if ctx.active:  # the same initial weights on every rank, but each its own dropout draws
                torch.manual_seed(derive_seed(cfg.seed, ctx.rank))
            if ctx.is_main:
                run.write_config({**built.config, "phase": phase.name})
            console.print(f"{built.banner}, CPU threads: {threads}")
        barrier(ctx)
        with StopRequest(max_minutes) as stop:
            outcome = run_loop(built.fit, pos, stop, console)
    outcome.run_dir = run.path
    return outcome


MODEL_DEFAULTS = {f.name: f.default for f in fields(CaptionerConfig) if f.default is not MISSING}


def resolve_run(run_dir: Path | None, resume: bool, default_latest: bool) -> RunDir:
    """--run, else the latest run (to resume, or for a phase that follows one), else a new one."""
    if run_dir is None:
        return RunDir.latest() if default_latest else RunDir.new()
    run = RunDir(run_dir)
    if resume and not run.has_checkpoint():
        raise UserError(f"nothing to resume in {run}: it has no checkpoints/last.pt")
    return run


def check_options_unchanged(saved: dict, options: dict, changeable: frozenset[str]) -> None:
    """A resumed run refuses an option that would change it, naming the option."""
    for key, value in options.items():
        if value is None or key not in saved or key in changeable:
            continue
        if saved[key] != value:
            raise UserError(
                f"cannot change --{key.replace('_', '-')} on resume: "
                f"the run was trained with {saved[key]!r}, got {value!r}"
            )

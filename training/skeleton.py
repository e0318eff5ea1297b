"""The training skeleton every phase shares: which run, resume, option merging, seeds, the loop.

A phase (training/phases/: decoder.py, joint.py, scst.py) states only what is its own, as a
`Phase`: its name, its options dataclass (training/options.py, which also marks the options a
resume may change), how a fresh session fills its options, and how to build its network, optimizer
and data (`build` returns a `Built`). The rest is here, once: the run directory, loading last.pt
(or previous.pt), starting from another phase's checkpoint, refusing an option that would change
the run, the seeds (the same initial weights on every torchrun rank, then each
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

from decoder.config import CaptionerConfig
from store.checkpoints import load_checkpoint, load_resumable
from store.distributed import Dist, barrier, broadcast_object, process_group
from store.errors import UserError
from store.rundir import RunDir
from store.seeds import derive_seed
from training.loop import Fit, Outcome, Position, resume_from
from training.loop import run as run_loop
from training.options import changeable_on_resume, flag, inherited
from training.stopping import StopRequest


@dataclass
class Built:
    """What a phase builds for one session."""

    fit: Fit
    config: dict  # saved as config.json and in every checkpoint
    start: Position  # where a fresh session starts (a resumed one starts from its checkpoint)
    banner: str  # said when a fresh session starts


class Phase(Protocol):
    name: str  # the checkpoint's "phase", the key of its options in config, the metrics' phase column
    follows_a_run: bool  # starts from a run's checkpoint, so its default run is the latest one
    options_type: type  # a frozen dataclass with at least `seed` and `epochs` (training/options.py)

    def fresh_options(self, run: RunDir, workdir: Path | None, options: dict) -> tuple[Any, dict | None]:
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
) -> Outcome:
    """Train (or resume) one phase of a run; `options` holds the given options, all the phase's."""
    with process_group() as ctx:  # left after the training's objects (DDP among them) are gone
        return _train(ctx, phase, workdir, run_dir, resume, max_minutes, options, console)


def _train(ctx: Dist, phase: Phase, workdir, run_dir, resume, max_minutes, options, console) -> Outcome:
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
        saved = state["config"][phase.name]
        model = {**MODEL_DEFAULTS, **state["config"].get("model", {})}  # a config from before a field existed
        changeable = changeable_on_resume(phase.options_type)
        check_options_unchanged({**model, **saved}, options, changeable)
        changed = {k: v for k, v in options.items() if k in changeable and v is not None}
        cfg = phase.options_type(**{**saved, **changed})
        if state["epoch"] >= cfg.epochs and not state.get("batch_in_epoch", 0):
            console.print(
                f"{phase.name} phase of {run}: all {cfg.epochs} epochs are done, nothing to resume "
                "(--epochs N trains more)"
            )
        else:
            console.print(
                f"resuming {phase.name} phase of {run} from {path.name}: epoch {state['epoch'] + 1}, "
                f"batch {state.get('batch_in_epoch', 0)}, step {state['step']}, CPU threads: {threads}"
            )
    else:
        cfg, state = phase.fresh_options(run, workdir, options)
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


def start_from_checkpoint(phase: Phase, run: RunDir, workdir: Path | None, options: dict) -> tuple[Any, dict]:
    """(options, checkpoint) of a phase that starts from a checkpoint: `--init`, by default the
    run's best.pt. The dataset, the store and the options the phase inherits come from the decoder
    phase that checkpoint descends from; then the given options."""
    init = Path(options.get("init") or run.best)
    state = load_checkpoint(init)
    if state["phase"] == phase.name and run.last.exists() and init.parent == run.checkpoints:
        raise UserError(f"{run} is already in the {phase.name} phase: add --resume")
    decoder = state["config"]["decoder"]
    given = {
        **inherited(phase.options_type, decoder),
        "workdir": str(workdir or decoder["workdir"]),
        "store": decoder["store"],
        **options,
        "init": str(init),
    }
    return phase.options_type(**given), state


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
                f"cannot change {flag(key)} on resume: the run was trained with {saved[key]!r}, got {value!r}"
            )

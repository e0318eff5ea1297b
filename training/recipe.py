"""What `python cli.py train` runs: one phase, or a recipe of phases for one decoder or an ensemble.

    python cli.py train data/work                  # the default recipe (RECIPE), start to end
    python cli.py train data/work --members 5      # the same for 5 decoders that differ in seed
    python cli.py train --resume                   # continue the latest run wherever it stopped
    python cli.py train --run R --phase scst       # one more phase (for every member of R)

A run of one decoder and one phase is a plain run, as each phase module writes it. A run of
several steps or members also keeps RUNDIR/recipe.json: the steps (phase and options), the number
of members, and which (member, step) pairs are finished, rewritten atomically after each. `--resume`
reads it and continues with the first pair not finished: resumed from its last checkpoint if that
step had started (its phase is the checkpoint's), started afresh otherwise. So an interruption
between two steps, or in the middle of one, loses nothing. Each member runs all its steps before
the next member starts, so the first complete model exists as early as possible.

Options belong to phases (training/options.py), and an option that the phase about to run does not
take is refused before anything is written: with --phase, that phase's; for a new run without it,
the recipe's first phase's (its other steps keep their own); with --resume, the phase where the run
stopped. So is a decoder phase's option that its decoder does not read (--heads is the
transformer's): with --decoder, here; without, once the store has said which decoder is the
default. A run of several steps or members resumes with the options its steps were given, so
--resume takes no options there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from store.checkpoints import load_resumable
from store.errors import UserError
from store.files import atomic_write_bytes
from store.rundir import RunDir
from training.loop import Outcome, Position
from training.options import DecoderConfig, check_decoder_reads, check_phase_takes, flag, takes
from training.skeleton import resolve_run

# The default recipe, chosen on the cross-validated measurement (docs/quality.md).
RECIPE: tuple[tuple[str, dict], ...] = (("decoder", {}),)


def phase_trainer(phase: str):
    """The train function of a phase (imported on use: the joint phase pulls in the CNN)."""
    if phase == "decoder":
        from training.phases.decoder import train_decoder

        return train_decoder
    if phase == "joint":
        from training.phases.joint import train_joint

        return train_joint
    if phase == "scst":
        from training.phases.scst import train_scst

        return train_scst
    raise UserError(f"unknown phase {phase!r}: one of decoder, joint, scst")


@dataclass
class Plan:
    steps: list[tuple[str, dict]]
    members: int = 1
    done: list[list[int]] = field(default_factory=list)  # [member, step] pairs that finished
    workdir: str | None = None  # the dataset of the steps that start afresh

    def save(self, run: RunDir) -> None:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 writes
            text = {
                "steps": [[p, o] for p, o in self.steps],
                "members": self.members,
                "done": self.done,
                "workdir": self.workdir,
            }
            atomic_write_bytes(run.recipe, json.dumps(text, indent=1, sort_keys=True).encode())

    @classmethod
    def load(cls, run: RunDir) -> Plan:
        try:
            data = json.loads(run.recipe.read_text())
            # files written before options were checked may hold options of other phases, which
            # those runs ignored, and keep --weights beside the steps
            steps = [(p, {k: v for k, v in o.items() if takes(p, k)}) for p, o in data["steps"]]
            for p, o in steps:
                if p == "decoder" and data.get("weights"):
                    o.setdefault("weights", data["weights"])
            done = [list(d) for d in data["done"]]
            return cls(steps, int(data["members"]), done, data.get("workdir"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{run.recipe} is not a recipe file ({e})") from None


def train_run(
    workdir: Path | None,
    run_dir: Path | None,
    *,
    phase: str | None,
    members: int | None,
    resume: bool,
    max_minutes: float | None,
    options: dict,
    console: Console,
) -> Outcome:
    """`train`: with --phase, that phase (for every member of an ensemble run); without, the recipe.
    `options` are the given ones, by field name (training/options.py)."""
    if members is not None and members < 1:
        raise UserError("--members must be at least 1")
    if not resume:
        check_phase_takes(phase or RECIPE[0][0], options)
        if (phase or RECIPE[0][0]) == "decoder" and "decoder" in options:
            check_decoder_reads(options["decoder"], options)
    follows = resume or phase in ("joint", "scst")  # these continue a run: by default the latest
    existing = RunDir(run_dir) if run_dir is not None else (RunDir.latest() if follows else None)
    plan = Plan.load(existing) if existing is not None and existing.recipe.is_file() else None
    if resume:
        if plan is None:  # a plain run: resume the phase of its checkpoint
            resolve_run(existing.path, resume=True, default_latest=True)  # says so when there is nothing to resume
            state, _ = load_resumable(existing.checkpoints)
            check_phase_takes(phase or state["phase"], options)
            if (phase or state["phase"]) == "decoder":
                check_decoder_reads(state["config"]["model"].get("decoder", "pooled"), options)
            return phase_trainer(phase or state["phase"])(
                workdir, existing.path, resume=True, max_minutes=max_minutes, options=options, console=console
            )
        if phase is not None and all(p != phase for p, _ in plan.steps):
            raise UserError(
                f"{existing} follows {existing.recipe.name}, which has no {phase} step: resume it without --phase"
            )
        if options:
            raise UserError(
                f"{existing} follows {existing.recipe.name}, whose steps keep the options they were given: "
                f"resume it without {', '.join(map(flag, options))}"
            )
        return _execute(plan, existing, workdir, max_minutes, console)
    if phase is not None and plan is not None:  # one more phase for every member
        if members is not None and members != plan.members:
            raise UserError(f"{existing} has {plan.members} member(s); --members cannot change that")
        plan.steps.append((phase, options))
        plan.save(existing)
        return _execute(plan, existing, workdir, max_minutes, console)
    steps = (
        [(phase, options)]
        if phase is not None
        else [(p, {**o, **options}) if i == 0 else (p, dict(o)) for i, (p, o) in enumerate(RECIPE)]
    )
    count = members or 1
    if len(steps) == 1 and count == 1:  # a plain run
        return phase_trainer(steps[0][0])(
            workdir, run_dir, resume=False, max_minutes=max_minutes, options=steps[0][1], console=console
        )
    if run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("under torchrun, a run of several steps or members needs --run-dir")
    run = resolve_run(run_dir, resume=False, default_latest=False)
    if run.checkpoints.exists() or run.recipe.exists():
        raise UserError(f"{run} already has checkpoints: add --resume, or choose a new --run")
    plan = Plan(steps, count, workdir=str(workdir or "data/work"))
    plan.save(run)
    return _execute(plan, run, workdir, max_minutes, console)


def _execute(plan: Plan, run: RunDir, workdir: Path | None, max_minutes: float | None, console) -> Outcome:
    workdir = workdir or plan.workdir
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    outcome = Outcome("finished", Position(), run_dir=run.path)
    ran = False
    for member in range(plan.members):
        where = run if plan.members == 1 else run.member(member)
        for k, (phase, options) in enumerate(plan.steps):
            if [member, k] in plan.done:
                continue
            left = None if deadline is None else (deadline - time.monotonic()) / 60
            if left is not None and left <= 0 and ran:  # a session always makes progress on one step
                return Outcome("time limit reached", outcome.position, run_dir=run.path)
            started = where.has_checkpoint() and load_resumable(where.checkpoints)[0]["phase"] == phase and k > 0
            started = started or (k == 0 and where.has_checkpoint())
            opts = dict(options)
            if phase == "decoder" and not started:  # members differ only in seed
                opts["seed"] = opts.get("seed", DecoderConfig.seed) + member
            label = f"member {member + 1}/{plan.members}, " if plan.members > 1 else ""
            console.print(f"{label}step {k + 1}/{len(plan.steps)}: {phase} phase of {where}")
            outcome = phase_trainer(phase)(
                workdir,
                where.path,
                resume=started,
                max_minutes=None if left is None else max(left, 1e-9),  # 0 would mean no limit
                options={} if started else opts,
                console=console,
            )
            ran = True
            if outcome.status != "finished":
                outcome.run_dir = run.path
                return outcome
            plan.done.append([member, k])
            plan.save(run)
    outcome.run_dir = run.path
    return outcome

"""The training loop shared by every phase: epochs, batches, checkpoints, logs, clean stops.

A phase supplies the network, its data and what to save; the loop owns the rest. Its position
(epoch, batch inside the epoch, global step), the optimizer, the global RNG (dropout) and the
running epoch sums are all in the checkpoint, and the data order is a function of (seed, epoch),
so a resumed session continues exactly where the last one stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from decoder.model import caption_loss, smoothed_caption_loss, split_output
from store.checkpoints import save_checkpoint
from store.distributed import SINGLE, Dist, all_gather_object, max_scalar, sum_scalar
from store.progress import PlainProgress
from store.rundir import RunDir
from store.runlog import RunLog, plot_run
from training.stopping import StopRequest

Batch = tuple[torch.Tensor, torch.Tensor]


class PhaseData(Protocol):
    num_batches: int

    def train_batches(self, epoch: int, start_batch: int) -> Iterator[Batch]: ...

    def val_batches(self) -> Iterator[Batch]: ...


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps over the whole run, all phases
    loss_sum: float = 0.0  # sum of this epoch's batch losses so far
    seconds: float = 0.0  # time spent in this epoch so far
    best: float = math.inf  # best validation score so far (lower is better)


@dataclass
class Fit:
    """Everything the loop needs from a phase."""

    phase: str
    run_dir: Path
    net: torch.nn.Module  # forward(inputs, captions) -> logits
    optimizer: torch.optim.Optimizer
    data: PhaseData
    epochs: int
    grad_clip: float
    checkpoint_fields: Callable[[], dict]  # model weights, config, vocab... merged into each checkpoint
    # (loss to minimise, units it is a mean over, value to log) of one training batch; the default is
    # teacher-forced cross-entropy over the batch's words
    objective: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, float, float]] | None = None
    logged_as: str = "loss"  # what the logged value is: the batch CSV's column, the epoch's train_<it>
    select_score: Callable[[float], float] | None = None  # validation score from val loss; lower is better
    lr_at: Callable[[int], float] | None = None  # the learning rate of the step after that many global steps
    checkpoint_minutes: float | None = None  # also checkpoint mid-epoch on this timer
    dist: Dist = SINGLE  # this process's place under torchrun
    train_net: torch.nn.Module | None = None  # `net` wrapped in DistributedDataParallel, when distributed
    pending_rows: list[dict] = field(default_factory=list)


@dataclass
class Outcome:
    status: str  # "finished" or the reason it stopped early
    position: Position
    val_loss: float | None = None
    run_dir: Path | None = None


def run(fit: Fit, pos: Position, stop: StopRequest, console: Console) -> Outcome:
    main = fit.dist.is_main
    log = RunLog(fit.run_dir)
    train_net = fit.train_net or fit.net
    last_checkpoint = time.monotonic()
    val_loss = None
    remaining = (fit.epochs - pos.epoch) * fit.data.num_batches - pos.batch
    plain = PlainProgress(console if main else None, fit.phase, remaining, "batches")  # as lines in a log file
    done = 0
    with _progress(console, disable=not main) as progress:
        task = progress.add_task(fit.phase, total=fit.data.num_batches, loss=float("nan"))
        while pos.epoch < fit.epochs:
            progress.update(task, completed=pos.batch, description=f"{fit.phase} epoch {pos.epoch + 1}/{fit.epochs}")
            fit.net.train()
            started = time.monotonic()
            for batch in fit.data.train_batches(pos.epoch, pos.batch):
                loss, logged = _loss(fit.objective or teacher_forcing, train_net, batch, fit.dist)
                fit.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(fit.net.parameters(), fit.grad_clip)
                if fit.lr_at is not None:  # a function of the step alone: resume restores nothing more
                    for group in fit.optimizer.param_groups:
                        group["lr"] = fit.lr_at(pos.step)
                fit.optimizer.step()
                pos.batch += 1
                pos.step += 1
                pos.loss_sum += logged
                fit.pending_rows.append(
                    {"phase": fit.phase, "epoch": pos.epoch + 1, "step": pos.step, fit.logged_as: f"{logged:.5f}"}
                )
                progress.update(task, advance=1, loss=logged)
                done += 1
                plain.update(
                    done,
                    f"epoch {pos.epoch + 1}/{fit.epochs} batch {pos.batch}/{fit.data.num_batches}, loss {logged:.3f}",
                )
                timer_due = (
                    bool(fit.checkpoint_minutes) and time.monotonic() - last_checkpoint >= fit.checkpoint_minutes * 60
                )
                reason, timer_due = _agree(stop, timer_due, fit.dist)
                if reason or timer_due:
                    pos.seconds += time.monotonic() - started
                    started = time.monotonic()
                    _checkpoint(fit, pos, log)
                    last_checkpoint = time.monotonic()
                    if reason:
                        return Outcome(reason, pos)
            pos.seconds += time.monotonic() - started
            val_loss = evaluate_loss(fit.net, fit.data.val_batches())
            train_loss = pos.loss_sum / max(pos.batch, 1)
            score = fit.select_score(val_loss) if fit.select_score else val_loss
            improved = score < pos.best
            pos.best = min(pos.best, score)
            if main:
                log.log_epoch(
                    {
                        "phase": fit.phase,
                        "epoch": pos.epoch + 1,
                        f"train_{fit.logged_as}": f"{train_loss:.5f}",
                        "val_loss": f"{val_loss:.5f}",
                        "val_cider": "" if not fit.select_score else f"{-score:.4f}",
                        "seconds": f"{pos.seconds:.2f}",
                        "step": pos.step,
                    }
                )
                console.print(
                    f"{fit.phase} epoch {pos.epoch + 1}/{fit.epochs}: train {fit.logged_as} {train_loss:.4f}, "
                    f"val loss {val_loss:.4f}{'' if not fit.select_score else f', val CIDEr {-score:.3f}'}, "
                    f"{pos.seconds:.1f}s{'  (best)' if improved else ''}"
                )
            pos.epoch, pos.batch, pos.loss_sum, pos.seconds = pos.epoch + 1, 0, 0.0, 0.0
            _checkpoint(fit, pos, log, best=improved)
            last_checkpoint = time.monotonic()
            if main:
                plot_run(fit.run_dir)
            reason, _ = _agree(stop, False, fit.dist)
            if reason:
                return Outcome(reason, pos, val_loss)
    return Outcome("finished", pos, val_loss)


def teacher_forcing(
    net: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, float, float]:
    """Mean cross-entropy of the batch's next words (label-smoothed if asked; plus the attention
    decoder's penalty), their count, and the plain cross-entropy to log (comparable across decoders)."""
    inputs, captions = batch
    logits, penalty = split_output(net(inputs, captions))
    if label_smoothing:
        loss, plain = smoothed_caption_loss(logits, captions, label_smoothing)
    else:
        loss = plain = caption_loss(logits, captions)
    units = float((captions[:, 1:] != 0).sum())
    if isinstance(penalty, torch.Tensor):  # a mean over photos, not words: see _loss
        return loss + penalty, units, plain.item(), (penalty, float(captions.size(0)))
    return loss, units, plain.item()


def _loss(objective, net: torch.nn.Module, batch, ctx: Dist) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate, logged value of the global batch).

    Distributed, each rank holds a shard of the global batch. Its mean loss is rescaled by its
    share of the global batch's units (words), so that DistributedDataParallel's gradient average
    equals the gradient of the global batch's mean loss: the same step a single process would take.
    An objective may return a fourth item, (a term of the loss that is a mean over photos, the
    photos): that term is rescaled by the rank's share of photos instead (the attention penalty).
    """
    loss, units, logged, *per_photo = objective(net, batch)
    if not ctx.active:
        return loss, logged
    total_units = sum_scalar(ctx, units)
    weighted = loss * (units * ctx.world_size / total_units)
    if per_photo:
        term, photos = per_photo[0]
        share = photos * ctx.world_size / sum_scalar(ctx, photos)
        weighted = weighted + term * (share - units * ctx.world_size / total_units)
    return weighted, sum_scalar(ctx, logged * units) / total_units


def _agree(stop: StopRequest, timer_due: bool, ctx: Dist) -> tuple[str | None, bool]:
    """(why to stop, whether to checkpoint), the same on every rank: a signal or time limit seen by
    one rank stops them all at the same batch."""
    reason = stop.reason()
    if not ctx.active:
        return reason, timer_due
    code = max_scalar(ctx, (2 if reason else 0) | int(timer_due))
    if code & 2 and not reason:
        reason = "stopped by another rank"
    return reason, bool(code & 1)


@torch.no_grad()
def evaluate_loss(net: torch.nn.Module, batches: Iterator[Batch]) -> float:
    """Mean per-word cross-entropy over all batches (weighted by their word count)."""
    net.eval()
    total, words = 0.0, 0
    for inputs, captions in batches:
        n = int((captions[:, 1:] != 0).sum())
        total += caption_loss(split_output(net(inputs, captions))[0], captions).item() * n
        words += n
    return total / max(words, 1)


def _checkpoint(fit: Fit, pos: Position, log: RunLog, best: bool = False) -> None:
    """Flush the batch log, then write last.pt (and best.pt): the log never runs behind a checkpoint.

    Distributed, every rank's RNG state is gathered (dropout differs per rank) and rank 0 writes.
    """
    rng_by_rank = all_gather_object(fit.dist, torch.get_rng_state())
    if not fit.dist.is_main:
        fit.pending_rows.clear()
        return
    log.log_batches(fit.pending_rows)
    fit.pending_rows.clear()
    state = {
        **fit.checkpoint_fields(),
        "optimizer": fit.optimizer.state_dict(),
        "phase": fit.phase,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch,
        "step": pos.step,
        "epoch_loss_sum": pos.loss_sum,
        "epoch_seconds": pos.seconds,
        "best_score": pos.best,
        "rng": torch.get_rng_state(),
        "rng_by_rank": rng_by_rank,
        "world_size": fit.dist.world_size,
    }
    run = RunDir(fit.run_dir)
    save_checkpoint(state, run.last, keep_previous=True)
    if best:
        save_checkpoint(state, run.best)


def restore_rng(state: dict, ctx: Dist, console: Console) -> None:
    """This rank's RNG state from the checkpoint; a changed world size is said, not refused."""
    saved = state.get("world_size", 1)
    if saved == ctx.world_size:
        torch.set_rng_state(state.get("rng_by_rank", [state["rng"]])[ctx.rank])
        return
    torch.set_rng_state(state["rng"])
    if ctx.is_main:
        console.print(
            f"[yellow]note[/]: checkpoint written by {saved} process(es), resuming with {ctx.world_size}: "
            "global batches "
            "and data order are the same, but dropout draws differ, so the run continues without being bit-identical "
            "to an uninterrupted one"
        )


def resume_from(state: dict, optimizer: torch.optim.Optimizer, run_dir: Path, ctx: Dist, console: Console) -> Position:
    """Optimizer, RNG and position from a checkpoint; the logs are cut back to its step."""
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state, ctx, console)
    pos = position_from(state)
    if ctx.is_main:
        RunLog(run_dir).truncate_after(state["phase"], pos.step)
    return pos


def position_from(state: dict) -> Position:
    return Position(
        epoch=state["epoch"],
        batch=state.get("batch_in_epoch", 0),
        step=state["step"],
        loss_sum=state.get("epoch_loss_sum", 0.0),
        seconds=state.get("epoch_seconds", 0.0),
        best=state.get("best_score", math.inf),
    )


def _progress(console: Console, disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        _SpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable,
    )


class _SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} batch/s" if task.speed else "")

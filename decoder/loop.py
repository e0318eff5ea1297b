"""The training loop shared by both phases: epochs, batches, checkpoints, logs, clean stops.

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

from decoder.model import caption_loss
from decoder.stopping import StopRequest
from store.checkpoints import save_checkpoint
from store.runlog import RunLog, plot_run

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
    select_score: Callable[[float], float] | None = None  # validation score from val loss; lower is better
    checkpoint_minutes: float | None = None  # also checkpoint mid-epoch on this timer
    pending_rows: list[dict] = field(default_factory=list)


@dataclass
class Outcome:
    status: str  # "finished" or the reason it stopped early
    position: Position
    val_loss: float | None = None
    run_dir: Path | None = None


def run(fit: Fit, pos: Position, stop: StopRequest, console: Console) -> Outcome:
    log = RunLog(fit.run_dir)
    last_checkpoint = time.monotonic()
    val_loss = None
    with _progress(console) as progress:
        task = progress.add_task(fit.phase, total=fit.data.num_batches, loss=float("nan"))
        while pos.epoch < fit.epochs:
            progress.update(task, completed=pos.batch, description=f"{fit.phase} epoch {pos.epoch + 1}/{fit.epochs}")
            fit.net.train()
            started = time.monotonic()
            for inputs, captions in fit.data.train_batches(pos.epoch, pos.batch):
                loss = caption_loss(fit.net(inputs, captions), captions)
                fit.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(fit.net.parameters(), fit.grad_clip)
                fit.optimizer.step()
                pos.batch += 1
                pos.step += 1
                pos.loss_sum += loss.item()
                fit.pending_rows.append({"phase": fit.phase, "epoch": pos.epoch + 1, "step": pos.step, "loss": f"{loss.item():.5f}"})
                progress.update(task, advance=1, loss=loss.item())
                reason = stop.reason()
                timer_due = fit.checkpoint_minutes and time.monotonic() - last_checkpoint >= fit.checkpoint_minutes * 60
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
            log.log_epoch({
                "phase": fit.phase, "epoch": pos.epoch + 1, "train_loss": f"{train_loss:.5f}",
                "val_loss": f"{val_loss:.5f}", "val_cider": "" if not fit.select_score else f"{-score:.4f}",
                "seconds": f"{pos.seconds:.2f}", "step": pos.step,
            })
            console.print(
                f"{fit.phase} epoch {pos.epoch + 1}/{fit.epochs}: train loss {train_loss:.4f}, "
                f"val loss {val_loss:.4f}{'' if not fit.select_score else f', val CIDEr {-score:.3f}'}, "
                f"{pos.seconds:.1f}s{'  (best)' if improved else ''}"
            )
            pos.epoch, pos.batch, pos.loss_sum, pos.seconds = pos.epoch + 1, 0, 0.0, 0.0
            _checkpoint(fit, pos, log, best=improved)
            last_checkpoint = time.monotonic()
            plot_run(fit.run_dir)
            if reason := stop.reason():
                return Outcome(reason, pos, val_loss)
    return Outcome("finished", pos, val_loss)


@torch.no_grad()
def evaluate_loss(net: torch.nn.Module, batches: Iterator[Batch]) -> float:
    """Mean per-word cross-entropy over all batches (weighted by their word count)."""
    net.eval()
    total, words = 0.0, 0
    for inputs, captions in batches:
        n = int((captions[:, 1:] != 0).sum())
        total += caption_loss(net(inputs, captions), captions).item() * n
        words += n
    return total / max(words, 1)


def _checkpoint(fit: Fit, pos: Position, log: RunLog, best: bool = False) -> None:
    """Flush the batch log, then write last.pt (and best.pt): the log never runs behind a checkpoint."""
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
    }
    ckpt_dir = fit.run_dir / "checkpoints"
    save_checkpoint(state, ckpt_dir / "last.pt", keep_previous=True)
    if best:
        save_checkpoint(state, ckpt_dir / "best.pt")


def position_from(state: dict) -> Position:
    return Position(
        epoch=state["epoch"], batch=state.get("batch_in_epoch", 0), step=state["step"],
        loss_sum=state.get("epoch_loss_sum", 0.0), seconds=state.get("epoch_seconds", 0.0),
        best=state.get("best_score", math.inf),
    )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), _SpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )


class _SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} batch/s" if task.speed else "")

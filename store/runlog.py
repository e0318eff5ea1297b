"""A run's metrics: the per-batch and per-epoch CSVs, and the plots drawn from them.

CSV rows are appended as training goes; on resume, rows written after the checkpoint being
resumed (work that will be redone) are cut away, so the logs of an interrupted run read like
those of an uninterrupted one.
"""

from __future__ import annotations

import csv
from pathlib import Path

from store.errors import UserError
from store.files import atomic_write_bytes
from store.rundir import RunDir

# A phase logs either a loss (decoder, joint) or a reward (self-critical training) per batch.
BATCH_FIELDS = ["phase", "epoch", "step", "loss", "reward"]
EPOCH_FIELDS = ["phase", "epoch", "train_loss", "train_reward", "val_loss", "val_cider", "seconds", "step"]


class RunLog:
    """Appends metric rows to RUNDIR/metrics/{batches,epochs}.csv."""

    def __init__(self, run_dir: Path | RunDir):
        run = RunDir(run_dir)
        run.metrics.mkdir(parents=True, exist_ok=True)
        self.batches = run.batches_csv
        self.epochs = run.epochs_csv

    def truncate_after(self, phase: str, step: int) -> None:
        """Drop rows of `phase` logged after global step `step` (they are about to be redone)."""
        for path, fields in ((self.batches, BATCH_FIELDS), (self.epochs, EPOCH_FIELDS)):
            rows = read_rows(path)
            kept = [r for r in rows if r["phase"] != phase or int(r["step"]) <= step]
            if len(kept) != len(rows):
                _write_rows(path, fields, kept)

    def log_batches(self, rows: list[dict]) -> None:
        _append_rows(self.batches, BATCH_FIELDS, rows)

    def log_epoch(self, row: dict) -> None:
        _append_rows(self.epochs, EPOCH_FIELDS, [row])


def read_rows(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    if not new and _header(path) != fields:  # a run logged before a column was added: rewrite it once
        _write_rows(path, fields, read_rows(path))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_run(run_dir: Path | RunDir) -> list[Path]:
    """Loss of every batch, and train vs validation loss per epoch, as in the original report; and
    for self-critical training, the mean reward of every batch and of every epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir(run_dir)
    batches, epochs = read_rows(run.batches_csv), read_rows(run.epochs_csv)
    if not batches and not epochs:
        raise UserError(f"{run} has no metrics to plot yet")
    out_dir = run.plots
    out_dir.mkdir(exist_ok=True)
    written = []
    for column, name, ylabel in (("loss", "batch_loss", "cross-entropy"), ("reward", "batch_reward", "mean CIDEr-D")):
        rows = [r for r in batches if r.get(column)]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        for phase in dict.fromkeys(r["phase"] for r in rows):
            mine = [r for r in rows if r["phase"] == phase]
            ax.plot([int(r["step"]) for r in mine], [float(r[column]) for r in mine], lw=0.6, label=phase)
        ax.set(xlabel="batch (global step)", ylabel=ylabel, title=f"{column.capitalize()} of every batch")
        written.append(_save(fig, ax, out_dir / f"{name}.png"))
    if epochs:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = list(range(1, len(epochs) + 1))
        ax.plot(*_points(x, epochs, "train_loss"), marker="o", label="train")
        ax.plot(*_points(x, epochs, "val_loss"), marker="o", label="validation")
        for i, r in enumerate(epochs[1:], 1):
            if r["phase"] != epochs[i - 1]["phase"]:
                ax.axvline(i + 0.5, color="grey", ls="--", lw=0.8)
                ax.text(i + 0.6, ax.get_ylim()[1], r["phase"], va="top", fontsize=8)
        ax.set(xlabel="epoch (all phases)", ylabel="cross-entropy", title="Train vs validation loss per epoch")
        written.append(_save(fig, ax, out_dir / "epoch_loss.png"))
    if any(r.get("train_reward") for r in epochs):
        fig, ax = plt.subplots(figsize=(8, 4))
        x = list(range(1, len(epochs) + 1))
        ax.plot(*_points(x, epochs, "train_reward"), marker="o", label="train: mean reward of the samples")
        ax.plot(*_points(x, epochs, "val_cider"), marker="o", label="validation: greedy CIDEr-D")
        ax.set(xlabel="epoch (all phases)", ylabel="CIDEr-D", title="Self-critical training per epoch")
        written.append(_save(fig, ax, out_dir / "epoch_reward.png"))
    return written


def _points(x: list[int], rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    """The (epoch, value) pairs of the rows that have `column` (a phase logs loss or reward)."""
    pairs = [(i, float(r[column])) for i, r in zip(x, rows, strict=True) if r.get(column)]
    return [i for i, _ in pairs], [v for _, v in pairs]


def _save(fig, ax, path: Path) -> Path:
    """Legend, layout, PNG, and the figure freed (matplotlib keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

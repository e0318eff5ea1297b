"""The run directory: one type that knows where a run keeps each of its files.

    RUNDIR/config.json                 options of the latest phase started
    RUNDIR/checkpoints/{last,previous,best}.pt
    RUNDIR/metrics/{batches,epochs}.csv
    RUNDIR/plots/*.png
    RUNDIR/eval/<split>.json, <split>_captions.csv, <split>.html
    RUNDIR/eval/<split>+<other>.json, ...  the same for RUNDIR decoded with other runs (evaluate --with)
    RUNDIR/finetuned-<run>.pt          the joint phase's CNN, exported for featurize --encoder-from
    RUNDIR/neighbours.npz              the training photos' features and captions, for re-ranking
    RUNDIR/average_photo.npy           their mean features, for decoding with --prior-penalty
    RUNDIR/recipe.json                 a run of several steps or members: the plan and what is done
    RUNDIR/members/<i>/                an ensemble's members, each laid out as a run of its own

Every module asks a RunDir for a path instead of joining names, so the layout is written once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from store.errors import UserError
from store.files import atomic_write_bytes

RUNS_ROOT = Path("runs")
DEMO_RUN = Path("data/demo/run")  # where `make demo` trains (demo.py: ROOT/run); named when runs/ is empty


def eval_name(split: str, joined: Sequence[Path] = ()) -> str:
    """`split`, then `+` and the short name of each joined source in the order given: a run
    folder's name, a checkpoint file's run and stem (`tfm-last` for runs/tfm/checkpoints/last.pt),
    or a loose file's stem; characters other than letters, digits, `.`, `_` and `-` become `_`."""
    names = []
    for source in joined:
        source = Path(source).resolve()
        if source.is_file():
            name = f"{source.parent.parent.name}-{source.stem}" if source.parent.name == "checkpoints" else source.stem
        else:
            name = source.name
        names.append(re.sub(r"[^A-Za-z0-9._-]+", "_", name))
    return "+".join([split, *names])


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def previous(self) -> Path:
        return self.checkpoints / "previous.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def batches_csv(self) -> Path:
        return self.metrics / "batches.csv"

    @property
    def epochs_csv(self) -> Path:
        return self.metrics / "epochs.csv"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def eval_json(self, split: str, joined: Sequence[Path] = ()) -> Path:
        """eval/<split>.json, or with `joined` (the other runs or checkpoints decoded with this
        one as an ensemble) eval/<split>+<name>+....json, which leaves the run's own alone."""
        return self.eval / f"{eval_name(split, joined)}.json"

    def eval_captions(self, split: str, joined: Sequence[Path] = ()) -> Path:
        return self.eval / f"{eval_name(split, joined)}_captions.csv"

    def eval_report(self, split: str, joined: Sequence[Path] = ()) -> Path:
        return self.eval / f"{eval_name(split, joined)}.html"

    @property
    def finetuned(self) -> Path:
        return self.path / f"finetuned-{self.name}.pt"

    @property
    def neighbours(self) -> Path:
        return self.path / "neighbours.npz"

    @property
    def average_photo(self) -> Path:
        return self.path / "average_photo.npy"

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.json"

    def member(self, i: int) -> RunDir:
        return RunDir(self.path / "members" / str(i))

    def members(self) -> list[RunDir]:
        """An ensemble's members in order; empty for a run of one decoder."""
        folder = self.path / "members"
        if not folder.is_dir():
            return []
        return [RunDir(p) for p in sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name)) if p.is_dir()]

    def has_checkpoint(self) -> bool:
        """Whether there is something to resume: last.pt, or previous.pt if last.pt was lost."""
        return self.last.exists() or self.previous.exists()

    def newest_checkpoint(self) -> Path:
        """best.pt, else last.pt: what `caption` and `evaluate` use."""
        for path in (self.best, self.last):
            if path.exists():
                return path
        raise UserError(f"{self.path} has no checkpoints/best.pt or last.pt: train it first")

    def write_config(self, config: dict) -> None:
        atomic_write_bytes(self.config, json.dumps(config, indent=2, sort_keys=True).encode())

    @classmethod
    def new(cls, root: Path = RUNS_ROOT) -> RunDir:
        """runs/<timestamp>, with a suffix when two runs start in the same second."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / stamp
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{stamp}-{n}"
        return cls(path)

    @classmethod
    def latest(cls, root: Path = RUNS_ROOT) -> RunDir:
        """The most recently written run under `root` that has checkpoints."""
        runs = [cls(p) for p in Path(root).glob("*") if cls(p).checkpoints.is_dir() or cls(p).recipe.is_file()]
        if not runs:
            demo = f"give --run {DEMO_RUN} (make demo's run), or " if cls(DEMO_RUN).has_checkpoint() else ""
            raise UserError(f"no runs with checkpoints under {root}/: {demo}train one first (python cli.py train)")
        return max(runs, key=lambda r: (r.checkpoints if r.checkpoints.is_dir() else r.recipe).stat().st_mtime)

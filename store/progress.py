"""Where a long job stands, readable in a log file as well as on a terminal.

On a terminal rich draws a live bar. Written to a file (`nohup ... > log`), a live bar draws
nothing until the end, so a job of hours would look stuck: there `PlainProgress` prints a line
every LEGENDE_PROGRESS_EVERY seconds (default 30) with what is done, the rate and the time left.

    featurize: 2,400/7,000 images (34 %), 19.8 images/s, about 3 min 52 s left
"""

from __future__ import annotations

import os
import time

from rich.console import Console

DEFAULT_EVERY = 30.0


def progress_every() -> float:
    """Seconds between two progress lines in a log (LEGENDE_PROGRESS_EVERY)."""
    try:
        return max(0.0, float(os.environ.get("LEGENDE_PROGRESS_EVERY", DEFAULT_EVERY)))
    except ValueError:
        return DEFAULT_EVERY


def duration(seconds: float) -> str:
    """ "1 h 02 min", "3 min 52 s", "12 s"."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s} s" if m else f"{s} s"


class PlainProgress:
    """Prints `label: done/total unit (pct), rate, about T left` at most every `every` seconds, and
    once when done, but only where no live bar shows (the console is not a terminal)."""

    def __init__(self, console: Console | None, label: str, total: int, unit: str, every: float | None = None):
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.enabled = console is not None and not console.is_terminal and total > 0
        self.every = progress_every() if every is None else every
        self.started = self.last = time.monotonic()

    def update(self, done: int, detail: str = "") -> None:
        """`done` of `total` this session. The time left is extrapolated from this session's rate,
        which counts whatever else ran between updates (a training epoch's validation)."""
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if done else None
        parts = [f"{self.label}: {done:,}/{self.total:,} {self.unit} ({100 * done / self.total:.0f} %)"]
        parts += [detail] if detail else []
        parts.append(f"{rate:.1f} {self.unit}/s")
        if left is not None and done < self.total:
            parts.append(f"about {duration(left)} left")
        self.console.print(", ".join(parts), markup=False, highlight=False)

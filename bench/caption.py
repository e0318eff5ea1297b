"""Images per second of `caption DIR`, end to end (decoding, resizing, CNN, search, re-ranking).

    python bench/caption.py DIR [--run RUNDIR] [--limit 64] [--other-run RUNDIR2]

Loads the run once, then captions the same images in this process with greedy decoding, with
the old default (beam 3), and with today's defaults (decoder.decoding_options.Decoding: beam 3 and
re-ranking), and prints each speed against the old default's, measured in the same run. With
--other-run (e.g. a pooled decoder against an attention one), that run's captioner is timed
the same way, in the same process, and its rows are printed with its name.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoder.caption_photos import caption_images, find_images  # noqa: E402
from decoder.decoding_options import Decoding  # noqa: E402
from decoder.inference import load_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--other-run", type=Path, default=None, help="a second run, timed the same way")
    a = p.parse_args()
    paths = find_images(a.dir)[: a.limit]
    runs = [a.run] + ([a.other_run] if a.other_run else [])
    rates = {}
    for run in runs:
        for name, rate in measure(load_run(run), paths, a.workers).items():
            rates[(run, name)] = rate
    base = rates[(a.run, "beam 3")]
    for (run, name), rate in rates.items():
        label = f"[{run}] " if len(runs) > 1 else ""
        print(
            f"{label}{name}: {rate:.2f} images/s over {len(paths)} images "
            f"({rate / base:.2f}x beam 3 alone{' of the first run' if len(runs) > 1 else ''}, the old default)"
        )


def measure(loaded, paths: list[Path], workers: int) -> dict[str, float]:
    """Images per second of each decoding setting, after a warm-up."""
    d = Decoding()
    settings = {  # labels "beam N:" are what bench/gpu_check.sh reads
        "beam 1": Decoding(beam=1, rerank=0),
        "beam 3": Decoding(beam=3, rerank=0),
        f"beam {d.beam} + rerank {d.rerank} of {d.candidates} candidates (the defaults)": d,
    }
    for decoding in settings.values():  # warm-up: weights, threads, allocator, neighbours
        caption_images(loaded, paths[:2], workers=0, **asdict(decoding))
    rates = {}
    for name, decoding in settings.items():
        started = time.perf_counter()
        results = caption_images(loaded, paths, workers=workers, **asdict(decoding))
        rates[name] = len(results) / (time.perf_counter() - started)
    return rates


if __name__ == "__main__":
    main()

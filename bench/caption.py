"""Images per second of `caption DIR`, end to end (decoding, resizing, CNN, search, re-ranking).

    python bench/caption.py DIR [--run RUNDIR] [--limit 64]

Loads the run once, then captions the same images in this process with greedy decoding, with
the old default (beam 3), and with today's defaults (decoder.decoding.Decoding: beam 3 and
re-ranking), and prints each speed against the old default's, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoder.captioning import caption_images, find_images  # noqa: E402
from decoder.decoding import Decoding  # noqa: E402
from decoder.inference import load_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    paths = find_images(a.dir)[: a.limit]
    loaded = load_run(a.run)
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
        results = caption_images(loaded, paths, workers=a.workers, **asdict(decoding))
        rates[name] = len(results) / (time.perf_counter() - started)
    base = rates["beam 3"]
    for name, rate in rates.items():
        print(
            f"{name}: {rate:.2f} images/s over {len(paths)} images ({rate / base:.2f}x beam 3 alone, the old default)"
        )


if __name__ == "__main__":
    main()

"""Images per second of `caption DIR`, end to end (decoding, resizing, CNN, beam search).

    python bench/caption.py DIR [--run RUNDIR] [--limit 64]

Loads the run once, then captions the same images at beam 1 and at beam 3 in this process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoder.captioning import caption_images, find_images  # noqa: E402
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
    caption_images(loaded, paths[:2], beam=1, workers=0)  # warm-up: weights, threads, allocator
    rates = {}
    for beam in (1, 3):
        started = time.perf_counter()
        results = caption_images(loaded, paths, beam=beam, workers=a.workers)
        rates[beam] = len(results) / (time.perf_counter() - started)
        print(f"beam {beam}: {rates[beam]:.2f} images/s over {len(results)} images")
    print(f"beam 3 / beam 1 speed: {rates[3] / rates[1]:.2f}")


if __name__ == "__main__":
    main()

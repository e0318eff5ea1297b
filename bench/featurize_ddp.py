"""Speed-up of `torchrun --nproc-per-node N cli.py featurize` over one process, same images, same run.

    python bench/featurize_ddp.py [--n 40] [--nproc 2] [--weights google2015]

Builds a synthetic dataset in a temporary folder, then featurizes it from scratch twice: once
with one process (all cores as threads) and once under torchrun (one thread per process).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--crops", type=int, default=5)
    p.add_argument("--weights", default="google2015")
    a = p.parse_args()
    cli = [sys.executable, str(ROOT / "cli.py")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([*cli, "synth", str(tmp / "synth"), "--n", str(a.n)], check=True, capture_output=True)
        subprocess.run(
            [*cli, "prepare", str(tmp / "synth"), "--out", str(tmp / "one"), "--min-word-count", "1"],
            check=True,
            capture_output=True,
        )
        shutil.copytree(tmp / "one", tmp / "many")
        args = ["--weights", a.weights, "--crops", str(a.crops)]
        one = timed([*cli, "featurize", str(tmp / "one"), *args])
        many = timed(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(a.nproc),
                str(ROOT / "cli.py"),
                "featurize",
                str(tmp / "many"),
                *args,
            ]
        )
    crops = a.n * a.crops
    print(f"{a.n} images x {a.crops} crops, {a.weights} weights, wall time including start-up")
    print(f"1 process:            {one:7.1f} s  ({crops / one:.1f} crops/s)")
    print(f"{a.nproc} processes (torchrun): {many:7.1f} s  ({crops / many:.1f} crops/s)")
    print(f"speed-up: {one / many:.2f}x")


if __name__ == "__main__":
    main()

"""The whole pipeline on the built-in synthetic dataset, as a user would type it.

    make demo                      # = python demo.py
    python demo.py --n 40 --weights none --crop-size 80 --epochs 2 --joint-minutes 0.05   # what the test runs

Each step is a real `python cli.py ...` command run in a subprocess, printed before it runs and
timed; at the end come the captions of held-out images beside a reference, the metrics and the
time each step took, the path of the test split's HTML report (evaluation/report.py), and the next
commands to type, each with `--run` naming the demo's run. The store keeps the centre crop's
feature map, so `train` picks the attention decoder (the default on a store with maps), and the
held-out images get heat maps of what the decoder looked at for each word, in ROOT/heatmaps/.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from store.features import existing_attrs, store_path
from store.rundir import DEMO_RUN, RunDir

console = Console()


def step(name: str, args: list[str], timings: list[tuple[str, float]]) -> None:
    cmd = [sys.executable, "cli.py", *args]
    console.rule(f"[bold]{name}")
    console.print("$ python cli.py " + " ".join(args), style="cyan")
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=Path(__file__).parent)
    timings.append((name, time.monotonic() - started))
    if result.returncode != 0:
        sys.exit(f"demo step '{name}' failed with exit code {result.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEMO_RUN.parent, help="where the dataset, store and run go")
    p.add_argument("--n", type=int, default=500, help="synthetic images")
    p.add_argument("--weights", default="google2015")
    p.add_argument("--crops", type=int, default=1)
    p.add_argument("--crop-size", type=int, default=299, help="smaller crops make a quick smoke test")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--joint-minutes", type=float, default=1.0, help="length of each joint session; 0 skips it")
    p.add_argument("--show", type=int, default=8, help="held-out images to caption in the table")
    a = p.parse_args()

    synth, work, run, heatmaps = a.root / "synth", a.root / "work", a.root / DEMO_RUN.name, a.root / "heatmaps"
    for old in (run, heatmaps):
        shutil.rmtree(old, ignore_errors=True)  # a fresh run every time; the dataset and the feature store are reused
    store = existing_attrs(store_path(work, a.weights)) or {}
    rebuild = ["--overwrite"] if store and not store.get("maps_crops") else []  # a store from before maps
    t: list[tuple[str, float]] = []
    started = time.monotonic()
    step("synthetic scenes", ["synth", str(synth), "--n", str(a.n), "--seed", "0"], t)
    step("prepare", ["prepare", str(synth), "--out", str(work), "--min-word-count", "2"], t)
    step(
        "featurize",
        [
            "featurize",
            str(work),
            "--weights",
            a.weights,
            "--crops",
            str(a.crops),
            "--resume",
            "--crop-size",
            str(a.crop_size),
            "--resize",
            str(round(a.crop_size * 356 / 299)),
            "--maps",
            "centre",
            *rebuild,
        ],
        t,
    )
    step("train decoder (attention)", ["train", str(work), "--run", str(run), "--epochs", str(a.epochs)], t)
    if a.joint_minutes > 0:
        step(
            "joint session 1",
            [
                "train",
                "--run",
                str(run),
                "--phase",
                "joint",
                "--epochs",
                "1",
                "--max-minutes",
                str(a.joint_minutes),
                "--batch-size",
                "16",
            ],
            t,
        )
        if RunDir(run).last.exists():
            step(
                "joint session 2 (--resume)",
                ["train", "--run", str(run), "--phase", "joint", "--resume", "--max-minutes", str(a.joint_minutes)],
                t,
            )
    step("evaluate", ["evaluate", str(run), "--split", "test", "--report"], t)

    held_out = a.root / "held_out"
    shutil.rmtree(held_out, ignore_errors=True)
    held_out.mkdir(parents=True)
    references = {}
    for line in (work / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "test" and len(references) < a.show:
            dest = held_out / Path(rec["path"]).name
            shutil.copy(rec["path"], dest)
            references[str(dest)] = rec["captions"][0]
    out = a.root / "held_out_captions.csv"
    step(
        "caption held-out images",
        [
            "caption",
            str(held_out),
            "--run",
            str(run),
            "--format",
            "csv",
            "--out",
            str(out),
            "--attention",
            str(heatmaps),
        ],
        t,
    )

    table = Table("image", "generated caption", "a reference caption", title="Held-out synthetic images")
    with open(out, newline="") as f:
        for row in csv.DictReader(f):
            table.add_row(
                Path(row["image"]).name, row["caption"] or f"[red]{row['error']}", references.get(row["image"], "")
            )
    console.print(table)
    scores = json.loads(RunDir(run).eval_json("test").read_text())["scores"]
    metrics = Table(*scores, title="Test split (x100)")
    metrics.add_row(*(f"{100 * v:.1f}" for v in scores.values()))
    console.print(metrics)
    timing = Table("step", "seconds", title="Time per step")
    for name, seconds in t:
        timing.add_row(name, f"{seconds:.1f}")
    timing.add_row("[bold]total", f"[bold]{time.monotonic() - started:.1f}")
    console.print(timing)
    console.print(f"attention heat maps, a panel per word: {heatmaps}", soft_wrap=True)
    console.print(f"plots: {run / 'plots'}", soft_wrap=True)  # soft_wrap: a path on one line, to copy
    console.print(f"report (open it in a browser): {RunDir(run).eval_report('test')}", soft_wrap=True)
    plain = {"markup": False, "highlight": False, "soft_wrap": True}  # paths as they are, on one line
    console.print(f"\nNext, from the repository root (the run is {run}, not under runs/: give it with --run):", **plain)
    for command, what in next_commands(synth, run, a.epochs, a.joint_minutes > 0):
        console.print(f"  {command}  # {what}", **plain)


def next_commands(synth: Path, run: Path, epochs: int, joint: bool) -> list[tuple[str, str]]:
    """(command, what it does) to go on from the demo's run: caption photos, train further, evaluate."""
    r = shlex.quote(str(run))
    with open(RunDir(run).epochs_csv, newline="") as f:
        joint_epochs = sum(row["phase"] == "joint" for row in csv.DictReader(f))
    if not joint:
        train = (f"python cli.py train --run {r} --resume --epochs {epochs + 4}", "4 more decoder epochs")
    elif joint_epochs:
        train = (f"python cli.py train --run {r} --resume --epochs {joint_epochs + 1}", "one more joint epoch")
    else:
        train = (f"python cli.py train --run {r} --resume", "the joint phase, on from where its session stopped")
    return [
        (f"python cli.py caption {shlex.quote(str(synth / 'images'))} --run {r}", "caption a folder of photos"),
        train,
        (f"python cli.py evaluate {r} --report", "the test split's scores and page, after more training"),
    ]


if __name__ == "__main__":
    main()

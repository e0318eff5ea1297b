"""The demo's steps, end to end on a very small configuration, so that a broken demo fails CI; and
what it prints: the held-out captions, the scores, the timings and the commands to go on with."""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cli import main
from store.errors import UserError
from store.rundir import DEMO_RUN, RunDir
from tests.helpers import ROOT

STEPS = [
    "synthetic scenes",
    "prepare",
    "featurize",
    "train decoder (attention)",
    "joint session 1",
    "joint session 2 (--resume)",
    "evaluate",
    "caption held-out images",
]


def table_rows(out: str, title: str) -> list[list[str]]:
    """The cells of each body row of the rich table printed under `title` (one line per row)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = []
    for line in lines[start + 4 :]:  # title, top border, header, rule
        if not line.startswith("│"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("│").split("│")])
    return rows


def test_demo_runs_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "demo.py"),
        "--root",
        str(tmp_path),
        "--n",
        "30",
        "--weights",
        "none",
        "--crop-size",
        "80",
        "--crops",
        "2",
        "--epochs",
        "2",
        "--joint-minutes",
        "0.02",
        "--show",
        "3",
    ]
    env = {**os.environ, "COLUMNS": "400"}  # a table row on one line, whatever its captions' length
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    run = RunDir(tmp_path / "run")

    # the held-out photos: the captions `caption` wrote, beside each photo's first reference
    with open(tmp_path / "held_out_captions.csv", newline="") as f:
        captions = {Path(row["image"]).name: row for row in csv.DictReader(f)}
    records = [json.loads(line) for line in (tmp_path / "work" / "manifest.jsonl").read_text().splitlines()]
    test = [r for r in records if r["split"] == "test"]
    references = {Path(r["path"]).name: r["captions"][0] for r in test[:3]}
    assert sorted(captions) == sorted(references) and all(
        row["caption"] and not row["error"] for row in captions.values()
    )
    shown = table_rows(out, "Held-out synthetic images")
    assert sorted(shown) == sorted([name, captions[name]["caption"], references[name]] for name in references)

    # the scores: the test split's evaluation, x100
    evaluation = json.loads(run.eval_json("test").read_text())
    assert evaluation["images"] == len(test)
    assert table_rows(out, "Test split (x100)") == [[f"{100 * v:.1f}" for v in evaluation["scores"].values()]]

    # the time of each step, in order, and the total
    timing = table_rows(out, "Time per step")
    assert [name for name, _ in timing] == [*STEPS, "total"]
    seconds = [float(s) for _, s in timing]
    assert all(s > 0 for s in seconds) and seconds[-1] >= sum(seconds[:-1]) - 0.05 * len(STEPS)

    assert (run.plots / "epoch_loss.png").exists()
    heatmaps = sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png"))
    assert heatmaps == sorted(f"{name}.png" for name in references)  # one per held-out photo
    report = run.eval_report("test")
    assert f"report (open it in a browser): {report}" in out.splitlines() and report.is_file()

    # it ends with the commands that go on from its run, which is not under runs/
    lines = out.strip().splitlines()
    assert lines[-4] == f"Next, from the repository root (the run is {run}, not under runs/: give it with --run):"
    with open(run.epochs_csv, newline="") as f:
        joint_finished = any(row["phase"] == "joint" for row in csv.DictReader(f))
    train = f"train --run {run} --resume" + (" --epochs 2" if joint_finished else "")
    expected = [f"caption {tmp_path / 'synth' / 'images'} --run {run}", train, f"evaluate {run} --report"]
    commands = [line.split("  # ")[0].strip() for line in lines[-3:]]
    assert commands == [f"python cli.py {c}" for c in expected]
    for command in commands:  # each parses with cli.py's options (and its paths exist)
        name, *args = shlex.split(command)[2:]
        with click.Context(main) as ctx:
            main.get_command(ctx, name).make_context(name, args, parent=ctx)


def test_with_no_run_under_runs_the_error_names_the_demos_run_when_there_is_one(tmp_path, monkeypatch):
    """After `make demo`, `caption photos/` without --run says where the demo's run is."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as no_run:
        RunDir.latest()
    assert str(no_run.value) == "no runs with checkpoints under runs/: train one first (python cli.py train)"
    RunDir(DEMO_RUN).checkpoints.mkdir(parents=True)
    RunDir(DEMO_RUN).last.touch()
    with pytest.raises(UserError) as no_run:
        RunDir.latest()
    assert str(no_run.value) == (
        "no runs with checkpoints under runs/: give --run data/demo/run (make demo's run), or train one first "
        "(python cli.py train)"
    )

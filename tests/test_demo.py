"""The demo's steps, end to end on a very small configuration, so that a broken demo fails CI."""

import subprocess
import sys

from store.rundir import RunDir
from tests.helpers import ROOT


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
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for expected in (
        "Held-out synthetic images",
        "CIDEr-D",
        "Time per step",
        "joint session 2 (--resume)",
        "caption held-out images",
        "train decoder (attention)",
        "attention heat maps",
    ):
        assert expected in out
    assert (RunDir(tmp_path / "run").plots / "epoch_loss.png").exists()
    assert (RunDir(tmp_path / "run").eval_json("test")).exists()
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 3  # one per held-out photo
    report = RunDir(tmp_path / "run").eval_report("test")  # the demo ends with the report's path
    assert out.strip().splitlines()[-1].endswith(str(report)) and report.is_file()

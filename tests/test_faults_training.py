"""kill -9 at random points of decoder and joint training: resume reaches the uninterrupted weights,
redoing at most one checkpoint interval."""

import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from store.rundir import RunDir
from tests.helpers import ROOT, TINY, TINY_TRANSFORMER, run_cli

pytestmark = pytest.mark.slow


def kill_after_first_checkpoint(cmd: list[str], checkpoint, delay: float) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def same_weights(a, b, keys=("model",)):
    sa = torch.load(RunDir(a).last, weights_only=True)
    sb = torch.load(RunDir(b).last, weights_only=True)
    return sa["step"] == sb["step"] and all(
        torch.equal(sa[k][n], sb[k][n]) for k in keys for n in sa[k] if torch.is_tensor(sa[k][n])
    )


@pytest.mark.parametrize("decoder,seed", [("pooled", 0), ("pooled", 1), ("transformer", 0)])
def test_kill_9_during_decoder_training_then_resume(request, tmp_path, decoder, seed):
    work = request.getfixturevalue("featurized" if decoder == "pooled" else "mapped")  # the transformer reads maps
    tiny = TINY if decoder == "pooled" else TINY_TRANSFORMER
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("train", work, "--run", straight, "--epochs", 4, *tiny)
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(work), "--run", str(killed), "--epochs", "4", *tiny]
    kill_after_first_checkpoint(cmd, RunDir(killed).last, random.Random(seed).uniform(0, 1.5))
    state = torch.load(RunDir(killed).last, weights_only=True)  # the file survived the kill whole
    assert state["epoch"] >= 1
    run_cli("train", "--run", killed, "--resume")
    assert same_weights(straight, killed)


def test_kill_9_during_joint_training_then_resume(featurized, tmp_path):
    decoder = tmp_path / "decoder"
    run_cli("train", featurized, "--run", decoder, "--epochs", 1, *TINY)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(decoder, straight)
    shutil.copytree(decoder, killed)
    joint = ["--phase", "joint", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--checkpoint-minutes", "0.02"]
    run_cli("train", "--run", straight, *joint)
    last = RunDir(killed).last
    last.unlink()  # so that the first joint checkpoint is what we wait for
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", "--run", str(killed), *joint]
    kill_after_first_checkpoint(cmd, last, 1.0)
    state = torch.load(last, weights_only=True)
    assert state["phase"] == "joint" and state["batch_in_epoch"] > 0  # a mid-epoch, timer checkpoint
    run_cli("train", "--run", killed, "--phase", "joint", "--resume")
    assert same_weights(straight, killed, keys=("model", "encoder"))

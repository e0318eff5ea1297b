"""Joint phase: fine-tuning CNN + LSTM, exact resume mid-epoch, signals, logs across phases."""

import csv
import io
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from decoder.config import CaptionerConfig
from decoder.model import PooledCaptioner
from featurize.encoder import build_inception
from store.rundir import RunDir
from tests.helpers import ROOT, TINY, run_cli
from training.phases.joint import JointNet, train_joint

JOINT = {"epochs": 1, "batch_size": 8, "workers": 0, "cnn_lr": 1e-4}


@pytest.fixture(scope="module")
def decoder_run(featurized, tmp_path_factory):
    run = tmp_path_factory.mktemp("joint") / "decoder-run"
    run_cli("train", featurized, "--run", run, "--epochs", 2, "--lr", "3e-3", *TINY)
    return run


def copy_run(run, tmp_path, name):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def test_batch_norm_statistics_stay_frozen_and_blocks_before_unfreeze_do_not_train():
    torch.manual_seed(0)
    encoder = build_inception("none")
    net = JointNet(
        encoder, PooledCaptioner(CaptionerConfig(vocab_size=6, embed_size=8, hidden_size=8)), "Mixed_7a", None
    ).train()
    bn = encoder.Mixed_7c.branch1x1.bn
    before = bn.running_mean.clone()
    images = torch.randint(0, 255, (2, 3, 80, 80), dtype=torch.uint8)
    net(images, torch.tensor([[1, 4, 2], [1, 5, 2]])).sum().backward()
    assert torch.equal(bn.running_mean, before) and not bn.training
    assert encoder.Mixed_6e.branch1x1.conv.weight.grad is None  # before Mixed_7a: frozen
    assert encoder.Mixed_7c.branch1x1.conv.weight.grad is not None


def test_unknown_unfreeze_block_is_a_clear_error():
    from store.errors import UserError

    with pytest.raises(UserError, match="--unfreeze Mixed_9z: not a block"):
        JointNet(build_inception("none"), PooledCaptioner(CaptionerConfig(vocab_size=6)), "Mixed_9z", None)


def test_interrupted_joint_sessions_equal_an_uninterrupted_one(decoder_run, tmp_path):
    quiet = Console(file=io.StringIO())
    straight, stopped = copy_run(decoder_run, tmp_path, "straight"), copy_run(decoder_run, tmp_path, "stopped")
    train_joint(None, straight, resume=False, max_minutes=None, options=JOINT, console=quiet)
    outcome = train_joint(None, stopped, resume=False, max_minutes=1e-9, options=JOINT, console=quiet)
    assert outcome.status.startswith("time limit") and outcome.position.batch == 1
    while outcome.status != "finished":  # one batch per session, resumed mid-epoch every time
        outcome = train_joint(None, stopped, resume=True, max_minutes=1e-9, options={}, console=quiet)
    a = torch.load(RunDir(straight).last, weights_only=True)
    b = torch.load(RunDir(stopped).last, weights_only=True)
    assert a["phase"] == b["phase"] == "joint" and a["step"] == b["step"]
    for key in ("model", "encoder"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key] if torch.is_tensor(a[key][k]))
    # the CNN really was fine-tuned
    start = torch.load(RunDir(decoder_run).best, weights_only=True)
    assert "encoder" not in start
    fresh = build_inception("none").state_dict()
    assert not torch.equal(fresh["Mixed_7c.branch1x1.conv.weight"], a["encoder"]["Mixed_7c.branch1x1.conv.weight"])
    with open(RunDir(stopped).batches_csv) as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["decoder"] * start["step"] + ["joint"] * (a["step"] - start["step"])
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    assert (RunDir(stopped).plots / "batch_loss.png").exists()


def test_sigterm_mid_epoch_checkpoints_and_resumes(decoder_run, tmp_path):
    run = copy_run(decoder_run, tmp_path, "run")
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "train",
        "--run",
        str(run),
        "--phase",
        "joint",
        "--epochs",
        "50",
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    batches = RunDir(run).batches_csv
    decoder_rows = len(batches.read_text().splitlines())
    started = []
    for line in proc.stderr:  # on a loaded machine start-up can take long: wait for the session to begin
        started.append(line)
        if "joint phase of" in line:
            break
    time.sleep(3)  # a few joint steps
    assert proc.poll() is None, "".join(started)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = "".join(started) + err
    assert proc.returncode == 0, err
    assert "stopped (SIGTERM)" in err and "--phase joint --resume" in err
    state = torch.load(RunDir(run).last, weights_only=True)
    assert state["phase"] == "joint" and "encoder" in state
    assert len(batches.read_text().splitlines()) > decoder_rows  # joint steps were logged
    out = run_cli("train", "--run", run, "--phase", "joint", "--resume", "--max-minutes", "1e-9")
    assert "resuming joint phase" in out.stderr


def test_joint_checkpoint_captions_with_its_own_encoder(decoder_run, featurized, tmp_path):
    """A joint checkpoint's photos go through its fine-tuned CNN, not the CNN the store was made
    with: with the frozen CNN the features below would equal `frozen`, and the test fails."""
    import dataclasses
    import json

    from decoder.decoding_options import Decoding
    from decoder.inference import encode_photos, generate, load_captioner
    from store.checkpoints import load_checkpoint, save_checkpoint

    run = copy_run(decoder_run, tmp_path, "run")
    train_joint(None, run, resume=False, max_minutes=1e-9, options=JOINT, console=Console(file=io.StringIO()))
    state = load_checkpoint(RunDir(run).last)
    g = torch.Generator().manual_seed(0)  # one step moves the CNN little: make the fine-tuning unmistakable
    for name, weight in state["encoder"].items():
        if name.startswith("Mixed_7c") and name.endswith("conv.weight"):
            weight.add_(torch.randn(weight.shape, generator=g) * weight.std())
    checkpoint = tmp_path / "fine-tuned.pt"
    save_checkpoint(state, checkpoint)

    image = sorted((featurized.parent / "synth" / "images").glob("*.png"))[0]
    loaded = load_captioner(checkpoint)
    tuned, _ = encode_photos(loaded, [image], workers=0)
    without_cnn = dataclasses.replace(loaded, state={k: v for k, v in loaded.state.items() if k != "encoder"})
    frozen, _ = encode_photos(without_cnn, [image], workers=0)
    assert (tuned[0] - frozen[0]).abs().max() > 0.1 * frozen[0].abs().max()
    out = run_cli("caption", image, "--checkpoint", checkpoint, "--format", "json", "--workers", 0)
    expected = generate(loaded, tuned[0][None], rerank=Decoding().rerank, candidates=Decoding().candidates)[0]
    assert json.loads(out.stdout)[0]["caption"] == expected


def test_featurize_encoder_from_recaches_with_the_fine_tuned_cnn(decoder_run, featurized, tmp_path):
    import numpy as np

    from store.features import FeatureStore, find_store

    run = copy_run(decoder_run, tmp_path, "ft")
    train_joint(None, run, resume=False, max_minutes=1e-9, options=JOINT, console=Console(file=io.StringIO()))
    work = tmp_path / "work"
    shutil.copytree(featurized, work)
    run_cli("featurize", work, "--encoder-from", run, "--crops", 2, "--workers", 0, "--resize", 96, "--crop-size", 80)
    with FeatureStore.open(find_store(work, "finetuned-ft")) as new, FeatureStore.open(find_store(work, "none")) as old:
        assert new.attrs["weights"] == "finetuned-ft" and new.num_rows == old.num_rows
        assert not np.array_equal(new.read(slice(None)), old.read(slice(None)))
    out = run_cli("train", work, "--run", tmp_path / "again", "--weights", "finetuned-ft", "--epochs", 1, *TINY)
    assert "done" in out.stderr

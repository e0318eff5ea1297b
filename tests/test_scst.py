"""Self-critical training: exact resume, rewards and baselines, logs and plots, refusals."""

import csv
import io
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console

from decoder.cider import CiderD
from store.errors import UserError
from store.rundir import RunDir
from store.text import Vocabulary
from tests.helpers import TINY, run_cli
from training.phases.scst import SelfCritical, train_scst

SCST = {"epochs": 2, "batch_size": 4, "lr": 1e-3}


@pytest.fixture(scope="module")
def decoder_run(featurized, tmp_path_factory):
    run = tmp_path_factory.mktemp("scst") / "decoder-run"
    run_cli("train", featurized, "--run", run, "--epochs", 2, "--lr", "3e-3", *TINY)
    return run


def copy_run(run, tmp_path, name):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def test_interrupted_scst_sessions_equal_an_uninterrupted_one(decoder_run, tmp_path):
    quiet = Console(file=io.StringIO())
    straight, stopped = copy_run(decoder_run, tmp_path, "straight"), copy_run(decoder_run, tmp_path, "stopped")
    train_scst(None, straight, resume=False, max_minutes=None, options=SCST, console=quiet)
    outcome = train_scst(None, stopped, resume=False, max_minutes=1e-9, options=SCST, console=quiet)
    assert outcome.status.startswith("time limit") and outcome.position.batch == 1
    while outcome.status != "finished":  # one batch per session, resumed mid-epoch every time
        outcome = train_scst(None, stopped, resume=True, max_minutes=1e-9, options={}, console=quiet)
    a = torch.load(RunDir(straight).last, weights_only=True)
    b = torch.load(RunDir(stopped).last, weights_only=True)
    assert a["phase"] == b["phase"] == "scst" and a["step"] == b["step"] and a["config"]["scst"]["samples"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    start = torch.load(RunDir(decoder_run).best, weights_only=True)
    assert any(not torch.equal(a["model"][k], start["model"][k]) for k in a["model"])  # it trained
    with open(RunDir(stopped).batches_csv) as f:
        rows = list(csv.DictReader(f))
    scst = [r for r in rows if r["phase"] == "scst"]
    assert len(scst) == a["step"] - start["step"] and all(r["reward"] and not r["loss"] for r in scst)
    with open(RunDir(stopped).epochs_csv) as f:
        epochs = [r for r in csv.DictReader(f) if r["phase"] == "scst"]
    assert len(epochs) == 2 and all(r["train_reward"] and r["val_cider"] for r in epochs)
    for name in ("batch_loss", "batch_reward", "epoch_loss", "epoch_reward"):
        assert (RunDir(stopped).plots / f"{name}.png").stat().st_size > 0


def test_best_is_kept_by_validation_cider_from_the_starting_model(decoder_run, tmp_path):
    """best.pt moves only when an scst epoch beats the decoder it started from on val CIDEr-D."""
    run = copy_run(decoder_run, tmp_path, "run")
    before = torch.load(RunDir(run).best, weights_only=True)
    train_scst(None, run, resume=False, max_minutes=None, options=SCST, console=Console(file=io.StringIO()))
    best = torch.load(RunDir(run).best, weights_only=True)
    with open(RunDir(run).epochs_csv) as f:
        ciders = [float(r["val_cider"]) for r in csv.DictReader(f) if r["phase"] == "scst"]
    if best["phase"] == "scst":
        assert -best["best_score"] == pytest.approx(max(ciders), abs=1e-4)
    else:
        assert torch.equal(best["model"]["head.weight"], before["model"]["head.weight"])


def test_reward_baseline_is_the_mean_of_the_other_samples():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs"])
    cider = CiderD([["a dog runs"], ["a cat"]])
    objective = SelfCritical(cider, {0: cider.references(["a dog runs"])}, vocab, samples=3, max_len=5)
    tokens = torch.tensor([[4, 5, 7, 2, 0], [4, 6, 2, 0, 0], [6, 2, 0, 0, 0]])  # a dog runs / a cat / cat
    reward = objective.rewards(tokens, torch.tensor([0]))
    expected = cider.score(["a dog runs", "a cat", "cat"], cider.references(["a dog runs"]))
    assert np.allclose(reward.numpy()[0], expected, atol=1e-6) and reward[0, 0] > reward[0, 1]


def test_scst_refuses_one_sample_and_a_joint_checkpoint(decoder_run, tmp_path):
    run = copy_run(decoder_run, tmp_path, "run")
    with pytest.raises(UserError, match="--samples must be at least 2"):
        train_scst(
            None, run, resume=False, max_minutes=None, options={"samples": 1}, console=Console(file=io.StringIO())
        )
    state = torch.load(RunDir(run).best, weights_only=True)
    state["encoder"] = {}
    joint = tmp_path / "joint.pt"
    torch.save(state, joint)
    out = run_cli("train", "--run", run, "--phase", "scst", "--init", joint, check=False)
    assert out.returncode == 1 and "start it from a decoder-phase checkpoint" in out.stderr
    out = run_cli("train", "--run", run, "--phase", "scst", "--resume", check=False)
    assert out.returncode == 1 and "decoder-phase checkpoint: start the scst phase without --resume" in out.stderr


def test_samples_follow_the_rules_of_search_and_score_the_policy_they_were_drawn_from():
    """No <unk> and no empty caption, even from a decoder that prefers both; each token's
    log-probability is under the distribution it was drawn from (renormalised over the allowed
    words), and the loss backpropagates."""
    from decoder.config import CaptionerConfig
    from decoder.model import PooledCaptioner
    from training.phases.scst import SampleNet

    start, end, unk = Vocabulary.start_id, Vocabulary.end_id, Vocabulary.unk_id
    torch.manual_seed(0)
    model = PooledCaptioner(CaptionerConfig(vocab_size=10, feature_dim=16, embed_size=8, hidden_size=8)).eval()
    with torch.no_grad():
        model.head.bias[unk] = 8.0
        model.head.bias[end] = 6.0
    features = torch.randn(3, 16)
    first, _ = model.step(torch.full((3,), start), model.init_state(features))  # (3, V)
    assert (first.argmax(-1) == unk).all()
    tokens, logprobs, mask = SampleNet(model, start, end)(features, samples=40, max_len=6)  # (120, T)
    assert not (tokens == unk).any() and not (tokens[:, 0] == end).any()
    assert (tokens == end).any()  # <end> is still said, after the first word
    rules = torch.zeros(10, dtype=torch.bool)
    rules[[unk, end]] = True
    expected = first.masked_fill(rules, float("-inf")).log_softmax(-1)  # step 0's sampled policy
    rows = torch.arange(3).repeat_interleave(40)
    assert torch.allclose(logprobs[:, 0], expected[rows, tokens[:, 0]], atol=1e-6)
    (logprobs * mask).sum().backward()
    grad = model.head.bias.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0

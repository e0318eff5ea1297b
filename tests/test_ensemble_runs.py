"""Runs trained apart, decoded as one ensemble: `evaluate RUN --with OTHER`, `caption --with`,
Captioner.load(..., also=[...]), and the one-line refusals.

The two runs are an attention decoder and a transformer trained on one workdir (one vocabulary,
one feature store), the pairing the brief of `--with` was written for."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from cli import main
from decoder.inference import load_ensemble
from evaluation.evaluate import evaluate_run
from evaluation.report import saved_scores
from legende import Captioner, Decoding
from store.rundir import RunDir
from tests.helpers import TINY, TINY_TRANSFORMER, one_line_error, run_cli

ATTENTION = [*TINY, "--decoder", "attention", "--attention-size", "8"]


@pytest.fixture(scope="module")
def runs(mapped, tmp_path_factory) -> tuple[RunDir, RunDir]:
    """(att, tfm): an attention run and a transformer run, one epoch each on `mapped`. Tests may
    evaluate them (which writes eval/), not train them or change their checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    run_cli("train", mapped, "--run", root / "att", "--epochs", 1, *ATTENTION)
    run_cli("train", mapped, "--run", root / "tfm", "--epochs", 1, *TINY_TRANSFORMER)
    return RunDir(root / "att"), RunDir(root / "tfm")


@pytest.fixture(scope="module")
def photos(mapped, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for image in sorted((mapped.parent / "synth" / "images").glob("*.png"))[:3]:
        shutil.copy(image, folder / image.name)
    return folder


def test_evaluate_with_another_run_is_an_ensemble_written_apart(runs, monkeypatch):
    """Re-ranking (on by default) and the prior penalty find the training photos through the first
    run, as for a --members run; the captions are load_ensemble's of both best.pt."""
    monkeypatch.setattr("evaluation.metrics.java_available", lambda: False)
    att, tfm = runs
    flags = ["--split", "val", "--beam", "2", "--prior-penalty", "0.5"]
    result = CliRunner().invoke(main, ["evaluate", str(att.path), "--with", str(tfm.path), *flags])
    assert result.exit_code == 0, result.output
    written, captions = att.eval / "val+tfm.json", att.eval / "val+tfm_captions.csv"
    assert f"wrote {written} and {captions.name}" in result.output and "2 members" in result.output
    assert not att.eval_json("val").exists() and not att.eval_captions("val").exists()  # att's own: not touched
    assert not tfm.eval.exists()
    record = json.loads(written.read_text())
    assert record["members"] == [str(att.best), str(tfm.best)] and record["prior_penalty"] == 0.5

    ensemble = load_ensemble([att.best, tfm.best])
    expected = evaluate_run(ensemble, att.path, "val", beam=2, rerank=Decoding().rerank, prior_penalty=0.5, write=False)
    with open(captions, newline="") as f:
        assert [row["caption"] for row in csv.DictReader(f)] == [hyp for _, hyp in expected["captions"]]
    assert record["scores"] == expected["scores"]
    assert saved_scores(att)[0][0].startswith("val split, 2 members (val+tfm.json) (epoch 1)")  # caption's page


def test_caption_with_another_run_matches_the_api(runs, photos, tmp_path):
    """Heat maps of such an ensemble are its members' mean weights, as for a --members run."""
    att, tfm = runs
    out = tmp_path / "c.json"
    args = ["caption", photos, "--run", att.path, "--with", tfm.path, "--format", "json", "--out", out]
    run_cli(*args, "--workers", 0, "--attention", tmp_path / "heat")
    rows = json.loads(out.read_text())
    cap = Captioner.load(att.path, also=[tfm.path])
    assert cap.members == 2 and cap.describe() == f"{att} + {tfm} (2 members)"
    assert [r["caption"] for r in rows] == cap(sorted(photos.glob("*.png")))
    assert all(len(r["attention"]) == len(r["caption"].split()) for r in rows)
    assert len(list((tmp_path / "heat").glob("*.png"))) == 3
    assert Captioner.load(att.path).members == 1  # also= is optional: the signature of before still works


def test_each_refusal_is_one_line(runs, photos, tmp_path):
    att, tfm = runs
    missing = tmp_path / "nowhere"
    line = one_line_error(CliRunner().invoke(main, ["evaluate", str(att.path), "--with", str(missing)]))
    assert line == f"Error: {missing}: no such run folder or checkpoint file"

    other_vocab = tmp_path / "other_vocab.pt"
    state = torch.load(tfm.best, weights_only=True)
    torch.save({**state, "vocab": [*state["vocab"][:-1], "zebra"]}, other_vocab)
    line = one_line_error(CliRunner().invoke(main, ["evaluate", str(att.path), "--with", str(other_vocab)]))
    assert line == f"Error: {other_vocab} has another vocabulary than {att.best}: ensemble members must share one"

    # What check_members_agree reads of a joint-phase checkpoint: the fine-tuned CNN's weights.
    joint = tmp_path / "joint.pt"
    torch.save({**state, "encoder": {}}, joint)
    caption = ["caption", str(photos), "--run", str(att.path), "--workers", "0"]
    line = one_line_error(CliRunner().invoke(main, [*caption, "--with", str(joint)]))
    assert line == f"Error: {joint}: members with a fine-tuned CNN (joint phase) cannot share one feature pass"
    first = ["evaluate", "--checkpoint", str(joint), "--with", str(tfm.path)]  # the joint one named, first or not
    line = one_line_error(CliRunner().invoke(main, first))
    assert line == f"Error: {joint}: members with a fine-tuned CNN (joint phase) cannot share one feature pass"

    line = one_line_error(CliRunner().invoke(main, [*caption, "--with", str(att.best)]))
    assert line == f"Error: {att.best} is in the ensemble twice: give each run or checkpoint once"


def test_evaluate_refuses_a_checkpoint_of_another_run(tmp_path):
    """evaluate RUN --checkpoint F decodes F: a F from another run would silently ignore RUN."""
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    (other / "best.pt").write_bytes(b"")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run"), "--checkpoint", str(other / "best.pt")])
    assert result.exit_code == 2
    expected = f"--checkpoint {other / 'best.pt'} is not one of {tmp_path / 'run'}'s: give one or the other"
    assert expected in result.output

"""Decoder phase: learning, exact resume, clean stops on signals and time, streaming, logs."""

import csv
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from cli import main
from store.features import FeatureStore, find_store
from store.manifest import read_manifest
from store.rundir import RunDir
from store.text import Vocabulary
from tests.helpers import ROOT, TINY, TINY_TRANSFORMER, one_line_error, run_cli
from training import data as D
from training.options import DecoderConfig
from training.phases.decoder import FeatureData, train_decoder


def params(run_dir, name="last.pt"):
    return torch.load(RunDir(run_dir).checkpoints / name, weights_only=True)["model"]


def test_validation_loss_falls_and_logs_and_plots_are_written(featurized, tmp_path):
    run = tmp_path / "run"
    run_cli("train", featurized, "--run", run, "--epochs", 4, "--lr", "3e-3", *TINY)
    with open(RunDir(run).epochs_csv) as f:
        epochs = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in epochs]
    assert len(val) == 4 and val[-1] < val[0]
    with open(RunDir(run).batches_csv) as f:
        batches = list(csv.DictReader(f))
    assert [int(r["step"]) for r in batches] == list(range(1, len(batches) + 1))
    assert {r["phase"] for r in batches} == {"decoder"}
    assert (RunDir(run).plots / "batch_loss.png").stat().st_size > 0
    assert (RunDir(run).plots / "epoch_loss.png").stat().st_size > 0
    ckpt = torch.load(RunDir(run).best, weights_only=True)
    assert ckpt["phase"] == "decoder" and ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (run / "config.json").exists()


def test_resume_after_an_epoch_equals_an_uninterrupted_run(featurized, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", featurized, "--run", straight, "--epochs", 2, *TINY)
    run_cli("train", featurized, "--run", resumed, "--epochs", 1, *TINY)
    run_cli("train", "--run", resumed, "--resume", "--epochs", 2)
    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_cli("train", "--run", resumed, "--resume")  # a finished run says so, and trains nothing
    assert f"decoder phase of {resumed}: all 2 epochs are done, nothing to resume" in again.stderr
    assert "resuming" not in again.stderr and "after 2 epochs" in again.stderr
    assert all(torch.equal(a[k], v) for k, v in params(resumed).items())


def test_stops_mid_epoch_on_time_limit_and_resumes_exactly(featurized, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    options = {"epochs": 2, "embed_size": 16, "hidden_size": 16, "batch_size": 8}
    quiet = Console(file=io.StringIO())
    train_decoder(featurized, straight, resume=False, max_minutes=None, options=options, console=quiet)
    # A tiny time limit stops after every batch; each session resumes mid-epoch from the sampler position.
    outcome = train_decoder(featurized, stopped, resume=False, max_minutes=1e-9, options=options, console=quiet)
    assert outcome.status.startswith("time limit") and outcome.position.batch == 1
    sessions = 1
    while outcome.status != "finished":
        outcome = train_decoder(None, stopped, resume=True, max_minutes=1e-9, options={}, console=quiet)
        sessions += 1
    assert sessions > 4
    a, b = params(straight), params(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(RunDir(stopped).batches_csv) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, len(steps) + 1))  # every batch logged once, in order


@pytest.mark.parametrize(
    "sig,decoder", [(signal.SIGINT, "pooled"), (signal.SIGTERM, "pooled"), (signal.SIGTERM, "transformer")]
)
def test_signal_stops_cleanly_with_a_checkpoint(request, tmp_path, sig, decoder):
    work = request.getfixturevalue("featurized" if decoder == "pooled" else "mapped")  # the transformer reads maps
    tiny = TINY if decoder == "pooled" else TINY_TRANSFORMER
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "train",
            str(work),
            "--run",
            str(run),
            "--epochs",
            "100000",
            *tiny,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not RunDir(run).last.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"stopped ({sig.name})" in err and "--resume" in err
    state = torch.load(RunDir(run).last, weights_only=True)
    assert state["step"] > 0
    resumed = run_cli("train", "--run", run, "--resume", "--epochs", state["epoch"] + 1)
    assert "resuming" in resumed.stderr


def test_second_ctrl_c_interrupts_at_once(featurized, tmp_path):
    from training.stopping import StopRequest

    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.reason() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_streaming_gives_the_same_batches_as_memory(featurized):
    records = read_manifest(featurized)
    vocab = Vocabulary.load(featurized / "vocab.json")
    with FeatureStore.open(find_store(featurized)) as store:
        usable = np.asarray(store.done, dtype=bool)
        train = D.build_pairs(records, vocab, "train", usable)
        val = D.build_pairs(records, vocab, "val", usable)
        cfg = DecoderConfig(workdir=str(featurized), store=str(store.path), batch_size=8)
        in_ram = FeatureData(store, train, val, cfg)
        streamed = FeatureData(store, train, val, DecoderConfig(**{**cfg.__dict__, "stream": True}))
        assert isinstance(streamed.source, D.StreamingFeatures) and isinstance(in_ram.source, D.InMemoryFeatures)
        streamed.source.chunk_rows = 3  # many chunks, so the chunk cache is exercised
        for epoch in (0, 1):
            for (fa, ca), (fb, cb) in zip(
                in_ram.train_batches(epoch, 0), streamed.train_batches(epoch, 0), strict=True
            ):
                assert torch.equal(fa, fb) and torch.equal(ca, cb)


def test_epoch_order_is_a_seeded_permutation():
    pairs = D.Pairs(np.repeat(np.arange(50), 3), [[1, 2]] * 150)
    order, crops = D.epoch_order(pairs, epoch=3, seed=7, num_crops=5, chunk_rows=4)
    again, crops_again = D.epoch_order(pairs, epoch=3, seed=7, num_crops=5, chunk_rows=4)
    other, _ = D.epoch_order(pairs, epoch=4, seed=7, num_crops=5, chunk_rows=4)
    assert sorted(order.tolist()) == list(range(150))
    assert np.array_equal(order, again) and np.array_equal(crops, crops_again)
    assert not np.array_equal(order, other)
    assert set(crops.tolist()) == set(range(5))


def test_resume_refuses_a_changed_architecture(featurized, tmp_path):
    run = tmp_path / "run"
    run_cli("train", featurized, "--run", run, "--epochs", 1, *TINY)
    out = run_cli("train", "--run", run, "--resume", "--hidden-size", 32, check=False)
    assert out.returncode == 1
    assert (
        out.stderr.strip().splitlines()[-1]
        == "Error: cannot change --hidden-size on resume: the run was trained with 16, got 32"
    )
    out = run_cli("train", featurized, "--run", run, *TINY, check=False)
    assert out.returncode == 1 and "already has checkpoints" in out.stderr


def test_a_run_from_format_1_resumes_evaluates_captions_and_starts_another_phase(trained, featurized, tmp_path):
    """Checkpoints of format 1 kept the decoder phase's options under "train"; they load as "decoder"."""
    import shutil

    import legende

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    for path in RunDir(old).checkpoints.glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"]["train"] = state["config"].pop("decoder")
        torch.save({**state, "format_version": 1}, path)
    RunDir(old).neighbours.unlink()  # re-ranking rebuilds it from the store and dataset the config names
    images = sorted((featurized.parent / "synth" / "images").glob("*.png"))[:4]
    assert legende.Captioner.load(old)(images) == legende.Captioner.load(trained)(images)
    assert legende.Captioner.load(old).evaluate("val", write=False)["images"] > 0
    resumed = tmp_path / "resumed"
    shutil.copytree(old, resumed)
    assert legende.train(run_dir=resumed, resume=True, epochs=3).position.epoch == 3
    state = torch.load(RunDir(resumed).last, weights_only=True)
    assert state["format_version"] == 2 and state["config"]["decoder"]["workdir"] == str(featurized)
    assert legende.train(run_dir=old, phase="scst", epochs=1, batch_size=4).status == "finished"
    state = torch.load(RunDir(old).last, weights_only=True)
    assert state["phase"] == "scst" and state["config"]["decoder"]["seed"] == state["config"]["scst"]["seed"] == 0


def test_threads_option_and_its_environment_variable_set_torch_threads(featurized, tmp_path):
    run = tmp_path / "run"
    out = run_cli("--threads", 1, "train", featurized, "--run", run, "--epochs", 1, *TINY)
    assert "CPU threads: 1" in out.stderr
    out = run_cli("train", "--run", run, "--resume", "--epochs", 2, env={**os.environ, "LEGENDE_THREADS": "1"})
    assert "CPU threads: 1" in out.stderr
    out = run_cli("--threads", 0, "train", featurized, "--run", tmp_path / "other", check=False)
    assert out.returncode == 2 and "--threads" in out.stderr


def test_user_errors_are_one_line(tmp_path):
    nowhere, run = tmp_path / "nowhere", tmp_path / "r"
    line = one_line_error(CliRunner().invoke(main, ["train", str(nowhere), "--run", str(run)]))
    assert line == f"Error: no feature store in {nowhere}/features: run `python cli.py featurize {nowhere}`"
    line = one_line_error(CliRunner().invoke(main, ["train", "--run", str(run), "--resume"]))
    assert line == f"Error: nothing to resume in {run}: it has no checkpoints/last.pt"
    assert not run.exists()


@pytest.mark.parametrize("command", ["prepare", "synth", "featurize", "train", "plot", "evaluate", "caption"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_a_one_crop_store_logs_progress_trains_the_pooled_decoder_with_a_note_and_refuses_tta(featurized, tmp_path):
    """featurize's default is one crop per photo; a log file (not a terminal) gets progress lines."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(featurized, work, ignore=shutil.ignore_patterns("features"))
    log_every = {**os.environ, "LEGENDE_PROGRESS_EVERY": "0"}
    out = run_cli(
        "featurize", work, "--weights", "none", "--workers", 0, "--resize", 96, "--crop-size", 80,
        "--maps", "none", "--precision", "fp32", "--chunk-rows", 10, env=log_every,
    )  # fmt: skip
    assert "1 crops of 80px per image" in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("featurize: ")]
    assert lines[0].startswith("featurize: 10/40 images (25 %)") and "left" in lines[0]
    assert lines[-1].startswith("featurize: 40/40 images (100 %)") and "left" not in lines[-1]
    with FeatureStore.open(find_store(work)) as store:
        assert store.num_crops == 1

    run = tmp_path / "run"
    out = run_cli("train", work, "--run", run, "--epochs", 2, *TINY, env=log_every)
    assert "has one crop per photo, so the pooled decoder trains without crop augmentation" in out.stderr
    batches = D.num_batches(len(D.build_pairs(read_manifest(work), Vocabulary.load(work / "vocab.json"), "train",
                                              np.ones(40, bool))), 8)  # fmt: skip
    lines = [line for line in out.stderr.splitlines() if line.startswith("decoder: ")]
    assert len(lines) == 2 * batches and lines[0].startswith(f"decoder: 1/{2 * batches} batches")
    assert f"epoch 2/2 batch {batches}/{batches}" in lines[-1] and "about" in lines[0]

    out = run_cli("evaluate", run, "--split", "test", "--tta", check=False)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "Error: --tta averages the stored crops, and this run's store has one per photo: featurize with "
        "--crops 5 (and --overwrite), then train again, to use it"
    )


@pytest.mark.parametrize("by_photo", [False, True])
def test_the_order_of_an_epoch_does_not_depend_on_the_crops_stored(by_photo):
    """A 1-crop store (featurize's default) trains a centre-map decoder exactly as a 5-crop store
    does: the crops stored change the crop drawn per pair, never the order of the pairs."""
    pairs = D.Pairs(np.repeat(np.arange(30), 5), [[1, 4, 2]] * 150)
    one, crops_one = D.epoch_order(pairs, 2, 0, 1, 8, by_photo)
    five, crops_five = D.epoch_order(pairs, 2, 0, 5, 8, by_photo)
    assert np.array_equal(one, five) and not crops_one.any() and crops_five.max() == 4

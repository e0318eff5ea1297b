"""Consensus captions: nearest training photos, retrieval, re-ranking, and `--rerank` on new photos."""

import json
import shutil

import numpy as np
import pytest

from decoder.consensus import Neighbours, rerank, retrieve
from store.rundir import RunDir
from tests.helpers import TINY, run_cli


def toy_neighbours() -> Neighbours:
    """Four photos along two directions: two of dogs, two of cats."""
    features = np.array([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 0.8]])
    captions = [
        ["a dog runs on the grass", "a brown dog runs"],
        ["a dog runs through grass", "the dog is running"],
        ["a cat sleeps on a sofa", "a cat is sleeping"],
        ["a grey cat sleeps", "a cat lies on the sofa"],
    ]
    return Neighbours.from_features(features, captions)


def test_nearest_is_by_cosine_nearest_first():
    n = toy_neighbours()
    assert n.nearest(np.array([[10.0, 0.5], [0.0, 3.0]]), 2).tolist() == [[0, 1], [2, 3]]
    assert n.nearest(np.array([[1.0, 0.0]]), 10).shape == (1, 4)  # k is capped at the photos there are


def test_retrieve_returns_the_caption_the_other_neighbours_agree_with():
    n = toy_neighbours()
    dog, cat = retrieve(n, np.array([[1.0, 0.05], [0.05, 1.0]]), k=2)
    assert "dog" in dog and "runs" in dog
    assert "cat" in cat and "sofa" in cat


def test_rerank_prefers_the_candidate_the_neighbours_said():
    n = toy_neighbours()
    candidates = [["a man rides a bike", "a dog runs on the grass"], ["a cat sleeps on a sofa", "a dog runs"]]
    assert rerank(candidates, n, np.array([[1.0, 0.0], [0.0, 1.0]]), k=2) == [1, 0]


def test_rerank_never_prefers_an_empty_caption():
    n = toy_neighbours()
    # "the sky" shares no n-gram with the neighbours: it scores 0, like the empty caption before it
    assert rerank([["", "the sky"], ["", ""]], n, np.array([[1.0, 0.0], [0.0, 1.0]]), k=2) == [1, 0]


def test_neighbours_survive_a_round_trip(tmp_path):
    n = toy_neighbours()
    n.save(tmp_path / "n.npz")
    back = Neighbours.load(tmp_path / "n.npz")
    assert back.captions == n.captions and np.allclose(back.features, n.features, atol=1e-3)


def test_caption_reranks_new_photos_without_the_dataset(featurized, tmp_path):
    """Training keeps RUNDIR/neighbours.npz, so --rerank works after the dataset folder is gone."""
    work = tmp_path / "work"
    shutil.copytree(featurized, work)
    run = tmp_path / "run"
    run_cli("train", work, "--run", run, "--epochs", 2, "--lr", "3e-3", *TINY)
    assert RunDir(run).neighbours.is_file()
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((featurized.parent / "synth" / "images").glob("*.png"))[:4]:
        shutil.copy(image, photos / image.name)
    shutil.rmtree(work)
    out = run_cli("caption", photos, "--run", run, "--rerank", 5, "--format", "json", "--workers", 0)
    rows = json.loads(out.stdout)
    assert len(rows) == 4 and all(r["caption"] for r in rows)
    out = run_cli("evaluate", run, "--rerank", 5, check=False)  # evaluating needs the dataset: one line
    assert out.returncode == 1 and out.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def one_epoch_run(featurized, tmp_path_factory):
    run = tmp_path_factory.mktemp("out") / "run"
    run_cli("train", featurized, "--run", run, "--epochs", 1, *TINY)
    return run


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_caption_out_writes_every_format_to_the_file(featurized, one_epoch_run, tmp_path, fmt):
    run = one_epoch_run
    image = sorted((featurized.parent / "synth" / "images").glob("*.png"))[0]
    target = tmp_path / f"captions.{fmt}"
    out = run_cli("caption", image, "--run", run, "--format", fmt, "--out", target, "--workers", 0)
    text = target.read_text()
    assert image.name in text and "wrote 1 rows" in out.stderr and image.name not in out.stdout
    if fmt == "table":
        assert "\x1b[" not in text and "caption" in text.splitlines()[1]

"""Decoding against the decoder's language prior (--prior-penalty, decoder/prior.py)."""

import json

import numpy as np
import pytest
import torch

from decoder.config import CaptionerConfig
from decoder.ensemble import Ensemble
from decoder.factory import build_captioner
from decoder.prior import PriorCorrected
from decoder.search import beam_search
from store.errors import UserError
from store.features import FeatureStore
from store.manifest import read_manifest
from store.rundir import RunDir
from tests.helpers import run_cli

START, END = 1, 2


def tiny(decoder: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CaptionerConfig(
        vocab_size=12, feature_dim=16, embed_size=8, hidden_size=8, decoder=decoder, attention_size=8
    )
    return build_captioner(config).eval()


def photos(decoder: str, n: int) -> torch.Tensor:
    return torch.randn(n, 16) * 2 if decoder == "pooled" else torch.randn(n, 5, 16) * 2


@pytest.mark.parametrize("decoder", ["pooled", "attention", "transformer"])
def test_each_word_loses_its_log_probability_for_the_average_photo(decoder):
    model, features = tiny(decoder), photos(decoder, 4)
    average = features.mean(0)
    wrapped = PriorCorrected(model, average, weight=0.7)
    tokens = torch.full((4,), START)
    with torch.inference_mode():
        got, _ = wrapped.step(tokens, wrapped.init_state(features))
        own, _ = model.step(tokens, model.init_state(features))
        prior, _ = model.step(tokens, model.init_state(average.expand_as(features)))
        # The average photo itself, penalised by its whole prior, has no preference left.
        whole = PriorCorrected(model, average, weight=1.0)
        flat, _ = whole.step(tokens[:1], whole.init_state(average[None]))
    assert torch.allclose(got, torch.log_softmax(own - 0.7 * prior, -1), atol=1e-6)
    assert torch.allclose(flat.exp(), torch.full_like(flat, 1 / 12), atol=1e-6)
    assert not torch.allclose(got, own, atol=1e-3)


@pytest.mark.parametrize("decoder", ["pooled", "attention", "transformer"])
def test_a_photos_caption_does_not_depend_on_the_photos_decoded_with_it(decoder):
    ensemble = Ensemble([tiny(decoder, seed=1), tiny(decoder, seed=2)])
    features = photos(decoder, 9) * 5
    wrapped = PriorCorrected(ensemble, photos(decoder, 30).mean(0), weight=1.0)
    together = beam_search(wrapped, features, START, END, beam=3, max_len=10)
    alone = [beam_search(wrapped, f[None], START, END, beam=3, max_len=10)[0] for f in features]
    assert together == alone
    assert len({tuple(c) for c in together}) > 1  # the photos do get different captions
    assert together != beam_search(ensemble, features, START, END, beam=3, max_len=10)


def test_evaluate_and_caption_with_a_prior_penalty(trained, featurized, tiny_images, tmp_path):
    """The average photo is the mean of the train split's centre-crop features, kept in the run."""
    run_cli("evaluate", trained, "--split", "val", "--prior-penalty", "0.5", "--rerank", "0")
    result = json.loads(RunDir(trained).eval_json("val").read_text())
    assert result["prior_penalty"] == 0.5 and result["images"] > 0
    average = np.load(RunDir(trained).average_photo)
    records = read_manifest(featurized)
    rows = [i for i, r in enumerate(records) if r.split == "train"]
    with FeatureStore.open(next((featurized / "features").glob("*.h5"))) as store:
        expected = store.read(np.asarray(rows))[:, 0].astype(np.float64).mean(0)
    assert average.shape == expected.shape and np.allclose(average, expected, atol=1e-5)
    tiny_images(tmp_path / "photos", ["a.png", "b.png"], size=120)
    out = run_cli("caption", tmp_path / "photos", "--run", trained, "--prior-penalty", "0.5", "--format", "csv")
    assert len(out.stdout.strip().splitlines()) == 3  # header and two captions


def test_a_fine_tuned_cnn_has_no_cached_average_photo(tmp_path):
    from decoder.inference import LoadedCaptioner, average_photo_for

    loaded = LoadedCaptioner(tiny("pooled"), None, {"encoder": {}, "config": {}}, tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(UserError, match="joint phase"):
        average_photo_for(loaded)

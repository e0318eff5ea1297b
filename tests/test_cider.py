"""The array CIDEr-D equals pycocoevalcap's CIDEr-D on the same inputs."""

import random

import numpy as np
from pycocoevalcap.cider.cider import Cider

from decoder.cider import CiderD

WORDS = (
    "a an the dog dogs man woman girl boy runs running jumps sits on in at grass water snow ball red blue two".split()
)


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def test_equals_pycocoevalcap_per_image_and_on_average():
    rng = random.Random(0)
    gts = {i: [sentence(rng) for _ in range(rng.randint(1, 5))] for i in range(40)}
    res = {i: [sentence(rng) if i % 7 else gts[i][0]] for i in range(40)}  # some exact matches
    mean, per_image = Cider().compute_score(gts, res)
    cider = CiderD(gts.values())  # pycocoevalcap takes document frequencies from the scored set
    ours = np.array([cider.score(res[i], cider.references(gts[i]))[0] for i in gts])
    assert np.abs(ours - per_image).max() < 1e-6 and abs(ours.mean() - mean) < 1e-6


def test_several_candidates_score_as_they_would_one_by_one():
    rng = random.Random(1)
    corpus = [[sentence(rng) for _ in range(5)] for _ in range(30)]
    cider = CiderD(corpus)
    refs = cider.references(corpus[3])
    candidates = [sentence(rng) for _ in range(6)] + [corpus[3][1], ""]
    together = cider.score(candidates, refs)
    alone = [cider.score([c], refs)[0] for c in candidates]
    assert np.allclose(together, alone, atol=1e-12)
    assert together[-2] == together.max() and together[-1] == 0.0  # a reference itself scores highest; nothing scores 0


def test_diversity_counts_distinct_captions_words_and_the_most_repeated_3gram():
    from evaluation.metrics import diversity

    hyps = {
        "a": "A man in a red jacket .",
        "b": "a man in a red jacket",
        "c": "a dog runs in a red field",
        "d": "two dogs play",
    }
    d = diversity(hyps)
    assert d["distinct"] == 75.0  # a and b are the same caption once normalised
    assert d["vocabulary"] == len({"a", "man", "in", "red", "jacket", "dog", "runs", "field", "two", "dogs", "play"})
    assert (d["top_3gram"], d["top_3gram_share"]) == ("in a red", 75.0)  # in 3 of the 4 captions
    assert diversity({"x": "a dog"})["top_3gram_share"] == 0.0  # no 3-gram at all

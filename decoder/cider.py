"""CIDEr-D as array arithmetic, for use inside a training loop and for re-ranking captions.

pycocoevalcap's scorer recounts document frequencies and rebuilds every reference vector on each
call, and loops over n-grams in Python; self-critical training scores a batch of sampled captions
at every step. Here the document frequencies come once from a reference corpus (the train split's
captions), each image's references become a dense tf-idf matrix over their own n-grams once
(`references`), and all candidates of an image are scored against all its references at once
(`score`). The arithmetic is pycocoevalcap's, quirks included: the length penalty compares bigram
counts, and a candidate's n-grams absent from the references add to its norm only.
tests/test_cider.py checks equality with pycocoevalcap to 1e-6.

    cider = CiderD(corpus)                         # corpus: each image's reference captions
    refs = cider.references(["a dog runs", ...])
    cider.score(["a dog runs on grass", "a cat"], refs)   # -> array of 2 scores
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

Ngram = tuple[str, ...]


def ngram_counts(tokens: list[str], n: int = 4) -> Counter[Ngram]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


@dataclass
class References:
    """One image's references as tf-idf rows over the n-grams they contain."""

    index: dict[Ngram, int]  # n-gram -> column
    weights: np.ndarray  # (R, U) tf-idf
    order: np.ndarray  # (U,) n-gram length - 1
    norms: np.ndarray  # (R, n)
    lengths: np.ndarray  # (R,) bigram counts (pycocoevalcap's "length")


class CiderD:
    def __init__(self, corpus: Iterable[Iterable[str]], n: int = 4, sigma: float = 6.0):
        """`corpus`: for each image, its reference captions (space-separated tokens); the document
        frequency of an n-gram is the number of images whose references contain it."""
        self.n, self.sigma = n, sigma
        self.df: Counter[Ngram] = Counter()
        images = 0
        for refs in corpus:
            images += 1
            self.df.update({g for ref in refs for g in ngram_counts(ref.split(), n)})
        if images == 0:
            raise ValueError("CIDEr-D needs a reference corpus of at least one image")
        self.log_images = math.log(float(images))

    def _vector(self, caption: str) -> tuple[dict[Ngram, float], np.ndarray, int]:
        """(tf-idf by n-gram, norm per n-gram length, bigram count) of one caption."""
        vec, norms, length = {}, np.zeros(self.n), 0
        for g, tf in ngram_counts(caption.split(), self.n).items():
            w = float(tf) * (self.log_images - math.log(max(1.0, self.df[g])))
            vec[g] = w
            norms[len(g) - 1] += w * w
            if len(g) == 2:
                length += tf
        return vec, np.sqrt(norms), length

    def references(self, captions: list[str]) -> References:
        vectors = [self._vector(c) for c in captions]
        index: dict[Ngram, int] = {}
        for vec, _, _ in vectors:
            for g in vec:
                index.setdefault(g, len(index))
        weights = np.zeros((len(captions), len(index)))
        for r, (vec, _, _) in enumerate(vectors):
            weights[r, [index[g] for g in vec]] = list(vec.values())
        order = np.array([len(g) - 1 for g in index], dtype=np.int64)
        norms = np.stack([v[1] for v in vectors]) if vectors else np.zeros((0, self.n))
        return References(index, weights, order, norms, np.array([v[2] for v in vectors], dtype=np.float64))

    def score(self, candidates: list[str], refs: References) -> np.ndarray:
        """CIDEr-D of each candidate against the same references; (S,)."""
        hyp = np.zeros((len(candidates), len(refs.index)))
        hyp_norms, hyp_lengths = np.zeros((len(candidates), self.n)), np.zeros(len(candidates))
        for s, caption in enumerate(candidates):
            vec, hyp_norms[s], hyp_lengths[s] = self._vector(caption)
            cols = [(refs.index[g], w) for g, w in vec.items() if g in refs.index]
            if cols:
                hyp[s, [c for c, _ in cols]] = [w for _, w in cols]
        ref = refs.weights[None]  # (1, R, U)
        clipped = np.minimum(hyp[:, None], ref) * ref  # (S, R, U)
        val = np.stack([clipped[..., refs.order == k].sum(-1) for k in range(self.n)], axis=-1)  # (S, R, n)
        denom = hyp_norms[:, None, :] * refs.norms[None]  # (S, R, n)
        val = np.divide(val, denom, out=val, where=denom != 0)
        delta = hyp_lengths[:, None] - refs.lengths[None]  # (S, R)
        val *= np.exp(-(delta**2) / (2 * self.sigma**2))[..., None]
        return val.mean(-1).sum(1) / len(refs.lengths) * 10.0

"""CIDEr-D as array arithmetic, for use inside a training loop and for re-ranking captions.

pycocoevalcap's scorer recounts document frequencies and rebuilds every reference vector on each
call, and loops over n-grams in Python; self-critical training scores a batch of sampled captions
at every step. Here the document frequencies come once from a reference corpus (the train split's
captions), an image's references become a count matrix over their own n-grams once
(`references`), and all candidates are scored against all references with a few matrix products
(`similarity`). The arithmetic is pycocoevalcap's, quirks included: the length penalty compares
bigram counts, and a candidate's n-grams absent from the references add to its norm only.
tests/test_cider.py checks equality with pycocoevalcap to 1e-6.

    cider = CiderD(corpus)                         # corpus: each image's reference captions
    refs = cider.references(["a dog runs", ...])
    cider.score(["a dog runs on grass", "a cat"], refs)   # -> array of 2 scores

It lives in decoder/, the lowest of the packages that use it: consensus re-ranking
(decoder/consensus.py) scores captions with it at decoding time, and above decoder/ the report's
per-photo scores (evaluation/report.py) and the self-critical reward (training/phases/scst.py) use
the same scorer. The corpus scores of `evaluate` come from pycocoevalcap (evaluation/metrics.py).
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
    """One image's (or one set of) references as n-gram count rows over the n-grams they contain."""

    index: dict[Ngram, int]  # n-gram -> column
    counts: np.ndarray  # (R, U) term frequencies
    idf: np.ndarray  # (U,) log(images) - log(df): an n-gram's tf-idf weight is tf * idf
    order: np.ndarray  # (U,) n-gram length - 1
    norms: np.ndarray  # (R, n) tf-idf norm per n-gram length
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

    def _idf(self, g: Ngram) -> float:
        return self.log_images - math.log(max(1.0, self.df[g]))

    def _stats(self, counts: list[Counter[Ngram]]) -> tuple[np.ndarray, np.ndarray]:
        """(norms (S, n), bigram counts (S,)) of captions' full tf-idf vectors."""
        norms, lengths = np.zeros((len(counts), self.n)), np.zeros(len(counts))
        for s, c in enumerate(counts):
            for g, tf in c.items():
                norms[s, len(g) - 1] += (tf * self._idf(g)) ** 2
                if len(g) == 2:
                    lengths[s] += tf
        return np.sqrt(norms), lengths

    def references(self, captions: list[str]) -> References:
        counts = [ngram_counts(c.split(), self.n) for c in captions]
        index: dict[Ngram, int] = {}
        for c in counts:
            for g in c:
                index.setdefault(g, len(index))
        matrix = np.zeros((len(captions), len(index)))
        for r, c in enumerate(counts):
            matrix[r, [index[g] for g in c]] = list(c.values())
        idf = np.array([self._idf(g) for g in index])
        order = np.array([len(g) - 1 for g in index], dtype=np.int64)
        norms, lengths = self._stats(counts)
        return References(index, matrix, idf, order, norms, lengths)

    def similarity(self, candidates: list[str], refs: References) -> np.ndarray:
        """(S, R): CIDEr-D of each candidate against each single reference.

        The clipped product of pycocoevalcap, min(tf_s, tf_r) * idf * tf_r * idf summed over the
        shared n-grams, is computed as matrix products: min(a, b) = sum over t >= 1 of [a >= t][b >= t].
        """
        counts = [ngram_counts(c.split(), self.n) for c in candidates]
        hyp = np.zeros((len(candidates), len(refs.index)))
        for s, c in enumerate(counts):
            shared = [(refs.index[g], tf) for g, tf in c.items() if g in refs.index]
            if shared:
                hyp[s, [i for i, _ in shared]] = [tf for _, tf in shared]
        hyp_norms, hyp_lengths = self._stats(counts)
        weighted = refs.counts * refs.idf**2  # (R, U): tf_r * idf^2
        val = np.zeros((len(candidates), len(refs.lengths), self.n))
        top = int(max(hyp.max(initial=0), refs.counts.max(initial=0)))
        for k in range(self.n):
            cols = refs.order == k
            h, r, w = hyp[:, cols], refs.counts[:, cols], weighted[:, cols]
            for t in range(1, top + 1):
                val[..., k] += (h >= t).astype(np.float64) @ ((r >= t) * w).T
        denom = hyp_norms[:, None, :] * refs.norms[None]  # (S, R, n)
        val = np.divide(val, denom, out=val, where=denom != 0)
        delta = hyp_lengths[:, None] - refs.lengths[None]  # (S, R)
        return val.mean(-1) * np.exp(-(delta**2) / (2 * self.sigma**2)) * 10.0

    def score(self, candidates: list[str], refs: References) -> np.ndarray:
        """CIDEr-D of each candidate against all the references (their mean); (S,)."""
        return self.similarity(candidates, refs).mean(1)

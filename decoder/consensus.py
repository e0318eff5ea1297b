"""Captions by consensus with the nearest training photos (Devlin et al. 2015, "Exploring nearest
neighbor approaches for image captioning").

A photo's k nearest training photos (cosine on the pooled CNN features) bring their human
captions. `retrieve` returns the one of those captions that agrees most with the others (no
decoder at all: the bar a learnt decoder must clear); `rerank` scores each of the decoder's beam
candidates by its CIDEr-D against all those captions and keeps the best, which pulls the decoder
away from its generic favourites toward what people said about similar photos.

A run keeps its training photos' features and captions in RUNDIR/neighbours.npz, so that
`caption --rerank K` works on new photos without the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from decoder.cider import CiderD
from store.errors import UserError
from store.features import FeatureStore
from store.files import safe_write
from store.manifest import Record


@dataclass
class Neighbours:
    """The training photos: unit-length features (N, D) and each photo's reference captions."""

    features: np.ndarray
    captions: list[list[str]]

    @classmethod
    def from_store(cls, store: FeatureStore, records: list[Record]) -> Neighbours:
        """The train split's photos that have features: their centre crops and their captions."""
        rows = [i for i, r in enumerate(records) if r.split == "train" and store.done[i]]
        if not rows:
            raise UserError(f"{store.path} has no train photos with features to re-rank against")
        features = store.read(np.asarray(rows))[:, 0]
        return cls.from_features(features, [records[i].captions for i in rows])

    @classmethod
    def from_features(cls, features: np.ndarray, captions: list[list[str]]) -> Neighbours:
        features = np.asarray(features, dtype=np.float32)
        return cls(features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12), captions)

    def nearest(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(Q, k) indices of the k most cosine-similar training photos, nearest first."""
        q = np.asarray(queries, dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        sims = q @ self.features.T  # (Q, N)
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, 1).argsort(1)[:, ::-1]
        return np.take_along_axis(top, order, 1)

    @cached_property
    def cider(self) -> CiderD:
        """CIDEr-D with document frequencies from these training captions, counted once: a loaded
        captioner re-ranks on every call."""
        return CiderD(self.captions)

    def save(self, path: Path) -> None:
        flat = [c for caps in self.captions for c in caps]
        with safe_write(Path(path)) as f:
            np.savez_compressed(
                f,
                features=self.features.astype(np.float16),
                captions=np.asarray(flat, dtype=str),
                counts=np.asarray([len(c) for c in self.captions], dtype=np.int64),
            )

    @classmethod
    def load(cls, path: Path) -> Neighbours:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no {path} to re-rank with")
        with np.load(path, allow_pickle=False) as z:
            flat, counts = z["captions"].tolist(), z["counts"]
            features = z["features"].astype(np.float32)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return cls(features, [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def retrieve(neighbours: Neighbours, queries: np.ndarray, k: int, cider: CiderD | None = None) -> list[str]:
    """For each query photo, the neighbour caption with the highest mean CIDEr-D against the captions
    of the *other* k-1 neighbours (a photo's own captions would vote for themselves)."""
    cider = cider or neighbours.cider
    out = []
    for near in neighbours.nearest(queries, k):
        captions = [c for m in near for c in neighbours.captions[m]]
        owner = np.repeat(np.arange(len(near)), [len(neighbours.captions[m]) for m in near])  # (C,)
        sim = cider.similarity(captions, cider.references(captions))  # (C, C)
        others = owner[:, None] != owner[None, :]  # (C, C): pairs from different photos
        if not others.any():  # a single neighbour: its captions vote among themselves
            others = ~np.eye(len(captions), dtype=bool) if len(captions) > 1 else np.ones((1, 1), bool)
        consensus = (sim * others).sum(1) / np.maximum(others.sum(1), 1)
        out.append(captions[int(consensus.argmax())])
    return out


def rerank(
    candidates: list[list[str]],
    neighbours: Neighbours,
    queries: np.ndarray,
    k: int,
    cider: CiderD | None = None,
) -> list[int]:
    """For each query photo, the index of its candidate with the highest CIDEr-D against the
    captions of its k nearest training photos (the first candidate wins ties). An empty caption
    is never picked over a non-empty one: it scores 0, which every candidate scores when the
    neighbours' words are all common ones (zero document-frequency weight)."""
    cider = cider or neighbours.cider
    picks = []
    for cands, near in zip(candidates, neighbours.nearest(queries, k), strict=True):
        refs = cider.references([c for m in near for c in neighbours.captions[m]])
        scores = np.asarray(cider.score(cands, refs), dtype=np.float64)
        empty = np.array([not c.strip() for c in cands])
        if not empty.all():
            scores[empty] = -np.inf
        picks.append(int(np.argmax(scores)))
    return picks

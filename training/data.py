"""Batches of (image feature, caption) pairs drawn from the feature store, reproducibly.

Every epoch each pair takes one of the K stored crops at random, which keeps the original
project's random-crop augmentation without running the CNN again. The order of an epoch is a pure
function of (seed, epoch), so resuming needs only the epoch and the batch index inside it.

The order is *chunk-local*: the store's row chunks are shuffled, grouped into windows, and pairs
are shuffled within a window. For a dataset that fits in one window this is a plain shuffle; for
a large one it lets the streaming source read each chunk from disk about once per epoch. Both
sources see the same order, so they yield identical batches.

Grouped by photo (`by_photo`, the attention decoder's default from 20,000 training captions), the
photos of a window are shuffled and each photo's captions follow one another, so a batch of 64
captions holds about 13 photos and their maps are read and projected once each (`Regions`)
instead of once per caption.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from decoder.attention import Regions
from store.distributed import SINGLE, Dist, shard
from store.features import FeatureStore
from store.manifest import Record
from store.seeds import derive_seed
from store.text import Vocabulary

WINDOW_CHUNKS = 64


@dataclass
class Pairs:
    """Every (image, caption) pair of one split; captions as ids with <start> and <end>."""

    rows: np.ndarray  # (P,) store row of each pair
    captions: list[list[int]]

    def __len__(self) -> int:
        return len(self.rows)


def build_pairs(records: list[Record], vocab: Vocabulary, split: str, usable: np.ndarray) -> Pairs:
    """Pairs of `split` whose image was featurized (`usable[row]`); row i is manifest record i."""
    rows, captions = [], []
    for row, record in enumerate(records):
        if record.split != split or not usable[row]:
            continue
        for caption in record.captions:
            rows.append(row)
            captions.append([vocab.start_id, *vocab.encode(caption.split()), vocab.end_id])
    return Pairs(np.asarray(rows, dtype=np.int64), captions)


def pad_captions(captions: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """(B, T) LongTensor, right-padded to the longest caption of the batch."""
    out = torch.full((len(captions), max(len(c) for c in captions)), pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.as_tensor(c)
    return out


def epoch_order(
    pairs: Pairs, epoch: int, seed: int, num_crops: int, chunk_rows: int, by_photo: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(order, crops): a permutation of pair indices and the crop each pair uses this epoch; `by_photo`
    keeps each photo's pairs together (in their stored order), the photos shuffled."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    chunk_of_pair = pairs.rows // chunk_rows
    chunks = np.unique(chunk_of_pair)
    chunks = chunks[torch.randperm(len(chunks), generator=g).numpy()]
    order = []
    for w in range(0, len(chunks), WINDOW_CHUNKS):
        in_window = np.flatnonzero(np.isin(chunk_of_pair, chunks[w : w + WINDOW_CHUNKS]))
        if by_photo:
            photos, photo_of_pair = np.unique(pairs.rows[in_window], return_inverse=True)
            place = np.empty(len(photos), np.int64)
            place[torch.randperm(len(photos), generator=g).numpy()] = np.arange(len(photos))
            order.append(in_window[np.argsort(place[photo_of_pair], kind="stable")])
        else:
            order.append(in_window[torch.randperm(len(in_window), generator=g).numpy()])
    crops = torch.randint(num_crops, (len(pairs),), generator=g).numpy()
    return np.concatenate(order) if order else np.zeros(0, np.int64), crops


class InMemoryFeatures:
    """The whole (N, K, D) float16 array in RAM: the fast path for datasets that fit."""

    def __init__(self, store: FeatureStore):
        self.array = store.read(slice(None))

    def get(self, rows: np.ndarray, crops: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.array[rows, crops].astype(np.float32))  # (B, D)


class StreamingFeatures:
    """Reads chunks of rows from the store on demand, keeping the most recent ones cached."""

    def __init__(self, store: FeatureStore, cache_chunks: int = 2 * WINDOW_CHUNKS):
        self.store, self.chunk_rows, self.cache_chunks = store, store.chunk_rows, cache_chunks
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _chunk(self, c: int) -> np.ndarray:
        if c in self.cache:
            self.cache.move_to_end(c)
        else:
            stop = min((c + 1) * self.chunk_rows, self.store.num_rows)
            self.cache[c] = self.store.read(slice(c * self.chunk_rows, stop))
            if len(self.cache) > self.cache_chunks:
                self.cache.popitem(last=False)
        return self.cache[c]

    def get(self, rows: np.ndarray, crops: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), self.store.dim), np.float32)
        for i, (row, crop) in enumerate(zip(rows, crops, strict=True)):
            out[i] = self._chunk(int(row) // self.chunk_rows)[int(row) % self.chunk_rows, crop]
        return torch.from_numpy(out)  # (B, D)


class InMemoryMaps:
    """Every row's feature maps (N, Km, R, D) float16 in RAM, for the attention decoder."""

    def __init__(self, store: FeatureStore):
        self.array, self.maps_crops = store.read_maps(slice(None)), store.maps_crops

    def get(self, rows: np.ndarray, crops: np.ndarray) -> torch.Tensor:
        crops = np.where(crops < self.maps_crops, crops, 0)  # a centre-only store: always the centre
        return torch.from_numpy(self.array[rows, crops].astype(np.float32))  # (B, R, D)

    def grouped(self, rows: np.ndarray, crops: np.ndarray) -> Regions:
        return grouped_maps(self, rows, crops)


class StreamingMaps:
    """Reads each pair's map from the store (one HDF5 chunk per row): maps too large for RAM."""

    def __init__(self, store: FeatureStore):
        self.store, self.maps_crops = store, store.maps_crops

    def get(self, rows: np.ndarray, crops: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.store.read_maps(rows, crops).astype(np.float32))  # (B, R, D)

    def grouped(self, rows: np.ndarray, crops: np.ndarray) -> Regions:
        return grouped_maps(self, rows, crops)


def grouped_maps(source: InMemoryMaps | StreamingMaps, rows: np.ndarray, crops: np.ndarray) -> Regions:
    """The batch's distinct maps, each read once, and the one each pair uses."""
    crops = np.where(crops < source.maps_crops, crops, 0)  # a centre-only store: always the centre
    keys, photo = np.unique(rows * source.maps_crops + crops, return_inverse=True)
    return Regions(source.get(keys // source.maps_crops, keys % source.maps_crops), torch.from_numpy(photo.ravel()))


def fits_in_memory(store: FeatureStore, fraction: float = 0.5, maps: bool = False) -> bool:
    """Whether the store's features (or maps) take less than `fraction` of the memory available now."""
    need = store.num_rows * (store.maps_crops * store.regions if maps else store.num_crops) * store.dim * 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return need < fraction * int(line.split()[1]) * 1024
    except OSError:
        pass
    return need < 2 * 1024**3


def feature_source(store: FeatureStore, stream: bool, maps: bool = False):
    """Where batches read features from: pooled vectors (B, D), or with `maps` regions (B, R, D);
    from RAM when they fit in half the available memory, else from disk."""
    if maps:
        return StreamingMaps(store) if stream or not fits_in_memory(store, maps=True) else InMemoryMaps(store)
    return StreamingFeatures(store) if stream or not fits_in_memory(store) else InMemoryFeatures(store)


def train_batches(
    pairs: Pairs,
    source,
    order: np.ndarray,
    crops: np.ndarray,
    batch_size: int,
    start_batch: int = 0,
    ctx: Dist = SINGLE,
    grouped: bool = False,
) -> Iterator[tuple[torch.Tensor | Regions, torch.Tensor]]:
    """(features (B, D) or maps, captions (B, T)) for the batches of one epoch from `start_batch` on;
    `grouped` (a maps source): each distinct map once, as `Regions`.

    Under torchrun, this rank's share of each global batch of `batch_size`.
    """
    get = source.grouped if grouped else source.get
    for b in range(start_batch, num_batches(len(pairs), batch_size)):
        idx = shard(order[b * batch_size : (b + 1) * batch_size], ctx)
        yield get(pairs.rows[idx], crops[idx]), pad_captions([pairs.captions[i] for i in idx])


def eval_batches(
    pairs: Pairs, source, batch_size: int = 256, grouped: bool = False
) -> Iterator[tuple[torch.Tensor | Regions, torch.Tensor]]:
    """Every pair once, in order, on the centre crop (crop 0): the same numbers every epoch."""
    get = source.grouped if grouped else source.get
    for start in range(0, len(pairs), batch_size):
        idx = np.arange(start, min(start + batch_size, len(pairs)))
        yield get(pairs.rows[idx], np.zeros(len(idx), np.int64)), pad_captions([pairs.captions[i] for i in idx])


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size

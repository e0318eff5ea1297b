"""Seconds per decoder epoch on cached features vs an end-to-end epoch the original's way.

    python bench/decoder_epoch.py [WORKDIR] [--sample-batches 3] [--profile 10]

WORKDIR is a prepared and featurized dataset (default: data/work from `make features`). The
decoder epoch is timed in full, for the pooled decoder and, when the store has feature maps
(`featurize --maps`), for the attention and transformer decoders, each in a fresh process whose peak resident
memory is reported (the features or maps in RAM included); the end-to-end epoch (decode + resize + random 299 crop with
torchvision transforms, Inception v3 forward and backward, LSTM, Adam step, batch 32) is timed on a
few batches and extrapolated to the same number of batches. Both run here, in this process.
Each decoder trains with its own defaults for this many captions (training/options.py decoder_defaults:
from 20,000 training captions the attention decoder groups its batches by photo, 64 captions each).

--profile N prints where an attention step's time goes: torch.profiler over N batches, by operator.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoder.config import CaptionerConfig  # noqa: E402
from decoder.factory import build_captioner, reads_maps  # noqa: E402
from decoder.model import PooledCaptioner, caption_loss, split_output  # noqa: E402
from featurize.encoder import build_inception  # noqa: E402
from store.features import FeatureStore, find_store  # noqa: E402
from store.manifest import read_manifest  # noqa: E402
from store.text import Vocabulary  # noqa: E402
from training import data as D  # noqa: E402
from training.options import DecoderConfig, decoder_defaults, given_fields  # noqa: E402
from training.phases.decoder import FeatureData  # noqa: E402


def decoder_epoch(workdir: Path, decoder: str, profile: int = 0) -> tuple[float, int, float]:
    """(seconds, batches, peak resident MB) of one epoch of `decoder` with its defaults."""
    records = read_manifest(workdir)
    vocab = Vocabulary.load(workdir / "vocab.json")
    with FeatureStore.open(find_store(workdir)) as store:
        usable = np.asarray(store.done, dtype=bool)
        train, val = (D.build_pairs(records, vocab, split, usable) for split in ("train", "val"))
        torch.manual_seed(0)
        defaults = {k: v for k, v in decoder_defaults(decoder, len(train)).items() if k not in ("epochs", "select_by")}
        config = CaptionerConfig(
            vocab_size=len(vocab), feature_dim=store.dim, decoder=decoder, **given_fields(CaptionerConfig, defaults)
        )
        model = build_captioner(config)
        cfg = DecoderConfig(workdir=str(workdir), store=str(store.path), **given_fields(DecoderConfig, defaults))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        data = FeatureData(store, train, val, cfg, maps=reads_maps(config))
        batches = data.train_batches(0, 0)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            for _ in range(3):  # warm up
                train_step(model, opt, *next(batches))
            with profiler(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(profile):
                    train_step(model, opt, *next(batches))
            print(f"{decoder} decoder, {profile} batches of {cfg.batch_size}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            return 0.0, data.num_batches, 0.0
        started = time.perf_counter()
        for features, captions in batches:
            train_step(model, opt, features, captions)
        seconds = time.perf_counter() - started
    return seconds, data.num_batches, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step(model, opt, features, captions) -> None:
    logits, penalty = split_output(model(features, captions))
    loss = caption_loss(logits, captions) + penalty
    opt.zero_grad()
    loss.backward()
    opt.step()


def end_to_end_batches(records, train: D.Pairs, vocab: Vocabulary, n_batches: int, batch_size: int = 32) -> float:
    """Mean seconds per batch of the original's training step, images decoded in the loop."""
    transform = transforms.Compose([transforms.Resize((356, 356)), transforms.RandomCrop(299), transforms.ToTensor()])
    encoder = build_inception("none").train()  # same compute whatever the weights
    model = PooledCaptioner(CaptionerConfig(vocab_size=len(vocab)))
    opt = torch.optim.Adam([*encoder.parameters(), *model.parameters()], lr=3e-4)
    rng = np.random.default_rng(0)
    times = []
    for b in range(n_batches + 1):  # the first batch warms up and is not counted
        idx = rng.choice(len(train), size=batch_size, replace=False)
        started = time.perf_counter()
        images = torch.stack([transform(Image.open(records[train.rows[i]].path).convert("RGB")) for i in idx])
        captions = D.pad_captions([train.captions[i] for i in idx])
        loss = caption_loss(model(encoder(images), captions), captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if b:
            times.append(time.perf_counter() - started)
    return float(np.mean(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", nargs="?", type=Path, default=Path("data/work"))
    p.add_argument("--sample-batches", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, help="profile this many attention batches instead")
    a = p.parse_args()
    if a.profile:
        decoder_epoch(a.workdir, "attention", a.profile)
        return
    records = read_manifest(a.workdir)
    vocab = Vocabulary.load(a.workdir / "vocab.json")
    with FeatureStore.open(find_store(a.workdir)) as store:
        usable = np.asarray(store.done, dtype=bool)
        train = D.build_pairs(records, vocab, "train", usable)
        decoders = ["pooled", "attention", "transformer"] if store.maps_crops else ["pooled"]
    epochs = {}
    for decoder in decoders:  # a fresh process each: its peak memory is its own
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            epochs[decoder] = pool.apply(decoder_epoch, (a.workdir, decoder))
    cached, n_batches, _ = epochs["pooled"]
    per_batch = end_to_end_batches(records, train, vocab, a.sample_batches)
    e2e = per_batch * n_batches
    print(
        f"dataset: {a.workdir} ({len(train)} train captions, {n_batches} batches of 32), "
        f"torch threads {torch.get_num_threads()}"
    )
    for decoder, (seconds, _, rss) in epochs.items():
        print(f"{decoder:9s} decoder epoch on cached features: {seconds:8.2f} s, peak memory {rss:.0f} MB")
    print(
        f"end-to-end epoch, original way:   {e2e:8.1f} s  "
        f"({per_batch:.2f} s/batch x {n_batches}, from {a.sample_batches} batches)"
    )
    for decoder, (seconds, _, _) in epochs.items():
        print(f"end-to-end epoch / {decoder} epoch: {e2e / seconds:.0f}x")
    for decoder in decoders[1:]:
        print(f"{decoder} epoch / pooled epoch: {epochs[decoder][0] / cached:.1f}x")


if __name__ == "__main__":
    main()

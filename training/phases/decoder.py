"""Decoder phase: train the captioner (pooled, attention or transformer) on the cached crop features.

    python cli.py train data/work --epochs 40
    python cli.py train --resume            # continue the most recent run

A new run writes RUNDIR/config.json and checkpoints; `--resume` rebuilds everything from the
checkpoint (architecture, vocabulary, store identity) and refuses options that would change
the architecture, naming the option (training/skeleton.py).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from decoder.config import CaptionerConfig
from decoder.consensus import Neighbours
from decoder.factory import build_captioner, check_store_serves, reads_maps
from store.distributed import SINGLE, Dist
from store.errors import UserError
from store.features import FeatureStore, find_store, store_identity
from store.manifest import VOCAB_NAME, read_manifest
from store.rundir import RunDir
from store.text import Vocabulary
from training import data as D
from training.cached_features import open_training_store, val_cider_score
from training.loop import Fit, Outcome, Position, teacher_forcing
from training.options import DecoderConfig, check_decoder_reads, decoder_defaults, given_fields
from training.skeleton import Built, train_phase


class FeatureData:
    """The decoder phase's PhaseData: batches of cached features."""

    def __init__(
        self,
        store: FeatureStore,
        train: D.Pairs,
        val: D.Pairs,
        cfg: DecoderConfig,
        ctx: Dist = SINGLE,
        maps: bool = False,
    ):
        self.store, self.train, self.val, self.cfg, self.ctx, self.maps = store, train, val, cfg, ctx, maps
        self.source = D.feature_source(store, cfg.stream, maps)
        self.num_batches = D.num_batches(len(train), cfg.batch_size)

    def train_batches(self, epoch: int, start_batch: int):
        grouped = self.maps and self.cfg.group_by_photo
        order, crops = D.epoch_order(
            self.train, epoch, self.cfg.seed, self.store.num_crops, self.store.chunk_rows, by_photo=grouped
        )
        return D.train_batches(
            self.train, self.source, order, crops, self.cfg.batch_size, start_batch, self.ctx, grouped=grouped
        )

    def val_batches(self):
        return D.eval_batches(self.val, self.source, grouped=self.maps)  # no dropout: the same numbers, faster


class DecoderPhase:
    name = "decoder"
    options_type = DecoderConfig
    follows_a_run = False

    def fresh_options(self, run: RunDir, workdir: Path | None, options: dict):
        if run.checkpoints.exists():
            raise UserError(f"{run} already has checkpoints: add --resume, or choose a new --run")
        workdir = Path(workdir or "data/work")
        given = given_fields(DecoderConfig, options)
        store_path = find_store(workdir, given.get("weights"))
        model = given_fields(CaptionerConfig, options)
        decoder = model.setdefault("decoder", default_decoder(store_path))
        check_decoder_reads(decoder, options)
        captions = sum(len(r.captions) for r in read_manifest(workdir) if r.split == "train")
        defaults = decoder_defaults(decoder, captions)
        self.model_options = {**given_fields(CaptionerConfig, defaults), **model}
        training = {**given_fields(DecoderConfig, defaults), **given}
        return DecoderConfig(workdir=str(workdir), store=str(store_path), **training), None

    def build(self, ctx: Dist, run: RunDir, cfg: DecoderConfig, state: dict | None, stack: ExitStack) -> Built:
        store, records, usable = open_training_store(stack, cfg.workdir, cfg.store, state["store"] if state else None)
        if state is not None:
            vocab, model_cfg = Vocabulary(state["vocab"]), CaptionerConfig(**state["config"]["model"])
        else:
            vocab = Vocabulary.load(Path(cfg.workdir) / VOCAB_NAME)
            model_cfg = CaptionerConfig(vocab_size=len(vocab), feature_dim=store.dim, **self.model_options)
        train_pairs = D.build_pairs(records, vocab, "train", usable)
        val_pairs = D.build_pairs(records, vocab, "val", usable)
        if not len(train_pairs) or not len(val_pairs):
            raise UserError(
                f"{cfg.workdir} has {len(train_pairs)} train and {len(val_pairs)} validation captions "
                "with features; need both"
            )

        check_store_serves(store, model_cfg, f"run {run}", state["store"] if state else None)
        maps = reads_maps(model_cfg)
        model = build_captioner(model_cfg)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        if state is not None:
            model.load_state_dict(state["model"])
        elif ctx.is_main:  # what re-ranking needs, kept with the run so that new photos need no dataset
            Neighbours.from_store(store, records).save(run.neighbours)
        identity = store_identity(store)
        config = {"model": model_cfg.to_dict(), "decoder": asdict(cfg)}
        fit = Fit(
            phase=self.name,
            run_dir=run.path,
            net=model,
            optimizer=optimizer,
            data=FeatureData(store, train_pairs, val_pairs, cfg, ctx, maps),
            epochs=cfg.epochs,
            grad_clip=cfg.grad_clip,
            objective=functools.partial(teacher_forcing, label_smoothing=cfg.label_smoothing)
            if cfg.label_smoothing
            else None,
            lr_at=functools.partial(warmed_up, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else None,
            checkpoint_fields=lambda: {
                "model": model.state_dict(),
                "config": config,
                "vocab": vocab.itos,
                "store": identity,
            },
            select_score=val_cider_score(model, vocab, store, records, usable) if cfg.select_by == "cider" else None,
            dist=ctx,
            train_net=DistributedDataParallel(model) if ctx.active else None,
        )
        banner = (
            f"run {run}: {len(train_pairs)} train / {len(val_pairs)} val captions, vocabulary {len(vocab)}, "
            f"{model_cfg.decoder} decoder{f' over {store.regions} regions' if maps else ''}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, batches of {cfg.batch_size} captions"
            f"{' grouped by photo' if maps and cfg.group_by_photo else ''}, lr {cfg.lr:g}"
            f"{f' after {cfg.warmup_steps} warm-up steps' if cfg.warmup_steps else ''}"
            f"{f', label smoothing {cfg.label_smoothing:g}' if cfg.label_smoothing else ''}"
        )
        if not maps and store.num_crops == 1:  # said first: the banner's line ends with the CPU threads
            banner = (
                f"note: {store.path.name} has one crop per photo, so the pooled decoder trains without crop "
                f"augmentation (featurize --crops 5 --overwrite gives it 5)\n{banner}"
            )
        return Built(fit, config, Position(), banner)


def warmed_up(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of the optimizer step after `step` steps: rising linearly over the first
    `warmup_steps`, then `lr`. A pure function of the global step, so a resumed run needs nothing new."""
    return lr * min(1.0, (step + 1) / warmup_steps)


def default_decoder(store_path: Path) -> str:
    """The attention decoder where the store has feature maps to attend over, else the pooled one."""
    with FeatureStore.open(store_path) as store:
        return "attention" if store.maps_crops else "pooled"


def train_decoder(*args, **kwargs) -> Outcome:
    """Train (or resume) the decoder phase: training.skeleton.train_phase's arguments, this phase."""
    return train_phase(DecoderPhase(), *args, **kwargs)

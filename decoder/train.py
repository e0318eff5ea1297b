"""Decoder phase: train the LSTM captioner on the cached crop features.

    python cli.py train data/work --epochs 40
    python cli.py train --resume            # continue the most recent run

A new run writes RUNDIR/config.json and checkpoints; `--resume` rebuilds everything from the
checkpoint (architecture, vocabulary, store identity) and refuses options that would change
the architecture, naming the option.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from decoder import data as D
from decoder.loop import Fit, Outcome, Position, resume_from, run
from decoder.model import Captioner, CaptionerConfig
from decoder.stopping import StopRequest
from decoder.vocab import Vocabulary
from featurize.distributed import SINGLE, Dist, barrier, broadcast_object, process_group
from store.checkpoints import load_resumable
from store.errors import UserError
from store.features import FeatureStore, find_store
from store.manifest import VOCAB_NAME, manifest_sha256, read_manifest
from store.runlog import latest_run, new_run_dir, write_config


@dataclass(frozen=True)
class TrainConfig:
    """Options of a training run; fixed for its lifetime except `epochs`, which a resume may extend."""

    workdir: str
    store: str
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-4
    grad_clip: float = 5.0
    seed: int = 0
    stream: bool = False
    select_by: str = "loss"  # which validation score picks best.pt: "loss" or "cider"


MODEL_OPTIONS = {f.name for f in fields(CaptionerConfig)} - {"vocab_size", "feature_dim"}
TRAIN_OPTIONS = {f.name for f in fields(TrainConfig)} - {"workdir", "store"}
CHANGEABLE_ON_RESUME = {"epochs", "stream"}
STORE_IDENTITY = ("encoder", "weights", "weights_sha256", "num_crops", "resize", "crop_size", "seed", "manifest_sha256")


class FeatureData:
    """The decoder phase's PhaseData: batches of cached features."""

    def __init__(self, store: FeatureStore, train: D.Pairs, val: D.Pairs, cfg: TrainConfig, ctx: Dist = SINGLE):
        self.store, self.train, self.val, self.cfg, self.ctx = store, train, val, cfg, ctx
        self.source = D.feature_source(store, cfg.stream)
        self.num_batches = D.num_batches(len(train), cfg.batch_size)

    def train_batches(self, epoch: int, start_batch: int):
        order, crops = D.epoch_order(self.train, epoch, self.cfg.seed, self.store.num_crops, self.store.chunk_rows)
        return D.train_batches(self.train, self.source, order, crops, self.cfg.batch_size, start_batch, self.ctx)

    def val_batches(self):
        return D.eval_batches(self.val, self.source)


def resolve_run(run_dir: Path | None, resume: bool) -> Path:
    if run_dir is None:
        return latest_run() if resume else new_run_dir()
    run_dir = Path(run_dir)
    has_ckpt = (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "checkpoints" / "previous.pt").exists()
    if resume and not has_ckpt:
        raise UserError(f"nothing to resume in {run_dir}: it has no checkpoints/last.pt")
    return run_dir


def store_identity(store: FeatureStore) -> dict:
    """What a checkpoint records of its store: the identity it is checked against, where the CNN's
    weights file is (so `caption` can rebuild the CNN from a PATH source) and the precision the
    features were computed in (so `caption` computes new ones the same way)."""
    return {**{k: store.attrs.get(k) for k in STORE_IDENTITY}, "weights_path": store.attrs.get("weights_path", ""),
            "precision": store.attrs.get("precision", "fp32")}


def check_store_matches(store: FeatureStore, expected: dict, what: str) -> None:
    """A run trained on one store refuses another (other CNN, crops or dataset), naming the difference."""
    diffs = [f"{k}: {what} has {expected.get(k)!r}, store has {store.attrs.get(k)!r}"
             for k in STORE_IDENTITY if k in expected and str(expected.get(k)) != str(store.attrs.get(k))]
    if diffs:
        raise UserError(f"{store.path} does not match {what} ({'; '.join(diffs)})")


def check_options_unchanged(saved: dict, options: dict) -> None:
    for key, value in options.items():
        if value is None or key in CHANGEABLE_ON_RESUME or key not in saved:
            continue
        if saved[key] != value:
            raise UserError(f"cannot change --{key.replace('_', '-')} on resume: the run was trained with {saved[key]!r}, got {value!r}")


def val_cider_score(model: Captioner, vocab: Vocabulary, store: FeatureStore, records: list, usable: np.ndarray):
    """A function giving minus the validation CIDEr-D of greedy captions (lower is better, like a loss).

    Greedy decoding on the centre crop keeps it cheap enough to run every epoch, and it draws no
    random numbers, so selecting by CIDEr does not change the training trajectory.
    """
    from decoder.metrics import score_captions
    from decoder.search import greedy

    rows = [i for i, r in enumerate(records) if r.split == "val" and usable[i]]
    features = torch.from_numpy(store.read(np.asarray(rows))[:, 0].astype(np.float32))  # (n, D)
    references = {records[i].id: records[i].captions for i in rows}

    def score(_val_loss: float) -> float:
        model.eval()
        ids = greedy(model, features, vocab.start_id, vocab.end_id)
        hypotheses = {records[i].id: " ".join(vocab.decode(seq)) for i, seq in zip(rows, ids, strict=True)}
        return -score_captions(references, hypotheses, use_java=False)[0]["CIDEr-D"]

    return score


def train_decoder(
    workdir: Path | None, run_dir: Path | None, *, resume: bool, max_minutes: float | None,
    options: dict, console: Console, weights: str | None = None,
) -> Outcome:
    """Train (or resume) the decoder phase; `options` holds the explicitly given CLI options.

    Under torchrun each rank trains on its share of every global batch (see decoder/distributed.py).
    """
    with process_group() as ctx:  # left after the training's objects (DDP among them) are gone
        return _train_decoder(ctx, workdir, run_dir, resume, max_minutes, options, console, weights)


def _train_decoder(ctx: Dist, workdir, run_dir, resume, max_minutes, options, console, weights) -> Outcome:
    threads = torch.get_num_threads()
    console = console if ctx.is_main else Console(quiet=True)
    run_dir = broadcast_object(ctx, resolve_run(run_dir, resume) if ctx.is_main else None)
    state = None
    if resume:
        state, path = load_resumable(run_dir / "checkpoints")
        if state["phase"] != "decoder":
            raise UserError(f"{path} is a {state['phase']}-phase checkpoint: resume it with --phase {state['phase']}")
        check_options_unchanged({**state["config"]["model"], **state["config"]["train"]}, options)
        saved = state["config"]["train"]
        cfg = TrainConfig(**{**saved, **{k: v for k, v in options.items() if k in CHANGEABLE_ON_RESUME and v is not None}})
        model_cfg = CaptionerConfig(**state["config"]["model"])
        vocab = Vocabulary(state["vocab"])
        console.print(f"resuming {run_dir} from {path.name}: epoch {state['epoch'] + 1}, batch {state.get('batch_in_epoch', 0)}, step {state['step']}, "
                      f"CPU threads: {threads}")
    else:
        if (run_dir / "checkpoints").exists() and ctx.is_main:
            raise UserError(f"{run_dir} already has checkpoints: add --resume, or choose a new --run")
        workdir = Path(workdir or "data/work")
        store_path = find_store(workdir, weights)
        cfg = TrainConfig(workdir=str(workdir), store=str(store_path), **{k: v for k, v in options.items() if k in TRAIN_OPTIONS and v is not None})
        vocab = Vocabulary.load(workdir / VOCAB_NAME)

    with FeatureStore.open(Path(cfg.store)) as store:
        records = read_manifest(Path(cfg.workdir))
        if state is not None:
            check_store_matches(store, state["store"], "the run's checkpoint")
        elif store.attrs.get("manifest_sha256") != manifest_sha256(Path(cfg.workdir)):
            raise UserError(f"{store.path} was built from another manifest: run `python cli.py featurize {cfg.workdir} --resume --overwrite`")
        if len(records) != store.num_rows:
            raise UserError(f"{store.path} has {store.num_rows} rows but the manifest has {len(records)} images")
        if state is None:
            model_cfg = CaptionerConfig(vocab_size=len(vocab), feature_dim=store.dim, **{k: v for k, v in options.items() if k in MODEL_OPTIONS and v is not None})
        usable = np.asarray(store.done, dtype=bool)
        train_pairs = D.build_pairs(records, vocab, "train", usable)
        val_pairs = D.build_pairs(records, vocab, "val", usable)
        if not len(train_pairs) or not len(val_pairs):
            raise UserError(f"{cfg.workdir} has {len(train_pairs)} train and {len(val_pairs)} validation captions with features; need both")

        torch.manual_seed(cfg.seed)
        model = Captioner(model_cfg)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        identity = store_identity(store)
        config = {"model": model_cfg.to_dict(), "train": asdict(cfg)}
        if state is not None:
            model.load_state_dict(state["model"])
            pos = resume_from(state, optimizer, run_dir, ctx, console)
        else:
            pos = Position()
            if ctx.active:  # the same initial weights on every rank, but each its own dropout draws
                torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank)
            if ctx.is_main:
                write_config(run_dir, {**config, "phase": "decoder"})
            console.print(
                f"run {run_dir}: {len(train_pairs)} train / {len(val_pairs)} val captions, vocabulary {len(vocab)}, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters, CPU threads: {threads}"
            )

        select = val_cider_score(model, vocab, store, records, usable) if cfg.select_by == "cider" else None
        fit = Fit(
            phase="decoder", run_dir=run_dir, net=model, optimizer=optimizer,
            data=FeatureData(store, train_pairs, val_pairs, cfg, ctx), epochs=cfg.epochs, grad_clip=cfg.grad_clip,
            checkpoint_fields=lambda: {"model": model.state_dict(), "config": config, "vocab": vocab.itos, "store": identity},
            select_score=select, dist=ctx, train_net=DistributedDataParallel(model) if ctx.active else None,
        )
        barrier(ctx)
        with StopRequest(max_minutes) as stop:
            outcome = run(fit, pos, stop, console)
    outcome.run_dir = run_dir
    return outcome

"""Joint phase: fine-tune the CNN and the LSTM end to end on images, in resumable sessions.

    python cli.py train data/work --run runs/<run> --phase joint --max-minutes 60
    python cli.py train --run runs/<run> --phase joint --resume

It starts from the run's decoder-phase best.pt (or --init CHECKPOINT) and a CNN built from the
weights the feature store was made with, so the first joint step sees exactly the features the
decoder was trained on. Every sample draws a random 299 crop of the 356 resize, as the original
did, from a generator seeded by (seed, epoch, sample): the crop does not depend on which worker
decodes it, so an interrupted and resumed session equals an uninterrupted one.

Batch-norm statistics stay frozen (the layers are kept in eval mode): a CPU batch of 32 captions
holds few distinct images, and re-estimating the statistics from such batches would shift every
feature away from what the pretrained layers after them expect.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from decoder.config import CaptionerConfig
from decoder.factory import build_captioner, reads_maps
from featurize.crops import CropPolicy, to_float
from featurize.encoder import checkpoint_encoder, regions
from featurize.pipeline import bf16_is_fast
from store.distributed import Dist, shard
from store.errors import UserError
from store.features import FeatureStore, check_store_matches, store_identity
from store.images import open_image
from store.manifest import Record, read_manifest
from store.rundir import RunDir
from store.seeds import derive_seed
from store.text import Vocabulary
from training import data as D
from training.loop import Fit, Outcome, Position
from training.options import JointConfig
from training.skeleton import Built, start_from_checkpoint, train_phase


class JointNet(nn.Module):
    """CNN + captioner. Inputs are uint8 crops (B, 3, S, S), or already-encoded features: (B, D), or
    for the attention decoder the CNN's map as regions (B, R, D)."""

    def __init__(self, encoder: nn.Module, captioner: nn.Module, unfreeze: str, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.encoder, self.captioner, self.autocast_dtype = encoder, captioner, autocast_dtype
        self.maps = reads_maps(captioner.config)
        names = [name for name, _ in encoder.named_children()]
        if unfreeze not in names:
            raise UserError(f"--unfreeze {unfreeze}: not a block of the CNN (one of {', '.join(names)})")
        for name, module in encoder.named_children():
            if name == unfreeze:
                break
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> JointNet:
        super().train(mode)
        for m in self.encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # frozen statistics: see the module docstring
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S) in [0, 1]
        with torch.autocast(
            x.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
        ):
            if self.maps:
                return regions(self.encoder.feature_maps(x)).float()  # (B, R, D)
            return self.encoder(x).float()  # (B, D)

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor):
        features = self.encode(inputs) if inputs.dtype == torch.uint8 else inputs
        return self.captioner(features, captions)


class _TrainImages(Dataset):
    """(uint8 random crop, caption ids) of pair i in epoch e, the crop seeded by (seed, e, i)."""

    def __init__(self, records: list[Record], pairs: D.Pairs, policy: CropPolicy, seed: int):
        self.records, self.pairs, self.policy, self.seed = records, pairs, policy, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, i))
        img = open_image(Path(self.records[self.pairs.rows[i]].path))
        return self.policy.random_crop(img, g), self.pairs.captions[i]


class _EpochBatches(Sampler):
    """The batches of one epoch from `start` on; the order is a function of (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int, ctx: Dist):
        g = torch.Generator().manual_seed(derive_seed(seed, epoch))
        self.order = torch.randperm(n, generator=g).tolist()
        self.batch_size, self.epoch, self.start, self.ctx = batch_size, epoch, start, ctx

    def __iter__(self):
        for b in range(self.start, D.num_batches(len(self.order), self.batch_size)):
            yield [
                (self.epoch, i) for i in shard(self.order[b * self.batch_size : (b + 1) * self.batch_size], self.ctx)
            ]

    def __len__(self) -> int:
        return D.num_batches(len(self.order), self.batch_size) - self.start


def _collate(items):
    return torch.stack([crop for crop, _ in items]), D.pad_captions([c for _, c in items])


class ImageData:
    """The joint phase's PhaseData: decoded, randomly cropped images from DataLoader workers."""

    def __init__(
        self,
        net: JointNet,
        records,
        train: D.Pairs,
        val: D.Pairs,
        policy: CropPolicy,
        cfg: JointConfig,
        device,
        ctx: Dist,
    ):
        self.net, self.records, self.val, self.policy, self.cfg, self.device, self.ctx = (
            net,
            records,
            val,
            policy,
            cfg,
            device,
            ctx,
        )
        self.dataset = _TrainImages(records, train, policy, cfg.seed)
        self.num_batches = D.num_batches(len(train), cfg.batch_size)

    def train_batches(self, epoch: int, start_batch: int):
        sampler = _EpochBatches(len(self.dataset), self.cfg.batch_size, self.cfg.seed, epoch, start_batch, self.ctx)
        # its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # drives dropout, and one more draw per resumed session would change the run
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.workers,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        for images, captions in loader:
            yield images.to(self.device), captions.to(self.device)

    @torch.no_grad()
    def val_batches(self):
        """Each validation image encoded once (centre crop), then every caption scored on it."""
        rows = sorted(set(self.val.rows.tolist()))
        features = {}
        self.net.eval()
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start : start + self.cfg.batch_size]
            crops = torch.stack([self.policy.center(open_image(Path(self.records[r].path))) for r in chunk])
            for r, f in zip(chunk, self.net.encode(crops.to(self.device)), strict=True):
                features[r] = f
        for batch in D.eval_batches(self.val, _RowFeatures(features)):
            yield batch[0].to(self.device), batch[1].to(self.device)


class _RowFeatures:
    def __init__(self, features: dict[int, torch.Tensor]):
        self.features = features

    def get(self, rows, crops) -> torch.Tensor:
        return torch.stack([self.features[int(r)].cpu() for r in rows])


def pick_device(ctx: Dist) -> torch.device:
    """CUDA when present (this rank's GPU under torchrun), else the CPU."""
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or with `auto` where the hardware runs it faster than fp32
    (CUDA with bf16; CPUs with AMX, see featurize.pipeline.bf16_is_fast)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if bf16_is_fast() else None


class JointPhase:
    name = "joint"
    options_type = JointConfig
    follows_a_run = True

    def fresh_options(self, run: RunDir, workdir: Path | None, options: dict):
        return start_from_checkpoint(self, run, workdir, options)

    def build(self, ctx: Dist, run: RunDir, cfg: JointConfig, state: dict, stack: ExitStack) -> Built:
        device = pick_device(ctx)
        records = read_manifest(Path(cfg.workdir))
        with FeatureStore.open(Path(cfg.store)) as store:
            check_store_matches(store, state["store"], "the checkpoint")
            if store.attrs.get("view") == "full":
                raise UserError(
                    f"{cfg.store} has --view full features; the joint phase trains on crops: "
                    "start it from a run on a --view crops store"
                )
            usable = np.asarray(store.done, dtype=bool)
            identity = store_identity(store)
        vocab = Vocabulary(state["vocab"])
        model_cfg = CaptionerConfig(**state["config"]["model"])
        train_pairs = D.build_pairs(records, vocab, "train", usable)
        val_pairs = D.build_pairs(records, vocab, "val", usable)

        captioner = build_captioner(model_cfg)
        captioner.load_state_dict(state["model"])
        encoder = checkpoint_encoder(
            {"store": state["store"], **({"encoder": state["encoder"]} if "encoder" in state else {})}
        )
        net = JointNet(encoder, captioner, cfg.unfreeze, autocast_dtype(cfg.precision, device)).to(device)
        optimizer = torch.optim.Adam(
            [
                {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": cfg.cnn_lr},
                {"params": captioner.parameters(), "lr": cfg.lr},
            ]
        )
        config = {"model": model_cfg.to_dict(), "decoder": state["config"]["decoder"], "joint": asdict(cfg)}
        # a fresh joint phase continues the run's step count and must beat the decoder phase's best
        # (a decoder best picked by CIDEr is on another scale: then the first joint epoch sets the bar)
        by_loss = state["config"]["decoder"].get("select_by", "loss") == "loss"
        start = Position(step=state["step"], best=state.get("best_score", float("inf")) if by_loss else float("inf"))
        policy = CropPolicy.from_attrs(identity)
        fit = Fit(
            phase=self.name,
            run_dir=run.path,
            net=net,
            optimizer=optimizer,
            data=ImageData(net, records, train_pairs, val_pairs, policy, cfg, device, ctx),
            epochs=cfg.epochs,
            dist=ctx,
            train_net=DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
            if ctx.active
            else None,
            grad_clip=cfg.grad_clip,
            checkpoint_minutes=cfg.checkpoint_minutes,
            checkpoint_fields=lambda: {
                "model": captioner.state_dict(),
                "encoder": encoder.state_dict(),
                "config": config,
                "vocab": vocab.itos,
                "store": identity,
            },
        )
        return Built(fit, config, start, f"joint phase of {run} from {cfg.init} (decoder epoch {state['epoch']})")


def train_joint(*args, **kwargs) -> Outcome:
    """Train (or resume) the joint phase: training.skeleton.train_phase's arguments, this phase."""
    return train_phase(JointPhase(), *args, **kwargs)

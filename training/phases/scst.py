"""Self-critical sequence training (Rennie et al. 2017) on the cached features: the decoder learns
from its own sampled captions, rewarded by their CIDEr-D against the photo's references.

    python cli.py train --run runs/<run> --phase scst --epochs 10
    python cli.py train --run runs/<run> --phase scst --resume

Teacher forcing trains the decoder to predict the next human word; at test time it feeds on its own
words and is scored by CIDEr-D. Self-critical training closes that gap: for every photo of a batch
it samples `samples` captions (5 by default), rewards each with its CIDEr-D against the photo's
references (document frequencies from the train split's captions, decoder/cider.py), and raises the
probability of the samples that beat the mean reward of the *other* samples of the same photo
(the baseline), lowering the others. No value network, no greedy pass: the photo's other samples
are the baseline (Luo 2020, "A better variant of self-critical sequence training").

It starts from the run's decoder-phase best.pt (or --init) and keeps best.pt by validation CIDEr-D
(greedy, centre crop), starting from the initial model's own score, so best.pt only moves when
self-critical training improves on the decoder it started from. Sampling draws from torch's global
generator, which every checkpoint saves: a resumed session samples what the uninterrupted one did.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from decoder.cider import CiderD, References
from decoder.config import CaptionerConfig
from decoder.factory import build_captioner, check_store_serves, reads_maps
from decoder.search import allowed
from store.distributed import Dist, shard
from store.errors import UserError
from store.features import store_identity
from store.rundir import RunDir
from store.text import Vocabulary
from training import data as D
from training.cached_features import open_training_store, val_cider_score
from training.loop import Fit, Outcome, Position
from training.options import ScstConfig
from training.skeleton import Built, start_from_checkpoint, train_phase


class SampleNet(nn.Module):
    """Samples `samples` captions per photo; forward so that DistributedDataParallel sees the step.

    Returns tokens (B*S, T), the log-probability of each sampled token (B*S, T) and a mask of the
    tokens that count (up to and including each caption's <end>)."""

    def __init__(self, captioner: nn.Module, start_id: int, end_id: int):
        super().__init__()
        self.captioner, self.start_id, self.end_id = captioner, start_id, end_id

    def forward(self, features: torch.Tensor, samples: int, max_len: int):
        state = tuple(s.repeat_interleave(samples, dim=1) for s in self.captioner.init_state(features))
        tokens = torch.full((features.size(0) * samples,), self.start_id, dtype=torch.long)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        out_tokens, out_logprobs, out_mask = [], [], []
        for t in range(max_len):
            logprobs, state = self.captioner.step(tokens, state)  # (B*S, V)
            # search's rules (no <unk>, no empty caption), renormalised: the policy samples are drawn from
            logprobs = allowed(logprobs, t, self.end_id).log_softmax(-1)
            tokens = torch.multinomial(logprobs.detach().exp(), 1).squeeze(1)  # (B*S,)
            out_tokens.append(tokens)
            out_logprobs.append(logprobs.gather(1, tokens[:, None]).squeeze(1))
            out_mask.append(~finished)
            finished = finished | (tokens == self.end_id)
            if finished.all():
                break
        return torch.stack(out_tokens, 1), torch.stack(out_logprobs, 1), torch.stack(out_mask, 1).float()


class SelfCritical:
    """The objective: (loss, tokens it averages over, mean reward) of a batch (features, rows)."""

    def __init__(self, cider: CiderD, refs: dict[int, References], vocab: Vocabulary, samples: int, max_len: int):
        self.cider, self.refs, self.vocab, self.samples, self.max_len = cider, refs, vocab, samples, max_len

    def rewards(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, S) CIDEr-D of each sample against its photo's references."""
        words = [" ".join(self.vocab.decode(seq)) for seq in tokens.tolist()]
        s = self.samples
        return torch.tensor(
            np.stack([self.cider.score(words[i * s : (i + 1) * s], self.refs[int(row)]) for i, row in enumerate(rows)]),
            dtype=torch.float32,
        )

    def __call__(self, net: nn.Module, batch) -> tuple[torch.Tensor, float, float]:
        features, rows = batch
        tokens, logprobs, mask = net(features, self.samples, self.max_len)
        reward = self.rewards(tokens, rows)  # (B, S)
        baseline = (reward.sum(1, keepdim=True) - reward) / (self.samples - 1)  # mean of the others
        advantage = (reward - baseline).reshape(-1, 1)  # (B*S, 1)
        units = mask.sum()
        loss = -(advantage * logprobs * mask).sum() / units
        return loss, float(units), float(reward.mean())


class ScstData:
    """The photos of the train split in an order fixed by (seed, epoch), one stored crop each; the
    validation batches are the decoder phase's (teacher-forced loss on the centre crop)."""

    def __init__(self, store, rows: np.ndarray, val: D.Pairs, cfg: ScstConfig, ctx: Dist, maps: bool):
        self.store, self.cfg, self.ctx, self.val = store, cfg, ctx, val
        self.images = D.Pairs(rows, [[] for _ in rows])
        self.source = D.feature_source(store, cfg.stream, maps)
        self.num_batches = D.num_batches(len(rows), cfg.batch_size)

    def train_batches(self, epoch: int, start_batch: int):
        order, crops = D.epoch_order(self.images, epoch, self.cfg.seed, self.store.num_crops, self.store.chunk_rows)
        for b in range(start_batch, self.num_batches):
            idx = shard(order[b * self.cfg.batch_size : (b + 1) * self.cfg.batch_size], self.ctx)
            yield self.source.get(self.images.rows[idx], crops[idx]), torch.as_tensor(self.images.rows[idx])

    def val_batches(self):
        return D.eval_batches(self.val, self.source)


class ScstPhase:
    name = "scst"
    options_type = ScstConfig
    follows_a_run = True

    def fresh_options(self, run: RunDir, workdir: Path | None, options: dict):
        cfg, state = start_from_checkpoint(self, run, workdir, options)
        if "encoder" in state:
            raise UserError(
                f"{cfg.init} is a joint-phase checkpoint with a fine-tuned CNN; self-critical training runs on "
                "the cached features of the original CNN: start it from a decoder-phase checkpoint (--init)"
            )
        if cfg.samples < 2:
            raise UserError("--samples must be at least 2: each sample's baseline is the others' mean reward")
        return cfg, state

    def build(self, ctx: Dist, run: RunDir, cfg: ScstConfig, state: dict, stack: ExitStack) -> Built:
        store, records, usable = open_training_store(stack, cfg.workdir, cfg.store, state["store"])
        vocab, model_cfg = Vocabulary(state["vocab"]), CaptionerConfig(**state["config"]["model"])
        rows = np.asarray([i for i, r in enumerate(records) if r.split == "train" and usable[i]], dtype=np.int64)
        val_pairs = D.build_pairs(records, vocab, "val", usable)
        if not len(rows) or not len(val_pairs):
            raise UserError(
                f"{cfg.workdir} has {len(rows)} train photos and {len(val_pairs)} validation captions; need both"
            )
        cider = CiderD(records[i].captions for i in rows)
        refs = {int(i): cider.references(records[i].captions) for i in rows}

        check_store_serves(store, model_cfg, f"checkpoint {cfg.init}", state["store"])
        model = build_captioner(model_cfg)
        model.load_state_dict(state["model"])
        net = SampleNet(model, vocab.start_id, vocab.end_id)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        identity = store_identity(store)
        config = {"model": model_cfg.to_dict(), "decoder": state["config"]["decoder"], "scst": asdict(cfg)}
        select = val_cider_score(model, vocab, store, records, usable)
        start = Position(step=state["step"], best=select(0.0) if state["phase"] != "scst" else float("inf"))
        fit = Fit(
            phase=self.name,
            run_dir=run.path,
            net=model,
            optimizer=optimizer,
            data=ScstData(store, rows, val_pairs, cfg, ctx, reads_maps(model_cfg)),
            epochs=cfg.epochs,
            grad_clip=cfg.grad_clip,
            checkpoint_fields=lambda: {
                "model": model.state_dict(),
                "config": config,
                "vocab": vocab.itos,
                "store": identity,
            },
            select_score=select,
            dist=ctx,
            objective=SelfCritical(cider, refs, vocab, cfg.samples, cfg.max_len),
            train_net=DistributedDataParallel(net) if ctx.active else net,
            logged_as="reward",
        )
        banner = (
            f"self-critical phase of {run} from {cfg.init} ({state['phase']} epoch {state['epoch']}, "
            f"val CIDEr-D {-start.best:.3f}): {len(rows)} train photos x {cfg.samples} samples"
        )
        return Built(fit, config, start, banner)


def train_scst(*args, **kwargs) -> Outcome:
    """Train (or resume) the self-critical phase: training.skeleton.train_phase's arguments, this phase."""
    return train_phase(ScstPhase(), *args, **kwargs)

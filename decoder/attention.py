"""The Show-Attend-and-Tell captioner: at every word the LSTM looks again at the photo's regions.

The pooled captioner (decoder/model.py) sees one average of the whole crop, so it cannot tell what
is where. This one reads the CNN's last feature map, R regions of D (8x8 = 64 for a 299 crop,
9x9 = 81 for a whole 356 view; any R works), and before each word computes soft attention over
them (Xu et al. 2015):

- the regions are projected once per photo to the hidden size ("values") and to the attention
  size ("keys"), so a step costs R dot products, not R projections of 2048-d vectors. In training a
  batch can pass each photo's map once with the photo of every caption (`Regions`): the projection,
  R x 2048 x H multiply-adds, is then paid once per photo rather than once per caption;
- teacher forcing sorts the batch by length and steps only the captions not yet ended, so padding
  costs nothing (the same numbers as stepping the padding too: no loss term reads it);
- the initial (h, c) come from the mean of the projected regions, the pooled feature's analogue;
- a gating scalar beta = sigmoid(W h) scales the attended context, letting the LSTM lean on its
  language model for words such as "a" and "of";
- training adds the doubly stochastic penalty lambda * mean_r (1 - sum_t alpha_tr)^2, which pushes
  every region to be looked at about once over the caption instead of one region always.

It has the pooled captioner's `init_state` / `step` interface, so greedy and beam search,
ensembles and self-critical training use it unchanged. Its state is (h, c, values, keys), every
tensor with the batch in dim 1 as search and ensembles expect.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from decoder.config import CaptionerConfig
from store.errors import UserError

SHRINK = 0.75  # teacher forcing drops the ended captions once they are a quarter of those it steps


class Regions(NamedTuple):
    """A training batch's feature maps with each photo's map once: maps (U, R, D), and for each of
    the B captions the index of its photo in `maps` (B,)."""

    maps: torch.Tensor
    photo: torch.Tensor


AttentionState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (1,B,H) (1,B,H) (1,B,R,H) (1,B,R,A)


class AttentionCaptioner(nn.Module):
    def __init__(self, config: CaptionerConfig):
        super().__init__()
        if config.num_layers != 1:
            raise UserError("the attention decoder has one LSTM layer: drop --num-layers")
        self.config = c = config
        self.values = nn.Sequential(nn.Linear(c.feature_dim, c.hidden_size), nn.ReLU(), nn.Dropout(c.dropout))
        self.keys = nn.Linear(c.hidden_size, c.attention_size)
        self.query = nn.Linear(c.hidden_size, c.attention_size)
        self.score = nn.Linear(c.attention_size, 1)
        self.gate = nn.Linear(c.hidden_size, 1)
        self.init_h = nn.Linear(c.hidden_size, c.hidden_size)
        self.init_c = nn.Linear(c.hidden_size, c.hidden_size)
        self.embed = nn.Embedding(c.vocab_size, c.embed_size, padding_idx=0)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.cell = nn.LSTMCell(c.embed_size + c.hidden_size, c.hidden_size)
        self.out_dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)

    def _start(self, regions: torch.Tensor | Regions):
        """regions (B, R, D), or Regions -> h, c (B, H), values (B, R, H), keys (B, R, A)."""
        maps, photo = regions if isinstance(regions, Regions) else (regions, None)
        if maps.dim() != 3:
            raise ValueError(f"the attention decoder reads feature maps (B, R, D), not {tuple(maps.shape)}")
        values = self.values(maps)  # (U, R, H): each photo once
        mean = values.mean(1)
        start = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), values, self.keys(values)
        return start if photo is None else tuple(s.index_select(0, photo) for s in start)  # (B, ...) each

    def _attend(self, h: torch.Tensor, values: torch.Tensor, keys: torch.Tensor):
        """(gated context (B, H), weights (B, R)) for the hidden state h (B, H)."""
        weights = torch.softmax(self.score(torch.tanh(keys + self.query(h)[:, None])).squeeze(-1), dim=-1)
        context = torch.bmm(weights[:, None], values).squeeze(1)  # (B, H)
        return torch.sigmoid(self.gate(h)) * context, weights

    def _step(self, words: torch.Tensor, h, c, values, keys):
        context, weights = self._attend(h, values, keys)
        h, c = self.cell(torch.cat([words, context], dim=-1), (h, c))
        return h, c, weights

    def teacher_forced(
        self, regions: torch.Tensor | Regions, captions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T-1, V), attention weights (B, T-1, R)): position t reads captions[:, t] and
        predicts captions[:, t+1], with the weights it looked at the regions with. Positions past a
        caption's <end> get zero logits and weights."""
        h, c, values, keys = self._start(regions)
        words = self.embed_dropout(self.embed(captions[:, :-1]))  # (B, T-1, E)
        real = captions[:, 1:] != 0  # (B, T-1)
        steps = real.sum(1)  # (B,): each caption's trained positions
        order = torch.argsort(steps, descending=True, stable=True)
        active = (steps[order][None] > torch.arange(words.size(1))[:, None]).sum(1).tolist()  # (T-1,) per step
        h, c, values, keys, words = (x.index_select(0, order) for x in (h, c, values, keys, words))
        batch, hidden, weights, width = words.size(0), [], [], words.size(0)
        for t, n in enumerate(active):  # the longest captions first: step t runs the first `width` rows
            if n <= SHRINK * width:  # drop the ended captions; not at every step: a slice's gradient is full size
                width, h, c, values, keys = n, h[:n], c[:n], values[:n], keys[:n]
            h, c, w = self._step(words[:width, t], h, c, values, keys)
            hidden.append(nn.functional.pad(h, (0, 0, 0, batch - width)))
            weights.append(nn.functional.pad(w, (0, 0, 0, batch - width)))
        unsort = torch.argsort(order)
        hidden = self.out_dropout(torch.stack(hidden, 1).index_select(0, unsort))  # (B, T-1, H)
        read = real.flatten().nonzero().squeeze(1)  # the positions a loss reads
        logits = self.head(hidden.flatten(0, 1).index_select(0, read))  # (P, V)
        logits = logits.new_zeros(real.numel(), logits.size(1)).index_copy(0, read, logits)
        return logits.view(*real.shape, -1), torch.stack(weights, 1).index_select(0, unsort)

    def forward(self, regions: torch.Tensor | Regions, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-word logits (B, T-1, V), the doubly stochastic penalty to add to the loss)."""
        logits, weights = self.teacher_forced(regions, captions)
        real = (captions[:, 1:] != 0).float()[..., None]  # (B, T-1, 1): padding looks at nothing
        coverage = (weights * real).sum(1)  # (B, R)
        return logits, self.config.attention_penalty * ((1 - coverage) ** 2).mean()

    def init_state(self, regions: torch.Tensor) -> AttentionState:
        h, c, values, keys = self._start(regions)
        return h[None], c[None], values[None], keys[None]

    def step(self, tokens: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        """Log-probabilities of the next word given the previous one; tokens (B,) -> (B, V)."""
        h, c, values, keys = (s[0] for s in state)
        h, c, _ = self._step(self.embed(tokens), h, c, values, keys)
        return torch.log_softmax(self.head(h), dim=-1), (h[None], c[None], state[2], state[3])

    @torch.inference_mode()
    def attention(self, regions: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Weights (B, T-1, R) over the regions behind each word of `captions` (<start> w1 .. <end>)."""
        return self.teacher_forced(regions, captions)[1]

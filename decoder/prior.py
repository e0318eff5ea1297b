"""Decoding against the decoder's own language prior: what it says whatever the photo shows.

A decoder trained by maximum likelihood falls back on the phrases that fit most photos: asked to
caption the average training photo, the 6,000-photo attention decoder says "two people stand in
front of a building", and "in front of" then ends 18 % of its dev captions (docs/quality.md).
`PriorCorrected` scores each next word by

    log p(word | photo, prefix) - w * log p(word | average photo, prefix)

renormalised, so a word loses ground by how much the decoder would say it without looking. The
average photo is fixed by the training set, so a photo's caption never depends on which other
photos are captioned with it. It wraps any decoder with init_state/step, an ensemble included.
"""

from __future__ import annotations

import torch
from torch import nn


class PriorCorrected(nn.Module):
    def __init__(self, model: nn.Module, average: torch.Tensor, weight: float):
        """`average`: the average training photo as the decoder reads it, (D,) or regions (R, D)."""
        super().__init__()
        self.model, self.weight, self.config = model, weight, model.config
        self.register_buffer("average", average.float())
        self.size = 0  # how many state tensors the photo's own state has, set by init_state

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The photos' states, then the average photo's: computed once, a view per photo (batch in dim 1)."""
        own = self.model.init_state(features)
        prior = tuple(s.expand(-1, features.size(0), *s.shape[2:]) for s in self.model.init_state(self.average[None]))
        self.size = len(own)
        return (*own, *prior)

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        own, own_state = self.model.step(tokens, state[: self.size])
        prior, prior_state = self.model.step(tokens, state[self.size :])
        return torch.log_softmax(own - self.weight * prior, dim=-1), (*own_state, *prior_state)

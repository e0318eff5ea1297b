"""Ensembles: decoders that differ only in seed, decoded together.

At every step of greedy or beam search the members' next-word probabilities are averaged
(the log of the mean, not the mean of the logs: a word one member rules out stays possible if the
others like it). The ensemble exposes the captioner's `init_state` / `step` interface, its state
being every member's (h, c) in turn, so search is written once for one decoder or many.

Members must share a vocabulary and a feature store (the same CNN, crops and images): their
probabilities are over the same words, for the same features. Anything else is refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decoder.model import Captioner
from store.errors import UserError


class Ensemble(nn.Module):
    def __init__(self, members: list[Captioner]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.log_members = math.log(len(members))

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's (h, c), each (L, B, H), in member order."""
        return tuple(t for member in self.members for t in member.init_state(features))

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        """Log of the members' mean next-word probability; tokens (B,) -> (B, V)."""
        logprobs, new_state = [], []
        for i, member in enumerate(self.members):
            lp, (h, c) = member.step(tokens, (state[2 * i], state[2 * i + 1]))
            logprobs.append(lp)
            new_state += [h, c]
        return torch.logsumexp(torch.stack(logprobs), 0) - self.log_members, tuple(new_state)


def check_members_agree(states: list[dict], paths: list) -> None:
    """One-line refusal when members differ in vocabulary or feature store."""
    first = states[0]
    for state, path in zip(states[1:], paths[1:], strict=True):
        if state["vocab"] != first["vocab"]:
            raise UserError(f"{path} has another vocabulary than {paths[0]}: ensemble members must share one")
        ours = {k: v for k, v in state.get("store", {}).items() if k not in ("precision", "weights_path")}
        theirs = {k: v for k, v in first.get("store", {}).items() if k not in ("precision", "weights_path")}
        if ours != theirs:
            differs = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise UserError(
                f"{path} was trained on another feature store than {paths[0]} ({', '.join(differs)} differ): "
                "ensemble members must share one"
            )
        if "encoder" in state or "encoder" in first:
            raise UserError(f"{path}: members with a fine-tuned CNN (joint phase) cannot share one feature pass")

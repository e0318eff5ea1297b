"""Ensembles: decoders decoded together, a run's members (which differ only in seed) or the
decoders of runs trained apart (`evaluate RUN --with OTHER`, `caption --with`).

At every step of greedy or beam search the members' next-word probabilities are averaged
(the log of the mean, not the mean of the logs: a word one member rules out stays possible if the
others like it). The ensemble exposes the captioner's `init_state` / `step` interface, its state
being every member's state tensors in turn, so search is written once for one decoder or many.

Members must share a vocabulary, a feature store (the same CNN, crops and images) and an input:
pooled vectors, or feature maps (the attention decoder and the transformer read the same maps, so
they mix). Their probabilities are then over the same words, for the same features. Anything else
is refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decoder.factory import decoder_of, reads_maps
from store.errors import UserError
from store.features import FEATURE_IDENTITY


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = members[0].config  # what the members read (check_members_agree makes it one input)
        self.log_members = math.log(len(members))
        self.sizes: list[int] = []  # how many state tensors each member has, set by init_state

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's state tensors (batch in dim 1), in member order."""
        states = [member.init_state(features) for member in self.members]
        self.sizes = [len(s) for s in states]
        return tuple(t for s in states for t in s)

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        """Log of the members' mean next-word probability; tokens (B,) -> (B, V)."""
        logprobs, new_state, at = [], [], 0
        for member, size in zip(self.members, self.sizes, strict=True):
            lp, member_state = member.step(tokens, state[at : at + size])
            at += size
            logprobs.append(lp)
            new_state += list(member_state)
        return torch.logsumexp(torch.stack(logprobs), 0) - self.log_members, tuple(new_state)


def _identity(state: dict) -> dict:
    """What a member's features are, as far as its checkpoint recorded them: the store identity (a
    checkpoint from before `view` existed was trained on crops, the only view there was; one from
    before `images_sha256` recorded the manifest's hash), and for the attention decoder the maps."""
    store = {"view": "crops", **state.get("store", {})}
    keys = (*FEATURE_IDENTITY, "manifest_sha256" if "images_sha256" not in store else "images_sha256")
    if reads_maps(state["config"]["model"]):
        keys += ("maps_crops", "map_size")
    return {k: store[k] for k in keys if k in store}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def check_members_agree(states: list[dict], paths: list) -> None:
    """One-line refusal when members differ in vocabulary or feature store."""
    first = states[0]
    for state, path in zip(states[1:], paths[1:], strict=True):
        if state["vocab"] != first["vocab"]:
            raise UserError(f"{path} has another vocabulary than {paths[0]}: ensemble members must share one")
        if reads_maps(state["config"]["model"]) != reads_maps(first["config"]["model"]):
            decoder, first_decoder = (_a(decoder_of(s["config"]["model"])) for s in (state, first))
            raise UserError(
                f"{path} is {decoder} decoder and {paths[0]} {first_decoder} one: ensemble members must read "
                "the same input (pooled vectors, or feature maps: attention and transformer)"
            )
        ours, theirs = _identity(state), _identity(first)
        shared = ours.keys() & theirs.keys()  # what both recorded: older checkpoints recorded less
        ours, theirs = {k: ours[k] for k in shared}, {k: theirs[k] for k in shared}
        if ours != theirs:
            differs = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise UserError(
                f"{path} was trained on another feature store than {paths[0]} ({', '.join(differs)} differ): "
                "ensemble members must share one"
            )
        if "encoder" in state or "encoder" in first:
            joint = path if "encoder" in state else paths[0]  # the one that fine-tuned, first or not
            raise UserError(f"{joint}: members with a fine-tuned CNN (joint phase) cannot share one feature pass")

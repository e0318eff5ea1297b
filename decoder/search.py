"""Greedy and beam search, written once against the captioner's `init_state` / `step` interface.

Beam search keeps, per image, the B best partial captions by summed log-probability; finished
captions (those that emitted <end>) are ranked by that sum divided by length**alpha, so alpha=0
is the plain sum and alpha=1 the mean log-probability per word (length normalisation).

Two words are ruled out where the step's log-probabilities are consumed (`allowed`), for every
caller (greedy, beam and its n-best candidates that re-ranking picks from, ensembles, and the
samples of self-critical training):
- <unk> never: a word the vocabulary lacks cannot be said, and "sitting on a <unk>" is no caption;
- <end> at the first step, so a caption has at least one word. An undertrained decoder otherwise
  finds the empty caption likelier than any sentence, and beam search, which stops once no live
  beam can beat its best finished caption, then returns nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from store.text import Vocabulary

UNK_ID = Vocabulary.unk_id  # the same id in every vocabulary


def allowed(logprobs: torch.Tensor, t: int, end_id: int) -> torch.Tensor:
    """Step t's log-probabilities (B, V) with the words a caption may not have there set to -inf:
    <unk> always, <end> at the first step. Out of place, so sampling can backpropagate through it."""
    banned = torch.tensor([UNK_ID, end_id] if t == 0 else [UNK_ID], device=logprobs.device)
    return logprobs.index_fill(1, banned, float("-inf"))


@torch.inference_mode()
def greedy(model: nn.Module, features: torch.Tensor, start_id: int, end_id: int, max_len: int = 30) -> list[list[int]]:
    """The most likely next word at each step; features (B, D) -> token ids without specials."""
    state = model.init_state(features)
    tokens = torch.full((features.size(0),), start_id, dtype=torch.long)
    out = torch.zeros(features.size(0), 0, dtype=torch.long)
    finished = torch.zeros(features.size(0), dtype=torch.bool)
    for t in range(max_len):
        logprobs, state = model.step(tokens, state)  # (B, V)
        tokens = allowed(logprobs, t, end_id).argmax(-1)
        out = torch.cat([out, tokens[:, None]], dim=1)
        finished |= tokens == end_id
        if finished.all():
            break
    return [_until_end(row.tolist(), end_id) for row in out]


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    beam: int = 3,
    max_len: int = 30,
    alpha: float = 0.0,
) -> list[list[int]]:
    """The best caption per image under length-normalised log-probability; features (B, D)."""
    if beam <= 1:
        return greedy(model, features, start_id, end_id, max_len)
    return [c[0] for c in beam_candidates(model, features, start_id, end_id, beam, max_len, alpha, n_best=1)]


@torch.inference_mode()
def beam_candidates(
    model: nn.Module,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    beam: int = 3,
    max_len: int = 30,
    alpha: float = 0.0,
    n_best: int = 1,
) -> list[list[list[int]]]:
    """Up to `n_best` distinct captions per image, best first; features (B, D).

    All images of the batch advance together: one `step` call per word for every live beam of
    every image (B * beam rows), then each image's bookkeeping on its own 2 * beam best
    continuations. An image whose search has ended leaves the batch.
    """
    n = features.size(0)
    state = model.init_state(features)  # each (L, B, H)
    rows = torch.arange(n).repeat_interleave(beam)  # (B * beam,) image of each beam row
    state = tuple(s[:, rows] for s in state)
    searches = [_Search(beam) for _ in range(n)]
    live = list(range(n))  # images still searching, in the order of the batch rows
    tokens = torch.full((n * beam,), start_id, dtype=torch.long)
    for t in range(max_len):
        logprobs, state = model.step(tokens, state)  # (live * beam, V)
        logprobs = allowed(logprobs, t, end_id)
        vocab = logprobs.size(1)
        scores = torch.stack([searches[i].scores for i in live]).reshape(-1)  # (live * beam,)
        total = (scores[:, None] + logprobs).reshape(len(live), beam * vocab)
        top_scores, top_idx = total.topk(min(2 * beam, beam * vocab), dim=1)  # (live, 2 * beam)
        next_live, picks, next_tokens = [], [], []
        for j, i in enumerate(live):
            chosen = searches[i].advance(top_scores[j].tolist(), top_idx[j].tolist(), vocab, end_id, alpha)
            if chosen is None:
                continue
            parents, words = chosen
            next_live.append(i)
            picks += [j * beam + p for p in parents]
            next_tokens += words
        if not next_live:
            break
        live = next_live
        idx = torch.tensor(picks)
        state = tuple(s[:, idx] for s in state)
        tokens = torch.tensor(next_tokens)
    return [search.best(alpha, n_best) for search in searches]


class _Search:
    """One image's beams: live partial captions with their summed log-probabilities, and the
    finished ones with their length-normalised scores."""

    def __init__(self, beam: int):
        self.beam = beam
        # Only the first beam is live at the start, so the B copies do not all pick the same word.
        self.scores = torch.full((beam,), float("-inf"))
        self.scores[0] = 0.0
        self.seqs: list[list[int]] = [[] for _ in range(beam)]
        self.finished: list[tuple[float, list[int]]] = []

    def advance(self, top_scores: list[float], top_idx: list[int], vocab: int, end_id: int, alpha: float):
        """Take the step's best continuations; (parent beams, next words) of `beam` live rows, or
        None when the search has ended."""
        next_tokens, next_seqs, next_scores, parents = [], [], [], []
        for s, idx in zip(top_scores, top_idx, strict=True):
            if s == float("-inf"):
                break
            parent, word = divmod(idx, vocab)
            if word == end_id:
                self.finished.append((s / (len(self.seqs[parent]) + 1) ** alpha, self.seqs[parent]))
                continue
            next_tokens.append(word)
            next_seqs.append(self.seqs[parent] + [word])
            next_scores.append(s)
            parents.append(parent)
            if len(next_tokens) == self.beam:
                break
        best_finished = max((f[0] for f in self.finished), default=float("-inf"))
        # Stop when no live beam can still beat the best finished caption. With alpha == 0 scores only
        # fall, so the bound is exact; with alpha > 0 a longer caption could still win, so run on.
        if not next_tokens or (alpha == 0 and max(next_scores) <= best_finished):
            return None
        pad = self.beam - len(next_tokens)  # dead beams copy the first row, with score -inf
        self.seqs = next_seqs + [[] for _ in range(pad)]
        self.scores = torch.tensor(next_scores + [float("-inf")] * pad)
        return parents + [parents[0]] * pad, next_tokens + [next_tokens[0]] * pad

    def best(self, alpha: float, n_best: int) -> list[list[int]]:
        finished = self.finished
        if not finished:  # nothing ended within max_len: take the best live beam as it stands
            top = int(self.scores.argmax())
            finished = [(self.scores[top].item() / max(len(self.seqs[top]), 1) ** alpha, self.seqs[top])]
        ranked = sorted(enumerate(finished), key=lambda f: (-f[1][0], f[0]))  # ties: first found first
        out: list[list[int]] = []
        for _, (_, seq) in ranked:
            if seq not in out:
                out.append(seq)
            if len(out) == n_best:
                break
        return out


def _until_end(ids: list[int], end_id: int) -> list[int]:
    return ids[: ids.index(end_id)] if end_id in ids else ids

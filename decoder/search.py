"""Greedy and beam search, written once against the captioner's `init_state` / `step` interface.

Beam search keeps, per image, the B best partial captions by summed log-probability; finished
captions (those that emitted <end>) are ranked by that sum divided by length**alpha, so alpha=0
is the plain sum and alpha=1 the mean log-probability per word (length normalisation).
"""

from __future__ import annotations

import torch

from decoder.model import Captioner


@torch.inference_mode()
def greedy(model: Captioner, features: torch.Tensor, start_id: int, end_id: int, max_len: int = 30) -> list[list[int]]:
    """The most likely next word at each step; features (B, D) -> token ids without specials."""
    state = model.init_state(features)
    tokens = torch.full((features.size(0),), start_id, dtype=torch.long)
    out = torch.zeros(features.size(0), 0, dtype=torch.long)
    finished = torch.zeros(features.size(0), dtype=torch.bool)
    for _ in range(max_len):
        logprobs, state = model.step(tokens, state)  # (B, V)
        tokens = logprobs.argmax(-1)
        out = torch.cat([out, tokens[:, None]], dim=1)
        finished |= tokens == end_id
        if finished.all():
            break
    return [_until_end(row.tolist(), end_id) for row in out]


@torch.inference_mode()
def beam_search(
    model: Captioner, features: torch.Tensor, start_id: int, end_id: int,
    beam: int = 3, max_len: int = 30, alpha: float = 0.0,
) -> list[list[int]]:
    """The best caption per image under length-normalised log-probability; features (B, D)."""
    if beam <= 1:
        return greedy(model, features, start_id, end_id, max_len)
    return [_beam_one(model, features[i : i + 1], start_id, end_id, beam, max_len, alpha) for i in range(features.size(0))]


def _beam_one(model: Captioner, feature: torch.Tensor, start_id: int, end_id: int, beam: int, max_len: int, alpha: float) -> list[int]:
    h, c = model.init_state(feature)  # (L, 1, H)
    state = (h.repeat(1, beam, 1), c.repeat(1, beam, 1))  # (L, beam, H)
    tokens = torch.full((beam,), start_id, dtype=torch.long)
    # Only the first beam is live at the start, so the B copies do not all pick the same word.
    scores = torch.full((beam,), float("-inf"))
    scores[0] = 0.0
    seqs: list[list[int]] = [[] for _ in range(beam)]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_len):
        logprobs, state = model.step(tokens, state)  # (beam, V)
        vocab = logprobs.size(1)
        total = (scores[:, None] + logprobs).reshape(-1)  # (beam * V,)
        top_scores, top_idx = total.topk(min(2 * beam, total.numel()))
        next_tokens, next_seqs, next_scores, parents = [], [], [], []
        for s, idx in zip(top_scores.tolist(), top_idx.tolist(), strict=True):
            if s == float("-inf"):
                break
            parent, word = divmod(idx, vocab)
            if word == end_id:
                length = len(seqs[parent]) + 1
                finished.append((s / length**alpha, seqs[parent]))
                continue
            next_tokens.append(word)
            next_seqs.append(seqs[parent] + [word])
            next_scores.append(s)
            parents.append(parent)
            if len(next_tokens) == beam:
                break
        best_finished = max((f[0] for f in finished), default=float("-inf"))
        # Stop when no live beam can still beat the best finished caption. With alpha == 0 scores only
        # fall, so the bound is exact; with alpha > 0 a longer caption could still win, so run on.
        if not next_tokens or (alpha == 0 and max(next_scores) <= best_finished):
            break
        idx = torch.tensor(parents)
        state = (state[0][:, idx], state[1][:, idx])
        tokens = torch.tensor(next_tokens)
        scores = torch.tensor(next_scores)
        seqs = next_seqs
        if len(next_tokens) < beam:  # pad dead beams so shapes stay fixed
            pad = beam - len(next_tokens)
            state = (torch.cat([state[0], state[0][:, :1].repeat(1, pad, 1)], 1), torch.cat([state[1], state[1][:, :1].repeat(1, pad, 1)], 1))
            tokens = torch.cat([tokens, tokens[:1].repeat(pad)])
            scores = torch.cat([scores, torch.full((pad,), float("-inf"))])
            seqs = seqs + [[] for _ in range(pad)]
    if not finished:  # nothing ended within max_len: take the best live beam as it stands
        finished = [(scores.max().item() / max(len(seqs[int(scores.argmax())]), 1) ** alpha, seqs[int(scores.argmax())])]
    return max(finished, key=lambda f: f[0])[1]


def _until_end(ids: list[int], end_id: int) -> list[int]:
    return ids[: ids.index(end_id)] if end_id in ids else ids

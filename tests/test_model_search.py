"""The captioner's shapes and loss, and greedy / beam search over its step interface."""

import math

import pytest
import torch

from decoder.config import CaptionerConfig
from decoder.model import PooledCaptioner, caption_loss
from decoder.search import beam_search, greedy

START, END, UNK = 1, 2, 3


def tiny_model(vocab_size=10, seed=0, image_as="input", num_layers=1) -> PooledCaptioner:
    torch.manual_seed(seed)
    config = CaptionerConfig(
        vocab_size=vocab_size, feature_dim=16, embed_size=8, hidden_size=8, image_as=image_as, num_layers=num_layers
    )
    return PooledCaptioner(config).eval()


def test_forward_predicts_every_word_after_start():
    model = tiny_model()
    captions = torch.tensor([[START, 5, 6, END, 0], [START, 7, END, 0, 0]])
    logits = model(torch.randn(2, 16), captions)
    assert logits.shape == (2, 4, 10)  # (B, T-1, V)


def test_loss_ignores_padding():
    captions = torch.tensor([[START, 5, END, 0, 0]])
    logits = torch.randn(1, 4, 10)
    changed = logits.clone()
    changed[0, 2:] = torch.randn(2, 10) * 100  # positions whose targets are <pad>
    assert torch.equal(caption_loss(logits, captions), caption_loss(changed, captions))
    changed[0, 1] += torch.randn(10)  # position predicting <end>: counts
    assert not torch.equal(caption_loss(logits, captions), caption_loss(changed, captions))


@pytest.mark.parametrize("image_as,num_layers", [("input", 1), ("state", 1), ("state", 2), ("input", 2)])
def test_step_matches_teacher_forcing(image_as, num_layers):
    """Decoding one word at a time gives the same distribution as the batched forward pass."""
    model = tiny_model(image_as=image_as, num_layers=num_layers)
    features, captions = torch.randn(1, 16), torch.tensor([[START, 4, 5, END]])
    batched = torch.log_softmax(model(features, captions), -1)  # (1, 3, V)
    state = model.init_state(features)
    for t in range(3):
        logprobs, state = model.step(captions[:, t], state)
        assert torch.allclose(logprobs, batched[:, t], atol=1e-5)


def test_beam_one_is_greedy():
    model = tiny_model(vocab_size=12, seed=3)
    features = torch.randn(5, 16)
    assert beam_search(model, features, START, END, beam=1) == greedy(model, features, START, END)


class MarkovCaptioner:
    """A hand-set model: the next word's probabilities depend only on the previous word."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int = 6):
        self.logprobs = torch.full((vocab_size, vocab_size), -1e9)
        for prev, nxt in table.items():
            for word, p in nxt.items():
                self.logprobs[prev, word] = math.log(p)

    def init_state(self, features):
        zeros = torch.zeros(1, features.size(0), 1)
        return zeros, zeros.clone()

    def step(self, tokens, state):
        return self.logprobs[tokens], state


# <start> -> A (0.6) or B (0.4); after A the mass is spread (best: <end> 0.35);
# after B, <end> is almost certain. Greedy: "A" with p=0.21; the best caption is "B" with p=0.36.
# (Words from id 4: id 3 is <unk>, which search never emits.)
A, B = 4, 5
TABLE = {START: {A: 0.6, B: 0.4}, A: {END: 0.35, A: 0.33, B: 0.32}, B: {END: 0.9, A: 0.05, B: 0.05}}


def test_beam_finds_the_better_caption_that_greedy_misses():
    model = MarkovCaptioner(TABLE)
    features = torch.zeros(1, 4)
    assert greedy(model, features, START, END) == [[A]]
    assert beam_search(model, features, START, END, beam=2) == [[B]]


def test_length_normalisation_prefers_longer_captions():
    # "B <end>": p=0.4, log -0.92 over 2 tokens (-0.46 each). "A B <end>": 0.6*0.5=0.3, log -1.20 but
    # -0.40 per token. "A <end>": 0.3, -0.60 per token.
    model = MarkovCaptioner({START: {A: 0.6, B: 0.4}, A: {END: 0.5, B: 0.5}, B: {END: 1.0}})
    features = torch.zeros(1, 4)
    assert beam_search(model, features, START, END, beam=3, alpha=0.0) == [[B]]
    assert beam_search(model, features, START, END, beam=3, alpha=1.0) == [[A, B]]


def test_a_caption_has_at_least_one_word():
    # the empty caption (p=0.9) would win every search: it is ruled out, "A" is the best left
    model = MarkovCaptioner({START: {END: 0.9, A: 0.1}, A: {END: 1.0}})
    features = torch.zeros(2, 4)
    assert greedy(model, features, START, END) == [[A], [A]]
    for beam in (2, 3):
        assert beam_search(model, features, START, END, beam=beam) == [[A], [A]]


@pytest.mark.parametrize("beam", [2, 3, 5])
def test_beam_score_never_worse_than_greedy(beam):
    model = tiny_model(vocab_size=9, seed=beam)
    features = torch.randn(4, 16)

    def logprob(feature, ids):
        state, total = model.init_state(feature[None]), 0.0
        for prev, word in zip([START, *ids], [*ids, END], strict=True):
            lp, state = model.step(torch.tensor([prev]), state)
            total += lp[0, word].item()
        return total

    for f, g, b in zip(
        features,
        greedy(model, features, START, END, max_len=40),
        beam_search(model, features, START, END, beam=beam, max_len=40),
        strict=True,
    ):
        assert logprob(f, b) >= logprob(f, g) - 1e-5


def per_image_beam(model, feature, start_id, end_id, beam, max_len, alpha):
    """The per-image beam search légende used before the batched one, kept as the oracle (with the
    rules added since: <end> cannot be the first word, <unk> is never a word)."""
    h, c = model.init_state(feature)  # (L, 1, H)
    state = (h.repeat(1, beam, 1), c.repeat(1, beam, 1))  # (L, beam, H)
    tokens = torch.full((beam,), start_id, dtype=torch.long)
    # Only the first beam is live at the start, so the B copies do not all pick the same word.
    scores = torch.full((beam,), float("-inf"))
    scores[0] = 0.0
    seqs: list[list[int]] = [[] for _ in range(beam)]
    finished: list[tuple[float, list[int]]] = []
    for t in range(max_len):
        logprobs, state = model.step(tokens, state)  # (beam, V)
        if t == 0:
            logprobs[:, end_id] = float("-inf")
        logprobs[:, UNK] = float("-inf")
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
            state = (
                torch.cat([state[0], state[0][:, :1].repeat(1, pad, 1)], 1),
                torch.cat([state[1], state[1][:, :1].repeat(1, pad, 1)], 1),
            )
            tokens = torch.cat([tokens, tokens[:1].repeat(pad)])
            scores = torch.cat([scores, torch.full((pad,), float("-inf"))])
            seqs = seqs + [[] for _ in range(pad)]
    if not finished:  # nothing ended within max_len: take the best live beam as it stands
        finished = [
            (scores.max().item() / max(len(seqs[int(scores.argmax())]), 1) ** alpha, seqs[int(scores.argmax())])
        ]
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize(
    "beam,alpha,image_as,layers",
    [(2, 0.0, "input", 1), (3, 0.0, "state", 2), (5, 0.7, "input", 1), (4, 1.0, "input", 2)],
)
def test_batched_beam_search_gives_the_per_image_captions(beam, alpha, image_as, layers):
    """All images searched at once give exactly what searching them one at a time gave."""
    for seed in range(3):
        model = tiny_model(vocab_size=11, seed=seed, image_as=image_as, num_layers=layers)
        features = torch.randn(17, 16) * 3
        with torch.inference_mode():
            expected = [per_image_beam(model, f[None], START, END, beam, 12, alpha) for f in features]
        assert beam_search(model, features, START, END, beam=beam, max_len=12, alpha=alpha) == expected


def test_beam_candidates_are_distinct_and_best_first():
    from decoder.search import beam_candidates

    model = tiny_model(vocab_size=11, seed=4)
    features = torch.randn(6, 16)
    for f, cands in zip(
        features, beam_candidates(model, features, START, END, beam=5, max_len=12, n_best=4), strict=True
    ):
        assert 1 <= len(cands) <= 4 and len({tuple(c) for c in cands}) == len(cands)
        assert cands[0] == beam_search(model, f[None], START, END, beam=5, max_len=12)[0]


# --- <unk> is never said -----------------------------------------------------------------------


def unk_lover(seed: int, bias: float = 30.0, decoder: str = "pooled") -> torch.nn.Module:
    """A tiny decoder whose head pushes every step's probability onto <unk>."""
    if decoder == "pooled":
        model = tiny_model(vocab_size=10, seed=seed)
    else:
        from decoder.transformer import TransformerCaptioner

        torch.manual_seed(seed)
        config = CaptionerConfig(vocab_size=10, feature_dim=16, hidden_size=8, heads=2, decoder="transformer")
        model = TransformerCaptioner(config).eval()
    with torch.no_grad():
        model.head.bias[UNK] = bias
    return model


@pytest.mark.parametrize("decoder", ["pooled", "transformer"])
def test_no_search_ever_says_unk_even_from_a_decoder_that_prefers_it(decoder):
    from decoder.ensemble import Ensemble
    from decoder.search import beam_candidates
    from training.phases.scst import SampleNet

    model = unk_lover(seed=0, decoder=decoder)
    features = torch.randn(6, 16) if decoder == "pooled" else torch.randn(6, 4, 16)  # the transformer reads regions
    first, _ = model.step(torch.full((6,), START), model.init_state(features))
    assert (first.argmax(-1) == UNK).all() and first[:, UNK].exp().min() > 0.99  # it does prefer <unk>
    ensemble = Ensemble([model, unk_lover(seed=1, decoder=decoder)])
    captions = {
        "greedy": greedy(model, features, START, END, max_len=8),
        "beam": beam_search(model, features, START, END, beam=3, max_len=8),
        "beam, alpha 1": beam_search(model, features, START, END, beam=4, max_len=8, alpha=1.0),
        "ensemble greedy": greedy(ensemble, features, START, END, max_len=8),
        "ensemble beam": beam_search(ensemble, features, START, END, beam=3, max_len=8),
    }
    for name, nbest in {
        "n-best": beam_candidates(model, features, START, END, beam=5, max_len=8, n_best=5),
        "ensemble n-best": beam_candidates(ensemble, features, START, END, beam=5, max_len=8, n_best=5),
    }.items():
        assert all(1 <= len(cands) <= 5 for cands in nbest), name  # re-ranking gets candidates to choose from
        captions[name] = [c for cands in nbest for c in cands]
    torch.manual_seed(0)
    tokens, logprobs, mask = SampleNet(model, START, END)(features, samples=50, max_len=8)
    captions["samples"] = tokens.tolist()
    for name, ids in captions.items():
        assert ids and all(seq for seq in ids), name  # a word, not the empty caption
        assert not any(UNK in seq for seq in ids), name

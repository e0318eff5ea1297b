"""The captioner's shapes and loss, and greedy / beam search over its step interface."""

import math

import pytest
import torch

from decoder.model import Captioner, CaptionerConfig, caption_loss
from decoder.search import beam_search, greedy

START, END = 1, 2


def tiny_model(vocab_size=10, seed=0, image_as="input", num_layers=1) -> Captioner:
    torch.manual_seed(seed)
    config = CaptionerConfig(vocab_size=vocab_size, feature_dim=16, embed_size=8, hidden_size=8, image_as=image_as, num_layers=num_layers)
    return Captioner(config).eval()


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

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int = 5):
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
A, B = 3, 4
TABLE = {START: {A: 0.6, B: 0.4}, A: {END: 0.35, A: 0.33, B: 0.32}, B: {END: 0.9, A: 0.05, B: 0.05}}


def test_beam_finds_the_better_caption_that_greedy_misses():
    model = MarkovCaptioner(TABLE)
    features = torch.zeros(1, 4)
    assert greedy(model, features, START, END) == [[A]]
    assert beam_search(model, features, START, END, beam=2) == [[B]]


def test_length_normalisation_prefers_longer_captions():
    # "<end>" at once: p=0.5, log -0.69 over 1 word. "A <end>": 0.45*0.8=0.36, log -1.02 but -0.51 per word.
    model = MarkovCaptioner({START: {END: 0.5, A: 0.45, B: 0.05}, A: {END: 0.8, A: 0.2}, B: {END: 1.0}})
    features = torch.zeros(1, 4)
    assert beam_search(model, features, START, END, beam=3, alpha=0.0) == [[]]
    assert beam_search(model, features, START, END, beam=3, alpha=1.0) == [[A]]


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

    for f, g, b in zip(features, greedy(model, features, START, END, max_len=40), beam_search(model, features, START, END, beam=beam, max_len=40), strict=True):
        assert logprob(f, b) >= logprob(f, g) - 1e-5

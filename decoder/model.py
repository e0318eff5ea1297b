"""The pooled (Show-and-Tell) captioner: an image vector becomes the LSTM's first input, then words follow.

The image enters as the *first input* rather than as the initial (h, c) state, as in Show and
Tell (Vinyals et al. 2015): the LSTM's own gates learn how much of the image to write into its
memory, and one projection to the embedding size serves, where an initial state would need two
(h and c) per layer. Unlike the reference implementation, the output at the image step is not
trained to predict `<start>` (a constant that wastes capacity): `<start>` is the second input and
the loss covers only the words after it.

Decoding goes through `init_state(features)` and `step(tokens, state)` so that greedy and beam
search (decoder/search.py) are written once for every phase. `CaptionerConfig` (decoder/config.py)
configures every captioner (decoder/factory.py builds the one it names) and `caption_loss` is the loss
all phases train.
"""

from __future__ import annotations

import torch
from torch import nn

from decoder.config import CaptionerConfig

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (layers, B, H)


class PooledCaptioner(nn.Module):
    """Reads one pooled vector per photo (B, D). The public API's `legende.Captioner` is another
    thing: a trained run loaded to caption photos."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        c = config
        self.project = nn.Sequential(nn.Linear(c.feature_dim, c.embed_size), nn.ReLU(), nn.Dropout(c.dropout))
        self.embed = nn.Embedding(c.vocab_size, c.embed_size, padding_idx=0)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.lstm = nn.LSTM(
            c.embed_size,
            c.hidden_size,
            num_layers=c.num_layers,
            batch_first=True,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
        )
        self.out_dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        if c.image_as == "state":  # the alternative, kept to measure it (see bench/quality.py)
            self.to_state = nn.Linear(c.embed_size, 2 * c.num_layers * c.hidden_size)
        elif c.image_as != "input":
            raise ValueError(f"image_as must be 'input' or 'state', not {c.image_as!r}")

    def _image_state(self, features: torch.Tensor) -> State:
        """(h0, c0), each (L, B, H), computed from the projected image."""
        c = self.config
        hc = torch.tanh(self.to_state(self.project(features)))  # (B, 2*L*H)
        h, cell = hc.view(-1, 2, c.num_layers, c.hidden_size).permute(1, 2, 0, 3).contiguous()  # (L, B, H) each
        return h, cell

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Next-word logits for teacher forcing.

        features (B, D); captions (B, T) = <start> w1 .. wn <end> <pad>...
        Returns logits (B, T-1, V) whose position t predicts captions[:, t+1].
        """
        words = self.embed_dropout(self.embed(captions[:, :-1]))  # (B, T-1, E)
        if self.config.image_as == "state":
            hidden, _ = self.lstm(words, self._image_state(features))  # (B, T-1, H)
            return self.head(self.out_dropout(hidden))  # (B, T-1, V)
        image = self.project(features).unsqueeze(1)  # (B, 1, E)
        hidden, _ = self.lstm(torch.cat([image, words], dim=1))  # (B, T, H)
        return self.head(self.out_dropout(hidden[:, 1:]))  # (B, T-1, V): skip the image step

    def init_state(self, features: torch.Tensor) -> State:
        """The LSTM state after reading the image; features (B, D)."""
        if self.config.image_as == "state":
            return self._image_state(features)
        _, state = self.lstm(self.project(features).unsqueeze(1))
        return state

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Log-probabilities of the next word given the previous one; tokens (B,) -> (B, V)."""
        hidden, state = self.lstm(self.embed(tokens).unsqueeze(1), state)  # (B, 1, H)
        return torch.log_softmax(self.head(hidden[:, 0]), dim=-1), state


def split_output(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(logits, penalty) of a captioner's forward: the attention decoder adds a penalty, this one none."""
    return out if isinstance(out, tuple) else (out, 0.0)


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean cross-entropy over real (non-padding) target words; logits (B, T-1, V)."""
    targets = captions[:, 1:]  # (B, T-1)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=pad_id)


def smoothed_caption_loss(
    logits: torch.Tensor, captions: torch.Tensor, label_smoothing: float, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed cross-entropy, plain cross-entropy), each a mean over the real target words.

    The smoothed loss is what `cross_entropy(..., label_smoothing=eps)` computes, (1 - eps) x the
    cross-entropy + eps x the mean over the vocabulary of -log p; both come from one log-softmax, over
    the real positions only."""
    targets = captions[:, 1:].reshape(-1)  # (B*(T-1),)
    real = (targets != pad_id).nonzero().squeeze(1)
    logprobs = torch.log_softmax(logits.reshape(-1, logits.size(-1)).index_select(0, real), -1)  # (P, V)
    plain = -logprobs.gather(1, targets.index_select(0, real)[:, None]).mean()
    spread = -logprobs.mean(-1).mean()
    return (1 - label_smoothing) * plain + label_smoothing * spread, plain

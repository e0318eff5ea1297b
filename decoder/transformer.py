"""The transformer captioner: a small causal (GPT-style) decoder whose words attend to each other
and, by cross-attention, to the photo's regions.

    python cli.py train data/work --decoder transformer

The LSTM decoders carry the caption in one state vector; here every word looks back at all the
words before it. It is built from torch's own `nn.TransformerDecoderLayer` (pre-norm, batch first),
sized for Flickr8k-scale data, where large transformers caption worse than LSTMs (docs/transformer.md):

- the regions (B, R, D) are projected once per photo to the width W (`--hidden-size`) and
  normalised: that is the memory every layer's cross-attention reads;
- words: an embedding of size W plus fixed sinusoidal positions (nothing to learn, any length),
  then `--num-layers` layers of `--heads` heads and a final LayerNorm;
- the output layer is the word embedding itself (tied weights), plus a bias: fewer parameters
  to fit on little data, and a word's input and output meanings stay one vector;
- initialised as GPT-2 is: the embedding N(0, 0.02), the positions scaled to the same size, no
  sqrt(W) factor. Tied weights make the input word's own logit grow with its share of the last
  layer's input; with two layers and the usual N(0, W^-1/2) x sqrt(W) the input word dominates
  it, and the decoder starts by repeating its input (a first loss of 13.9 nats over 37 words,
  against 3.8 this way, which also learned faster: docs/transformer.md).

Training runs all positions at once under a causal mask (`forward`). Decoding goes through the
`init_state` / `step` interface of the other captioners, so greedy and beam search, ensembles,
the prior penalty and self-critical training use it unchanged. A step does not recompute the
prefix: `init_state` computes each layer's cross-attention keys and values of the regions once,
and each step appends the new word's self-attention keys and values to a cache. The step is
written against the same layer modules (their attention projections, norms, feed-forward and
dropouts), so one set of weights serves both, and a test checks that they give the same
next-word probabilities.

The state is, per layer, (self keys, self values, cross keys, cross values), each (heads, B, n,
head size): the batch is in dim 1, where search, ensembles and the prior penalty select, repeat
and expand it; n is the number of words so far (self) or of regions (cross).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from decoder.attention import Regions
from decoder.config import CaptionerConfig
from store.errors import UserError

TransformerState = tuple[torch.Tensor, ...]  # 4 per layer, each (heads, B, n, W / heads)
INIT_STD = 0.02  # of the word embedding, and the positions' size (GPT-2's)


def sinusoid(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Fixed sinusoidal position encodings (Vaswani et al. 2017); positions (T,) -> (T, W)."""
    rates = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10_000.0) / width))
    angles = positions.float()[:, None] * rates  # (T, W/2)
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(1)[:, :width]  # sin, cos interleaved


class TransformerCaptioner(nn.Module):
    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = c = config
        width = c.hidden_size
        if c.heads < 1 or width % c.heads:
            raise UserError(f"the transformer's width (--hidden-size {width}) must be a multiple of --heads {c.heads}")
        if c.num_layers < 1:
            raise UserError("the transformer decoder needs at least one layer (--num-layers)")
        self.width, self.heads, self.head_size = width, c.heads, width // c.heads
        self.memory = nn.Sequential(nn.Linear(c.feature_dim, width), nn.LayerNorm(width), nn.Dropout(c.dropout))
        self.embed = nn.Embedding(c.vocab_size, width)
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                width, c.heads, 4 * width, c.dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, c.vocab_size)
        self.head.weight = self.embed.weight  # tied: (V, W) both ways
        nn.init.zeros_(self.head.bias)

    # --- shared by training and stepping ---------------------------------------------------------

    def _memory(self, regions: torch.Tensor | Regions) -> torch.Tensor:
        """regions (B, R, D), or Regions (each photo's map once) -> the memory (B, R, W)."""
        maps, photo = regions if isinstance(regions, Regions) else (regions, None)
        if maps.dim() != 3:
            raise ValueError(f"the transformer decoder reads feature maps (B, R, D), not {tuple(maps.shape)}")
        memory = self.memory(maps)  # (U, R, W): each photo once
        return memory if photo is None else memory.index_select(0, photo)

    def _words(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (B, T) at positions start.. -> the first layer's input (B, T, W)."""
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        # each dimension of a sinusoid has RMS 1/sqrt(2): scaled to the size of the embedding's
        x = self.embed(tokens) + INIT_STD * math.sqrt(2) * sinusoid(positions, self.width).to(tokens.device)
        return self.embed_dropout(x)

    # --- training: every position at once ----------------------------------------------------------

    def forward(self, regions: torch.Tensor | Regions, captions: torch.Tensor) -> torch.Tensor:
        """Next-word logits (B, T-1, V): position t reads captions[:, :t+1] and predicts captions[:, t+1].
        Positions past a caption's <end> get zero logits (no loss reads them; the causal mask keeps
        the padding out of the real positions)."""
        memory = self._memory(regions)  # (B, R, W)
        x = self._words(captions[:, :-1], 0)  # (B, T-1, W)
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1), device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=mask, tgt_is_causal=True)
        real = captions[:, 1:] != 0  # (B, T-1)
        read = real.flatten().nonzero().squeeze(1)  # the positions a loss reads
        logits = self.head(self.norm(x.flatten(0, 1).index_select(0, read)))  # (P, V)
        logits = logits.new_zeros(real.numel(), logits.size(1)).index_copy(0, read, logits)
        return logits.view(*real.shape, -1)

    # --- decoding: one word at a time, with cached keys and values ----------------------------

    def _split(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, n, W) projected by (weight, bias) and split into heads: (heads, B, n, W / heads)."""
        y = F.linear(x, weight, bias)
        return y.view(*y.shape[:2], self.heads, self.head_size).permute(2, 0, 1, 3)

    def _projections(self, attn: nn.MultiheadAttention):
        """The query, key and value (weight, bias) of a MultiheadAttention's packed input projection."""
        w, b = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
        return (w[0], b[0]), (w[1], b[1]), (w[2], b[2])

    def _attend(self, attn: nn.MultiheadAttention, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(output (B, 1, W), weights (heads, B, 1, n)) of one query per row over n keys."""
        weights = torch.softmax((q / math.sqrt(self.head_size)) @ k.transpose(-1, -2), -1)  # (heads, B, 1, n)
        out = F.dropout(weights, attn.dropout, self.training) @ v  # (heads, B, 1, W / heads)
        out = out.permute(1, 2, 0, 3).flatten(2)  # (B, 1, W)
        return attn.out_proj(out), weights

    def init_state(self, regions: torch.Tensor) -> TransformerState:
        """Each layer's empty self-attention cache and the regions' cross-attention keys and values."""
        memory = self._memory(regions)  # (B, R, W)
        empty = memory.new_zeros(self.heads, memory.size(0), 0, self.head_size)
        state = []
        for layer in self.layers:
            _, key, value = self._projections(layer.multihead_attn)
            state += [empty, empty, self._split(memory, *key), self._split(memory, *value)]
        return tuple(state)

    def _step(self, tokens: torch.Tensor, state: TransformerState):
        """(hidden (B, W), new state, the last layer's cross-attention weights (heads, B, R))."""
        x = self._words(tokens[:, None], state[0].size(2))  # (B, 1, W) at the position after the cache
        new_state = []
        for i, layer in enumerate(self.layers):
            self_k, self_v, cross_k, cross_v = state[4 * i : 4 * i + 4]
            query, key, value = self._projections(layer.self_attn)
            h = layer.norm1(x)
            self_k = torch.cat([self_k, self._split(h, *key)], 2)  # (heads, B, t+1, W / heads)
            self_v = torch.cat([self_v, self._split(h, *value)], 2)
            out, _ = self._attend(layer.self_attn, self._split(h, *query), self_k, self_v)
            x = x + layer.dropout1(out)
            query, _, _ = self._projections(layer.multihead_attn)
            out, weights = self._attend(layer.multihead_attn, self._split(layer.norm2(x), *query), cross_k, cross_v)
            x = x + layer.dropout2(out)
            h = layer.norm3(x)
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))
            new_state += [self_k, self_v, cross_k, cross_v]
        return self.norm(x[:, 0]), tuple(new_state), weights[:, :, 0]

    def step(self, tokens: torch.Tensor, state: TransformerState) -> tuple[torch.Tensor, TransformerState]:
        """Log-probabilities of the next word given the previous one; tokens (B,) -> (B, V)."""
        hidden, state, _ = self._step(tokens, state)
        return torch.log_softmax(self.head(hidden), dim=-1), state

    @torch.inference_mode()
    def attention(self, regions: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Weights (B, T-1, R) over the regions behind each word of `captions` (<start> w1 .. <end>):
        the last layer's cross-attention, averaged over its heads, as the decoding steps saw it."""
        state, weights = self.init_state(regions), []
        for t in range(captions.size(1) - 1):
            _, state, w = self._step(captions[:, t], state)
            weights.append(w.mean(0))  # (B, R)
        return torch.stack(weights, 1)

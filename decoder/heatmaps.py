"""Why the attention decoder said each word: its weights over the photo's regions, as pictures.

    python cli.py caption photos/ --attention heatmaps/      # one PNG per photo

`word_attention` gives, for a caption already chosen (by beam search, re-ranking...), the weights
the decoder put on each region when it produced each word: the caption is read again with
teacher forcing, which reproduces the decoding steps exactly. An ensemble's weights are the mean
of its members'. `draw_attention` writes the photo as the CNN saw it (the centre crop, or the
whole resize for a full-view store), then one panel per word with its weights upsampled over it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from decoder.ensemble import Ensemble
from featurize.crops import CropPolicy
from store.files import safe_write
from store.text import Vocabulary

COLUMNS = 5


def word_attention(model: torch.nn.Module, vocab: Vocabulary, regions: torch.Tensor, captions: list[str]) -> list:
    """Per photo, one list of R weights per word of its caption; regions (B, R, D)."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    out = []
    for region, caption in zip(regions, captions, strict=True):
        words = caption.split()
        ids = torch.tensor([[vocab.start_id, *vocab.encode(words), vocab.end_id]])
        weights = torch.stack([m.attention(region[None], ids)[0] for m in members]).mean(0)  # (T-1, R)
        out.append(weights[: len(words)].tolist())
    return out


def seen_picture(photo: Image.Image, policy: CropPolicy, full_view: bool) -> Image.Image:
    """The pixels the CNN's map covers: the centre crop of the resize, or the whole resize."""
    resized = Image.fromarray(policy.resized(photo).permute(1, 2, 0).numpy())
    return resized if full_view else resized.crop(policy.center_box())


def draw_attention(picture: Image.Image, words: list[str], weights: list[list[float]], path: Path) -> Path:
    """PNG at `path`: the picture, then each word over its weights (bright = looked at).

    Each panel is scaled to its own maximum, so a word that spreads its attention still shows
    where the most of it went; the title gives that maximum's share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(round(math.sqrt(len(weights[0])))) if weights else 1
    panels = len(words) + 1
    rows = -(-panels // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(2.4 * COLUMNS, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("photo", fontsize=10)
    for ax, word, w in zip(axes.flat[1:], words, weights, strict=False):
        grid = np.asarray(w, dtype=np.float32).reshape(side, side)
        heat = Image.fromarray(grid / max(grid.max(), 1e-12) * 255).convert("L").resize(picture.size, Image.BILINEAR)
        ax.imshow(picture)
        ax.imshow(np.asarray(heat), cmap="inferno", alpha=0.6, vmin=0, vmax=255)
        ax.set_title(f"{word} ({grid.max():.2f})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with safe_write(path) as f:
        fig.savefig(f, format="png", dpi=72)
    plt.close(fig)
    return path

"""Why the attention decoder said each word: its weights over the photo's regions, as pictures.

    python cli.py caption photos/ --attention heatmaps/      # one PNG per photo

The weights come with the captions (decoder/caption_photos.py `word_attention`). `draw_attention`
writes the photo as the CNN saw it (the centre crop, or the whole resize for a full-view store),
then one panel per word with its weights upsampled over it; `write_heatmaps` does that for every
captioned photo, and makes the small per-word heat maps of the HTML report as it goes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from decoder.caption_photos import CaptionResult
from decoder.inference import Inputs, LoadedCaptioner, Photo, crop_policy
from evaluation.report import word_heatmaps
from featurize.crops import CropPolicy
from store.files import safe_write
from store.images import ImageError, open_image

COLUMNS = 5


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


def write_heatmaps(
    loaded: LoadedCaptioner,
    photos: list[Photo],
    results: list[CaptionResult],
    outdir: Path,
    base,
    strips: dict[int, list[tuple[str, str]]] | None = None,
):
    """One PNG per captioned photo under `outdir` (OUTDIR/<path under base>.png; photo<i>.png for
    an image given in memory); the paths written. With `strips` (a dict to fill), also the small
    heat map of each word of photos[i] for the HTML page, in strips[i]
    (evaluation.report.word_heatmaps): one picture at a time, so that a large folder never holds
    them all."""
    policy, full_view = crop_policy(loaded.state), Inputs.of(loaded.state).full_view
    written = []
    for i, (photo, result) in enumerate(zip(photos, results, strict=True)):
        if result.attention is None:
            continue
        try:
            img = photo if not isinstance(photo, Path) else open_image(photo)
        except ImageError:  # changed since it was captioned: the caption stands, the picture is skipped
            continue
        name = Path(photo).relative_to(base).as_posix() + ".png" if isinstance(photo, Path) else f"photo{i}.png"
        picture = seen_picture(img, policy, full_view)
        written.append(draw_attention(picture, result.caption.split(), result.attention, Path(outdir) / name))
        if strips is not None:
            strips[i] = word_heatmaps(picture, result.caption.split(), result.attention)
    return written

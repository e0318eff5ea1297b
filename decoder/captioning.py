"""`caption DIR`: describe every image under a folder (or one image file).

    python cli.py caption photos/ --beam 3 --format csv --out captions.csv

Images are decoded and cropped in DataLoader workers and encoded in batches; a file that cannot
be read is reported with its reason and the others are still captioned.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from decoder.captioners import reads_maps
from decoder.heatmaps import draw_attention, seen_picture, word_attention
from decoder.inference import Inputs, LoadedCaptioner, Photo, crop_policy, encode_photos, generate
from decoder.report import word_heatmaps
from store.errors import UserError
from store.images import IMAGE_EXTENSIONS, ImageError, open_image


@dataclass
class CaptionResult:
    image: str
    caption: str | None = None
    error: str | None = None
    attention: list[list[float]] | None = None  # per word, its weights over the map's regions


def find_images(target: Path) -> list[Path]:
    """Image files under `target` (recursive, sorted), or `target` itself when it is a file."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise UserError(f"{target}: no such file or directory")
    return sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())


def caption_images(
    loaded: LoadedCaptioner,
    paths: list[Photo],
    beam: int = 3,
    alpha: float = 0.0,
    tta: bool = False,
    batch_size: int = 16,
    workers: int = 2,
    rerank: int = 0,
    candidates: int = 5,
    prior_penalty: float = 0.0,
    attention: bool = False,
) -> list[CaptionResult]:
    """Every photo's caption or error; with `attention` (attention decoder only), also the weights
    behind each word."""
    if attention and not reads_maps(loaded.model.config):
        raise UserError(
            f"{loaded.path} is a pooled decoder: attention maps need a run trained with --decoder attention"
        )
    features, errors = encode_photos(loaded, paths, tta=tta, batch_size=batch_size, workers=workers)
    order = sorted(features)
    inputs = _stack(features, order) if order else None
    sentences = (
        generate(loaded, inputs, beam, alpha, rerank=rerank, candidates=candidates, prior_penalty=prior_penalty)
        if order
        else []
    )
    weights = word_attention(loaded.model, loaded.vocab, inputs, sentences) if attention and order else []
    by_index = dict(zip(order, sentences, strict=True))
    weights_of = dict(zip(order, weights, strict=False))
    return [
        CaptionResult(str(p), caption=by_index.get(i), error=errors.get(i), attention=weights_of.get(i))
        for i, p in enumerate(paths)
    ]


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
    heat map of each word of photos[i] for the HTML page, in strips[i] (decoder.report.word_heatmaps):
    one picture at a time, so that a large folder never holds them all."""
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


def _stack(features: dict, order: list[int]):
    import torch

    return torch.stack([features[i] for i in order])


def format_results(results: list[CaptionResult], fmt: str) -> str:
    """CSV (image, caption, error) or JSON ([{"image", "caption"} or {"image", "error"}]; with
    attention, "attention": one list of region weights per word of the caption)."""
    if fmt == "json":
        rows = [
            {"image": r.image, "caption": r.caption, **({"attention": r.attention} if r.attention is not None else {})}
            if r.error is None
            else {"image": r.image, "error": r.error}
            for r in results
        ]
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["image", "caption", "error"])
        for r in results:
            writer.writerow([r.image, r.caption or "", r.error or ""])
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt}")

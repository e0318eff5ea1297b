"""`caption DIR`: describe every image under a folder (or one image file).

    python cli.py caption photos/ --beam 3 --format csv --out captions.csv

Images are decoded and cropped in DataLoader workers and encoded in batches; a file that cannot
be read is reported with its reason and the others are still captioned.

With `attention`, each caption also carries the weights the decoder put on each region when it
produced each word (`word_attention`): the attention decoder's, or the transformer's last-layer
cross-attention averaged over its heads; evaluation/heatmaps.py draws them.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from decoder.ensemble import Ensemble
from decoder.factory import reads_maps
from decoder.inference import LoadedCaptioner, Photo, encode_photos, generate
from store.errors import UserError
from store.images import IMAGE_EXTENSIONS
from store.text import Vocabulary


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
    """Every photo's caption or error; with `attention` (a decoder of maps: attention, transformer),
    also the weights behind each word."""
    if attention and not reads_maps(loaded.model.config):
        raise UserError(
            f"{loaded.path} is a pooled decoder: attention maps need a run trained with --decoder attention "
            "or --decoder transformer"
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


def word_attention(model: torch.nn.Module, vocab: Vocabulary, regions: torch.Tensor, captions: list[str]) -> list:
    """Per photo, one list of R weights per word of its caption; regions (B, R, D).

    The captions are already chosen (by beam search, re-ranking...), so each is read again with
    teacher forcing, which reproduces the decoding steps exactly. An ensemble's weights are the
    mean of its members'."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    out = []
    for region, caption in zip(regions, captions, strict=True):
        words = caption.split()
        ids = torch.tensor([[vocab.start_id, *vocab.encode(words), vocab.end_id]])
        weights = torch.stack([m.attention(region[None], ids)[0] for m in members]).mean(0)  # (T-1, R)
        out.append(weights[: len(words)].tolist())
    return out


def _stack(features: dict, order: list[int]):
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

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

from decoder.inference import LoadedCaptioner, Photo, encode_photos, generate
from store.errors import UserError
from store.images import IMAGE_EXTENSIONS


@dataclass
class CaptionResult:
    image: str
    caption: str | None = None
    error: str | None = None


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
) -> list[CaptionResult]:
    features, errors = encode_photos(loaded, paths, tta=tta, batch_size=batch_size, workers=workers)
    order = sorted(features)
    sentences = (
        generate(loaded, _stack(features, order), beam=beam, alpha=alpha, rerank=rerank, candidates=candidates)
        if order
        else []
    )
    by_index = dict(zip(order, sentences, strict=True))
    return [CaptionResult(str(p), caption=by_index.get(i), error=errors.get(i)) for i, p in enumerate(paths)]


def _stack(features: dict, order: list[int]):
    import torch

    return torch.stack([features[i] for i in order])


def format_results(results: list[CaptionResult], fmt: str) -> str:
    """CSV (image, caption, error) or JSON ([{"image", "caption"} or {"image", "error"}])."""
    if fmt == "json":
        rows = [
            {"image": r.image, "caption": r.caption} if r.error is None else {"image": r.image, "error": r.error}
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

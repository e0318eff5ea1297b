"""The HTML report of `evaluate --report` and `caption --report`: one page to look at the captions.

    python cli.py evaluate runs/<run> --split test --report    # -> RUNDIR/eval/test.html
    python cli.py caption photos/ --report photos.html

A table of scores says how good a model is on average, not which photos it gets wrong or why. The
page shows every photo as a small thumbnail beside its generated caption and, for a labelled
split, its references and its own CIDEr-D, sorted worst first, with a text filter; above them the
scores and the run's loss plots. It is one self-contained file (images are base64 data inside it),
so it opens from disk with no server and can be sent or attached as it is. When the captions carry
the attention decoder's weights (`caption --report FILE --attention DIR`), each caption has a strip
of small heat maps under it, one per word: where the decoder looked when it said that word.

Safety: file names, captions, references and error messages come from the user's data, and all of
them are written as HTML text through html.escape. None of them goes inside the page's only
<script>, which reads nothing but the rows' numeric data-* attributes and their text. A
Content-Security-Policy allows that one script and the one style sheet by their hashes and images
only as data: URIs, so even a mistake in the escaping could neither run code nor load anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from decoder.cider import CiderD
from store.files import atomic_write_bytes
from store.images import ImageError, open_image
from store.rundir import RunDir
from store.text import normalize_caption

if TYPE_CHECKING:  # decoder/caption_photos.py imports torch, which building a page does not need
    from decoder.caption_photos import CaptionResult

THUMBNAIL_SIDE = 128  # pixels, the longer side; with JPEG quality 70 a thumbnail is 3-6 KB
HEATMAP_SIDE = 64  # a word's heat map, as the page shows it (about 1.5 KB)
HEAT_ALPHA = 0.6  # the heat's share of each pixel, over the photo (as evaluation/heatmaps.py draws it)
JPEG_QUALITY = 70


@dataclass
class ReportRow:
    """One photo of the page."""

    name: str  # what the page calls it: the manifest id, or the path under the captioned folder
    photo: Path | None  # the file its thumbnail is made from (None: no thumbnail)
    caption: str | None = None
    error: str | None = None  # why there is no caption
    references: list[str] = field(default_factory=list)
    cider: float | None = None  # this photo's CIDEr-D against its references
    # For each generated word, the word and its heat map over the photo as a data: URI
    # (word_heatmaps); the page shows them under the caption. Empty: no strip.
    attention: list[tuple[str, str]] = field(default_factory=list)


def per_image_cider(references: list[list[str]], hypotheses: list[str]) -> list[float]:
    """Each hypothesis's CIDEr-D against its own references, the document frequencies coming from
    all the references given, as pycocoevalcap computes them; the corpus CIDEr-D is their mean.

    Captions are tokenised as evaluation/metrics.py does without Java (an empty one scores as a lone
    unknown word), so without Java the mean equals `evaluate`'s CIDEr-D; with Java, `evaluate` uses
    the PTB tokenizer, which can differ on punctuation and <unk>."""
    refs = [[normalize_caption(c) for c in rs] for rs in references]
    hyps = [normalize_caption(h) or "<unk>" for h in hypotheses]
    cider = CiderD(refs)
    return [float(cider.score([h], cider.references(r))[0]) for h, r in zip(hyps, refs, strict=True)]


def image_data_uri(img: Image.Image, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG of `img` (longer side at most `side`) as a data: URI for an <img src>."""
    small = img.convert("RGB")
    small.thumbnail((side, side))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def word_heatmaps(picture: Image.Image, words: list[str], weights: list[list[float]]) -> list[tuple[str, str]]:
    """(word, data: URI) for each word: `picture` (the pixels the CNN's map covers) with the word's
    weights over its R = side x side regions, as evaluation/heatmaps.py draws a panel: upsampled
    bilinearly, scaled to the word's own maximum, in matplotlib's inferno (bright = looked at)."""
    import numpy as np
    from matplotlib import colormaps

    small = picture.convert("RGB")
    small.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
    base = np.asarray(small, dtype=np.float32)
    inferno = colormaps["inferno"]
    out = []
    for word, w in zip(words, weights, strict=True):
        grid = np.asarray(w, dtype=np.float32)
        side = int(round(len(grid) ** 0.5))
        grid = grid.reshape(side, side) / max(float(grid.max()), 1e-12)
        heat = Image.fromarray(np.uint8(np.clip(grid, 0, 1) * 255)).resize(small.size, Image.BILINEAR)
        colour = inferno(np.asarray(heat, dtype=np.float32) / 255)[..., :3] * 255
        mixed = (1 - HEAT_ALPHA) * base + HEAT_ALPHA * colour
        out.append((word, image_data_uri(Image.fromarray(np.uint8(np.round(mixed))), HEATMAP_SIDE)))
    return out


def thumbnail(photo: Path) -> str | None:
    """The thumbnail of an image file as a data: URI, or None when it cannot be read."""
    try:
        return image_data_uri(open_image(photo))
    except ImageError:
        return None


def run_plots(run: RunDir) -> list[tuple[str, str]]:
    """(label, data: URI) of RUNDIR/plots/*.png, and of each ensemble member's plots."""
    sources = [("", run)] + [(f"member {i + 1}: ", m) for i, m in enumerate(run.members())]
    return [
        (label + png.name, "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii"))
        for label, where in sources
        for png in sorted(where.plots.glob("*.png"))
    ]


def saved_scores(run: RunDir) -> list[tuple[str, dict[str, float]]]:
    """The evaluations a run keeps (RUNDIR/eval/<split>.json, and <split>+<other>.json of the run
    decoded with others), labelled with what was evaluated."""
    out = []
    for path in sorted(run.eval.glob("*.json")):
        try:
            result = json.loads(path.read_text())
            members = len(result["members"]) if "members" in result else 1  # from before "members": one name
            what = f"{members} members" if members > 1 else Path(result["checkpoint"]).name
            if path.stem != result["split"]:
                what += f" ({path.name})"
            label = f"{result['split']} split, {what} (epoch {result['epoch']})"
            out.append((f"{label}, {decoding_text(result)}", dict(result["scores"])))
        except (OSError, ValueError, KeyError, TypeError):  # not an evaluation file: nothing to show
            continue
    return out


def decoding_text(settings: dict) -> str:
    """'beam 3, alpha 0.0, centre crop' and the re-ranking, from evaluate's result or caption's options."""
    crops = "mean of the crops" if settings["tta"] else "centre crop"
    text = f"beam {settings['beam']}, alpha {settings['alpha']}, {crops}"
    if settings.get("rerank"):
        text += f", re-ranked among {settings['candidates']} by {settings['rerank']} neighbours"
    if settings.get("prior_penalty"):
        text += f", prior penalty {settings['prior_penalty']}"
    return text


def evaluation_report(result: dict, run: RunDir, model: str) -> str:
    """The page of evaluation.evaluate.evaluate_run's result: every photo of the split with its references.
    `model` names what was evaluated (a checkpoint file, or an ensemble run and its size)."""
    pairs = result["captions"]  # [(manifest Record, generated caption)]
    ciders = per_image_cider([r.captions for r, _ in pairs], [h for _, h in pairs])
    rows = [
        ReportRow(r.id, Path(r.path), h, references=list(r.captions), cider=c)
        for (r, h), c in zip(pairs, ciders, strict=True)
    ]
    details = {
        "model": f"{model}, epoch {result['epoch']}, {result['phase']} phase",
        "photos": str(result["images"]),
        "decoding": decoding_text(result),
    }
    mean = 100 * sum(ciders) / len(ciders)
    notes = [
        *result["notes"],
        f"CIDEr-D per photo (last column): against its own references, captions tokenised as without Java; "
        f"their mean is {mean:.1f}",
    ]
    return render(
        rows,
        title=f"{result['split']} split of {run.name}",
        details=details,
        scores=[(f"{result['split']} split, x100", result["scores"])],
        notes=notes,
        plots=run_plots(run),
    )


def caption_report(
    results: list[CaptionResult],
    base: Path,
    run: RunDir,
    details: dict[str, str],
    heatmaps: dict[int, list[tuple[str, str]]] | None = None,
) -> str:
    """The page of `caption`: unlabelled photos (named by their path under `base`), and the scores
    the run keeps from its evaluations. `heatmaps`: {i: word_heatmaps of results[i]}, shown under
    those captions (evaluation.heatmaps.write_heatmaps makes them)."""
    heatmaps = heatmaps or {}
    rows = [
        ReportRow(
            str(Path(r.image).relative_to(base)), Path(r.image), r.caption, error=r.error, attention=heatmaps.get(i, [])
        )
        for i, r in enumerate(results)
    ]
    return render(
        rows,
        title=f"{len(rows)} photos captioned by {run.name}",
        details=details,
        scores=[(label + ", x100", s) for label, s in saved_scores(run)],
        notes=[],
        plots=run_plots(run),
    )


def write_report(path: Path, page: str) -> Path:
    """Writes the page whole or not at all (store/files.py): an interrupted run never leaves half a
    page that looks complete."""
    atomic_write_bytes(path, page.encode("utf-8"))
    return Path(path)


def render(
    rows: list[ReportRow],
    *,
    title: str,
    details: dict[str, str],
    scores: list[tuple[str, dict[str, float]]],
    notes: list[str],
    plots: list[tuple[str, str]],
) -> str:
    """The whole page. Every argument may hold user data: it is escaped here, nowhere else."""
    scored = any(r.cider is not None for r in rows)
    csp = (
        f"default-src 'none'; img-src data:; script-src '{_sha256(SCRIPT)}'; style-src '{_sha256(STYLE)}'; "
        "base-uri 'none'; form-action 'none'"
    )
    sort_options = [("worst", "CIDEr-D, worst first"), ("best", "CIDEr-D, best first")] if scored else []
    sort_options += [("name", "name"), ("caption", "caption")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">',
        f"<title>légende: {_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in details.items()) + "</dl>",
        *(_scores_table(label, s) for label, s in scores),
        *(f'<p class="note">{_e(n)}</p>' for n in notes),
    ]
    if plots:
        figures = "".join(
            f'<figure><img class="plot" src="{_e(uri)}" alt="{_e(label)}"><figcaption>{_e(label)}</figcaption></figure>'
            for label, uri in plots
        )
        parts.append(f'<section class="plots">{figures}</section>')
    options = "".join(f'<option value="{v}">{_e(text)}</option>' for v, text in sort_options)
    parts += [
        '<p class="controls"><label>sort <select id="sort">' + options + "</select></label> "
        '<label>filter <input id="filter" type="search" placeholder="words of a name, caption or reference">'
        '</label> <span id="count"></span></p>',
        '<table id="photos"><thead><tr><th>photo</th><th>name</th><th>caption</th>'
        + ("<th>references</th><th>CIDEr-D x100</th>" if scored else "")
        + "</tr></thead><tbody>",
        *(_row(i, r, scored) for i, r in enumerate(rows)),
        f"</tbody></table><script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _row(index: int, row: ReportRow, scored: bool) -> str:
    data = f' data-index="{index}"' + (f' data-cider="{row.cider:.6f}"' if row.cider is not None else "")
    uri = thumbnail(row.photo) if row.photo is not None else None
    photo = f'<img class="thumb" src="{_e(uri)}" alt="{_e(row.name)}">' if uri else '<span class="none">no image</span>'
    if row.error is not None:
        caption = f'<span class="error">{_e(row.error)}</span>'
    else:
        caption = _e(row.caption or "")
    if row.attention:
        caption += '<div class="attention">' + "".join(
            f'<figure><img class="heat" src="{_e(uri)}" alt="{_e(word)}"><figcaption>{_e(word)}</figcaption></figure>'
            for word, uri in row.attention
        )
        caption += "</div>"
    cells = [f'<td class="photo">{photo}</td>', f'<td class="name">{_e(row.name)}</td>']
    cells.append(f'<td class="caption">{caption}</td>')
    if scored:
        refs = "".join(f"<li>{_e(ref)}</li>" for ref in row.references)
        cells.append(f'<td class="references"><ol>{refs}</ol></td>')
        cells.append(f'<td class="cider">{"" if row.cider is None else f"{100 * row.cider:.1f}"}</td>')
    return f"<tr{data}>{''.join(cells)}</tr>"


def _scores_table(label: str, scores: dict[str, float]) -> str:
    head = "".join(f"<th>{_e(name)}</th>" for name in scores)
    values = "".join(f"<td>{100 * v:.1f}</td>" for v in scores.values())
    return f'<table class="scores"><caption>{_e(label)}</caption><tr>{head}</tr><tr>{values}</tr></table>'


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _sha256(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
dd { margin: 0; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
table.scores td { text-align: right; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.3em; }
.note { color: #666; margin: 0.2em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plot { max-width: 420px; }
figure { margin: 0; }
.thumb { display: block; max-width: 128px; max-height: 128px; }
.attention { display: flex; flex-wrap: wrap; gap: 0.3em; margin-top: 0.4em; }
.attention img { width: 64px; }
.attention figcaption { text-align: center; font-size: 12px; }
.error { color: #b00; }
.none { color: #999; }
td.cider { text-align: right; font-variant-numeric: tabular-nums; }
ol { margin: 0; padding-left: 1.4em; }
.controls input { width: 22em; }
"""

# Reorders and hides rows; reads only the rows' data-index and data-cider numbers and their text.
SCRIPT = """
"use strict";
(() => {
  const body = document.querySelector("#photos tbody");
  const rows = Array.from(body.rows);
  const sort = document.getElementById("sort");
  const filter = document.getElementById("filter");
  const count = document.getElementById("count");
  const index = (r) => Number(r.dataset.index);
  const cider = (r, missing) => ("cider" in r.dataset ? Number(r.dataset.cider) : missing);
  const text = (r, cell) => r.querySelector(cell).textContent;
  const orders = {
    worst: (a, b) => cider(a, Infinity) - cider(b, Infinity) || index(a) - index(b),
    best: (a, b) => cider(b, -Infinity) - cider(a, -Infinity) || index(a) - index(b),
    name: (a, b) => text(a, ".name").localeCompare(text(b, ".name")) || index(a) - index(b),
    caption: (a, b) => text(a, ".caption").localeCompare(text(b, ".caption")) || index(a) - index(b),
  };
  function show() {
    const query = filter.value.trim().toLowerCase();
    let shown = 0;
    rows.sort(orders[sort.value]);
    for (const r of rows) {
      r.hidden = query !== "" && !r.textContent.toLowerCase().includes(query);
      shown += r.hidden ? 0 : 1;
      body.appendChild(r);
    }
    count.textContent = `${shown} of ${rows.length} photos`;
  }
  sort.addEventListener("change", show);
  filter.addEventListener("input", show);
  show();
})();
"""

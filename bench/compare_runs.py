"""Several trained runs side by side on one split, each paired with the first on the same photos.

    python cli.py evaluate RUN_A --split val; python cli.py evaluate RUN_B --split val
    python bench/compare_runs.py RUN_A RUN_B --split val --names attention,transformer

Reads what `evaluate` wrote (RUN/eval/<split>.json and <split>_captions.csv), so each run is
scored with the decoding it was evaluated with. The table gives `evaluate`'s scores, CIDEr-D with
a bootstrap standard error over photos (per-photo scores on légende's tokenisation), the paired
CIDEr-D difference to the first run (bootstrap over the per-photo differences) and the diversity
columns. The runs must have captioned the same
photos; refusing otherwise keeps a pairing honest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale import read_eval_captions  # noqa: E402
from evaluation.metrics import bootstrap_se, per_photo_cider  # noqa: E402


def compare(runs: list[Path], names: list[str], split: str) -> str:
    lines = [
        "| run | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | ΔCIDEr-D (paired) | distinct /100 | words used | top 3-gram % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for run, name in zip(runs, names, strict=True):
        result = json.loads((run / "eval" / f"{split}.json").read_text())
        references, captions = read_eval_captions(run, split)
        scores = per_photo_cider(references, captions)
        if base is None:
            base = scores
        if set(scores) != set(base):
            raise SystemExit(f"{run} captioned other photos of {split} than {runs[0]}: cannot pair them")
        cider = np.asarray([scores[k] for k in base])
        delta = cider - np.asarray([base[k] for k in base])
        s, d = result["scores"], result["diversity"]
        cols = [f"{100 * s[m]:.1f}" if m in s else "–" for m in ("BLEU-4", "METEOR", "ROUGE-L")]
        cols += [f"{100 * s['CIDEr-D']:.1f} ± {100 * bootstrap_se(cider):.1f}"]
        cols += [f"{100 * delta.mean():+.1f} ± {100 * bootstrap_se(delta):.1f}"]
        cols += [f"{d['distinct']:.0f}", f"{d['vocabulary']}", f"{d['top_3gram_share']} ({d['top_3gram']})"]
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run folders evaluated on SPLIT; the first is the baseline")
    p.add_argument("--split", default="val")
    p.add_argument("--names", help="comma-separated row names (default: the run folders)")
    a = p.parse_args()
    names = a.names.split(",") if a.names else [str(r) for r in a.runs]
    if len(names) != len(a.runs):
        p.error(f"--names gives {len(names)} names for {len(a.runs)} runs")
    print(compare(a.runs, names, a.split))


if __name__ == "__main__":
    main()

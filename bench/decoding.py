"""How decoding choices trade quality against diversity, on one trained run and split.

    python bench/decoding.py RUNDIR --split val --out data/decoding.json \
        --setting default:beam=3,rerank=30,candidates=5 --setting beam3:beam=3,rerank=0

Each setting decodes the split's photos once with `decoder.inference.generate`; the table gives
CIDEr-D and BLEU-4 (x100), the paired CIDEr-D difference to the first setting with its bootstrap
standard error over photos, and the diversity columns of `evaluation.metrics.diversity`.
Results are written to --out after each setting, and settings already there are not rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoder.inference import generate, load_run  # noqa: E402
from evaluation.evaluate import split_features  # noqa: E402
from evaluation.metrics import diversity  # noqa: E402
from store.manifest import read_manifest  # noqa: E402
from store.text import normalize_caption  # noqa: E402

NUMERIC = {"beam": int, "rerank": int, "candidates": int, "alpha": float, "prior_penalty": float}


def parse_setting(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    opts = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        opts[key] = NUMERIC[key](value)
    return name, opts


def per_photo_scores(refs: dict[str, list[str]], hyps: dict[str, str]) -> tuple[np.ndarray, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [normalize_caption(c) for c in v] for k, v in refs.items()}
    res = {k: [normalize_caption(hyps[k])] for k in refs}
    _, cider = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return np.asarray(cider, dtype=np.float64), float(bleu[3])


def bootstrap_se(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return float(values[idx].mean(1).std())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--split", default="val")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--setting", action="append", required=True, help="NAME:k=v,... of beam alpha rerank candidates prior_penalty"
    )
    a = p.parse_args()
    results = json.loads(a.out.read_text()) if a.out.is_file() else {}
    loaded = load_run(a.run, a.checkpoint)
    workdir = Path(loaded.state["config"]["decoder"]["workdir"])
    records = read_manifest(workdir)
    rows, features = split_features(loaded, records, a.split, tta=False)
    ids = [records[i].id for i in rows]
    refs = {records[i].id: records[i].captions for i in rows}
    base = None
    for spec in a.setting:
        name, opts = parse_setting(spec)
        if name not in results:
            t0 = time.perf_counter()
            hyps = generate(loaded, features, **opts)
            seconds = time.perf_counter() - t0
            captions = dict(zip(ids, hyps, strict=True))
            results[name] = {"opts": opts, "seconds": round(seconds, 1), "captions": captions}
            a.out.write_text(json.dumps(results, indent=1))
        hyps = results[name]["captions"]
        cider, bleu4 = per_photo_scores(refs, hyps)
        base = cider if base is None else base
        div = diversity(hyps)
        print(
            f"| {name} | {100 * cider.mean():.1f} ± {100 * bootstrap_se(cider):.1f} "
            f"| {100 * (cider - base).mean():+.1f} ± {100 * bootstrap_se(cider - base):.1f} | {100 * bleu4:.1f} "
            f"| {div['distinct']} | {div['vocabulary']} | {div['top_3gram_share']} ({div['top_3gram']}) "
            f"| {results[name]['seconds']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

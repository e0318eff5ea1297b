"""How decoding choices trade quality against diversity, on trained runs and a split.

    python bench/decoding.py RUNDIR --split val --out data/decoding \
        --setting default:beam=3,rerank=30,candidates=5 --setting beam3:beam=3,rerank=0

Each setting decodes the split's photos once with `decoder.inference.generate`. For one run, the
table gives CIDEr-D and BLEU-4 (x100), the paired CIDEr-D difference to the first setting, each
with a bootstrap standard error over photos, and the diversity columns of
`evaluation.metrics.diversity`. For several runs (the folds of bench/crossval.py), each column is
the mean ± standard error over the runs. The captions are written to OUT/<i>.json (run i) after
each setting, and settings already there are not decoded again.
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
from evaluation.metrics import bootstrap_se, diversity, per_photo_cider  # noqa: E402
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
    """(CIDEr-D per photo, corpus BLEU-4) on légende's own tokenisation."""
    from pycocoevalcap.bleu.bleu import Bleu

    cider = per_photo_cider(refs, hyps)
    gts = {k: [normalize_caption(c) for c in v] for k, v in refs.items()}
    bleu, _ = Bleu(4).compute_score(gts, {k: [normalize_caption(hyps[k])] for k in refs}, verbose=0)
    return np.asarray([cider[k] for k in refs], dtype=np.float64), float(bleu[3])


def decode(run: Path, checkpoint: Path | None, split: str, settings: list[str], out: Path) -> dict[str, list]:
    """{setting: {"row": [CIDEr-D, ΔCIDEr-D, BLEU-4, distinct, words used, top 3-gram %], "cider": per photo,
    "delta": per photo, "gram": the top 3-gram}}; Δ is to the first setting, on the same photos."""
    results = json.loads(out.read_text()) if out.is_file() else {}
    loaded = load_run(run, checkpoint)
    records = read_manifest(Path(loaded.state["config"]["decoder"]["workdir"]))
    rows, features = split_features(loaded, records, split, tta=False)
    ids, refs = [records[i].id for i in rows], {records[i].id: records[i].captions for i in rows}
    table, base = {}, None
    for spec in settings:
        name, opts = parse_setting(spec)
        if name not in results:
            t0 = time.perf_counter()
            hyps = generate(loaded, features, **opts)
            captions = dict(zip(ids, hyps, strict=True))
            results[name] = {"opts": opts, "seconds": round(time.perf_counter() - t0, 1), "captions": captions}
            out.write_text(json.dumps(results, indent=1))
        cider, bleu4 = per_photo_scores(refs, results[name]["captions"])
        base = cider if base is None else base
        div = diversity(results[name]["captions"])
        row = [100 * cider.mean(), 100 * (cider - base).mean(), 100 * bleu4, div["distinct"], div["vocabulary"]]
        row.append(div["top_3gram_share"])
        table[name] = {"row": row, "cider": cider, "delta": cider - base, "gram": div["top_3gram"]}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run folders; several: the folds of one method")
    p.add_argument("--split", default="val")
    p.add_argument("--checkpoint", type=Path, help="one run: this checkpoint instead of its best.pt")
    p.add_argument("--out", type=Path, required=True, help="folder of the captions, OUT/<i>.json for run i")
    p.add_argument(
        "--setting", action="append", required=True, help="NAME:k=v,... of beam alpha rerank candidates prior_penalty"
    )
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tables = [decode(run, a.checkpoint, a.split, a.setting, a.out / f"{i}.json") for i, run in enumerate(a.runs)]
    print("| setting | CIDEr-D | ΔCIDEr-D | BLEU-4 | distinct /100 | words used | top 3-gram % |")
    print("|---|---|---|---|---|---|---|")
    for name in tables[0]:
        if len(tables) == 1:
            t = tables[0][name]
            cider, delta, bleu4, distinct, words, top = t["row"]
            cols = [f"{cider:.1f} ± {100 * bootstrap_se(t['cider']):.1f}",
                    f"{delta:+.1f} ± {100 * bootstrap_se(t['delta']):.1f}", f"{bleu4:.1f}", f"{distinct}",
                    f"{words}", f"{top} ({t['gram']})"]  # fmt: skip
        else:
            values = np.asarray([t[name]["row"] for t in tables], dtype=np.float64)  # (runs, 6)
            se = values.std(0, ddof=1) / np.sqrt(len(tables))
            cols = [f"{m:.1f} ± {e:.1f}" for m, e in zip(values.mean(0), se, strict=True)]
        print(f"| {name} | " + " | ".join(cols) + " |", flush=True)


if __name__ == "__main__":
    main()

"""How légende's cost grows with the data: the default recipe on N training photos of Flickr8k.

    python bench/scale.py ../shared/flickr8k --out data/scale --sizes 850,2000,6000

DATA is a Flickr8k folder with `captions.txt`, `images/` and `split.csv` (image,split: train and
dev). For each N, the first N photos of a seeded shuffle of the train split (so the smaller sets
are subsets of the larger) and all the dev photos make a split file; then, each step a fresh
process timed from outside:

- `cli.py prepare DATA --split-file` (dev as val), `cli.py featurize` and `cli.py train`, each with
  no other flag: the whole default recipe, as a user runs it;
- one epoch of the pooled decoder on the same store (`train --decoder pooled --epochs 1`);
- `cli.py evaluate RUN --split val` (the dev photos: scores and their diversity);
- `cli.py caption` of 100 dev photos, end to end (model load, CNN, search, re-ranking).

Seconds and peak resident memory of each step go to OUT/scale.json as they come (a step already
there is skipped, so an interrupted bench continues), with the cost table in OUT/scale.md and the
dev scores in OUT/learning.md. The original's end-to-end epoch (Inception forward and backward on
299 crops with the LSTM, batch 32) is timed on a few batches once and scaled to each N's captions.
Everything runs one step at a time: two heavy processes on 2 cores slow each other several times
over.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cli_runner import run_cli  # noqa: E402

CAPTION_PHOTOS = 100


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="Flickr8k folder: captions.txt, images/, split.csv")
    p.add_argument("--out", type=Path, default=Path("data/scale"))
    p.add_argument("--sizes", default="850,2000,6000", help="training photos of each row, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that picks the training photos")
    p.add_argument("--e2e-batches", type=int, default=3, help="batches timed for the original's end-to-end epoch")
    return p


def timed(args: list[str], log: Path) -> dict:
    """Run `python cli.py ARGS` (output appended to `log`): its seconds and peak resident memory (MB)."""
    run = run_cli(*args, log=log)
    return {"seconds": round(run.seconds, 1), "peak_mb": run.peak_mb}


def split_file(data: Path, out: Path, n: int, seed: int) -> Path:
    """OUT/N/split.csv: N train photos (nested across N) and every dev photo."""
    with open(data / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = sorted(r["image"] for r in rows if r["split"] == "train")
    dev = sorted(r["image"] for r in rows if r["split"] in ("dev", "val"))
    if n > len(train):
        raise SystemExit(f"{data} has {len(train)} train photos, fewer than {n}")
    random.Random(seed).shuffle(train)
    path = out / str(n) / "split.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("image,split\n" + "".join(f"{i},train\n" for i in train[:n]) + "".join(f"{i},dev\n" for i in dev))
    return path


def epoch_seconds(run: Path) -> float:
    """Mean training seconds of the run's epochs (validation excluded), from metrics/epochs.csv."""
    with open(run / "metrics" / "epochs.csv", newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f) if r["phase"] == "decoder"]
    return sum(seconds) / len(seconds)


def dev_quality(run: Path) -> dict:
    """Diversity of the run's dev captions (eval/val_captions.csv) and a bootstrap standard error
    of CIDEr-D over photos (per-photo scores with the document frequencies held fixed)."""
    from evaluation.metrics import bootstrap_se, diversity, per_photo_cider

    references, captions = read_eval_captions(run, "val")
    per_photo = list(per_photo_cider(references, captions).values())
    return {"cider_se": round(100 * bootstrap_se(per_photo), 1), **diversity(captions)}


def read_eval_captions(run: Path, split: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(references, captions) by image from `evaluate`'s RUN/eval/<split>_captions.csv."""
    with open(run / "eval" / f"{split}_captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["image"]: r["references"].split(" | ") for r in rows}, {r["image"]: r["caption"] for r in rows}


def train_captions(work: Path) -> int:
    from store.manifest import read_manifest

    return sum(len(r.captions) for r in read_manifest(work) if r.split == "train")


def end_to_end_batch_seconds(work: Path, batches: int) -> float:
    """Seconds per batch of 32 of the original's end-to-end training step (bench/decoder_epoch.py)."""
    from bench.decoder_epoch import end_to_end_batches
    from store.manifest import read_manifest
    from store.text import Vocabulary
    from training import data as D

    records = read_manifest(work)
    vocab = Vocabulary.load(work / "vocab.json")
    import numpy as np

    train = D.build_pairs(records, vocab, "train", np.ones(len(records), bool))
    return end_to_end_batches(records, train, vocab, batches)


def measure(n: int, a: argparse.Namespace, results: dict, save) -> None:
    row = results.setdefault(str(n), {})
    base = a.out.resolve() / str(n)
    work, run, pooled, log = base / "work", base / "run", base / "pooled", base / "log.txt"
    split = split_file(a.data, a.out.resolve(), n, a.seed)
    steps = [
        ("prepare", ["prepare", str(a.data.resolve()), "--split-file", str(split), "--out", str(work)]),
        ("featurize", ["featurize", str(work), "--resume"]),
        ("train", ["train", str(work), "--run", str(run)] if not (run / "checkpoints").exists() else None),
        ("pooled", ["train", str(work), "--run", str(pooled), "--decoder", "pooled", "--epochs", "1"]),
        ("evaluate", ["evaluate", str(run), "--split", "val"]),
    ]
    for name, args in steps:
        if name in row:
            continue
        if args is None:  # an interrupted train: continue it (its seconds are this session's)
            args = ["train", "--run", str(run), "--resume"]
        row[name] = timed(args, log)
        save()
    if "train_epoch_s" not in row:
        row["train_epoch_s"] = round(epoch_seconds(run), 1)
        row["pooled_epoch_s"] = round(epoch_seconds(pooled), 1)
        row["captions"] = train_captions(work)
        row["store_mb"] = round(sum(p.stat().st_size for p in (work / "features").glob("*.h5")) / 2**20)
        scores = json.loads((run / "eval" / "val.json").read_text())["scores"]
        row["dev_scores"] = {k: round(100 * v, 1) for k, v in scores.items()}
        row["dev_quality"] = dev_quality(run)
        save()
    if "caption" not in row:
        photos = base / "caption-photos"
        photos.mkdir(exist_ok=True)
        with open(split, newline="") as f:
            dev = [r["image"] for r in csv.DictReader(f) if r["split"] == "dev"][:CAPTION_PHOTOS]
        for image in dev:
            link = photos / image
            if not link.exists():
                link.symlink_to((a.data / "images" / image).resolve())
        row["caption"] = timed(["caption", str(photos), "--run", str(run), "--format", "csv"], log)
        row["caption"]["photos"] = len(dev)
        save()


def table(results: dict) -> str:
    lines = [
        "| training photos (captions) | prepare s | featurize s | store MB | train s (12 epochs) | attention epoch s "
        "| pooled epoch s | attention / pooled | original e2e epoch s | e2e / attention | peak MB (featurize, train) "
        "| whole recipe | per 1,000 photos | caption photos/s | dev CIDEr-D | dev BLEU-4 |",
        "|" + "---|" * 16,
    ]
    e2e = results.get("e2e_batch_s")
    for n, r in sorted(((int(k), v) for k, v in results.items() if k.isdigit()), key=lambda kv: kv[0]):
        if "train_epoch_s" not in r:
            continue
        recipe = r["prepare"]["seconds"] + r["featurize"]["seconds"] + r["train"]["seconds"]
        e2e_epoch = e2e * -(-r["captions"] // 32) if e2e else None
        cap, scores = r.get("caption"), r["dev_scores"]
        cells = [
            f"{n:,} ({r['captions']:,})",
            f"{r['prepare']['seconds']:.0f}",
            f"{r['featurize']['seconds']:.0f}",
            f"{r['store_mb']:,}",
            f"{r['train']['seconds']:.0f}",
            f"{r['train_epoch_s']:.1f}",
            f"{r['pooled_epoch_s']:.1f}",
            f"{r['train_epoch_s'] / r['pooled_epoch_s']:.1f}×",
            f"{e2e_epoch:,.0f}" if e2e_epoch else "–",
            f"{e2e_epoch / r['train_epoch_s']:.0f}×" if e2e_epoch else "–",
            f"{r['featurize']['peak_mb']:,}, {r['train']['peak_mb']:,}",
            f"{recipe / 60:.1f} min",
            f"{recipe / n * 1000 / 60:.1f} min",
            f"{cap['photos'] / cap['seconds']:.1f}" if cap else "–",
            f"{scores.get('CIDEr-D', float('nan')):.1f} ± {r['dev_quality']['cider_se']:.1f}",
            f"{scores.get('BLEU-4', float('nan')):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def learning_curve(results: dict) -> str:
    """Caption quality on the dev photos against training photos: scores x100 and diversity."""
    lines = [
        "| training photos | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | distinct /100 | words used "
        "| most frequent 3-gram (% of captions) |",
        "|" + "---|" * 9,
    ]
    for n, r in sorted(((int(k), v) for k, v in results.items() if k.isdigit()), key=lambda kv: kv[0]):
        if "dev_quality" not in r:
            continue
        sc, q = r["dev_scores"], r["dev_quality"]
        cells = [f"{n:,}", *(f"{sc.get(m, float('nan')):.1f}" for m in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"))]
        cells += [f"{sc['CIDEr-D']:.1f} ± {q['cider_se']:.1f}", f"{q['distinct']:.0f}", f"{q['vocabulary']}"]
        cells.append(f'"{q["top_3gram"]}" ({q["top_3gram_share"]:.0f})')
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(a: argparse.Namespace) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
        (a.out / "scale.md").write_text(table(results))
        (a.out / "learning.md").write_text(learning_curve(results))

    for n in (int(s) for s in a.sizes.split(",")):
        measure(n, a, results, save)
        if "e2e_batch_s" not in results:
            results["e2e_batch_s"] = round(
                end_to_end_batch_seconds(a.out.resolve() / str(n) / "work", a.e2e_batches), 2
            )
            save()
        print(table(results), learning_curve(results), sep="\n", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

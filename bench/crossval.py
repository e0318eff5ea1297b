"""Caption quality by k-fold cross-validation: every photo is a test photo once, one CNN pass for all.

    python bench/crossval.py ../shared/flickr8k-dev --out data/cv --folds 5 --method retrieval --method defaults
    make crossval DATA=../shared/flickr8k-dev

The dataset is prepared and featurized once (OUT/work). Each fold then gets its own workdir,
OUT/folds/fold<f>/work: the same manifest rows with the fold's photos as `test`, 10% of the others
as `val` (what picks best.pt) and the rest as `train`, a vocabulary from that train split only, and
a link to the one feature store (a store's identity is its images, not their split). Every method
is trained and scored on the same folds, so methods are compared photo for photo.

Methods (--method, repeatable; each adds one row per fold to OUT/crossval.json):
  retrieval        no decoder: the consensus caption of the 30 nearest training photos
  defaults         the baseline of every Δ: the pooled decoder with its defaults (40 epochs, best.pt by
                   val loss), beam 3, no re-ranking: `train` as it was before re-ranking and attention
  NAME:ARGS        any other recipe, e.g. "e20-cider:--epochs 20 --select-by cider" (ARGS go to
                   `cli.py train`); later phases after ';', decoding options after '|':
                   "e20+scst+rerank:--epochs 20 --select-by cider ; --phase scst|rerank=30,candidates=5"

--ensemble "NAME:A,B|DECODING" (repeatable) decodes the runs of methods A and B (given by --method in
the same call, trained first) as one ensemble, e.g. "att+tfm:att-b32,tfm|rerank=30,candidates=5";
its train seconds are the members' sum.

Scores are x100, mean ± standard error over folds; `distinct` is distinct captions per 100 photos.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cli_runner import run_cli  # noqa: E402
from store.features import FeatureStore, find_store  # noqa: E402
from store.manifest import VOCAB_NAME, Record, read_manifest, write_manifest  # noqa: E402
from store.text import Vocabulary  # noqa: E402

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
VAL_SHARE = 0.1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset for `cli.py prepare`")
    p.add_argument("--out", type=Path, default=Path("data/cv"), help="work folder (default: data/cv)")
    p.add_argument("--folds", type=int, default=5, help="k (default: 5)")
    p.add_argument("--only-folds", default=None, help="comma-separated folds to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: 0)")
    p.add_argument("--min-word-count", type=int, default=5, help="vocabulary threshold per fold (default: 5)")
    p.add_argument("--method", action="append", default=[], help="see above (repeatable)")
    p.add_argument("--ensemble", action="append", default=[], help="NAME:A,B|DECODING, see above (repeatable)")
    p.add_argument(
        "--keep-scored",
        action="store_true",
        help="do not score again a method's folds that crossval.json already holds (e.g. to add an --ensemble)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every step")
    p.add_argument(
        "--featurize-args",
        default="",
        help='options of the one `cli.py featurize` run, e.g. "--maps all" for the attention decoder',
    )
    p.add_argument("--baseline", default="defaults", help="method the paired ΔCIDEr-D is taken against")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="score the held-out fold (test), or each fold's validation photos, to choose settings "
        "without looking at the test photos (rows are then named METHOD@val)",
    )
    return p


def fold_of(records: list[Record], folds: int, seed: int) -> dict[str, int]:
    ids = sorted(r.id for r in records)
    random.Random(seed).shuffle(ids)
    return {image: i % folds for i, image in enumerate(ids)}


def fold_workdir(
    out: Path, base: Path, records: list[Record], fold: int, folds: int, seed: int, min_count: int
) -> Path:
    """OUT/folds/fold<f>/work with the fold's splits, its own vocabulary and a link to the store."""
    work = out / "folds" / f"k{folds}-s{seed}" / f"fold{fold}" / "work"
    assign = fold_of(records, folds, seed)
    rest = sorted((r.id for r in records if assign[r.id] != fold), key=lambda i: (hash_of(i, seed), i))
    val = set(rest[: round(VAL_SHARE * len(rest))])
    split = {r.id: "test" if assign[r.id] == fold else "val" if r.id in val else "train" for r in records}
    fold_records = [Record(r.id, r.path, split[r.id], r.captions) for r in records]
    write_manifest(work, fold_records)
    vocab = Vocabulary.build((c.split() for r in fold_records if r.split == "train" for c in r.captions), min_count)
    vocab.save(work / VOCAB_NAME)
    store = find_store(base).resolve()
    link = work / "features" / store.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(store)
    return work


def hash_of(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big")


def centre_features(store: FeatureStore, rows: list[int]) -> np.ndarray:
    return store.read(np.asarray(rows))[:, 0].astype(np.float32)  # (n, D)


def score_rows(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict:
    from evaluation.metrics import diversity, score_captions

    scores, _ = score_captions(references, hypotheses)
    return {**{k: round(100 * v, 2) for k, v in scores.items()}, **diversity(hypotheses)}


def run_retrieval(work: Path, k: int = 30) -> tuple[dict, dict[str, str]]:
    from decoder.consensus import Neighbours, retrieve

    records = read_manifest(work)
    with FeatureStore.open(find_store(work)) as store:
        train = [i for i, r in enumerate(records) if r.split == "train" and store.done[i]]
        test = [i for i, r in enumerate(records) if r.split == "test" and store.done[i]]
        neighbours = Neighbours.from_features(centre_features(store, train), [records[i].captions for i in train])
        queries = centre_features(store, test)
    captions = retrieve(neighbours, queries, k)
    hyps = {records[i].id: c for i, c in zip(test, captions, strict=True)}
    return score_rows({records[i].id: records[i].captions for i in test}, hyps), hyps


def train_recipe(work: Path, phases: list[list[str]], log: Path) -> tuple[Path, float]:
    """(the run after the last phase, train seconds of all phases): each phase trains once, and each
    later phase continues a copy of the run after the phases before it, so recipes sharing a start
    share its training."""
    seconds, previous = 0.0, None
    for i in range(len(phases)):
        key = hashlib.sha256(json.dumps(phases[: i + 1]).encode()).hexdigest()[:10]
        run = work.parent / "runs" / key
        done = run / "bench_seconds.json"
        if not done.exists():
            if previous is not None:
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(previous, run)
                args = ["train", "--run", str(run), *phases[i]]
            else:
                args = ["train", str(work), "--run", str(run), *phases[i]]
            took = run_cli(*args, log=log).seconds
            (run / "bench_recipe.json").write_text(json.dumps(phases[: i + 1]))
            done.write_text(json.dumps({"seconds": took}))
        seconds += json.loads(done.read_text())["seconds"]
        previous = run
    return previous, seconds


def score_runs(runs: list[Path], decode: dict, split: str) -> tuple[dict, dict[str, str]]:
    """(scores x100 and diversity, captions by image) of best.pt of `runs`, one decoder or an ensemble."""
    from decoder.inference import load_ensemble, run_checkpoints
    from evaluation.evaluate import evaluate_run
    from evaluation.metrics import diversity

    loaded = load_ensemble([c for run in runs for c in run_checkpoints(run)])
    result = evaluate_run(loaded, runs[0], split=split, write=False, **decode)
    hyps = {rec.id: hyp for rec, hyp in result["captions"]}
    return {**{k: round(100 * v, 2) for k, v in result["scores"].items()}, **diversity(hyps)}, hyps


def run_recipe(
    work: Path, phases: list[list[str]], decode: dict, log: Path, split: str = "test"
) -> tuple[dict, dict[str, str], float]:
    """Train the phases in turn (train_recipe), then score best.pt on the split."""
    run, seconds = train_recipe(work, phases, log)
    return *score_runs([run], decode, split), seconds


def parse_method(spec: str) -> tuple[str, list[list[str]], dict]:
    """'name:phase 1 args ; phase 2 args|decode' -> (name, [args of each phase], decode options)."""
    if spec == "defaults":
        return "defaults", [["--decoder", "pooled"]], {"beam": 3, "rerank": 0}
    name, _, rest = spec.partition(":")
    train, _, decode = rest.partition("|")
    options = {"beam": 3, "rerank": 0}  # decoding as given, not the evaluate defaults
    for part in filter(None, (s.strip() for s in decode.split(","))):
        key, _, value = part.partition("=")
        options[key] = float(value) if key == "alpha" else True if key == "tta" else int(value)
    return name, [shlex.split(p) for p in train.split(";")], options


def row_name(spec: str, split: str) -> str:
    """The name of a --method's rows in crossval.json."""
    if spec == "retrieval":
        return "retrieval (k=30)"
    return parse_method(spec)[0] + ("@val" if split == "val" else "")


def summarise(rows: list[dict], baseline: str = "defaults") -> str:
    """mean ± standard error over folds, one line per method in the order first run; ΔCIDEr-D is
    the paired difference to the baseline on the same folds (and split), which removes the
    fold-to-fold spread that the methods share."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = (
        "| method | folds | " + " | ".join(METRICS) + f" | ΔCIDEr-D vs {baseline} | distinct /100 | words used "
        "| top 3-gram % | train s / fold |"
    )
    lines = [head, "|" + "---|" * (len(METRICS) + 7)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = [_mean_se([r["scores"][key] for r in rs if key in r["scores"]]) for key in METRICS]
        base = {r["fold"]: r for r in rows if r["method"] == baseline + ("@val" if m.endswith("@val") else "")}
        deltas = [r["scores"]["CIDEr-D"] - base[r["fold"]]["scores"]["CIDEr-D"] for r in rs if r["fold"] in base]
        cells.append(_mean_se(deltas, signed=True))
        cells.append(_mean_se([r["scores"]["distinct"] for r in rs]))
        for key in ("vocabulary", "top_3gram_share"):
            cells.append(_mean_se([r["scores"][key] for r in rs if key in r["scores"]]))
        secs = [r["train_seconds"] for r in rs if not math.isnan(r.get("train_seconds", float("nan")))]
        cells.append(f"{np.mean(secs):.0f}" if secs else "0")
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_se(values: list[float], signed: bool = False) -> str:
    if not values:
        return "–"
    se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):{'+' if signed else ''}.1f} ± {se:.1f}"


def record(rows: list[dict], name: str, fold: int, scores: dict, hyps: dict, train_seconds: float,
           started: float, args: argparse.Namespace, out: Path) -> list[dict]:  # fmt: skip
    """`rows` with this method's row of this fold replacing any earlier one, written to
    OUT/crossval.json and .md as it comes."""
    row = {
        "method": name,
        "fold": fold,
        "folds": args.folds,
        "seed": args.seed,
        "scores": scores,
        "train_seconds": train_seconds,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "examples": dict(list(hyps.items())[:3]),
    }
    rows = [r for r in rows if (r["method"], r["fold"], r["folds"]) != (name, fold, args.folds)] + [row]
    (out / "crossval.json").write_text(json.dumps(rows, indent=1))
    (out / "crossval.md").write_text(summarise(rows, args.baseline))
    print(f"{name} fold {fold}: " + ", ".join(f"{k} {v}" for k, v in scores.items()), flush=True)
    return rows


def main(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["LEGENDE_THREADS"] = str(args.threads)
    log = out / "crossval.log"
    base = out / "work"
    if not (base / "manifest.jsonl").exists():
        run_cli("prepare", args.data, "--out", str(base), log=log)
    run_cli("featurize", str(base), "--resume", *shlex.split(args.featurize_args), log=log)
    records = read_manifest(base)
    results_path = out / "crossval.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    folds = range(args.folds) if not args.only_folds else [int(f) for f in args.only_folds.split(",")]
    for spec in args.method:
        name = row_name(spec, args.split)
        for fold in folds:
            if args.keep_scored and any((r["method"], r["fold"], r["folds"]) == (name, fold, args.folds) for r in rows):
                continue
            work = fold_workdir(out, base, records, fold, args.folds, args.seed, args.min_word_count)
            started = time.perf_counter()
            if spec == "retrieval":
                scores, hyps, train_seconds = *run_retrieval(work), 0.0
            else:
                _, phases, decode = parse_method(spec)
                scores, hyps, train_seconds = run_recipe(work, phases, decode, log, args.split)
            rows = record(rows, name, fold, scores, hyps, train_seconds, started, args, out)
    methods = {name: phases for name, phases, _ in map(parse_method, args.method)}
    for spec in args.ensemble:
        name, rest = spec.split(":", 1)
        members, _, decoding = rest.partition("|")
        _, _, decode = parse_method(f"{name}:|{decoding}")
        name += "@val" if args.split == "val" else ""
        for fold in folds:
            work = fold_workdir(out, base, records, fold, args.folds, args.seed, args.min_word_count)
            started = time.perf_counter()
            trained = [train_recipe(work, methods[m], log) for m in members.split(",")]
            scores, hyps = score_runs([run for run, _ in trained], decode, args.split)
            rows = record(rows, name, fold, scores, hyps, sum(s for _, s in trained), started, args, out)
    print(summarise(rows, args.baseline))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

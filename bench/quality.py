"""Caption quality on real photos: prepare, featurize, decoder phase, evaluate, joint session, evaluate.

    python bench/quality.py DATA [--out DIR] [--quick]
    make quality DATA=../shared/flickr8k-dev

DATA is anything `python cli.py prepare` reads (a folder, Flickr8k's captions.txt, a CSV, parquet;
with --hf, a Hugging Face dataset id). The steps run as the user would run them, through cli.py
in subprocesses; only the scoring of a checkpoint calls the library (evaluation.evaluate.evaluate_run)
so that several decoding settings can be scored on one checkpoint:

    prepare DATA --out OUT/work                          (--min-word-count, columns ...)
    featurize OUT/work --weights google2015 --crops 5 --resume   (an existing store is reused)
    train OUT/work --run OUT/runs/NAME --epochs E --select-by cider  (+ --train-arg options)
    evaluate best.pt on the validation split             (one row per --decode setting)
    train --run OUT/runs/NAME --phase joint --max-minutes M --batch-size 16
    evaluate the joint session's last.pt on the validation split

Every invocation adds its rows to OUT/quality.json (a row with the same configuration is
replaced) and rewrites OUT/quality.md from all rows, so a sweep is a series of invocations with
different --name / --train-arg / --decode / --seed (see the printed commands). Scores are x100.

--quick: 3 decoder epochs, a 1-minute joint session: a smoke test of the whole chain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cli_runner import run_cli  # noqa: E402
from store.rundir import RunDir  # noqa: E402

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset for `cli.py prepare` (folder, captions file, CSV, parquet; an id with --hf)")
    p.add_argument("--out", type=Path, default=Path("data/quality"), help="work folder (default: data/quality)")
    p.add_argument("--quick", action="store_true", help="3 epochs and a 1-minute joint session")
    p.add_argument("--hf", action="store_true", help="DATA is a Hugging Face dataset id")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="prepared workdir (default: OUT/work, or OUT/work-mwcN with --min-word-count N)",
    )
    p.add_argument(
        "--min-word-count", type=int, default=None, help="prepare's --min-word-count (default: prepare's own)"
    )
    p.add_argument("--image-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--crops", type=int, default=5, help="featurize --crops (default: 5)")
    p.add_argument("--weights", default="google2015", help="featurize --weights (default: google2015)")
    p.add_argument("--name", default=None, help="run name under OUT/runs (default: from the options)")
    p.add_argument("--epochs", type=int, default=None, help="decoder epochs (default: 20; --quick: 3)")
    p.add_argument(
        "--select-by", default="cider", choices=["loss", "cider"], help="what picks best.pt (default: cider)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `cli.py train` option, e.g. hidden-size=1024 or image-as=state (repeatable)",
    )
    p.add_argument(
        "--decode",
        action="append",
        default=None,
        metavar="SPEC",
        help="decoding setting to score, e.g. beam=3 or beam=5,alpha=0.7,tta (repeatable; default: beam=3)",
    )
    p.add_argument(
        "--joint-minutes", type=float, default=None, help="joint session length; 0 skips it (default: 8; --quick: 1)"
    )
    p.add_argument("--joint-batch-size", type=int, default=16, help="joint --batch-size (default: 16)")
    p.add_argument(
        "--joint-decode",
        default=None,
        metavar="SPEC",
        help="decoding setting of the joint row (default: the first --decode)",
    )
    p.add_argument("--joint-epochs", type=int, default=None, help="joint --epochs (default: train's own, 1)")
    p.add_argument(
        "--joint-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra joint-phase `cli.py train` option, e.g. lr=3e-5 or unfreeze=Mixed_6a (repeatable)",
    )
    p.add_argument(
        "--joint-resume",
        action="store_true",
        help="continue the run's joint phase (train --resume) instead of starting it: a second session",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of every step (OMP_NUM_THREADS); 1 is steadier on a machine others are using",
    )
    p.add_argument(
        "--keep-run", action="store_true", help="reuse OUT/runs/NAME if it has a decoder best.pt instead of retraining"
    )
    return p


def parse_decode(spec: str) -> dict:
    """'beam=5,alpha=0.7,tta' -> {'beam': 5, 'alpha': 0.7, 'tta': True}."""
    out = {"beam": 3, "alpha": 0.0, "tta": False}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = part.partition("=")
        if key in ("tta", "center"):
            out["tta"] = key == "tta"
        elif key == "beam":
            out["beam"] = int(value)
        elif key == "alpha":
            out["alpha"] = float(value)
        else:
            raise SystemExit(f"--decode {spec!r}: unknown key {key!r} (beam=, alpha=, tta, center)")
    return out


def decode_label(d: dict) -> str:
    return f"beam {d['beam']}, alpha {d['alpha']:g}, {'TTA' if d['tta'] else 'centre'}"


def score(checkpoint: Path, decode: dict) -> tuple[dict, float, dict]:
    """(scores x100, seconds, raw result) of a checkpoint on the validation split."""
    from decoder.inference import load_captioner
    from evaluation.evaluate import evaluate_run

    started = time.perf_counter()
    loaded = load_captioner(checkpoint)
    result = evaluate_run(loaded, checkpoint.parent.parent, split="val", write=False, **decode)
    seconds = time.perf_counter() - started
    return {k: round(100 * v, 2) for k, v in result["scores"].items()}, seconds, result


def epochs_summary(run_dir: Path) -> dict:
    """Decoder-phase epoch curve: best val CIDEr (greedy) and its epoch, seconds per epoch."""
    from store.runlog import read_rows

    rows = [r for r in read_rows(RunDir(run_dir).epochs_csv) if r["phase"] == "decoder"]
    if not rows:
        return {}
    out = {
        "epochs": len(rows),
        "s_per_epoch": round(sum(float(r["seconds"]) for r in rows) / len(rows), 2),
        "min_val_loss": min(float(r["val_loss"]) for r in rows),
        "min_val_loss_epoch": min(rows, key=lambda r: float(r["val_loss"]))["epoch"],
    }
    cider = [(float(r["val_cider"]), int(r["epoch"])) for r in rows if r.get("val_cider")]
    if cider:
        best = max(cider)
        out.update(
            best_greedy_cider=round(100 * best[0], 2),
            best_epoch=best[1],
            greedy_cider_curve=[round(100 * c, 1) for c, _ in cider],
        )
    return out


def reuse_store(workdir: Path, out: Path, weights: str, crops: int) -> None:
    """Hard-link a finished store of another workdir under OUT whose manifest is byte-identical.

    The manifest does not depend on --min-word-count (only vocab.json does), so workdirs prepared
    from the same data with another vocabulary share one set of features; `featurize --resume`
    then checks the linked store's attributes and finds nothing left to do.
    """
    from store.features import existing_attrs, store_path
    from store.manifest import manifest_sha256

    target = store_path(workdir, weights)
    if target.exists() or existing_attrs(target):
        return
    sha = manifest_sha256(workdir)
    for other in sorted(out.glob("*/features/" + target.name)):
        attrs = existing_attrs(other) or {}
        if (
            other.parent.parent != workdir
            and attrs.get("manifest_sha256") == sha
            and int(attrs.get("num_crops", -1)) == crops
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.hardlink_to(other)
            except OSError:
                shutil.copy2(other, target)
            print(f"reusing {other} (same manifest) as {target}", flush=True)
            return


def write_tables(out: Path, rows: list[dict]) -> str:
    head = "| configuration | " + " | ".join(METRICS) + " | train s | eval s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for r in rows:
        s = r["scores"]
        cells = [f"{s[m]:.1f}" if m in s else "–" for m in METRICS]
        lines.append(
            f"| {r['config']} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        )
    steps = ["", "| step | seconds |", "|---|---|"]
    seen = {}
    for r in rows:
        for k, v in r.get("steps", {}).items():
            seen[k] = v
    steps += [f"| {k} | {v:.0f} |" for k, v in seen.items()]
    md = (
        "Validation split, scores x100 (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D); train s = seconds of the "
        "training step that made the checkpoint, eval s = seconds to caption and score the split.\n\n"
        + "\n".join(lines)
        + "\n"
        + "\n".join(steps)
        + "\n"
    )
    (out / "quality.md").write_text(md)
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    return md


def cli_options(items: list[str], flag: str) -> list[str]:
    """KEY=VALUE items -> ["--KEY", "VALUE", ...] for a cli.py command line."""
    args = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {item!r}: expected KEY=VALUE")
        args += [f"--{key.lstrip('-')}", value]
    return args


def options_label(args: list[str]) -> str:
    """["--KEY", "VALUE", ...] -> "KEY=VALUE ...", as rows and run names show them."""
    return " ".join(f"{k.lstrip('-')}={v}" for k, v in zip(args[::2], args[1::2], strict=True))


def main() -> None:
    a = get_args_parser().parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the cli.py steps
        import torch

        torch.set_num_threads(a.threads)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quality.log"
    epochs = a.epochs or (3 if a.quick else 20)
    joint_minutes = a.joint_minutes if a.joint_minutes is not None else (1.0 if a.quick else 8.0)
    if a.joint_resume and not a.keep_run:
        raise SystemExit("--joint-resume continues a run: add --keep-run (and --name of that run)")
    decodes = [parse_decode(s) for s in (a.decode or ["beam=3"])]
    joint_decode = parse_decode(a.joint_decode) if a.joint_decode else decodes[0]
    workdir = a.workdir or (out / (f"work-mwc{a.min_word_count}" if a.min_word_count is not None else "work"))
    train_args, joint_extra = cli_options(a.train_arg, "--train-arg"), cli_options(a.joint_arg, "--joint-arg")
    options, joint_options = options_label(train_args), options_label(joint_extra)
    name = a.name or "-".join(
        filter(
            None,
            [
                "decoder",
                options.replace(" ", "-").replace("=", ""),
                f"mwc{a.min_word_count}" if a.min_word_count is not None else "",
                f"e{epochs}",
                f"seed{a.seed}",
            ],
        )
    )
    run_dir = out / "runs" / name
    steps: dict[str, float] = {}

    # 1. prepare (fast, deterministic: the same manifest keeps the feature store valid) and featurize
    prep = ["prepare", *(["--hf", a.data] if a.hf else [a.data]), "--out", str(workdir)]
    for opt, val in (
        ("--min-word-count", a.min_word_count),
        ("--image-column", a.image_column),
        ("--caption-column", a.caption_column),
    ):
        if val is not None:
            prep += [opt, str(val)]
    steps[f"prepare {workdir.name}"] = run_cli(*prep, log=log).seconds
    reuse_store(workdir, out, a.weights, a.crops)
    steps[f"featurize {workdir.name} ({a.weights}, K={a.crops}, --resume)"] = run_cli(
        "featurize", str(workdir), "--weights", a.weights, "--crops", str(a.crops), "--resume", log=log
    ).seconds

    # 2. decoder phase
    best = RunDir(run_dir).best
    if a.keep_run and best.exists():
        train_seconds = (
            json.loads((run_dir / "bench_train.json").read_text())["seconds"]
            if (run_dir / "bench_train.json").exists()
            else 0.0
        )
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        train_seconds = run_cli(
            "train",
            str(workdir),
            "--run",
            str(run_dir),
            "--epochs",
            str(epochs),
            "--select-by",
            a.select_by,
            "--seed",
            str(a.seed),
            "--weights",
            a.weights,
            *train_args,
            log=log,
        ).seconds
        (run_dir / "bench_train.json").write_text(json.dumps({"seconds": train_seconds}))
    steps[f"train decoder {name}"] = train_seconds
    curve = epochs_summary(run_dir)
    base = f"{options or 'defaults'}; {workdir.name}; seed {a.seed}; {epochs} ep"

    new_rows = []
    # a resumed joint session's run holds a joint best.pt now: its decoder rows stand as first scored
    for d in [] if a.joint_resume else decodes:
        scores, secs, result = score(best, d)
        config = f"decoder [{base}] best ep {result['epoch']}; {decode_label(d)}"
        steps[f"evaluate {name} {decode_label(d)}"] = secs
        new_rows.append(
            {
                "config": config,
                "run": str(run_dir),
                "phase": "decoder",
                "seed": a.seed,
                "options": options,
                "workdir": str(workdir),
                "epochs": epochs,
                "best_epoch": result["epoch"],
                "decode": d,
                "scores": scores,
                "train_seconds": train_seconds,
                "eval_seconds": secs,
                "curve": curve,
                "examples": [[r.path, h, r.captions[0]] for r, h in result["captions"][:8]],
            }
        )
        print(f"{config}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()), flush=True)

    # 3. joint session from the decoder's best.pt, then its last.pt on the validation split
    if joint_minutes > 0:
        joint_args = ["--batch-size", str(a.joint_batch_size), *joint_extra] + (
            ["--epochs", str(a.joint_epochs)] if a.joint_epochs else []
        )
        joint_seconds = run_cli(
            "train",
            "--run",
            str(run_dir),
            "--phase",
            "joint",
            "--max-minutes",
            f"{joint_minutes:g}",
            *joint_args,
            *(["--resume"] if a.joint_resume else []),
            log=log,
        ).seconds
        steps[f"train joint {name} ({joint_minutes:g} min{', resumed' if a.joint_resume else ''})"] = joint_seconds
        import torch

        from store.runlog import read_rows

        last = RunDir(run_dir).last
        state = torch.load(last, map_location="cpu", weights_only=True)
        batches = sum(r["phase"] == "joint" for r in read_rows(RunDir(run_dir).batches_csv))
        in_epoch = state.get("batch_in_epoch", 0)
        joint_epochs = [r for r in read_rows(RunDir(run_dir).epochs_csv) if r["phase"] == "joint"]
        if in_epoch:  # stopped mid-epoch: the checkpoint times the epoch so far
            s_per_batch = state["epoch_seconds"] / in_epoch
        elif joint_epochs:  # stopped at an epoch end: that epoch's time over its batches
            s_per_batch = float(joint_epochs[-1]["seconds"]) / (batches / len(joint_epochs))
        else:
            s_per_batch = joint_seconds / max(batches, 1)
        scores, secs, result = score(last, joint_decode)
        steps[f"evaluate joint {name} {decode_label(joint_decode)}"] = secs
        # batches counts every joint session of the run, so a resumed session's row says where it stands
        config = (
            f"joint [{base}{'; ' + joint_options if joint_options else ''}] +{joint_minutes:g} min"
            f"{' resumed' if a.joint_resume else ''}, {batches} batches of {a.joint_batch_size}, "
            f"{s_per_batch:.2f} s/batch; {decode_label(joint_decode)}"
        )
        new_rows.append(
            {
                "config": config,
                "run": str(run_dir),
                "phase": "joint",
                "seed": a.seed,
                "options": options,
                "workdir": str(workdir),
                "epochs": epochs,
                "decode": joint_decode,
                "joint_minutes": joint_minutes,
                "joint_options": joint_options,
                "joint_batches": batches,
                "s_per_batch": round(s_per_batch, 3),
                "scores": scores,
                "train_seconds": joint_seconds,
                "eval_seconds": secs,
                "examples": [[r.path, h, r.captions[0]] for r, h in result["captions"][:8]],
            }
        )
        print(f"{config}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()), flush=True)

    old = json.loads((out / "quality.json").read_text()) if (out / "quality.json").exists() else []
    keys = {r["config"] for r in new_rows}
    rows = [r for r in old if r["config"] not in keys] + new_rows
    for r in new_rows:
        r["steps"] = steps
    print(write_tables(out, rows))
    if curve:
        print(f"decoder epochs: {curve}")
    print(f"wrote {out / 'quality.md'} and {out / 'quality.json'}; command log in {log}")


if __name__ == "__main__":
    main()

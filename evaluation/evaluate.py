"""Score a run's captions on a split against all references of each image.

    python cli.py evaluate runs/<run> --split test --beam 3

Decoder-phase runs read the cached features (the centre crop, or the mean of the K crops with
--tta); joint-phase runs re-encode the images with their fine-tuned CNN. Writes
RUNDIR/eval/<split>.json (scores and settings) and RUNDIR/eval/<split>_captions.csv; with other
runs joined (`evaluate RUN --with OTHER`), <split>+<other>.json and <split>+<other>_captions.csv.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from decoder.factory import check_store_serves, reads_maps
from decoder.inference import LoadedCaptioner, centre_inputs, check_tta, encode_photos, generate
from evaluation.metrics import diversity, score_captions
from store.errors import UserError
from store.features import FeatureStore, check_store_matches
from store.files import atomic_write_bytes
from store.manifest import Record, read_manifest
from store.rundir import RunDir


def split_features(
    loaded: LoadedCaptioner, records: list[Record], split: str, tta: bool, workers: int = 2
) -> tuple[list[int], torch.Tensor]:
    """(manifest rows, features (n, D), or regions (n, R, D) for the attention decoder) of the
    split's images that have features."""
    check_tta(loaded.state, tta)
    decoder_cfg = loaded.state["config"]["decoder"]
    rows = [i for i, r in enumerate(records) if r.split == split]
    if "encoder" in loaded.state:  # joint phase: the cached features are from the CNN before fine-tuning
        feats, _ = encode_photos(loaded, [Path(records[i].path) for i in rows], tta=tta, workers=workers)
        kept = [rows[j] for j in sorted(feats)]
        return kept, torch.stack([feats[j] for j in sorted(feats)]) if kept else torch.zeros(0)
    with FeatureStore.open(Path(decoder_cfg["store"])) as store:
        check_store_matches(store, loaded.state["store"], f"checkpoint {loaded.path}")
        check_store_serves(store, loaded.state["config"]["model"], f"checkpoint {loaded.path}", loaded.state["store"])
        done = np.asarray(store.done, dtype=bool)
        kept = [i for i in rows if done[i]]
        if not kept:
            return [], torch.zeros(0)
        maps = reads_maps(loaded.state["config"]["model"])
        if not tta:
            return kept, centre_inputs(store, kept, maps)
        block = store.read_maps(np.asarray(kept)) if maps else store.read(np.asarray(kept))  # (n, K[m], ...)
        return kept, torch.from_numpy(block.astype(np.float32).mean(1))


def evaluate_run(
    loaded: LoadedCaptioner,
    run_dir: Path,
    split: str = "test",
    beam: int = 3,
    alpha: float = 0.0,
    tta: bool = False,
    workdir: Path | None = None,
    write: bool = True,
    rerank: int = 0,
    candidates: int = 5,
    prior_penalty: float = 0.0,
    joined: Sequence[Path] = (),
) -> dict:
    """Scores of `loaded` on `split`; also writes the eval files when `write`, under names that
    list the `joined` runs or checkpoints when other runs' decoders joined the run's own
    (RunDir.eval_json)."""
    workdir = Path(workdir or loaded.state["config"]["decoder"]["workdir"])
    records = read_manifest(workdir)
    rows, features = split_features(loaded, records, split, tta)
    if not rows:
        raise UserError(f"{workdir} has no {split} images with features to evaluate")
    hypotheses = generate(
        loaded, features, beam=beam, alpha=alpha, rerank=rerank, candidates=candidates, prior_penalty=prior_penalty
    )
    ids = [records[i].id for i in rows]
    scores, notes = score_captions(
        {k: records[i].captions for k, i in zip(ids, rows, strict=True)}, dict(zip(ids, hypotheses, strict=True))
    )
    result = {
        "split": split,
        "images": len(rows),
        "beam": beam,
        "alpha": alpha,
        "tta": tta,
        "rerank": rerank,
        "candidates": candidates if rerank else None,
        "prior_penalty": prior_penalty,
        "checkpoint": str(loaded.path),
        "members": [str(p) for p in loaded.checkpoints],  # every decoder that voted, in order
        "epoch": loaded.state["epoch"],
        "phase": loaded.state["phase"],
        "scores": scores,
        "diversity": diversity(dict(zip(ids, hypotheses, strict=True))),
        "notes": notes,
    }
    if write:
        run = RunDir(run_dir)
        atomic_write_bytes(run.eval_json(split, joined), json.dumps(result, indent=2).encode())
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["image", "caption", "references"])
        for i, hyp in zip(rows, hypotheses, strict=True):
            writer.writerow([records[i].path, hyp, " | ".join(records[i].captions)])
        atomic_write_bytes(run.eval_captions(split, joined), buf.getvalue().encode())
    result["captions"] = list(zip([records[i] for i in rows], hypotheses, strict=True))
    return result

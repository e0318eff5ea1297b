"""Per-photo CIDEr-D, its bootstrap standard error, and bench/compare_runs.py's pairing of two runs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.metrics import bootstrap_se, per_photo_cider, score_captions

ROOT = Path(__file__).resolve().parent.parent
REFS = {
    "a.jpg": ["a dog runs on the grass", "a brown dog running in a field"],
    "b.jpg": ["two children play in the sand", "kids playing at the beach"],
    "c.jpg": ["a man rides a bike down the street", "a cyclist on a city road"],
    "d.jpg": ["a woman sits on a bench", "a lady sitting on a park bench"],
}
GOOD = {"a.jpg": "a dog runs in a field", "b.jpg": "two kids play in the sand", "c.jpg": "a man rides a bike",
        "d.jpg": "a woman sits on a bench"}  # fmt: skip
BAD = {"a.jpg": "a man in a red shirt", "b.jpg": "a man in a red shirt", "c.jpg": "a man rides a bike",
       "d.jpg": "a man in a red shirt"}  # fmt: skip


def test_per_photo_cider_averages_to_the_corpus_score():
    per_photo = per_photo_cider(REFS, GOOD)
    corpus, _ = score_captions(REFS, GOOD, use_java=False)
    assert list(per_photo) == list(REFS)
    assert np.mean(list(per_photo.values())) == pytest.approx(corpus["CIDEr-D"], abs=1e-9)
    assert per_photo["d.jpg"] > per_photo["a.jpg"] > 0


def test_bootstrap_se_matches_the_standard_error_of_a_mean():
    values = np.random.default_rng(1).normal(size=400)
    assert bootstrap_se(np.full(50, 3.0)) == 0.0
    assert bootstrap_se(values, resamples=4000) == pytest.approx(values.std() / np.sqrt(400), rel=0.1)


def _evaluated_run(root: Path, captions: dict[str, str], cider: float) -> Path:
    (root / "eval").mkdir(parents=True)
    scores = {"BLEU-4": 0.2, "ROUGE-L": 0.4, "CIDEr-D": cider}
    diversity = {"distinct": 100.0, "vocabulary": 9, "top_3gram_share": 25.0, "top_3gram": "a man rides"}
    (root / "eval" / "val.json").write_text(json.dumps({"scores": scores, "diversity": diversity}))
    with open(root / "eval" / "val_captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "references"])
        for image, caption in captions.items():
            w.writerow([image, caption, " | ".join(REFS[image])])
    return root


def test_compare_runs_pairs_the_same_photos_and_refuses_others(tmp_path):
    good = _evaluated_run(tmp_path / "good", GOOD, 1.5)
    bad = _evaluated_run(tmp_path / "bad", BAD, 0.3)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_runs.py"), str(good), str(bad), "--names", "good,bad"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.stdout.splitlines()[2:]}
    delta = 100 * (
        np.mean(list(per_photo_cider(REFS, BAD).values())) - np.mean(list(per_photo_cider(REFS, GOOD).values()))
    )
    assert rows["good"][4].startswith("150.0 ± ") and rows["good"][5].startswith("+0.0 ± 0.0")
    assert rows["bad"][5].startswith(f"{delta:+.1f} ± ") and delta < -50

    fewer = _evaluated_run(tmp_path / "fewer", {k: GOOD[k] for k in ("a.jpg", "b.jpg")}, 1.0)
    refused = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_runs.py"), str(good), str(fewer)], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "captioned other photos of val" in refused.stderr

"""`python cli.py prepare` killed with SIGKILL at several points, over the outputs of an earlier
run on an older version of the same dataset, then rerun.

What must hold after every kill: each of manifest.jsonl, vocab.json and prepare_report.json is
whole, either the older run's file or the new one byte for byte (never half a file), and they
are never mixed the wrong way round (the report is moved in last, so a new report means a new
manifest and vocabulary). After the final uninterrupted rerun: the three files are
byte-identical to an uninterrupted run's, and nothing else is left in WORKDIR.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from store.manifest import MANIFEST_NAME, REPORT_NAME, VOCAB_NAME

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (MANIFEST_NAME, VOCAB_NAME, REPORT_NAME)


def command(data: Path, work: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "prepare",
        str(data),
        "--out",
        str(work),
        "--min-word-count",
        "2",
        "--seed",
        "5",
    ]


def run_to_completion(data: Path, work: Path) -> tuple[dict[str, bytes], float]:
    start = time.perf_counter()
    result = subprocess.run(command(data, work), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: (work / name).read_bytes() for name in OUTPUTS}, time.perf_counter() - start


def write_dataset(data: Path, version: int) -> None:
    """Same folder and file names for both versions; version 2 has more captions per image."""
    rows = ["image,caption"]
    for i in range(300):
        for j in range(version):
            rows.append(
                f"images/{i:03d}.jpg,a small {['red', 'blue', 'green'][i % 3]} square number {i % 40} seen {j} times"
            )
    rows += ["images/missing.jpg,a ghost", "images/000.jpg,kettle kettle kettle"]
    (data / "captions.csv").write_text("\n".join(rows) + "\n")


def kill_at(data: Path, work: Path, delay: float | None) -> None:
    """Start prepare and SIGKILL it after `delay` seconds, or (None) the moment its staging
    folder appears, that is while it writes its outputs."""
    process = subprocess.Popen(command(data, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if delay is None:
            deadline = time.monotonic() + 60
            while not any(p.name.startswith(".prepare.tmp") for p in os.scandir(work)):
                if process.poll() is not None or time.monotonic() > deadline:
                    return
        else:
            time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_kill_9_during_prepare_then_rerun_gives_identical_outputs(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    for i in range(300):
        path = data / "images" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((192, 192), 40 + i % 50).convert("RGB").save(path, quality=90)

    write_dataset(data, 2)
    new, seconds = run_to_completion(data, work)  # the uninterrupted run, for comparison
    write_dataset(data, 1)
    old, _ = run_to_completion(data, work)  # WORKDIR now holds an older version's outputs
    assert all(old[name] != new[name] for name in OUTPUTS)

    write_dataset(data, 2)
    rng = random.Random(0)
    # mostly in the second half of a run: the first is Python starting and importing
    kill_points = [None] + [rng.uniform(0.3, 1.1) * seconds for _ in range(5)]
    staging_left, outcomes = 0, []
    for delay in kill_points:
        before = {p.name for p in work.iterdir()}
        for _ in range(5):  # on a busy machine the writing may finish before the kill lands
            kill_at(data, work, delay)
            if delay is not None or {p.name for p in work.iterdir()} - before - set(OUTPUTS):
                break
            for name in OUTPUTS:
                (work / name).write_bytes(old[name])
        state = {}
        for name in OUTPUTS:
            current = (work / name).read_bytes()
            assert current in (old[name], new[name]), f"{name} is neither whole version"
            state[name] = "new" if current == new[name] else "old"
        if state[REPORT_NAME] == "new":
            assert state == dict.fromkeys(OUTPUTS, "new")
        if state[MANIFEST_NAME] == "old":
            assert state == dict.fromkeys(OUTPUTS, "old")
        others = {p.name for p in work.iterdir()} - set(OUTPUTS)
        assert all(name.startswith(".prepare.tmp") for name in others), others
        staging_left += bool(others - before)
        outcomes.append((delay and round(delay, 2), state[MANIFEST_NAME], bool(others - before)))
        if state[REPORT_NAME] == "new":  # the kill came after the run had finished: start over
            for name in OUTPUTS:
                (work / name).write_bytes(old[name])
    assert staging_left >= 1  # the kill while writing left its (ignored) staging folder
    print(f"run {seconds:.2f} s; kills (delay, outputs, staging left): {outcomes}")

    final, _ = run_to_completion(data, work)
    assert final == new
    assert sorted(p.name for p in work.iterdir()) == sorted(OUTPUTS)
    report = json.loads(final[REPORT_NAME])
    assert [e["rule"] for e in report["dropped_images"]] == ["missing"]

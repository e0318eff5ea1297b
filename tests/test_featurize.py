"""featurize end to end: the store it writes, unreadable images, resume, and kill -9 at any moment.

In-process runs use small crops (96 -> 80 px, the least Inception v3 accepts is 75) and the
seeded random network, so a run takes a fraction of a second; the SIGKILL test drives the real
CLI at the default 299 px with one image per chunk.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from featurize import pipeline
from featurize.crops import CropPolicy
from featurize.encoder import build_inception
from featurize.pipeline import encode, featurize, prepare_for_inference, resolve_precision, timed_precision
from store.errors import UserError
from store.features import FeatureStore
from store.manifest import Record, write_manifest

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "weights": "none",
    "resize": 96,
    "crop_size": 80,
    "num_crops": 3,
    "workers": 0,
    "batch_size": 4,
    "precision": "fp32",
    "maps": "none",
}


def make_dataset(folder: Path, n: int, bad: tuple[int, ...] = ()) -> Path:
    """n small images (rows in `bad` are corrupt files) and a manifest in folder/work."""
    records = []
    for i in range(n):
        path = folder / "images" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in bad:
            path.write_bytes(b"\x89PNG truncated")
        else:
            y, x = np.mgrid[0:48, 0:64]
            rgb = np.stack([(x * (i + 3)) % 256, (y * 5 + 40 * i) % 256, (x + y + 17 * i) % 256], -1)
            Image.fromarray(rgb.astype(np.uint8)).save(path)
        records.append(Record(id=f"{i:03d}", path=str(path), split="train", captions=["a thing"]))
    work = folder / "work"
    write_manifest(work, records)
    return work


def read_store(path: Path) -> dict:
    with FeatureStore.open(path) as s:
        maps = s.read_maps(slice(None)) if s.maps_crops else None
        return {
            "features": s.read(slice(None)),
            "done": s.done,
            "boxes": s.boxes,
            "failed": s.failed,
            "attrs": s.attrs,
            "maps": maps,
        }


def test_featurize_writes_the_store_and_reports_unreadable_images(tmp_path):
    work = make_dataset(tmp_path, 5, bad=(3,))
    console = Console(record=True, width=200)
    path = featurize(work, chunk_rows=2, console=console, **SMALL)
    assert path == work / "features" / "inception_v3-none.h5"
    got = read_store(path)
    assert got["features"].shape == (5, 3, 2048) and got["features"].dtype == np.float16
    assert got["done"].tolist() == [True, True, True, False, True]
    assert "cannot decode" in got["failed"][3] and not got["features"][3].any()
    policy = CropPolicy(resize=96, crop=80, num_crops=3)
    assert got["boxes"][1].tolist() == [list(b) for b in policy.boxes(1)]
    assert got["attrs"]["precision"] == "fp32" and got["attrs"]["resize"] == 96
    text = console.export_text()
    assert "1 image(s) could not be read" in text and "003.png: cannot decode" in text and "crops/s" in text

    # the stored vectors are the encoder's output on the policy's crops
    net = prepare_for_inference(build_inception("none"))
    crops = policy.crops(Image.open(tmp_path / "images" / "001.png"), row=1)  # (3, 3, 80, 80)
    want = encode(net, crops, batch_size=4, precision="fp32").numpy()  # (3, 2048)
    np.testing.assert_allclose(got["features"][1].astype(np.float32), want, rtol=2e-3, atol=1e-4)


def test_decoding_in_worker_processes_gives_the_same_bits(tmp_path):
    work = make_dataset(tmp_path, 4)
    serial = read_store(featurize(work, chunk_rows=2, **SMALL))["features"]
    parallel = read_store(featurize(work, chunk_rows=2, overwrite=True, **{**SMALL, "workers": 2}))["features"]
    assert np.array_equal(serial, parallel)


def test_resume_never_recomputes_done_rows(tmp_path, monkeypatch):
    work = make_dataset(tmp_path, 6)
    reference = read_store(featurize(work, chunk_rows=2, **SMALL))["features"]
    shutil.rmtree(work / "features")

    real_write = pipeline.StoreWriter.write_chunk
    calls = []

    def dies_after_two_chunks(self, chunk, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(chunk.rows.tolist())
        real_write(self, chunk, *args)

    monkeypatch.setattr(pipeline.StoreWriter, "write_chunk", dies_after_two_chunks)
    with pytest.raises(UserError, match="interrupted.*--resume"):
        featurize(work, chunk_rows=2, **SMALL)
    monkeypatch.setattr(pipeline.StoreWriter, "write_chunk", real_write)

    encoded = []
    real_encode = pipeline.encode
    monkeypatch.setattr(
        pipeline, "encode", lambda net, crops, *a: encoded.append(len(crops)) or real_encode(net, crops, *a)
    )
    path = featurize(work, chunk_rows=2, resume=True, **SMALL)
    assert calls == [[0, 1], [2, 3]] and encoded == [2 * 3]  # only rows 4 and 5, 3 crops each
    assert np.array_equal(read_store(path)["features"], reference)


def test_settings_that_differ_from_the_store_are_named(tmp_path):
    work = make_dataset(tmp_path, 2)
    featurize(work, **SMALL)
    with pytest.raises(UserError, match="already exists: pass --resume"):
        featurize(work, **SMALL)
    with pytest.raises(UserError) as e:
        featurize(work, resume=True, **{**SMALL, "num_crops": 2}, seed=5)
    assert "num_crops: 3 (store) vs 2 (requested)" in str(e.value) and "seed: 0 (store) vs 5" in str(e.value)


def test_precision_choice(monkeypatch):
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto", previous="bf16") == "bf16"  # a resumed store keeps its own
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_precision("auto") is None  # only timing both can tell
    chosen, rates = timed_precision(prepare_for_inference(build_inception("none")), 80, 2)
    assert chosen in ("fp32", "bf16") and "fp32" in rates and "bf16" in rates and "crops/s" in rates
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(UserError, match="no bfloat16 support"):
        resolve_precision("bf16")


def test_auto_precision_is_timed_and_recorded(tmp_path):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16: auto is fp32 without timing")
    work = make_dataset(tmp_path, 2)
    console = Console(record=True, width=200)
    path = featurize(work, console=console, **{**SMALL, "precision": "auto"})
    attrs = read_store(path)["attrs"]
    assert attrs["precision"] in ("fp32", "bf16") and "crops/s" in attrs["precision_timing"]
    assert f"{attrs['precision']} is faster here" in console.export_text()


def test_encoder_from_needs_a_joint_phase_run(tmp_path):
    with pytest.raises(UserError, match="no joint-phase checkpoint"):
        featurize(make_dataset(tmp_path, 1), encoder_from=tmp_path, **SMALL)


def cli(work: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "featurize",
        str(work),
        "--weights",
        "none",
        "--crops",
        "2",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--chunk-rows",
        "1",
        "--precision",
        "fp32",
        "--maps",
        "none",
        *extra,
    ]


def kill_when(work: Path, shards: int, extra: tuple[str, ...], after_s: float = 0.0) -> None:
    """Start the CLI and SIGKILL it once `after_s` passed and `shards` chunks are on disk."""
    parts = work / "features" / "inception_v3-none.h5.parts"
    proc = subprocess.Popen(cli(work, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after_s)
    while proc.poll() is None and len(list(parts.glob("chunk_*.npz"))) < shards:
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("maps", [(), ("--maps", "all")], ids=["vectors", "maps"])
def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(tmp_path, maps):
    work = make_dataset(tmp_path, 8, bad=(5,))
    reference_work = tmp_path / "reference"
    reference_work.mkdir()
    shutil.copy(work / "manifest.jsonl", reference_work)  # same images, same manifest bytes
    subprocess.run(cli(reference_work, *maps), check=True, capture_output=True)
    reference = read_store(reference_work / "features" / "inception_v3-none.h5")

    kill_when(work, shards=0, extra=maps, after_s=2.5)  # loading libraries and model, or on chunk 0
    kill_when(work, shards=2, extra=("--resume", *maps))  # mid-run, wherever it happens to be
    kill_when(work, shards=5, extra=("--resume", *maps))
    kill_when(work, shards=8, extra=("--resume", *maps))  # while assembling, or just after
    done = subprocess.run(cli(work, "--resume", *maps), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    got = read_store(work / "features" / "inception_v3-none.h5")
    assert np.array_equal(got["features"], reference["features"])  # bit for bit
    if maps:
        assert got["maps"].shape == (8, 2, 64, 2048) and np.array_equal(got["maps"], reference["maps"])
        assert got["maps"][0].any() and not got["maps"][5].any()  # the corrupt image has no map
    assert np.array_equal(got["done"], reference["done"]) and got["failed"].keys() == {5}
    assert np.array_equal(got["boxes"], reference["boxes"])
    assert not (work / "features" / "inception_v3-none.h5.parts").exists()

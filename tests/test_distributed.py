"""torchrun with 2 CPU processes over loopback (gloo): featurize and decoder training."""

import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from store.distributed import process_group, sum_scalar
from store.features import FeatureStore, find_store
from store.rundir import RunDir
from tests.helpers import ROOT, TINY, TINY_TRANSFORMER, run_cli

pytestmark = pytest.mark.slow
NO_DROPOUT = {"pooled": [*TINY, "--dropout", "0"], "transformer": [*TINY_TRANSFORMER, "--dropout", "0"]}


def torchrun(*args, nproc=2):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(ROOT / "cli.py"),
        *map(str, args),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_distributed_featurize_equals_single_process(featurized, tmp_path):
    """Bit-identical to one process running with the same threads per process (torchrun gives each
    rank one OpenMP thread; oneDNN's sums may round differently with another thread count)."""
    single, dist = tmp_path / "single", tmp_path / "dist"
    for work in (single, dist):
        work.mkdir()
        for name in ("manifest.jsonl", "vocab.json"):
            (work / name).write_bytes((featurized / name).read_bytes())
    args = ["--weights", "none", "--crops", 2, "--workers", 0, "--resize", 96, "--crop-size", 80, "--chunk-rows", 4]
    args += ["--precision", "fp32"]  # auto would time each run: both must compute alike
    run_cli("featurize", single, *args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    torchrun("featurize", dist, *args)
    with FeatureStore.open(find_store(single)) as a, FeatureStore.open(find_store(dist)) as b:
        assert b.attrs["manifest_sha256"] == a.attrs["manifest_sha256"]
        assert np.array_equal(b.done, a.done) and b.done.all()
        assert np.array_equal(b.read(slice(None)), a.read(slice(None)))
        assert np.array_equal(b.boxes, a.boxes)
    assert not list((dist / "features").glob("*.parts"))


@pytest.mark.parametrize("decoder", NO_DROPOUT)
def test_distributed_training_follows_the_single_process_trajectory(request, decoder, tmp_path):
    """The transformer's too: label smoothing and the warm-up are per word and per step alike."""
    work = request.getfixturevalue("featurized" if decoder == "pooled" else "mapped")  # the transformer reads maps
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_cli("train", work, "--run", single, "--epochs", 2, *NO_DROPOUT[decoder])
    out = torchrun("train", work, "--run-dir", ddp, "--epochs", 2, *NO_DROPOUT[decoder])
    assert out.stderr.count("done:") == 1  # rank 0 speaks for all

    def losses(run):
        with open(RunDir(run).batches_csv) as f:
            return np.array([float(r["loss"]) for r in csv.DictReader(f)])

    a, b = losses(single), losses(ddp)
    # Same global batches, word-weighted loss: the same steps up to float summation order.
    assert len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-3)
    pa = torch.load(RunDir(single).last, weights_only=True)["model"]
    pb = torch.load(RunDir(ddp).last, weights_only=True)
    assert pb["world_size"] == 2 and len(pb["rng_by_rank"]) == 2
    assert all(torch.allclose(pa[k], pb["model"][k], atol=1e-4) for k in pa)

    # resuming with another world size works, and says what that means
    resumed = run_cli("train", "--run", ddp, "--resume", "--epochs", 3)
    assert "written by 2 process(es), resuming with 1" in resumed.stderr


def _member(rank: int, port: int, fail: bool, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    try:
        with process_group() as ctx:
            total = sum_scalar(ctx, rank + 1)
            if fail:
                raise RuntimeError("a rank failed")
    except RuntimeError:
        pass
    results.put((rank, total, dist.is_initialized()))
    if dist.is_initialized():  # the failing case left it, as it should; leave now to exit cleanly
        dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_process_group_is_left_after_success_and_kept_after_an_error(fail):
    """Leaving on success keeps gloo from aborting the process at exit; after an error another rank
    may be inside a collective, so the group is not destroyed under it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    mp.start_processes(_member, args=(port, fail, results), nprocs=2, start_method="spawn")
    got = sorted(results.get(timeout=60) for _ in range(2))
    assert got == [(0, 3.0, fail), (1, 3.0, fail)]

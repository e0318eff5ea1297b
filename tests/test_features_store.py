"""The feature store on disk: layout, reading, refusing the wrong store, locking, crash safety.

These tests write shards with made-up vectors through `StoreWriter`, without any CNN.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from store.errors import UserError
from store.features import (
    SCHEMA_VERSION,
    Chunk,
    FeatureStore,
    StoreWriter,
    existing_attrs,
    find_store,
    store_path,
)

N, K, D = 7, 2, 8
ROOT = Path(__file__).resolve().parent.parent


def attrs(**changes) -> dict:
    base = {
        "encoder": "inception_v3",
        "weights": "none",
        "weights_sha256": "",
        "resize": 356,
        "crop_size": 299,
        "num_crops": K,
        "seed": 0,
        "flip": False,
        "precision": "fp32",
        "chunk_rows": 3,
        "manifest_sha256": "abc",
        "num_rows": N,
        "dim": D,
        "torch": "x",
    }
    return {**base, **changes}


PATHS = [f"img/{i}.png" for i in range(N)]


def vectors(rows: np.ndarray) -> np.ndarray:
    """float16 (n, K, D) made-up features that identify their row and crop."""
    return (rows[:, None, None] * 100 + np.arange(K)[None, :, None] * 10 + np.arange(D)).astype(np.float16)


def write(writer: StoreWriter, chunk: Chunk, failing: set[int] = frozenset()) -> None:
    n = chunk.rows.size
    feats = vectors(chunk.rows)
    failed = ["cannot decode" if r in failing else "" for r in chunk.rows]
    feats[[bool(f) for f in failed]] = 0
    boxes = np.tile(np.array([28, 28, 327, 327], np.int32), (n, K, 1))
    writer.write_chunk(chunk, feats, boxes, np.zeros((n, K), bool), failed)


def build(path: Path, failing: set[int] = frozenset(), **kw) -> Path:
    with StoreWriter(path, attrs(), PATHS, resume=kw.get("resume", False), overwrite=kw.get("overwrite", False)) as w:
        for chunk in w.todo():
            write(w, chunk, failing)
        return w.finish()


def test_layout_attributes_and_reading(tmp_path):
    path = build(store_path(tmp_path, "none"), failing={4})
    assert path == tmp_path / "features" / "inception_v3-none.h5"
    assert sorted(p.name for p in path.parent.iterdir()) == ["inception_v3-none.h5", "inception_v3-none.h5.lock"]
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float16 and f["features"].shape == (N, K, D)
        assert f["features"].chunks == (3, K, D)
        assert f["boxes"].shape == (N, K, 4) and f["done"].dtype == bool
    with FeatureStore.open(path) as store:
        assert store.attrs["schema_version"] == SCHEMA_VERSION and store.attrs["weights"] == "none"
        assert (store.num_rows, store.num_crops, store.dim, store.chunk_rows) == (N, K, D, 3)
        assert store.paths == PATHS
        assert store.done.tolist() == [True] * 4 + [False] + [True] * 2
        assert store.failed == {4: "cannot decode"}
        rows = np.array([5, 1, 5, 0])
        assert np.array_equal(store.read(rows), vectors(rows))  # any order, repeats
        assert np.array_equal(store.read(slice(0, 2)), vectors(np.arange(2)))
        assert not store.read([4]).any()  # a failed row is zeros


def test_store_path_uses_the_stem_of_a_weights_file(tmp_path):
    assert store_path(tmp_path, "google2015").name == "inception_v3-google2015.h5"
    assert store_path(tmp_path, "/x/runs/best.pt").name == "inception_v3-best.h5"


def test_find_store(tmp_path):
    with pytest.raises(UserError, match="no feature store"):
        find_store(tmp_path)
    path = build(store_path(tmp_path, "none"))
    assert find_store(tmp_path) == path == find_store(tmp_path, "none")
    with pytest.raises(UserError, match="no feature store .*google2015"):
        find_store(tmp_path, "google2015")
    build(store_path(tmp_path, "other"))
    with pytest.raises(UserError, match="several feature stores.*--weights"):
        find_store(tmp_path)


def test_other_settings_are_refused_naming_each_difference(tmp_path):
    path = build(store_path(tmp_path, "none"))
    with pytest.raises(UserError) as e:
        StoreWriter(path, attrs(seed=1, num_crops=5), PATHS, resume=True, overwrite=False)
    message = str(e.value)
    assert "seed: 0 (store) vs 1 (requested)" in message and "num_crops: 2 (store) vs 5 (requested)" in message
    assert "--overwrite" in message and "\n" not in message
    with StoreWriter(path, attrs(seed=1), PATHS, resume=False, overwrite=True) as w:  # rebuilds
        assert len(w.todo()) == 3


def test_an_existing_store_needs_resume_or_overwrite(tmp_path):
    path = build(store_path(tmp_path, "none"))
    with pytest.raises(UserError, match="already exists: pass --resume"):
        StoreWriter(path, attrs(), PATHS, resume=False, overwrite=False)
    with StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False) as w:
        assert w.todo() == []
        assert w.finish() == path  # nothing to assemble


def test_interrupted_run_keeps_finished_chunks_and_resumes(tmp_path):
    path = store_path(tmp_path, "none")
    with StoreWriter(path, attrs(), PATHS, resume=False, overwrite=False) as w:
        write(w, w.todo()[1])  # then the process dies: no .h5 yet
    assert not path.exists() and existing_attrs(path)["seed"] == 0
    with pytest.raises(UserError, match="interrupted run left 1 finished chunks"):
        StoreWriter(path, attrs(), PATHS, resume=False, overwrite=False)
    with pytest.raises(UserError, match="a run was interrupted: add --resume"):
        FeatureStore.open(path)
    with StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False) as w:
        assert [c.index for c in w.todo()] == [0, 2]
    assert np.array_equal(_read_all(build(path, resume=True)), vectors(np.arange(N)))


def test_failed_rows_are_retried_by_resume(tmp_path):
    path = build(store_path(tmp_path, "none"), failing={1, 4})
    with StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False) as w:
        todo = w.todo()
        assert [c.rows.tolist() for c in todo] == [[1], [4]]  # only the failed rows
        for chunk in todo:
            write(w, chunk, failing={4})  # 1 was fixed, 4 is still broken
        w.finish()
    with FeatureStore.open(path) as store:
        assert store.failed == {4: "cannot decode"}
        assert np.array_equal(store.read([1]), vectors(np.array([1])))


def test_kill_during_assembly_or_before_cleanup_is_harmless(tmp_path):
    path = store_path(tmp_path, "none")
    with StoreWriter(path, attrs(), PATHS, resume=False, overwrite=False) as w:
        for chunk in w.todo():
            write(w, chunk)
    parts = path.with_name(path.name + ".parts")
    saved = {p.name: p.read_bytes() for p in parts.iterdir()}
    path.with_name(path.name + ".tmp").write_bytes(b"half an HDF5 file")  # killed mid-assembly
    (parts / "chunk_000001.tmp").write_bytes(b"half a shard")  # killed mid-shard
    want = _read_all(build(path, resume=True))
    parts.mkdir()  # killed after the rename, before the shards were deleted
    for name, data in saved.items():
        (parts / name).write_bytes(data)
    assert np.array_equal(_read_all(build(path, resume=True)), want)
    assert not parts.exists() and not path.with_name(path.name + ".tmp").exists()


def test_a_damaged_shard_is_removed_and_reported(tmp_path):
    path = store_path(tmp_path, "none")
    with StoreWriter(path, attrs(), PATHS, resume=False, overwrite=False) as w:
        for chunk in w.todo():
            write(w, chunk)
        shard = path.with_name(path.name + ".parts") / "chunk_000002.npz"
        shard.write_bytes(shard.read_bytes()[:100])
        with pytest.raises(UserError, match="damaged.*--resume again"):
            w.finish()
    assert not shard.exists() and not path.exists()
    assert np.array_equal(_read_all(build(path, resume=True)), vectors(np.arange(N)))


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = store_path(tmp_path, "none")
    with StoreWriter(path, attrs(), PATHS, resume=False, overwrite=False):
        with pytest.raises(UserError, match=rf"another featurize \(pid {os.getpid()}\) is writing"):
            StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False)
    StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False).close()  # released


def test_the_lock_dies_with_a_sigkilled_holder(tmp_path):
    path = store_path(tmp_path, "none")
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from store.features import _acquire_lock
            _acquire_lock(__import__("pathlib").Path({str(path)!r}))
            print("locked", flush=True)
            time.sleep(60)
        """),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    StoreWriter(path, attrs(), PATHS, resume=True, overwrite=False).close()


def test_unreadable_or_foreign_files_are_user_errors(tmp_path):
    path = store_path(tmp_path, "none")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        FeatureStore.open(path)
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema 99"):
        FeatureStore.open(path)


def _read_all(path: Path) -> np.ndarray:
    with FeatureStore.open(path) as store:
        return store.read(slice(None))

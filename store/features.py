"""The HDF5 feature store: K encoder vectors for every manifest row, and how to build one safely.

    WORKDIR/features/inception_v3-google2015.h5
      features  float16 (N, K, D)   chunked by `chunk_rows` rows; zeros where not done
      paths     utf-8   (N,)        the manifest's image paths; row i = manifest record i
      boxes     int32   (N, K, 4)   crop boxes in the resized image: x0, y0, x1, y1
      flipped   bool    (N, K)      crops that were mirrored (all False unless --flip)
      done      bool    (N,)        the row's features are computed
      failed    utf-8   (N,)        why the image could not be read ("" when it could)
      maps      float16 (N, Km, R, D)  only with `featurize --maps`: the CNN's last feature map of
                                    the first Km crops (Km = 1: the centre crop), R regions each
                                    (8x8 = 64 for a 299 crop), chunked one row per HDF5 chunk
      attrs: schema_version, encoder, weights, weights_sha256, resize, crop_size, num_crops,
             seed, images_sha256, view, flip, precision, chunk_rows, num_rows, dim, maps_crops,
             map_size (IDENTITY_KEYS:
             a store that differs in one of them is another store), and provenance:
             manifest_sha256, weights_path, batch_size, torch, torchvision, h5py, numpy, python
             (stores from before images_sha256 are identified by manifest_sha256 instead)

Schema 2 added `maps`, `maps_crops` (0: no maps), `map_size` (the grid's side) and `view`
("crops": one CNN pass per crop; "full": one pass over the whole resized image, crops pooled from
its map). A schema 1 store reads as a schema 2 store without maps, of view "crops".

How a store is built, so that `kill -9` at any moment loses at most the chunk in flight:

- While a run computes, the .h5 is never open for writing. Each finished chunk of
  `chunk_rows` rows goes to its own shard, `<store>.h5.parts/chunk_000012.npz`, written to a
  temporary name, fsynced and renamed, so a shard is either complete or absent. The parts folder
  starts with `meta.json`, the attributes of the run, checked like the store's own on resume.
- When every chunk is done, the shards (over the previous store, if any) are assembled into
  `<store>.h5.tmp`, which is fsynced and renamed over the store; only then are the shards
  deleted. A kill during assembly leaves the old store and all shards, and assembling again is
  idempotent. A half-written HDF5 file (which HDF5 cannot always reopen) is never the only copy.
- Rows are grouped into chunks by position (rows 0..31, 32..63, ...), and every chunk is
  encoded in the same batches whatever happened before, so a resumed store is bit-identical to
  an uninterrupted one.
- Images that fail to decode are recorded with their reason in `failed` and left not `done`;
  a run tries each of them once, and a later `--resume` tries them again (after a fix, they
  are filled in; otherwise they are reported again).
- A `<store>.h5.lock` file held with `flock` keeps a second writer out; the kernel releases it
  when its holder dies, even by SIGKILL.

Readers use `FeatureStore`, which opens the .h5 read-only; since the file only ever appears
by rename, a reader never sees a half-built store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from store.errors import UserError
from store.files import atomic_write_bytes, commit, safe_write

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
# What the attributes schema 2 added mean where a store (schema 1) or a writer does not give them.
SCHEMA_DEFAULTS = {"schema_version": SCHEMA_VERSION, "view": "crops", "maps_crops": 0, "map_size": 0}
FEATURES_DIR = "features"
# What the features mean: a run records these of the store it trained on, and refuses another store
# that differs (another CNN, other crops, other images).
FEATURE_IDENTITY = (
    "encoder",
    "weights",
    "weights_sha256",
    "num_crops",
    "resize",
    "crop_size",
    "seed",
    "images_sha256",
    "view",
)
# What `featurize --resume` requires of an existing store: the meaning and also how the features were
# computed and laid out. A store disagreeing on any of them is another store.
IDENTITY_KEYS = (
    "schema_version",
    *FEATURE_IDENTITY,
    "flip",
    "precision",
    "chunk_rows",
    "num_rows",
    "dim",
    "maps_crops",
    "map_size",
)


def images_sha256(paths: list[str]) -> str:
    """The identity of a store's rows: its image paths in order. Not the manifest's hash, which
    also covers the split and the captions, so that one store serves every split of its images
    (the folds of a cross-validation, a re-split dataset)."""
    return hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


def store_identity(store: FeatureStore) -> dict:
    """What a checkpoint records of its store: the identity it is checked against, where the CNN's
    weights file is (so `caption` can rebuild the CNN from a PATH source) and the precision the
    features were computed in (so `caption` computes new ones the same way)."""
    attrs = {**store.attrs, "images_sha256": store.images_sha256}
    return {
        **{k: attrs.get(k) for k in FEATURE_IDENTITY},
        "manifest_sha256": attrs.get("manifest_sha256"),
        "weights_path": attrs.get("weights_path", ""),
        "precision": attrs.get("precision", "fp32"),
        "maps_crops": store.maps_crops,  # what an attention decoder was trained on
        "map_size": int(attrs.get("map_size", 0)),
    }


def check_store_matches(store: FeatureStore, expected: dict, what: str) -> None:
    """A run trained on one store refuses another (other CNN, crops or images), naming the difference.

    Checkpoints written before stores had `images_sha256` recorded the manifest's hash instead."""
    have = store_identity(store)
    keys = (
        FEATURE_IDENTITY
        if "images_sha256" in expected
        else (*_without(FEATURE_IDENTITY, "images_sha256"), "manifest_sha256")
    )
    diffs = [
        f"{k}: {what} has {expected.get(k)!r}, store has {have.get(k)!r}"
        for k in keys
        if k in expected and str(expected.get(k)) != str(have.get(k))
    ]
    if diffs:
        raise UserError(f"{store.path} does not match {what} ({'; '.join(diffs)})")


def store_path(workdir: Path, weights: str, encoder: str = "inception_v3") -> Path:
    """WORKDIR/features/<encoder>-<weights>.h5; a weights PATH is named by its file stem."""
    return Path(workdir) / FEATURES_DIR / f"{encoder}-{Path(weights).stem}.h5"


def find_store(workdir: Path, weights: str | None = None) -> Path:
    """The store for `weights`, or the only store in WORKDIR/features when `weights` is None."""
    folder = Path(workdir) / FEATURES_DIR
    if weights is not None:
        path = store_path(workdir, weights)
        if not path.is_file():
            raise UserError(
                f"no feature store {path}{_unfinished_hint(path)}: "
                f"run `python cli.py featurize {workdir} --weights {weights}`"
            )
        return path
    stores = sorted(folder.glob("*.h5"))
    if len(stores) == 1:
        return stores[0]
    if not stores:
        unfinished = sorted(folder.glob("*.h5.parts"))
        hint = f" (an unfinished run left {unfinished[0].name}: add --resume)" if unfinished else ""
        raise UserError(f"no feature store in {folder}{hint}: run `python cli.py featurize {workdir}`")
    names = ", ".join(p.name for p in stores)
    raise UserError(f"several feature stores in {folder} ({names}): choose one with --weights")


def _unfinished_hint(path: Path) -> str:
    return " (a run was interrupted: add --resume)" if _parts_dir(path).is_dir() else ""


class FeatureStore:
    """A finished store, read-only. Use as a context manager, or call `close()`."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = Path(path)
        self._file = file
        self.attrs: dict = upgraded({k: _plain(v) for k, v in file.attrs.items()})
        self.num_rows, self.num_crops, self.dim = file["features"].shape
        self.maps_crops = int(self.attrs["maps_crops"])  # 0: no maps
        self.regions = int(self.attrs["map_size"]) ** 2 if self.maps_crops else 0
        self.chunk_rows = int(self.attrs["chunk_rows"])
        self.paths: list[str] = [p.decode("utf-8") for p in file["paths"][:]]
        self.done: np.ndarray = file["done"][:]  # (N,) bool
        self.boxes: np.ndarray = file["boxes"][:]  # (N, K, 4) int32
        self.flipped: np.ndarray = file["flipped"][:]  # (N, K) bool
        reasons = file["failed"][:]
        self.failed: dict[int, str] = {int(i): reasons[i].decode("utf-8") for i in np.flatnonzero(reasons != b"")}

    @property
    def images_sha256(self) -> str:
        return self.attrs.get("images_sha256") or images_sha256(self.paths)

    @classmethod
    def open(cls, path: Path) -> FeatureStore:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no feature store at {path}{_unfinished_hint(path)}")
        try:
            file = h5py.File(path, "r")
        except OSError as e:
            raise UserError(
                f"{path} is not a readable HDF5 file ({e}): rebuild it with featurize --overwrite"
            ) from None
        version = file.attrs.get("schema_version")
        if version not in READABLE_SCHEMAS or "features" not in file:
            file.close()
            raise UserError(
                f"{path} has store schema {version}, this version reads {', '.join(map(str, READABLE_SCHEMAS))}: "
                "rebuild it with featurize --overwrite"
            )
        return cls(path, file)

    def read(self, rows: np.ndarray | slice) -> np.ndarray:
        """float16 (n, K, D) features of `rows` (any order, repeats allowed); zeros for rows not done."""
        ds = self._file["features"]
        if isinstance(rows, slice):
            return ds[rows]
        rows = np.asarray(rows, dtype=np.int64)
        wanted, inverse = np.unique(rows, return_inverse=True)  # HDF5 wants increasing indices
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= self.num_rows):
            raise IndexError(f"rows outside 0..{self.num_rows - 1}")
        return ds[wanted][inverse.reshape(-1)]

    def read_maps(self, rows: np.ndarray | slice, crops: np.ndarray | None = None) -> np.ndarray:
        """float16 maps of `rows`: (n, Km, R, D), or with `crops` (n,) the (n, R, D) of one crop per
        row. A crop index past the stored maps (a centre-only store) reads the centre crop's map."""
        if not self.maps_crops:
            raise UserError(f"{self.path} has no feature maps: run featurize --maps --overwrite")
        ds = self._file["maps"]
        if isinstance(rows, slice):
            block = ds[rows]
            rows = np.arange(self.num_rows)[rows]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            wanted, inverse = np.unique(rows, return_inverse=True)  # HDF5 wants increasing indices
            block = ds[wanted][inverse.reshape(-1)]
        if crops is None:
            return block
        crops = np.where(np.asarray(crops) < self.maps_crops, crops, 0)
        return block[np.arange(len(rows)), crops]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Chunk:
    """Rows of one chunk still to compute (a subset of index*chunk_rows .. +chunk_rows)."""

    index: int
    rows: np.ndarray  # (n,) int64, increasing


class StoreWriter:
    """Builds or completes one store: a shard per finished chunk, one atomic HDF5 at the end.

    `attrs` must hold every IDENTITY_KEYS entry except schema_version; `paths` are the
    manifest's image paths in order. Holds the store's lock until `close()`. Under torchrun, rank
    0's writer holds the lock and checks the store; the other ranks' (`follower=True`) only write
    the shards of their own chunks, and rank 0 assembles them all.
    """

    def __init__(
        self, path: Path, attrs: dict, paths: list[str], *, resume: bool, overwrite: bool, follower: bool = False
    ) -> None:
        self.path = Path(path)
        self.attrs = {**SCHEMA_DEFAULTS, **attrs}  # a writer that names no view or maps writes neither
        self.maps_crops, self.regions = int(self.attrs["maps_crops"]), int(self.attrs["map_size"]) ** 2
        self.paths = list(paths)
        self.num_rows = len(self.paths)
        self.chunk_rows = int(self.attrs["chunk_rows"])
        self.parts = _parts_dir(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = None
        if follower:  # another rank under torchrun: rank 0 holds the lock and has checked the store
            return
        self._lock = _acquire_lock(self.path)
        try:
            self._prepare(resume=resume, overwrite=overwrite)
        except BaseException:
            self.close()
            raise

    def _prepare(self, *, resume: bool, overwrite: bool) -> None:
        self._tmp_path().unlink(missing_ok=True)  # a kill during an earlier assembly
        if overwrite:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
        existing = [
            (p, a)
            for p, a in ((self.path, _h5_attrs(self.path)), (self.parts, _parts_attrs(self.parts)))
            if a is not None
        ]
        for where, attrs in existing:
            diffs = attr_differences(upgraded(attrs), self.attrs)
            if diffs:
                raise UserError(
                    f"{where} was built with other settings ({'; '.join(diffs)}): pass --overwrite to rebuild it"
                )
        if existing and not resume:
            if self.path.is_file():
                raise UserError(
                    f"{self.path} already exists: pass --resume to complete it, or --overwrite to rebuild it"
                )
            raise UserError(
                f"an interrupted run left {len(list(self._shards()))} finished chunks of {self.path}: "
                "pass --resume to complete it, or --overwrite to start again"
            )
        for stale in self.parts.glob("*.tmp"):  # shards a kill interrupted mid-write
            stale.unlink()

    def todo(self) -> list[Chunk]:
        """Chunks with rows not done in the store and not yet in a shard, in row order."""
        done = np.zeros(self.num_rows, dtype=bool)
        if self.path.is_file():
            with h5py.File(self.path, "r") as f:
                done = f["done"][:]
        finished = {c for c, _ in self._shards()}
        chunks = []
        for index in range(-(-self.num_rows // self.chunk_rows)):
            start = index * self.chunk_rows
            rows = start + np.flatnonzero(~done[start : start + self.chunk_rows])
            if rows.size and index not in finished:
                chunks.append(Chunk(index, rows))
        return chunks

    def write_chunk(
        self,
        chunk: Chunk,
        features: np.ndarray,
        boxes: np.ndarray,
        flipped: np.ndarray,
        failed: list[str],
        maps: np.ndarray | None = None,
    ) -> None:
        """Record one chunk atomically: features float16 (n, K, D) for its rows (zeros where failed),
        and in a store with maps their maps (n, Km, R, D)."""
        n = chunk.rows.size
        assert features.shape[0] == boxes.shape[0] == flipped.shape[0] == len(failed) == n
        assert (maps is None) == (self.maps_crops == 0), "maps go with, and only with, a store of maps"
        extra = {} if maps is None else {"maps": maps.astype(np.float16)}
        if not (self.parts / "meta.json").is_file():  # the run's attributes come before its shards
            self.parts.mkdir(exist_ok=True)
            atomic_write_bytes(self.parts / "meta.json", json.dumps(self.attrs, sort_keys=True, indent=1).encode())
        final = self.parts / f"chunk_{chunk.index:06d}.npz"
        with safe_write(final, tmp=final.with_suffix(".tmp")) as f:
            np.savez(
                f,
                rows=chunk.rows,
                features=features.astype(np.float16),
                boxes=boxes.astype(np.int32),
                flipped=flipped.astype(bool),
                failed=np.asarray(failed, dtype=str).reshape(n),
                **extra,
            )

    def finish(self) -> Path:
        """Assemble store + shards into a new .h5, swap it in atomically, then drop the shards."""
        shards = dict(self._shards())
        if not shards and self.path.is_file():  # nothing new since the store was assembled
            shutil.rmtree(self.parts, ignore_errors=True)
            return self.path
        tmp = self._tmp_path()
        old = h5py.File(self.path, "r") if self.path.is_file() else None
        try:
            with h5py.File(tmp, "w") as out:
                self._assemble(out, old, shards)
        finally:
            if old is not None:
                old.close()
        commit(tmp, self.path)
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.path

    def _assemble(self, out: h5py.File, old: h5py.File | None, shards: dict[int, Path]) -> None:
        n, k, d, c = self.num_rows, int(self.attrs["num_crops"]), int(self.attrs["dim"]), self.chunk_rows
        text = h5py.string_dtype("utf-8")
        feats = out.create_dataset(
            "features", (n, k, d), dtype=np.float16, chunks=(min(c, max(n, 1)), k, d), fillvalue=0
        )
        out.create_dataset("paths", data=np.array(self.paths, dtype=object), dtype=text)
        boxes = out.create_dataset("boxes", (n, k, 4), dtype=np.int32)
        flipped = out.create_dataset("flipped", (n, k), dtype=bool)
        done = out.create_dataset("done", (n,), dtype=bool)
        failed = out.create_dataset("failed", (n,), dtype=text)
        km, r = self.maps_crops, self.regions
        names = ("features", "boxes", "flipped", "done", "failed", *(("maps",) if km else ()))
        if km:
            maps = out.create_dataset("maps", (n, km, r, d), dtype=np.float16, chunks=(1, km, r, d), fillvalue=0)
        for index in range(-(-n // c)):
            rows = slice(index * c, min(n, (index + 1) * c))
            if old is not None:  # what the previous store already had
                block = {name: old[name][rows] for name in names}
            else:
                size = rows.stop - rows.start
                block = {
                    "features": np.zeros((size, k, d), np.float16),
                    "boxes": np.zeros((size, k, 4), np.int32),
                    "flipped": np.zeros((size, k), bool),
                    "done": np.zeros(size, bool),
                    "failed": np.full(size, b"", object),
                    **({"maps": np.zeros((size, km, r, d), np.float16)} if km else {}),
                }
            if index in shards:
                _overlay(block, shards[index], rows.start)
            feats[rows] = block["features"]
            boxes[rows] = block["boxes"]
            flipped[rows] = block["flipped"]
            done[rows] = block["done"]
            failed[rows] = block["failed"]
            if km:
                maps[rows] = block["maps"]
        for key, value in self.attrs.items():
            out.attrs[key] = (
                str(value) if isinstance(value, str) else value
            )  # str subclasses (TorchVersion) confuse h5py

    def _shards(self) -> Iterator[tuple[int, Path]]:
        if self.parts.is_dir():
            for p in sorted(self.parts.glob("chunk_*.npz")):
                yield int(p.stem.split("_")[1]), p

    def _tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attr_differences(have: dict, want: dict) -> list[str]:
    """'key: have (store) vs want (requested)' for every identity attribute that differs.

    A store from before `images_sha256` is compared on the manifest's hash, as it was then."""
    keys = IDENTITY_KEYS if "images_sha256" in have else (*_without(IDENTITY_KEYS, "images_sha256"), "manifest_sha256")
    return [
        f"{key}: {have.get(key)!r} (store) vs {want.get(key)!r} (requested)"
        for key in keys
        if _plain(have.get(key)) != _plain(want.get(key))
    ]


def _without(keys: tuple[str, ...], key: str) -> tuple[str, ...]:
    return tuple(k for k in keys if k != key)


def upgraded(attrs: dict) -> dict:
    """A store's attributes in the current schema: a schema 1 store is one without maps."""
    if attrs.get("schema_version") == 1:
        return {**attrs, **SCHEMA_DEFAULTS}
    return attrs


def existing_attrs(path: Path) -> dict | None:
    """The attributes of the store at `path`, or of its unfinished run, if there is one."""
    return _h5_attrs(Path(path)) or _parts_attrs(_parts_dir(Path(path)))


def _overlay(block: dict[str, np.ndarray], shard: Path, start: int) -> None:
    try:
        with np.load(shard, allow_pickle=False) as z:
            at = z["rows"] - start  # (n,) positions inside the chunk
            block["features"][at] = z["features"]
            block["boxes"][at] = z["boxes"]
            block["flipped"][at] = z["flipped"]
            if "maps" in block:
                block["maps"][at] = z["maps"]
            reasons = z["failed"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        shard.unlink(missing_ok=True)
        raise UserError(f"shard {shard} was damaged ({e}) and has been removed: run featurize --resume again") from None
    block["done"][at] = reasons == ""
    block["failed"][at] = [r.encode("utf-8") for r in reasons]


def _acquire_lock(path: Path) -> int:
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"another featurize (pid {holder}) is writing {path}: wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _h5_attrs(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e}): pass --overwrite to rebuild it") from None


def _parts_attrs(parts: Path) -> dict | None:
    meta = parts / "meta.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text())


def _plain(value: object) -> object:
    """HDF5 attributes come back as numpy scalars and bytes; compare and report plain Python."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value

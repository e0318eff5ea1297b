"""The dataset manifest: one JSON line per image (id, path, split, cleaned captions).

JSON lines rather than CSV because an image has a variable number of captions, and sorted keys
with a fixed separator so that the same input and seed give a byte-identical file, whose
hash then identifies the dataset in every feature store and checkpoint built from it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store.errors import UserError

MANIFEST_NAME = "manifest.jsonl"
VOCAB_NAME = "vocab.json"
REPORT_NAME = "prepare_report.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image of the dataset; `captions` are cleaned, space-separated tokens."""

    id: str
    path: str
    split: str
    captions: list[str] = field(default_factory=list)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, Ctrl-C: leave the old file and no temporary behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (the directory entry itself is data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete `path`'s temporary files or folders (`NAME.tmp<pid>`) left by processes that no
    longer run, as after a kill -9 or a power cut mid-write; a live writer's are left alone."""
    path = Path(path)
    for tmp in path.parent.glob(glob.escape(path.name) + ".tmp*"):
        _remove_if_stale(tmp, tmp.name[len(path.name) + len(".tmp"):])


def remove_stale_temporaries_in(folder: Path) -> None:
    """remove_stale_temporaries for every file of `folder` in one pass: for folders of many files
    written by name (extracted images), where one glob per file would read the folder each time."""
    for tmp in Path(folder).glob("*.tmp*"):
        _remove_if_stale(tmp, tmp.name.rpartition(".tmp")[2])


def _remove_if_stale(tmp: Path, pid: str) -> None:
    if pid.isdigit() and not _process_alive(int(pid)):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # not a process id we wrote; never signal a process group
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def write_manifest(workdir: Path, records: list[Record]) -> Path:
    lines = [json.dumps(asdict(r), sort_keys=True, ensure_ascii=False) for r in records]
    path = Path(workdir) / MANIFEST_NAME
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def read_manifest(workdir: Path) -> list[Record]:
    path = Path(workdir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no manifest at {path}: run `python cli.py prepare SOURCE --out {workdir}` first")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{path}:{lineno}: not a manifest row ({e})") from None
    return records


def manifest_sha256(workdir: Path) -> str:
    path = Path(workdir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no manifest at {path}: run `python cli.py prepare` first")
    return hashlib.sha256(path.read_bytes()).hexdigest()

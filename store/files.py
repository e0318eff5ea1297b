"""Safe writes: a file on disk is either the old one or the whole new one, never half of either.

Every writer in légende goes through `safe_write` (or `commit` when a library writes the
temporary file itself, as h5py does): write to `NAME.tmp<pid>`, flush, fsync, rename over NAME,
fsync the folder. A crash, a full disk or Ctrl-C at any moment leaves the previous file intact;
the temporary a killed process left behind is removed by the next writer of the same name
(`remove_stale_temporaries`), never one a live process is still writing.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def safe_write(path: Path, *, tmp: Path | None = None, keep_previous: Path | None = None) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; it replaces `path` only if the block ends
    without an exception. With `keep_previous`, the file it replaces is renamed there first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, Ctrl-C: leave the old file and no temporary behind
        tmp.unlink(missing_ok=True)
        raise
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with safe_write(path) as f:
        f.write(data)


def commit(tmp: Path, path: Path) -> None:
    """Make a finished temporary file durable and rename it over `path`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


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
        _remove_if_stale(tmp, tmp.name[len(path.name) + len(".tmp") :])


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

"""Checkpoints under faults: a disk that fills up while one is written, and a process killed
(SIGKILL, no chance to clean up) in the middle of saving one after another.

The disk-full tests mount a small tmpfs, so they need root; elsewhere they are skipped. The
truncated-file and pickle-payload cases are in test_checkpoints.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from store.checkpoints import load_checkpoint, load_resumable, save_checkpoint
from store.errors import UserError
from store.manifest import MANIFEST_NAME, REPORT_NAME, VOCAB_NAME
from store.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def state(step: int, numel: int = 256) -> dict:
    """A checkpoint whose every tensor value is `step`, so a mix of two saves would show."""
    value = float(step)
    return {
        "model": {"w": torch.full((numel,), value), "b": torch.full((3,), value)},
        "optimizer": {"state": {0: {"exp_avg": torch.full((numel,), value)}}},
        "epoch": step,
        "step": step,
        "phase": "decoder",
        "config": {"model": {}},
        "vocab": ["<pad>", "<start>", "<end>", "<unk>"],
        "rng": torch.get_rng_state(),
    }


def assert_consistent(checkpoint: dict) -> int:
    """The step of a checkpoint whose tensors all agree with it."""
    step = checkpoint["step"]
    assert checkpoint["epoch"] == step
    for tensor in (checkpoint["model"]["w"], checkpoint["model"]["b"], checkpoint["optimizer"]["state"][0]["exp_avg"]):
        assert torch.all(tensor == float(step)), f"step {step}: tensor from another save"
    return step


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, unmounted afterwards; skipped unless root can mount one here."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- disk full ---------------------------------------------------------------------------------


def test_disk_full_keeps_last_and_previous_intact_and_says_why(small_disk):
    folder = RunDir(small_disk).checkpoints
    save_checkpoint(state(1), folder / "last.pt", keep_previous=True)
    save_checkpoint(state(2), folder / "last.pt", keep_previous=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    with pytest.raises(UserError) as error:  # ~1.6 MB of tensors into 256 KiB
        save_checkpoint(state(3, numel=200_000), folder / "last.pt", keep_previous=True)
    message = str(error.value)
    assert message == (
        f"could not write checkpoint {folder / 'last.pt'}: No space left on device; the previous checkpoint is intact"
    )

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary left
    assert assert_consistent(load_checkpoint(folder / "last.pt")) == 2
    assert assert_consistent(load_checkpoint(folder / "previous.pt")) == 1
    checkpoint, path = load_resumable(folder)
    assert path.name == "last.pt" and checkpoint["step"] == 2

    # the space of the failed write was given back: training can go on saving
    save_checkpoint(state(4), folder / "last.pt", keep_previous=True)
    assert assert_consistent(load_resumable(folder)[0]) == 4


def test_disk_full_on_the_first_checkpoint_leaves_nothing(small_disk):
    with pytest.raises(UserError, match=r"last.pt: No space left on device$"):
        save_checkpoint(state(1, numel=200_000), small_disk / "last.pt")
    assert list(small_disk.iterdir()) == []
    with pytest.raises(UserError, match="no checkpoint in"):
        load_resumable(small_disk)


def test_disk_full_during_prepare_keeps_the_previous_outputs(small_disk, tmp_path, tiny_images):
    """A first prepare fits on the small disk; a larger one does not: a one-line error, and the
    first run's manifest, vocabulary and report are byte for byte what they were."""
    names = [f"img{i:03d}.png" for i in range(300)]
    tiny_images(tmp_path / "data" / "images", names)
    work = small_disk / "work"

    def run(n: int):
        rows = ["image,caption"]
        for name in names[:n]:
            for j in range(5):  # 40 distinct words: long, not degenerate
                rows.append(f"images/{name},caption {j} of {name} " + " ".join(f"word{j}x{k}" for k in range(40)))
        (tmp_path / "data" / "captions.csv").write_text("\n".join(rows) + "\n")
        return CliRunner().invoke(
            main, ["prepare", str(tmp_path / "data"), "--out", str(work), "--min-word-count", "1"]
        )

    assert run(10).exit_code == 0
    first = {p.name: p.read_bytes() for p in work.iterdir()}
    assert set(first) == {MANIFEST_NAME, VOCAB_NAME, REPORT_NAME}

    result = run(300)  # a ~500 KB manifest
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: cannot write to {work}: No space left on device; its previous files are unchanged"
    ]
    assert {p.name: p.read_bytes() for p in work.iterdir()} == first


# --- kill -9 while saving ----------------------------------------------------------------------

SAVER = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
from store.checkpoints import save_checkpoint
folder, step = Path(sys.argv[1]), int(sys.argv[2])
while True:
    step += 1
    value = float(step)
    save_checkpoint({{"model": {{"w": torch.full((1_000_000,), value), "b": torch.full((3,), value)}},
                     "optimizer": {{"state": {{0: {{"exp_avg": torch.full((1_000_000,), value)}}}}}},
                     "epoch": step, "step": step, "phase": "decoder", "config": {{"model": {{}}}},
                     "vocab": ["<pad>"], "rng": torch.get_rng_state()}},
                    folder / "last.pt", keep_previous=True)
"""


@pytest.mark.parametrize("kills", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_kill_9_while_saving_leaves_a_resumable_checkpoint(tmp_path, kills):
    """A process saves 8 MB checkpoints in a loop and is killed at random moments (one seed per
    kill, the same folder): each time load_resumable gives a complete checkpoint, the newest or
    the one before, and the next run goes on from it; abandoned temporaries are cleaned up."""
    folder = RunDir(tmp_path).checkpoints
    script = SAVER.format(root=str(ROOT))
    resumed_from = 0
    leftovers_seen = 0
    for seed in range(kills):
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(folder), str(resumed_from)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not (folder / "last.pt").exists() or (seed > 0 and _newest_step(folder) <= resumed_from):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the saver never wrote a checkpoint"
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()

        leftovers_seen += any(".tmp" in p.name for p in folder.iterdir())
        checkpoint, path = load_resumable(folder)
        step = assert_consistent(checkpoint)
        assert step > resumed_from  # progress was kept
        if path.name == "last.pt" and step == 1:
            # killed before a second save finished: the first checkpoint has no predecessor
            assert not (folder / "previous.pt").exists()
        elif path.name == "last.pt":
            # killed between saves or while writing a temporary: previous is one step older
            assert assert_consistent(load_checkpoint(folder / "previous.pt")) == step - 1
        else:
            # killed between the two renames: last.pt is gone, previous.pt is the newest
            assert not (folder / "last.pt").exists()
        resumed_from = step

    save_checkpoint(state(resumed_from + 1), folder / "last.pt", keep_previous=True)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "previous.pt"]
    print(f"kills that left a temporary file behind: {leftovers_seen} of {kills}")


def _newest_step(folder: Path) -> int:
    try:
        return load_resumable(folder)[0]["step"]
    except UserError:  # caught between the two renames of a save
        return 0

"""Checkpoints: atomic, loadable with weights_only, hostile or damaged files refused by name."""

import pytest
import torch

from store.checkpoints import load_checkpoint, load_resumable, save_checkpoint
from store.errors import UserError


def state(step: int) -> dict:
    return {
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
        "epoch": step,
        "step": step,
        "phase": "decoder",
        "config": {"model": {}},
        "vocab": ["<pad>"],
        "rng": torch.get_rng_state(),
    }


def test_round_trip_with_weights_only(tmp_path):
    save_checkpoint(state(7), tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    assert loaded["step"] == 7 and loaded["format_version"] == 2
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 7.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_previous_checkpoint_is_kept_and_used_when_last_is_truncated(tmp_path):
    save_checkpoint(state(1), tmp_path / "last.pt", keep_previous=True)
    save_checkpoint(state(2), tmp_path / "last.pt", keep_previous=True)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="last.pt"):
        load_checkpoint(tmp_path / "last.pt")
    loaded, path = load_resumable(tmp_path)
    assert path.name == "previous.pt" and loaded["step"] == 1


class Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


MARKER = ""


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    bad = state(1)
    bad["config"] = Payload()
    with open(tmp_path / "last.pt", "wb") as f:
        torch.save(bad, f)
    with pytest.raises(UserError, match="refused for safety"):
        load_checkpoint(tmp_path / "last.pt")
    assert not (tmp_path / "pwned").exists()
    torch.load(tmp_path / "last.pt", weights_only=False)  # the unsafe way does run it: the test has teeth
    assert (tmp_path / "pwned").exists()


def test_not_a_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a légende checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(UserError, match="no checkpoint"):
        load_resumable(tmp_path / "nothing")

"""Checkpoints: one schema, written atomically, loaded without unpickling arbitrary objects.

`last.pt` is written through a temporary file, fsync and rename; the checkpoint it replaces is
kept as `previous.pt`, so a file damaged after the fact (a truncated copy, a full disk during a
later write) costs one checkpoint interval, not the run. Loading always uses
`torch.load(weights_only=True)`: a file crafted to run code when unpickled is refused.

Format 2 keeps each phase's options in `config` under the phase's name ("decoder", "joint",
"scst"); format 1 kept the decoder phase's under "train", which loading renames, so runs made
before still resume, caption and evaluate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from store.errors import UserError
from store.files import safe_write

FORMAT_VERSION = 2
REQUIRED_KEYS = ("format_version", "model", "optimizer", "epoch", "step", "phase", "config", "vocab", "rng")


def save_checkpoint(state: dict, path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` atomically; with keep_previous the old file becomes previous.pt."""
    save_state_dict({"format_version": FORMAT_VERSION, **state}, path, keep_previous)


def save_state_dict(state: dict, path: Path, keep_previous: bool = False) -> None:
    """torch.save through a temporary file, fsync and rename; a full disk is a one-line UserError."""
    path = Path(path)
    try:
        with safe_write(path, keep_previous=path.with_name("previous.pt") if keep_previous else None) as f:
            torch.save(state, f)
    except BaseException as e:
        # torch.save reports a failed write (a full disk) as a RuntimeError whose context is
        # the OSError; anything else (an unpicklable state, Ctrl-C) keeps its traceback
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        kept = "; the previous checkpoint is intact" if path.exists() else ""
        raise UserError(f"could not write checkpoint {path}: {cause.strerror or cause}{kept}") from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint dict, or a one-line UserError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or hostile files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it contains objects other than tensors and plain data (refused for safety)"
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise UserError(f"{path} is not a légende checkpoint (missing {', '.join(missing)})")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {state['format_version']}; this légende reads up to {FORMAT_VERSION}"
        )
    if state["format_version"] < 2 and "train" in state["config"]:
        state["config"]["decoder"] = state["config"].pop("train")
    return state


def load_resumable(checkpoint_dir: Path) -> tuple[dict, Path]:
    """The newest loadable of last.pt and previous.pt, saying on stderr when it had to fall back."""
    errors = []
    for name in ("last.pt", "previous.pt"):
        path = Path(checkpoint_dir) / name
        if not path.exists():
            continue
        try:
            return load_checkpoint(path), path
        except UserError as e:
            errors.append(str(e))
    if errors:
        raise UserError("; ".join(errors))
    raise UserError(f"no checkpoint in {checkpoint_dir} to resume from")

"""Shared fixtures: tiny images and caption files that tests write into their own tmp_path."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import TINY, run_cli


@pytest.fixture
def tiny_images() -> Callable[..., list[Path]]:
    """Factory writing small distinct images: tiny_images(folder, ["a.png", "b.jpg"], size=16).

    Each image has its own colour, so no two are byte-identical; the format follows the suffix.
    """

    def make(folder: Path, names: list[str], size: int = 16) -> list[Path]:
        paths = []
        for i, name in enumerate(names):
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = ((37 * i) % 256, (91 * i + 50) % 256, (173 * i + 100) % 256)
            Image.new("RGB", (size, size), colour).save(path)
            paths.append(path)
        return paths

    return make


@pytest.fixture
def write_csv() -> Callable[..., Path]:
    """Factory writing rows (first row the header, if any) as a UTF-8 CSV: write_csv(path, rows)."""

    def make(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter=delimiter).writerows(rows)
        return path

    return make


@pytest.fixture(scope="session")
def featurized(tmp_path_factory) -> Path:
    """A real prepared and featurized synthetic dataset (random CNN, 2 crops of 80 px): WORKDIR.

    Built once per session through the CLI, the way a user builds one; tests must not modify it.
    """
    root = tmp_path_factory.mktemp("featurized")
    run_cli("synth", root / "synth", "--n", 40, "--seed", 1, "--size", 120)
    run_cli("prepare", root / "synth", "--out", root / "work", "--min-word-count", 1)
    run_cli(
        "featurize", root / "work", "--weights", "none", "--crops", 2, "--workers", 0, "--resize", 96,
        "--crop-size", 80, "--maps", "none", "--precision", "fp32",
    )  # fmt: skip
    return root / "work"


@pytest.fixture(scope="session")
def mapped(tmp_path_factory) -> Path:
    """A synthetic dataset featurized with the maps of every crop (2 crops of 139 px: 3x3 regions),
    for the decoders of maps (attention, transformer): WORKDIR. Tests must not modify it."""
    root = tmp_path_factory.mktemp("mapped")
    run_cli("synth", root / "synth", "--n", 40, "--seed", 1, "--size", 120)
    run_cli("prepare", root / "synth", "--out", root / "work", "--min-word-count", 1)
    run_cli(
        "featurize", root / "work", "--weights", "none", "--crops", 2, "--workers", 0, "--resize", 150,
        "--crop-size", 139, "--maps", "all",
    )  # fmt: skip
    return root / "work"


@pytest.fixture(scope="session")
def trained(featurized, tmp_path_factory) -> Path:
    """A tiny decoder trained for 2 epochs on `featurized`, through the CLI: RUNDIR. Tests may
    evaluate and caption with it (which writes RUNDIR/eval/), not train it further."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run_cli("train", featurized, "--run", run, "--epochs", 2, "--lr", "3e-3", *TINY)
    return run

"""The synthetic scenes dataset: files and layout, determinism, and captions that say what the
pixels show (colour, shape, size, position), which is what makes it learnable."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from prepare.dataset import prepare
from prepare.synth import COLOURS, SHAPES, make_synth
from store.errors import UserError
from store.manifest import read_manifest

SIZE = 128
COLOUR = "|".join(COLOURS)
PHRASE = rf"(?:(small|large) )?({COLOUR}) ({'|'.join(SHAPES)})"
RELATION = re.compile(rf"^a {PHRASE} (above|below|to the left of|to the right of) a {PHRASE}$")
PLACE = re.compile(r"(on the left|on the right|at the top|at the bottom|in the middle)$")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    make_synth(folder, n=60, seed=3, size=SIZE)
    return folder


def captions_by_image(folder: Path) -> dict[str, list[str]]:
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["caption", "image"]
    grouped = defaultdict(list)
    for caption, image in rows[1:]:
        grouped[image].append(caption)
    return grouped


def colour_masks(path: Path) -> dict[str, np.ndarray]:
    """Pixels of each palette colour that covers more than a few pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    masks = {name: (pixels == rgb).all(axis=2) for name, rgb in COLOURS.items()}
    return {name: m for name, m in masks.items() if m.sum() > 20}


def centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() / SIZE, ys.mean() / SIZE


def width(mask: np.ndarray) -> float:
    xs = np.nonzero(mask.any(axis=0))[0]
    return (xs.max() - xs.min() + 1) / SIZE


def fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))


def test_layout_images_and_three_to_five_distinct_captions(synth):
    grouped = captions_by_image(synth)
    assert sorted(grouped) == [f"images/{i:06d}.png" for i in range(60)]
    assert sorted(p.name for p in (synth / "images").iterdir()) == [f"{i:06d}.png" for i in range(60)]
    for image, captions in grouped.items():
        assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
        assert Image.open(synth / image).size == (SIZE, SIZE)
    counts = {len(c) for c in grouped.values()}
    assert counts == {3, 4, 5}  # varied, not always the same number


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, synth):
    make_synth(tmp_path / "again", n=60, seed=3, size=SIZE)
    assert (tmp_path / "again/captions.csv").read_bytes() == (synth / "captions.csv").read_bytes()
    for i in (0, 29, 59):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "again" / name).read_bytes() == (synth / name).read_bytes()
    make_synth(tmp_path / "other", n=60, seed=4, size=SIZE)
    assert (tmp_path / "other/captions.csv").read_bytes() != (synth / "captions.csv").read_bytes()


def test_named_colours_shapes_and_sizes_are_the_ones_drawn(synth):
    kinds = defaultdict(list)
    for image, captions in captions_by_image(synth).items():
        masks = colour_masks(synth / image)
        claims = [m for c in captions for m in re.findall(PHRASE, c)]
        assert {colour for _, colour, _ in claims} == set(masks), (image, captions)
        for size, colour, kind in claims:
            mask = masks[colour]
            assert width(mask) >= 0.15  # every shape is big enough to see after cropping
            if size:
                assert (width(mask) > 0.35) == (size == "large"), (image, size, width(mask))
            kinds[kind].append(fill_ratio(mask))
    # the shapes are told apart by how much of their bounding box they fill
    assert min(kinds["square"]) > 0.95
    assert 0.7 < min(kinds["circle"]) and max(kinds["circle"]) < 0.85
    assert 0.48 < min(kinds["triangle"]) and max(kinds["triangle"]) < 0.55
    assert max(kinds["star"]) < 0.45


def test_positions_and_relations_are_true(synth):
    checked = 0
    for image, captions in captions_by_image(synth).items():
        masks = colour_masks(synth / image)
        for caption in captions:
            relation = RELATION.match(caption)
            if relation:
                (ax, ay), (bx, by) = centre(masks[relation[2]]), centre(masks[relation[6]])
                expected = {"above": ay < by, "below": ay > by, "to the left of": ax < bx, "to the right of": ax > bx}
                assert expected[relation[4]], (image, caption)
                checked += 1
            place = PLACE.search(caption)
            if place and len(masks) == 1:
                x, y = centre(next(iter(masks.values())))
                expected = {
                    "on the left": x < 0.4,
                    "on the right": x > 0.6,
                    "at the top": y < 0.4,
                    "at the bottom": y > 0.6,
                    "in the middle": 0.4 < x < 0.6 and 0.4 < y < 0.6,
                }
                assert expected[place[1]], (image, caption, x, y)
                checked += 1
    assert checked > 60


def test_prepare_keeps_every_synthetic_caption_with_a_small_vocabulary(synth, tmp_path):
    report = prepare(synth, tmp_path / "work", min_word_count=1)
    assert report["dropped_images"] == [] and report["dropped_captions"] == []
    assert sum(len(r.captions) for r in read_manifest(tmp_path / "work")) == sum(
        len(c) for c in captions_by_image(synth).values()
    )
    assert report["vocabulary"]["size"] < 45


@pytest.mark.parametrize("options, message", [({"n": 0}, "--n"), ({"size": 32}, "--size")])
def test_bad_options_are_user_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        make_synth(tmp_path, **options)


def test_cli_synth(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "s"), "--n", "5", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 images" in result.output
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 5

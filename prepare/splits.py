"""Given splits: `prepare --split-file FILE` or the split a Karpathy `dataset_*.json` carries.

    python cli.py prepare ../shared/flickr8k --split-file ../shared/flickr8k/split.csv --out data/f8k

A split file is a CSV of `image,split` (a header is optional; tab-separated works too). Split
names are `train`, `val` (or `dev`), `test`, and Karpathy's `restval`, which counts as train.

An entry names an image the way the caption source names it (`1000268201_693b08cb0e.jpg` in
Flickr8k's captions.txt), or by its path in the dataset folder (`images/1000268201_693b08cb0e.jpg`).
An entry that is a bare file name also matches the one image with that file name wherever it
lies, so a split file written for the caption file works whatever folder holds the images; a
file name two images share is ambiguous, and reported.

What cannot be right stops the run with one line naming the line: an image in two splits, an
unknown split name, a line without two fields. What can be reported is: an entry naming no
image of the source (`unknown_image`, `ambiguous`), and an image the split does not mention,
which is left out (`not_in_split`, among the dropped images).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from store.errors import UserError

# name in a split file or Karpathy's json -> the manifest's split
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}


@dataclass(frozen=True)
class SplitEntry:
    """One line of a given split: the image as the split names it, its split, where it was said."""

    image: str
    split: str  # train, val or test
    where: str  # "split.csv:7"


@dataclass
class GivenSplit:
    """The entries of a split file or of a Karpathy json, and where they came from."""

    source: str
    entries: list[SplitEntry]


@dataclass
class Matched:
    """What a given split says of the source's images: image id -> split, and the entries that
    name no image (report entries)."""

    splits: dict[str, str] = field(default_factory=dict)
    unmatched: list[dict] = field(default_factory=list)


def split_name(text, image: str, where: str) -> str:
    """The manifest split for a split name as written (`dev` -> `val`, `restval` -> `train`)."""
    name = SPLIT_NAMES.get(str(text).strip().lower()) if isinstance(text, str) else None
    if name is None:
        said = "no split" if text is None else f"unknown split {text!r}"
        raise UserError(
            f"{where}: {said} for {image} (expected {', '.join(SPLIT_NAMES)}; dev means val, restval train)"
        )
    return name


def read_split_file(path: Path) -> GivenSplit:
    """The entries of a split file; UserError on a line that cannot be an entry."""
    from prepare.sources import IMAGE_COLUMNS, _normalise_name

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--split-file {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"--split-file {path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"--split-file {path}: {e.strerror or e}") from None
    lines = text.splitlines()
    delimiter = "\t" if lines and "\t" in lines[0] else ","
    rows = [(number, cells) for number, cells in enumerate(csv.reader(lines, delimiter=delimiter), 1) if cells]
    rows = [(number, [c.strip() for c in cells]) for number, cells in rows if any(c.strip() for c in cells)]
    if not rows:
        raise UserError(f"--split-file {path} is empty")
    img_idx, split_idx, ncols = 0, 1, 2
    number, first = rows[0]
    names = [_normalise_name(c) for c in first]
    if "split" in names:
        split_idx = names.index("split")
        others = [i for i in range(len(first)) if i != split_idx]
        known = [i for i in others if names[i] in IMAGE_COLUMNS]
        if not known and len(others) != 1:
            raise UserError(f"{path.name}:{number}: no image column beside `split` (columns: {', '.join(first)})")
        img_idx, ncols = (known or others)[0], len(first)
        rows = rows[1:]
    elif len(first) != 2:  # else no header: image, split
        raise UserError(
            f"{path.name}:{number}: expected image,split (a header naming a `split` column, or rows of an "
            f"image and a split name), found: {', '.join(first)[:120]}"
        )
    entries = []
    for number, cells in rows:
        where = f"{path.name}:{number}"
        if len(cells) != ncols:
            raise UserError(f"{where}: {len(cells)} field(s) where the file has {ncols} (image,split)")
        image = cells[img_idx]
        if not image:
            raise UserError(f"{where}: no image named")
        entries.append(SplitEntry(image, split_name(cells[split_idx], image, where), where))
    if not entries:
        raise UserError(f"--split-file {path} lists no images")
    return GivenSplit(str(path), entries)


def match(given: GivenSplit, known: dict[str, set[str]]) -> Matched:
    """Place the source's images in the given splits.

    `known` maps each image id (its path in the dataset folder) to the paths the caption source
    wrote for it. Raises UserError when an image is placed in two splits, by one name or two.
    """
    by_name: dict[str, set[str]] = {}  # an id or a written path -> image ids
    by_file: dict[str, set[str]] = {}  # a file name -> image ids
    for image, written in known.items():
        for name in {image, *written}:
            if name:
                by_name.setdefault(_key(name), set()).add(image)
        by_file.setdefault(PurePosixPath(_key(image)).name, set()).add(image)
    said: dict[str, SplitEntry] = {}  # an entry's name -> its first entry
    placed: dict[str, SplitEntry] = {}  # image id -> the entry that placed it
    out = Matched()
    for entry in given.entries:
        key = _key(entry.image)
        first = said.setdefault(key, entry)
        if first is not entry:
            if first.split != entry.split:
                raise UserError(
                    f"{entry.where}: {entry.image} is in two splits: {first.split} ({first.where}) and {entry.split}"
                )
            continue  # the same line again
        ids = by_name.get(key) or (by_file.get(key) if "/" not in key else None)
        if not ids:
            out.unmatched.append(_unmatched(entry, "unknown_image", "names no image of the caption source"))
            continue
        if len(ids) > 1:
            shown = ", ".join(sorted(ids)[:3]) + (", ..." if len(ids) > 3 else "")
            out.unmatched.append(_unmatched(entry, "ambiguous", f"{len(ids)} images match it: {shown}"))
            continue
        (image,) = ids
        earlier = placed.setdefault(image, entry)
        if earlier.split != entry.split:
            raise UserError(
                f"{entry.where}: {entry.image} is in two splits: {earlier.split} (as {earlier.image}, "
                f"{earlier.where}) and {entry.split}"
            )
        out.splits[image] = earlier.split
    return out


def _key(name: str) -> str:
    """A written path as a comparable name: forward slashes, no `./`, no surrounding spaces."""
    text = str(name).strip().replace("\\", "/")
    return PurePosixPath(text).as_posix() if text else ""


def _unmatched(entry: SplitEntry, rule: str, reason: str) -> dict:
    return {"image": entry.image, "where": entry.where, "rule": rule, "reason": reason, "split": entry.split}

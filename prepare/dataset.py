"""`prepare`: any supported caption source -> WORKDIR/manifest.jsonl, vocab.json, prepare_report.json.

    python cli.py prepare data/synth --out data/work --min-word-count 2

Steps: read rows (`prepare.sources`), clean each caption, group captions by image, check that
every image decodes, split by image (or follow a given split, `prepare.splits`), build the
vocabulary from train, write the report.
No bad row stops the run: each dropped caption or image is listed in the report with its
rule and reason. Only a source that yields nothing usable is a `UserError`.

Determinism: images are sorted by id, shuffled with `random.Random(seed)` and cut into
train/val/test (a given split needs no seed); the manifest lists the images **sorted by id**
(splits interleaved), so the row order of the feature store does not depend on the split. Same
input and seed give a byte-identical manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

from prepare.sources import open_source
from prepare.splits import GivenSplit, Matched, match, read_split_file
from store.errors import UserError
from store.files import atomic_write_bytes, fsync_dir, remove_stale_temporaries
from store.images import ImageError, open_image
from store.manifest import (
    MANIFEST_NAME,
    REPORT_NAME,
    SPLITS,
    VOCAB_NAME,
    Record,
    write_manifest,
)
from store.text import Vocabulary, tokenize

REPEAT_RUN = 3  # a token this many times in a row makes a caption degenerate ("kettle kettle kettle")
DOMINANT_MIN_TOKENS = 4  # from this length, one word making up half the caption is degenerate
STAGING = ".prepare"  # WORKDIR/.prepare.tmp<pid>/: the outputs while they are being written
DEFAULT_SPLIT, DEFAULT_SEED = "70/15/15", 0


def parse_split(text: str) -> tuple[float, float, float]:
    """ "70/15/15" -> (0.7, 0.15, 0.15); percentages or fractions, three of them, summing to 100 or 1."""
    try:
        parts = [float(p) for p in str(text).split("/")]
    except ValueError:
        parts = []
    total = sum(parts)
    if len(parts) != 3 or any(p < 0 for p in parts) or not (abs(total - 100) < 1e-6 or abs(total - 1) < 1e-6):
        raise UserError(f"--split {text!r}: expected train/val/test percentages such as 70/15/15")
    return parts[0] / total, parts[1] / total, parts[2] / total


def degenerate_reason(tokens: list[str]) -> str | None:
    """Why a caption is machine-made nonsense, or None: a token repeated REPEAT_RUN+ times in a
    row, or (from DOMINANT_MIN_TOKENS tokens) one word making up half the caption or more."""
    run = 1
    for previous, token in zip(tokens, tokens[1:], strict=False):
        run = run + 1 if token == previous else 1
        if run >= REPEAT_RUN:
            return f"{token!r} repeated {REPEAT_RUN}+ times in a row"
    if len(tokens) >= DOMINANT_MIN_TOKENS:
        word, count = Counter(tokens).most_common(1)[0]
        if 2 * count >= len(tokens):
            return f"{word!r} is {count} of {len(tokens)} words"
    return None


def caption_problem(tokens: list[str], max_length: int) -> tuple[str, str] | None:
    """(rule, reason) for a caption to drop, or None to keep it."""
    if not tokens:
        return "empty", "no words"
    reason = degenerate_reason(tokens)
    if reason:
        return "degenerate", reason
    if len(tokens) > max_length:
        return "too_long", f"{len(tokens)} words > --max-length {max_length}"
    return None


def image_problem(path: Path) -> tuple[str, str] | None:
    """(rule, reason) for an image that cannot be used, or None. Decodes the whole file, which
    is the only way to find truncated files before featurize does."""
    if not path.exists():
        return "missing", f"missing file {path}"
    try:
        open_image(path)
    except ImageError as e:
        return "unreadable", str(e)
    return None


def split_images(ids: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Image id -> split: sorted ids shuffled by `seed`, val and test sizes rounded, train the rest."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * fractions[1])
    n_test = round(len(order) * fractions[2])
    n_train = len(order) - n_val - n_test
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {image: split for split, members in cuts.items() for image in members}


def prepare(
    source: Path | None,
    workdir: Path,
    *,
    hf: str | None = None,
    revision: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str | None = None,
    split_file: Path | None = None,
    seed: int | None = None,
    min_word_count: int = 5,
    max_length: int = 50,
    console=None,
) -> dict:
    """Clean, split and tokenise SOURCE into WORKDIR; returns the report (also written as JSON).

    The split is `split` percentages (default 70/15/15) shuffled by `seed` (default 0), or the
    one `split_file` or a Karpathy json source gives; `split` or `seed` given beside a given
    split is refused, as an option that would not apply. `console` (a rich Console) shows
    progress while images are checked.
    """
    if split_file is not None and split is not None:
        raise UserError("--split and --split-file do not go together: the split file gives each image its split")
    fractions = parse_split(DEFAULT_SPLIT if split is None else split)
    if min_word_count < 1:
        raise UserError("--min-word-count must be at least 1")
    if max_length < 1:
        raise UserError("--max-length must be at least 1")
    given = read_split_file(split_file) if split_file is not None else None
    if given is not None and seed is not None:
        raise UserError("--seed does not apply with --split-file: the split file gives each image its split")
    workdir = Path(workdir)
    src = open_source(
        source, workdir, hf=hf, revision=revision, image_column=image_column, caption_column=caption_column
    )
    if given is None and src.split is not None:
        for option, value in (("--split", split), ("--seed", seed)):
            if value is not None:
                raise UserError(
                    f"{option} does not apply: {src.split.source} gives each image its split "
                    "(--split-file FILE gives another)"
                )
        given = src.split
    elif given is not None and src.split is not None:
        src.notes.append(f"the split of {src.split.source} was not used: --split-file {split_file} replaces it")
    seed = DEFAULT_SEED if seed is None and given is None else seed

    images: dict[Path, tuple[str, str]] = {}  # path -> (id, where first named)
    known: dict[str, set[str]] = {}  # every image id the source names -> the paths it wrote for it
    captions: dict[Path, list[str]] = {}  # path -> cleaned captions, in row order
    seen: dict[Path, set[str]] = {}  # the same, as sets: a list lookup per row is quadratic
    dropped_captions: list[dict] = []
    dropped_images: dict[str, dict] = {}
    rows_read = 0
    for row in src.rows:
        rows_read += 1
        if row.rule and not row.image:
            dropped_captions.append(_entry(row.image, row.where, row.rule, row.reason, row.caption))
            continue
        if given is not None:
            known.setdefault(row.image, set()).add(row.written)
        if row.rule:
            _drop_image(dropped_images, row.image, row.where, row.rule, row.reason)
            continue
        images.setdefault(row.path, (row.image, row.where))
        tokens = tokenize(row.caption)
        problem = caption_problem(tokens, max_length)
        kept = captions.setdefault(row.path, [])
        kept_set = seen.setdefault(row.path, set())
        cleaned = " ".join(tokens)
        if problem is None and cleaned in kept_set:
            problem = ("duplicate", "same image and caption as an earlier row")
        if problem:
            dropped_captions.append(_entry(row.image, row.where, *problem, row.caption))
        else:
            kept.append(cleaned)
            kept_set.add(cleaned)

    matched = match(given, known) if given is not None else None
    todo = sorted(images.items(), key=lambda kv: kv[1][0])
    if matched is not None:  # images the split leaves out are not decoded
        for path, (image_id, where) in todo:
            if image_id not in matched.splits:
                reason = f"not in the split of {Path(given.source).name}"
                _drop_image(dropped_images, image_id, where, "not_in_split", reason, captions=len(captions[path]))
        todo = [(path, named) for path, named in todo if named[0] in matched.splits]
    checked = []
    for path, (image_id, where) in _progress(todo, "checking images", console):
        problem = ("no_caption", "every caption was dropped") if not captions[path] else image_problem(path)
        if problem:
            _drop_image(dropped_images, image_id, where, *problem, captions=len(captions[path]))
        else:
            checked.append((image_id, path))
    if not checked:
        raise UserError(_nothing_left(src.description, rows_read, dropped_images, dropped_captions))

    if matched is not None:
        assignment = matched.splits
    else:
        assignment = split_images([image_id for image_id, _ in checked], fractions, seed)
    records = [
        Record(id=image_id, path=str(path), split=assignment[image_id], captions=captions[path])
        for image_id, path in checked
    ]
    by_split = {name: [r for r in records if r.split == name] for name in SPLITS}
    if not by_split["train"] and given is not None:
        raise UserError(f"none of the {len(records)} usable image(s) is in the train split of {given.source}")
    if not by_split["train"]:
        raise UserError(f"{len(records)} usable image(s) leave none for training with --split {split or DEFAULT_SPLIT}")
    vocab = Vocabulary.build((c.split() for r in by_split["train"] for c in r.captions), min_count=min_word_count)

    report = {
        "source": src.description,
        "workdir": str(workdir),
        "files": {"manifest": MANIFEST_NAME, "vocab": VOCAB_NAME, "report": REPORT_NAME},
        "settings": {
            "split": None if given is not None else split or DEFAULT_SPLIT,
            "split_file": None if split_file is None else str(split_file),
            "seed": seed,
            "min_word_count": min_word_count,
            "max_length": max_length,
            "image_column": image_column,
            "caption_column": caption_column,
        },
        "rows_read": rows_read,
        "splits": {
            name: {"images": len(members), "captions": sum(len(r.captions) for r in members)}
            for name, members in by_split.items()
        },
        "given_split": None if given is None else _given_split_report(given, matched, dropped_images),
        "vocabulary": {
            "size": len(vocab),
            "min_word_count": min_word_count,
            "val_token_coverage": _coverage(vocab, by_split["val"]),
        },
        "dropped_images": list(dropped_images.values()),
        "dropped_captions": dropped_captions,
        "notes": src.notes,
    }
    _write_outputs(workdir, records, vocab, report)
    return report


def _write_outputs(workdir: Path, records: list[Record], vocab: Vocabulary, report: dict) -> None:
    """Write manifest, vocabulary and report into a staging folder, then rename them into
    WORKDIR: a full disk, Ctrl-C or kill -9 while writing leaves the previous three files as
    they were (never half a file, nor a new manifest beside an old vocabulary), and the next
    run removes the abandoned staging folder."""
    staging = workdir / f"{STAGING}.tmp{os.getpid()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(workdir / STAGING)
        staging.mkdir(exist_ok=True)
        write_manifest(staging, records)
        vocab.save(staging / VOCAB_NAME)
        atomic_write_bytes(staging / REPORT_NAME, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write to {workdir}: {e.strerror or e}; its previous files are unchanged") from None
        raise
    for name in (MANIFEST_NAME, VOCAB_NAME, REPORT_NAME):  # the report, last, marks a finished run
        os.replace(staging / name, workdir / name)
    staging.rmdir()
    fsync_dir(workdir)  # make the renames durable


def _given_split_report(given: GivenSplit, matched: Matched, dropped_images: dict[str, dict]) -> dict:
    """What the given split said, and what of it could not be followed."""
    listed = {name: sum(e.split == name for e in given.entries) for name in SPLITS}
    left_out = [e for e in dropped_images.values() if e["rule"] == "not_in_split"]
    return {
        "source": given.source,
        "entries": len(given.entries),
        "listed": listed,
        "unmatched_entries": matched.unmatched,
        "images_not_in_split": len(left_out),
    }


def _entry(image: str, where: str, rule: str, reason: str, caption: str) -> dict:
    return {"image": image, "where": where, "rule": rule, "reason": reason, "caption": caption}


def _drop_image(dropped: dict[str, dict], image: str, where: str, rule: str, reason: str, captions: int = 1) -> None:
    """One report entry per image, however many rows named it; `captions` counts them."""
    if image in dropped:
        dropped[image]["captions"] += captions
    else:
        dropped[image] = {"image": image, "where": where, "rule": rule, "reason": reason, "captions": captions}


def _coverage(vocab: Vocabulary, records: list[Record]) -> float | None:
    """Share of val tokens the vocabulary knows (not <unk>); None without a val split."""
    tokens = [t for r in records for c in r.captions for t in c.split()]
    if not tokens:
        return None
    return round(sum(t in vocab.stoi for t in tokens) / len(tokens), 4)


def _nothing_left(description: str, rows: int, images: dict[str, dict], captions: list[dict]) -> str:
    reasons = Counter(e["rule"] for e in images.values()) + Counter(e["rule"] for e in captions)
    why = ", ".join(f"{n} {rule}" for rule, n in reasons.most_common(4))
    return f"nothing usable in {description}: {rows} row(s) read" + (f", dropped: {why}" if why else "")


def _progress(items: list, description: str, console):
    if console is None:
        return items
    from rich.progress import track

    return track(items, description=description, console=console, transient=True)


def print_summary(report: dict, console) -> None:
    """Human-readable tables of a prepare report: splits, vocabulary, what was dropped and why."""
    from rich.table import Table

    console.print(f"prepared {report['source']} ({report['rows_read']} rows read)")
    splits = Table()
    for column in ("split", "images", "captions"):
        splits.add_column(column, justify="left" if column == "split" else "right")
    for name, counts in report["splits"].items():
        splits.add_row(name, str(counts["images"]), str(counts["captions"]))
    splits.add_row(
        "total",
        str(sum(c["images"] for c in report["splits"].values())),
        str(sum(c["captions"] for c in report["splits"].values())),
        style="bold",
    )
    console.print(splits)
    given = report.get("given_split")
    if given:
        listed = ", ".join(f"{name} {n}" for name, n in given["listed"].items())
        console.print(
            f"split given by {given['source']}: {given['entries']} entries ({listed}); "
            f"{len(given['unmatched_entries'])} name no image of the source, "
            f"{given['images_not_in_split']} image(s) it does not mention were left out"
        )

    vocab = report["vocabulary"]
    coverage = vocab["val_token_coverage"]
    console.print(
        f"vocabulary: {vocab['size']} tokens (words seen >= {vocab['min_word_count']} "
        f"times in train); val token coverage: "
        f"{'n/a' if coverage is None else f'{coverage:.1%}'}"
    )

    dropped = [("image", e) for e in report["dropped_images"]] + [("caption", e) for e in report["dropped_captions"]]
    dropped += [("split entry", e) for e in (given or {}).get("unmatched_entries", [])]
    if dropped:
        table = Table(title="dropped", title_justify="left")
        for column in ("what", "rule", "count", "example"):
            table.add_column(column, justify="right" if column == "count" else "left")
        groups: dict[tuple[str, str], list[dict]] = {}
        for what, entry in dropped:
            groups.setdefault((what, entry["rule"]), []).append(entry)
        for (what, rule), entries in groups.items():
            first = entries[0]
            named = repr(first["caption"][:60]) if what == "caption" else first["image"]
            example = f"{first['where']}: {named} ({first['reason']})"
            table.add_row(what, rule, str(len(entries)), example)
        console.print(table)
    else:
        console.print("nothing dropped")
    for note in report["notes"]:
        console.print(f"note: {note}")
    console.print(
        f"wrote {report['files']['manifest']}, {report['files']['vocab']} and "
        f"{report['files']['report']} (every dropped item and why) in {report['workdir']}"
    )

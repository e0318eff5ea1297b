"""`prepare`: cleaning rules, image checks, the report, the split, the vocabulary, determinism,
and the `prepare` command as a user runs it."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from cli import main
from prepare.dataset import caption_problem, degenerate_reason, parse_split, prepare, print_summary
from store.errors import UserError
from store.manifest import MANIFEST_NAME, REPORT_NAME, VOCAB_NAME, read_manifest
from store.text import SPECIALS, Vocabulary
from tests.helpers import one_line_error


def report_of(workdir: Path) -> dict:
    return json.loads((workdir / REPORT_NAME).read_text())


def dropped(report: dict) -> dict[str, str]:
    """image id or caption text -> rule, for every dropped item."""
    items = {e["image"]: e["rule"] for e in report["dropped_images"]}
    items.update({e["caption"]: e["rule"] for e in report["dropped_captions"]})
    return items


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb to Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def dataset(tmp_path, tiny_images, write_csv):
    """Factory: a folder with `n` good images img00.png.. and a captions.csv; extra rows appended."""

    def make(n: int = 20, extra: list[list[str]] = (), captions_per_image: int = 2) -> Path:
        folder = tmp_path / "data"
        names = [f"img{i:02d}.png" for i in range(n)]
        tiny_images(folder / "images", names)
        rows = [["caption", "image"]]
        for i, name in enumerate(names):
            for j in range(captions_per_image):
                rows.append([f"A dog number{i} sits on grass{j}.", f"images/{name}"])
        write_csv(folder / "captions.csv", rows + [list(r) for r in extra])
        return folder

    return make


# --- the done criterion ----------------------------------------------------------------


def test_missing_image_truncated_jpeg_and_kettle_caption_are_all_reported(dataset, tmp_path):
    folder = dataset(
        10,
        extra=[
            ["a photo of nothing", "images/missing.jpg"],
            ["a broken photo", "images/broken.jpg"],
            ["kettle kettle kettle kettle", "images/img00.png"],
        ],
    )
    truncated_jpeg(folder / "images" / "broken.jpg")
    report = prepare(folder, tmp_path / "work")

    assert dropped(report) == {
        "images/missing.jpg": "missing",
        "images/broken.jpg": "unreadable",
        "kettle kettle kettle kettle": "degenerate",
    }
    assert report == report_of(tmp_path / "work")
    broken = next(e for e in report["dropped_images"] if e["image"] == "images/broken.jpg")
    assert "truncated" in broken["reason"].lower() and broken["where"] == "captions.csv:23"
    kept = read_manifest(tmp_path / "work")
    assert len(kept) == 10 and sum(len(r.captions) for r in kept) == 20


# --- cleaning rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, rule",
    [
        ("", "empty"),
        ("  ?!. ", "empty"),
        ("kettle kettle kettle", "degenerate"),
        ("a man with a hat hat hat", "degenerate"),
        ("dog dog cat", None),  # two in a row is fine
        ("the dog the cat", "degenerate"),  # 4 tokens, "the" is half
        ("the dog chases the cat", None),  # 2 of 5
        ("the the", None),  # short captions escape the half rule
        ("one two three four five six", "too_long"),
    ],
)
def test_caption_rules(caption, rule):
    problem = caption_problem(caption.split() if caption.strip(" ?!.") else [], max_length=5)
    assert (problem[0] if problem else None) == rule


def test_degenerate_reason_names_the_word():
    assert degenerate_reason(["kettle"] * 4) == "'kettle' repeated 3+ times in a row"
    assert degenerate_reason("a b a c a d".split()) == "'a' is 3 of 6 words"


def test_captions_are_normalised_and_bad_ones_listed(dataset, tmp_path):
    folder = dataset(
        10,
        extra=[
            ["  A  RED,   Kite!  ", "images/img01.png"],
            ["", "images/img02.png"],
            ["a b c d e f g h", "images/img03.png"],
            ["the cat the dog", "images/img04.png"],
        ],
    )
    report = prepare(folder, tmp_path / "work", max_length=7)
    by_id = {r.id: r for r in read_manifest(tmp_path / "work")}
    assert "a red kite" in by_id["images/img01.png"].captions
    assert dropped(report) == {"": "empty", "a b c d e f g h": "too_long", "the cat the dog": "degenerate"}
    too_long = next(e for e in report["dropped_captions"] if e["rule"] == "too_long")
    assert too_long == {
        "image": "images/img03.png",
        "where": "captions.csv:24",
        "rule": "too_long",
        "reason": "8 words > --max-length 7",
        "caption": "a b c d e f g h",
    }


def test_duplicate_rows_are_kept_once(dataset, tmp_path):
    folder = dataset(
        10,
        extra=[
            ["A dog number0 sits on grass0", "images/img00.png"],
            ["a dog number0 sits on grass0.", "./images/img00.png"],
        ],
    )
    report = prepare(folder, tmp_path / "work")
    by_id = {r.id: r for r in read_manifest(tmp_path / "work")}
    assert by_id["images/img00.png"].captions == ["a dog number0 sits on grass0", "a dog number0 sits on grass1"]
    assert [e["rule"] for e in report["dropped_captions"]] == ["duplicate", "duplicate"]


def test_image_whose_captions_are_all_dropped_is_reported(dataset, tmp_path, tiny_images):
    folder = dataset(10, extra=[["kettle kettle kettle", "images/lonely.png"]])
    tiny_images(folder / "images", ["lonely.png"])
    report = prepare(folder, tmp_path / "work")
    assert dropped(report)["images/lonely.png"] == "no_caption"
    assert "images/lonely.png" not in {r.id for r in read_manifest(tmp_path / "work")}


def test_every_kind_of_bad_image_is_dropped_with_a_reason(dataset, tmp_path):
    folder = dataset(
        10,
        extra=[
            ["empty file", "images/zero.png"],
            ["not an image", "images/text.png"],
            ["a bomb", "images/bomb.png"],
            ["a folder", "images/folder.png"],
            ["etc", "../../etc/passwd"],
            ["twice etc", "../../etc/passwd"],
        ],
    )
    images = folder / "images"
    (images / "zero.png").write_bytes(b"")
    (images / "text.png").write_text("hello, I am not a PNG")
    png_claiming_size(images / "bomb.png", 100_000, 100_000)
    (images / "folder.png").mkdir()
    report = prepare(folder, tmp_path / "work")
    reasons = {e["image"]: (e["rule"], e["reason"], e["captions"]) for e in report["dropped_images"]}
    assert reasons["images/zero.png"][:2] == ("unreadable", "empty file (0 bytes)")
    assert reasons["images/text.png"][0] == "unreadable"
    assert reasons["images/bomb.png"][0] == "unreadable" and "bomb" in reasons["images/bomb.png"][1]
    assert reasons["images/folder.png"][:2] == ("unreadable", "is a directory")
    assert reasons["../../etc/passwd"][0] == "outside_dataset"
    assert reasons["../../etc/passwd"][2] == 2  # one entry, both captions counted
    assert len(read_manifest(tmp_path / "work")) == 10


def test_non_utf8_csv_is_prepared_and_the_note_reported(tmp_path, tiny_images):
    tiny_images(tmp_path / "data", ["a.png", "b.png", "c.png"])
    (tmp_path / "data" / "captions.csv").write_bytes(
        b"caption,image\nun caf\xe9,a.png\nune cr\xe8me,b.png\nun th\xc3\xa9,c.png\n"
    )
    report = prepare(tmp_path / "data", tmp_path / "work", min_word_count=1)
    captions = sorted(c for r in read_manifest(tmp_path / "work") for c in r.captions)
    assert captions == ["un café", "un thé", "une crème"]
    assert report["notes"] == ["captions.csv: 2 line(s) were not valid UTF-8 and were read as Latin-1"]


# --- whole sources with nothing usable ---------------------------------------------------------


def test_nothing_left_after_cleaning_is_a_user_error(tmp_path, write_csv):
    write_csv(
        tmp_path / "captions.csv", [["image", "caption"], ["gone.png", "a dog"], ["gone2.png", "kettle kettle kettle"]]
    )
    with pytest.raises(
        UserError,
        match=r"nothing usable in .*captions.csv: 2 row\(s\) read, "
        r"dropped: 1 missing, 1 no_caption, 1 degenerate",
    ):
        prepare(tmp_path, tmp_path / "work")
    assert not (tmp_path / "work" / MANIFEST_NAME).exists()


def test_header_only_csv_is_a_user_error(tmp_path, write_csv):
    write_csv(tmp_path / "captions.csv", [["image", "caption"]])
    with pytest.raises(UserError, match=r"nothing usable in .*: 0 row\(s\) read$"):
        prepare(tmp_path, tmp_path / "work")


@pytest.mark.parametrize("text", ["70/30", "70/15/16", "a/b/c", "-10/60/50", ""])
def test_bad_split_is_refused(text):
    with pytest.raises(UserError, match="--split"):
        parse_split(text)


def test_split_accepts_percentages_or_fractions():
    assert parse_split("70/15/15") == pytest.approx((0.7, 0.15, 0.15))
    assert parse_split("0.8/0.1/0.1") == pytest.approx((0.8, 0.1, 0.1))


def test_bad_counts_are_refused(dataset, tmp_path):
    with pytest.raises(UserError, match="--min-word-count"):
        prepare(dataset(3), tmp_path / "w", min_word_count=0)
    with pytest.raises(UserError, match="--max-length"):
        prepare(dataset(3), tmp_path / "w", max_length=0)


def test_split_without_train_images_is_refused(dataset, tmp_path):
    with pytest.raises(UserError, match="none for training"):
        prepare(dataset(4), tmp_path / "w", split="0/50/50")


# --- split, manifest, vocabulary ---------------------------------------------------------------


def test_split_is_by_image_disjoint_and_70_15_15(dataset, tmp_path):
    report = prepare(dataset(40), tmp_path / "work")
    records = read_manifest(tmp_path / "work")
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 40
    sizes = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    assert sizes == {"train": 28, "val": 6, "test": 6}
    assert {s: v["images"] for s, v in report["splits"].items()} == sizes
    assert report["splits"]["train"]["captions"] == 56
    # all captions of an image travel with it: each image's two captions share its number
    for r in records:
        assert len({c.split()[2] for c in r.captions}) == 1


def test_manifest_is_sorted_by_id_with_absolute_paths(dataset, tmp_path):
    prepare(dataset(12), tmp_path / "work")
    records = read_manifest(tmp_path / "work")
    assert [r.id for r in records] == sorted(r.id for r in records)
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)


def test_same_input_and_seed_give_byte_identical_files(dataset, tmp_path):
    folder = dataset(30, extra=[["kettle kettle kettle", "images/img03.png"]])
    prepare(folder, tmp_path / "a", seed=7)
    prepare(folder, tmp_path / "b", seed=7)
    for name in (MANIFEST_NAME, VOCAB_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_another_seed_gives_another_split_of_the_same_images(dataset, tmp_path):
    folder = dataset(30)
    prepare(folder, tmp_path / "a", seed=0)
    prepare(folder, tmp_path / "b", seed=1)
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert [r.id for r in a] == [r.id for r in b]
    assert [r.split for r in a] != [r.split for r in b]


def test_vocabulary_comes_from_train_only_with_min_count(dataset, tmp_path):
    prepare(dataset(20), tmp_path / "work", min_word_count=2)
    vocab = Vocabulary.load(tmp_path / "work" / VOCAB_NAME)
    records = read_manifest(tmp_path / "work")
    train_words = [w for r in records if r.split == "train" for c in r.captions for w in c.split()]
    expected = sorted(w for w in set(train_words) if train_words.count(w) >= 2)
    assert vocab.itos[: len(SPECIALS)] == list(SPECIALS)
    assert sorted(vocab.itos[len(SPECIALS) :]) == expected
    # each image's "numberN" appears twice, only in its own split: val/test numbers are unknown
    val_number = next(r for r in records if r.split == "val").captions[0].split()[2]
    assert val_number not in vocab.stoi


def test_report_gives_vocabulary_size_and_val_coverage(dataset, tmp_path):
    report = prepare(dataset(20), tmp_path / "work", min_word_count=2)
    vocab = Vocabulary.load(tmp_path / "work" / VOCAB_NAME)
    assert report["vocabulary"]["size"] == len(vocab)
    # val captions: "a dog numberN sits on grassJ" -> 6 words, numberN unknown, rest known
    assert report["vocabulary"]["val_token_coverage"] == pytest.approx(5 / 6, abs=1e-4)


def test_parquet_source_extracts_images_into_workdir(tmp_path):
    rows = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buffer, format="PNG")
        rows.append({"bytes": buffer.getvalue(), "path": f"{i}.png"})
    table = pa.table(
        {
            "image": rows,
            "text": [f"a red square {i}" for i in range(6)],
            "generated_caption": ["kettle kettle kettle"] * 6,
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    report = prepare(tmp_path / "train.parquet", tmp_path / "work", min_word_count=1)
    records = read_manifest(tmp_path / "work")
    assert len(records) == 6 and report["dropped_captions"] == []
    assert all(Path(r.path).parent == tmp_path / "work" / "images" for r in records)
    assert all(r.captions[0].startswith("a red square") for r in records)


# --- summary and command line ------------------------------------------------------------------


def test_print_summary_shows_splits_vocabulary_and_drops(dataset, tmp_path):
    folder = dataset(10, extra=[["kettle kettle kettle kettle", "images/img00.png"], ["x", "images/missing.png"]])
    report = prepare(folder, tmp_path / "work")
    out = io.StringIO()
    print_summary(report, Console(file=out, width=200))
    text = out.getvalue()
    for expected in (
        "train",
        "val",
        "test",
        f"vocabulary: {report['vocabulary']['size']} tokens",
        "degenerate",
        "missing",
        "'kettle kettle kettle kettle'",
        REPORT_NAME,
    ):
        assert expected in text


def test_cli_prepare_writes_files_and_prints_a_summary(dataset, tmp_path):
    result = CliRunner().invoke(
        main, ["prepare", str(dataset(10)), "--out", str(tmp_path / "w"), "--min-word-count", "1", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "vocabulary" in result.output
    assert report_of(tmp_path / "w")["settings"]["seed"] == 3
    assert (tmp_path / "w" / MANIFEST_NAME).is_file() and (tmp_path / "w" / VOCAB_NAME).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "{tmp}/nope", "--out", "{tmp}/w"], "Error: no such file or folder: {tmp}/nope"),
        (["prepare", "--out", "{tmp}/w"], "Error: give a SOURCE"),
        (["prepare", "{tmp}", "--out", "{tmp}/w", "--split", "50/50"], "Error: --split '50/50'"),
    ],
)
def test_cli_prepare_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert one_line_error(result).startswith(message.format(tmp=tmp_path))


def test_cli_wrong_column_is_one_line_naming_it(dataset, tmp_path):
    result = CliRunner().invoke(
        main, ["prepare", str(dataset(3)), "--out", str(tmp_path / "w"), "--caption-column", "alt"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path}/data/captions.csv: no caption column 'alt' (columns: caption, image)"
    ]


@pytest.mark.parametrize("command", ["prepare", "synth"])
def test_cli_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example: python cli.py" in result.output

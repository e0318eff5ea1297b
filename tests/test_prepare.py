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


def test_a_symlink_out_of_the_dataset_is_reported_as_outside_dataset_and_never_read(dataset, tmp_path):
    folder = dataset(3, extra=[["stolen words", "images/passwd.png"]])
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "images" / "passwd.png").symlink_to(secret)
    report = prepare(folder, tmp_path / "work", min_word_count=1)
    assert report["dropped_images"] == [
        {
            "image": "images/passwd.png",
            "where": "captions.csv:8",
            "rule": "outside_dataset",
            "reason": f"a symlink that resolves to {secret}, outside the dataset folder {folder}",
            "captions": 1,
        }
    ]
    assert "stolen" not in (tmp_path / "work" / MANIFEST_NAME).read_text()


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


# --- a given split: --split-file and Karpathy's dataset_*.json ----------------------------------


def write_split(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def splits_of(workdir: Path) -> dict[str, str]:
    return {r.id: r.split for r in read_manifest(workdir)}


def test_split_file_is_followed_by_file_name_or_path_with_dev_as_val(dataset, tmp_path):
    folder = dataset(5)  # captions.csv writes images/img00.png ...
    split = write_split(
        tmp_path / "split.csv",
        [
            "image,split",
            "img00.png,train",
            "images/img01.png,train",
            "img02.png,dev",
            "img03.png,val",
            "img04.png,test",
        ],
    )
    report = prepare(folder, tmp_path / "work", split_file=split, min_word_count=1)
    assert splits_of(tmp_path / "work") == {
        "images/img00.png": "train",
        "images/img01.png": "train",
        "images/img02.png": "val",
        "images/img03.png": "val",
        "images/img04.png": "test",
    }
    assert report["splits"] == {
        "train": {"images": 2, "captions": 4},
        "val": {"images": 2, "captions": 4},
        "test": {"images": 1, "captions": 2},
    }
    assert report["given_split"] == {
        "source": str(split),
        "entries": 5,
        "listed": {"train": 2, "val": 2, "test": 1},
        "unmatched_entries": [],
        "images_not_in_split": 0,
    }
    assert report["settings"]["split"] is None and report["settings"]["seed"] is None
    assert report["settings"]["split_file"] == str(split) and report["dropped_images"] == []


def test_split_file_without_header_or_with_tabs_and_extra_columns(dataset, tmp_path):
    folder = dataset(3)
    for name, lines in {
        "plain.csv": ["img00.png,train", "img01.png,TRAIN", "img02.png,restval"],
        "tabs.tsv": ["id\tfile\tsplit", "7\timg00.png\ttrain", "8\timg01.png\ttrain", "9\timg02.png\ttrain"],
    }.items():
        prepare(folder, tmp_path / "work", split_file=write_split(tmp_path / name, lines), min_word_count=1)
        assert list(splits_of(tmp_path / "work").values()) == ["train"] * 3


def test_split_rows_naming_no_image_and_images_it_does_not_mention_are_reported(dataset, tmp_path):
    folder = dataset(4)
    split = write_split(tmp_path / "split.csv", ["image,split", "img00.png,train", "img01.png,dev", "nope.jpg,test"])
    report = prepare(folder, tmp_path / "work", split_file=split, min_word_count=1)
    assert splits_of(tmp_path / "work") == {"images/img00.png": "train", "images/img01.png": "val"}
    assert report["given_split"]["unmatched_entries"] == [
        {
            "image": "nope.jpg",
            "where": "split.csv:4",
            "rule": "unknown_image",
            "reason": "names no image of the caption source",
            "split": "test",
        }
    ]
    assert report["given_split"]["images_not_in_split"] == 2
    assert report["dropped_images"] == [
        {
            "image": f"images/img0{i}.png",
            "where": f"captions.csv:{2 * i + 2}",
            "rule": "not_in_split",
            "reason": "not in the split of split.csv",
            "captions": 2,
        }
        for i in (2, 3)
    ]
    assert report["splits"]["test"] == {"images": 0, "captions": 0}
    out = io.StringIO()
    print_summary(report, Console(file=out, width=300))
    text = out.getvalue()
    assert (
        f"split given by {split}: 3 entries (train 1, val 1, test 1); 1 name no image of the source, 2 image(s)" in text
    )
    assert "split entry │ unknown_image │     1 │ split.csv:4: nope.jpg" in text


def test_a_file_name_two_images_share_is_ambiguous(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path / "data" / "one", ["a.png", "b.png"])
    tiny_images(tmp_path / "data" / "two", ["a.png"])
    rows = [["image", "caption"], ["one/a.png", "a red one"], ["two/a.png", "a blue one"], ["one/b.png", "a dog"]]
    write_csv(tmp_path / "data" / "captions.csv", rows)
    split = write_split(tmp_path / "split.csv", ["a.png,val", "b.png,train"])
    report = prepare(tmp_path / "data", tmp_path / "work", split_file=split, min_word_count=1)
    assert splits_of(tmp_path / "work") == {"one/b.png": "train"}
    (entry,) = report["given_split"]["unmatched_entries"]
    assert entry["rule"] == "ambiguous" and entry["reason"] == "2 images match it: one/a.png, two/a.png"
    assert {e["image"]: e["rule"] for e in report["dropped_images"]} == {
        "one/a.png": "not_in_split",
        "two/a.png": "not_in_split",
    }


def test_a_split_file_with_train_and_dev_only_leaves_test_empty(dataset, tmp_path):
    split = write_split(
        tmp_path / "split.csv", ["image,split", *(f"img{i:02d}.png,{'dev' if i > 5 else 'train'}" for i in range(8))]
    )
    report = prepare(dataset(8), tmp_path / "work", split_file=split, min_word_count=1)
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 6, "val": 2, "test": 0}


def test_vocabulary_comes_from_the_train_split_of_the_file(dataset, tmp_path):
    split = write_split(
        tmp_path / "split.csv", ["img00.png,train", "img01.png,train", "img02.png,dev", "img03.png,test"]
    )
    prepare(dataset(4), tmp_path / "work", split_file=split, min_word_count=1)
    vocab = Vocabulary.load(tmp_path / "work" / VOCAB_NAME)
    assert {"number0", "number1"} <= set(vocab.itos) and not {"number2", "number3"} & set(vocab.itos)


def test_no_train_image_in_the_split_file_is_refused(dataset, tmp_path):
    split = write_split(tmp_path / "split.csv", ["img00.png,dev", "img01.png,test"])
    with pytest.raises(UserError, match=r"^none of the 2 usable image\(s\) is in the train split of "):
        prepare(dataset(2), tmp_path / "work", split_file=split)


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ["image,split", "img00.png,train", "img01.png,dev", "img00.png,test"],
            "split.csv:4: img00.png is in two splits: train (split.csv:2) and test",
        ),
        (
            ["image,split", "img00.png,train", "images/img00.png,dev"],
            "split.csv:3: images/img00.png is in two splits: train (as img00.png, split.csv:2) and val",
        ),
        (
            ["image,split", "img00.png,train", "img01.png,validation"],
            "split.csv:3: unknown split 'validation' for img01.png "
            "(expected train, restval, val, dev, test; dev means val, restval train)",
        ),
        (["img00.png,train", "img01.png"], "split.csv:2: 1 field(s) where the file has 2 (image,split)"),
        (["image,split", ",train"], "split.csv:2: no image named"),
        (["image,set,x", "img00.png,train,1"], "split.csv:1: expected image,split (a header naming a `split` column"),
        (["image,split"], "--split-file {split} lists no images"),
        ([], "--split-file {split} is empty"),
    ],
)
def test_bad_split_files_are_one_line_naming_the_line(dataset, tmp_path, lines, message):
    split = write_split(tmp_path / "split.csv", lines)
    args = ["prepare", str(dataset(2)), "--out", str(tmp_path / "w"), "--split-file", str(split)]
    assert one_line_error(CliRunner().invoke(main, args)).startswith("Error: " + message.format(split=split))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        (["--split", "70/15/15"], "--split and --split-file do not go together"),
        (["--seed", "0"], "--seed does not apply with --split-file"),
    ],
)
def test_options_of_the_random_split_are_refused_with_a_split_file(dataset, tmp_path, option, message):
    split = write_split(tmp_path / "split.csv", ["img00.png,train"])
    args = ["prepare", str(dataset(1)), "--out", str(tmp_path / "w"), "--split-file", str(split), *option]
    assert one_line_error(CliRunner().invoke(main, args)).startswith("Error: " + message)


def test_missing_split_file_is_one_line(dataset, tmp_path):
    args = ["prepare", str(dataset(1)), "--out", str(tmp_path / "w"), "--split-file", str(tmp_path / "no.csv")]
    assert one_line_error(CliRunner().invoke(main, args)) == f"Error: --split-file {tmp_path}/no.csv: no such file"


def karpathy(folder: Path, images: list[dict], name: str = "dataset_flickr8k.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def karpathy_image(name: str, split: str, *words: str) -> dict:
    return {
        "filename": name,
        "split": split,
        "sentences": [{"raw": f"A {w} here .", "tokens": ["a", w]} for w in words],
    }


def test_karpathy_json_gives_captions_and_split_with_restval_as_train(tmp_path, tiny_images):
    data = tmp_path / "f8k"
    tiny_images(data / "Flicker8k_Dataset", ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"])
    karpathy(
        data,
        [
            karpathy_image("1.jpg", "train", "dog", "puppy"),
            karpathy_image("2.jpg", "restval", "cat"),
            karpathy_image("3.jpg", "val", "bird"),
            karpathy_image("4.jpg", "test", "fish"),
        ],
    )
    report = prepare(data, tmp_path / "work", min_word_count=1)
    assert splits_of(tmp_path / "work") == {
        "Flicker8k_Dataset/1.jpg": "train",
        "Flicker8k_Dataset/2.jpg": "train",
        "Flicker8k_Dataset/3.jpg": "val",
        "Flicker8k_Dataset/4.jpg": "test",
    }
    assert read_manifest(tmp_path / "work")[0].captions == ["a dog here", "a puppy here"]
    assert report["given_split"]["listed"] == {"train": 2, "val": 1, "test": 1}
    assert report["source"] == f"{data}/dataset_flickr8k.json (flickr8k, with its split)"
    assert Vocabulary.load(tmp_path / "work" / VOCAB_NAME).itos[4:] == ["a", "here", "cat", "dog", "puppy"]
    # an image the json does not list (5.jpg) is simply not in the dataset: it names none
    assert report["dropped_images"] == []


def test_karpathy_bad_input_is_one_line(tmp_path, tiny_images):
    tiny_images(tmp_path / "d", ["1.jpg", "2.jpg"])
    cases = {
        "unknown.json": (
            [karpathy_image("1.jpg", "train", "dog"), karpathy_image("2.jpg", "holdout", "cat")],
            "unknown.json:images[1]: unknown split 'holdout' for 2.jpg",
        ),
        "twice.json": (
            [karpathy_image("1.jpg", "train", "dog"), karpathy_image("1.jpg", "test", "cat")],
            "twice.json:images[1]: 1.jpg is in two splits: train (twice.json:images[0]) and test",
        ),
    }
    for name, (images, message) in cases.items():
        path = karpathy(tmp_path / "d", images, name)
        result = CliRunner().invoke(main, ["prepare", str(path), "--out", str(tmp_path / "w")])
        assert one_line_error(result).startswith("Error: " + message)
    (tmp_path / "d" / "broken.json").write_text('{"images": [')
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "d" / "broken.json"), "--out", str(tmp_path / "w")])
    assert one_line_error(result).startswith(f"Error: {tmp_path}/d/broken.json: not a readable JSON file")


def test_karpathy_split_refuses_split_and_yields_to_a_split_file(tmp_path, tiny_images):
    tiny_images(tmp_path / "d", ["1.jpg", "2.jpg"])
    path = karpathy(tmp_path / "d", [karpathy_image("1.jpg", "train", "dog"), karpathy_image("2.jpg", "test", "cat")])
    result = CliRunner().invoke(main, ["prepare", str(path), "--out", str(tmp_path / "w"), "--split", "70/15/15"])
    assert one_line_error(result) == (
        f"Error: --split does not apply: {path} gives each image its split (--split-file FILE gives another)"
    )
    split = write_split(tmp_path / "split.csv", ["1.jpg,train", "2.jpg,train"])
    report = prepare(path, tmp_path / "w", split_file=split, min_word_count=1)
    assert set(splits_of(tmp_path / "w").values()) == {"train"}
    assert report["notes"] == [f"the split of {path} was not used: --split-file {split} replaces it"]


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

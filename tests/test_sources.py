"""Readers of every input layout: CSV (headed, headerless, named columns), Flickr8k's two text
layouts, parquet as Hugging Face writes it, and the --hf download path; plus every way a whole
source can be unusable."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prepare.sources import open_source
from store.errors import UserError


def read(source, workdir=None, **options):
    src = open_source(source, workdir or Path(source).parent / "work", **options)
    return list(src.rows), src.notes


def pairs(rows):
    return [(r.image, r.caption) for r in rows]


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --- CSV and text layouts ---------------------------------------------------------------------


def test_csv_with_header_in_a_folder(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path / "images", ["a.png", "b.png"])
    write_csv(
        tmp_path / "captions.csv",
        [["image", "caption"], ["images/a.png", "A dog."], ["images/a.png", "A puppy"], ["images/b.png", "A cat"]],
    )
    rows, notes = read(tmp_path)
    assert pairs(rows) == [("images/a.png", "A dog."), ("images/a.png", "A puppy"), ("images/b.png", "A cat")]
    assert rows[0].path == tmp_path / "images" / "a.png" and rows[0].path.is_absolute()
    assert rows[0].where == "captions.csv:2" and not rows[0].rule and notes == []


def test_original_headerless_caption_then_image_path(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path / "imgs", ["x.jpg"])
    write_csv(tmp_path / "data.csv", [["a red car", "imgs/x.jpg"], ["a car, parked", "imgs/x.jpg"]])
    rows, _ = read(tmp_path / "data.csv")
    assert pairs(rows) == [("imgs/x.jpg", "a red car"), ("imgs/x.jpg", "a car, parked")]
    assert rows[0].where == "data.csv:1"


def test_recognised_column_names_ignore_case_spaces_and_extra_columns(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path, ["p.png"])
    write_csv(tmp_path / "c.csv", [["ID", "Image Path", "Caption"], ["7", "p.png", "hello"]])
    rows, _ = read(tmp_path / "c.csv")
    assert pairs(rows) == [("p.png", "hello")]


def test_named_columns_override_recognition(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path, ["p.png"])
    write_csv(tmp_path / "c.csv", [["pic", "alt_text", "caption"], ["p.png", "use me", "not me"]])
    rows, _ = read(tmp_path / "c.csv", image_column="pic", caption_column="alt_text")
    assert pairs(rows) == [("p.png", "use me")]


def test_pexel_columns_prefer_text_over_generated_caption_in_csv(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path, ["p.png"])
    write_csv(tmp_path / "c.csv", [["generated_caption", "text", "image"], ["kettle kettle", "a portrait", "p.png"]])
    rows, _ = read(tmp_path / "c.csv")
    assert pairs(rows) == [("p.png", "a portrait")]


def test_flickr8k_captions_txt_with_images_subfolder(tmp_path, tiny_images):
    tiny_images(tmp_path / "Images", ["1000_aa.jpg", "1001_bb.jpg"])
    (tmp_path / "captions.txt").write_text(
        "image,caption\n"
        "1000_aa.jpg,A child in a pink dress .\n"
        '1000_aa.jpg,"A girl , going into a building ."\n'
        "1001_bb.jpg,A dog , unquoted comma .\n"
    )
    rows, _ = read(tmp_path)
    assert pairs(rows) == [
        ("Images/1000_aa.jpg", "A child in a pink dress ."),
        ("Images/1000_aa.jpg", "A girl , going into a building ."),
        ("Images/1001_bb.jpg", "A dog , unquoted comma ."),
    ]


def test_flickr8k_token_txt_found_in_a_subfolder(tmp_path, tiny_images):
    tiny_images(tmp_path / "Flicker8k_Dataset", ["1000_aa.jpg"])
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text(
        "1000_aa.jpg#0\tA child in a pink dress .\n1000_aa.jpg#1\tA girl going inside .\n"
    )
    (text / "Flickr_8k.trainImages.txt").write_text("1000_aa.jpg\n")
    rows, _ = read(tmp_path)
    assert pairs(rows) == [
        ("Flicker8k_Dataset/1000_aa.jpg", "A child in a pink dress ."),
        ("Flicker8k_Dataset/1000_aa.jpg", "A girl going inside ."),
    ]


def test_flickr30k_pipe_separated_results(tmp_path, tiny_images):
    tiny_images(tmp_path / "flickr30k_images", ["1.jpg"])
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| Two men, one with a hat .\n")
    rows, _ = read(tmp_path)
    assert pairs(rows) == [("flickr30k_images/1.jpg", "Two men, one with a hat .")]


def test_utf8_bom_header_is_recognised(tmp_path, tiny_images):
    tiny_images(tmp_path, ["a.png"])
    (tmp_path / "c.csv").write_bytes("\ufeffcaption,image\ncafé au lait,a.png\n".encode())
    rows, notes = read(tmp_path / "c.csv")
    assert pairs(rows) == [("a.png", "café au lait")] and notes == []


def test_non_utf8_lines_are_read_as_latin1_and_reported(tmp_path, tiny_images):
    tiny_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "c.csv").write_bytes(b"caption,image\ncaf\xe9 cr\xe8me,a.png\nna\xc3\xafve,b.png\n")
    rows, notes = read(tmp_path / "c.csv")
    assert pairs(rows) == [("a.png", "café crème"), ("b.png", "naïve")]
    assert notes == ["c.csv: 1 line(s) were not valid UTF-8 and were read as Latin-1"]


def test_utf16_csv_is_decoded(tmp_path, tiny_images):
    tiny_images(tmp_path, ["a.png"])
    (tmp_path / "c.csv").write_bytes("caption,image\nein Hund,a.png\n".encode("utf-16"))
    rows, _ = read(tmp_path / "c.csv")
    assert pairs(rows) == [("a.png", "ein Hund")]


def test_malformed_lines_become_rows_with_a_reason(tmp_path, tiny_images):
    tiny_images(tmp_path, ["a.png"])
    (tmp_path / "c.csv").write_text("image,caption,source\na.png,fine,x\na.png\n\n")
    rows, _ = read(tmp_path / "c.csv")
    assert [(r.rule, r.where) for r in rows] == [("", "c.csv:2"), ("malformed", "c.csv:3")]
    assert rows[1].reason == "1 fields where the file has 3"


def test_oversized_field_is_skipped_and_reading_goes_on(tmp_path, tiny_images):
    tiny_images(tmp_path, ["a.png"])
    huge = "x" * 200_000  # over csv.field_size_limit()
    (tmp_path / "c.csv").write_text(f'image,caption\na.png,"{huge}"\na.png,after\n')
    rows, _ = read(tmp_path / "c.csv")
    assert rows[0].rule == "malformed"
    assert pairs(rows[1:]) == [("a.png", "after")]


def test_paths_escaping_the_dataset_folder_are_refused(tmp_path, tiny_images, write_csv):
    data = tmp_path / "data"
    tiny_images(tmp_path, ["outside.png"])
    write_csv(
        data / "captions.csv",
        [
            ["image", "caption"],
            ["../../etc/passwd", "secret"],
            ["../outside.png", "sneaky"],
            [str(tmp_path / "outside.png"), "absolute"],
        ],
    )
    rows, _ = read(data)
    assert [r.rule for r in rows] == ["outside_dataset"] * 3
    assert all(r.path is None for r in rows)
    assert rows[0].image == "../../etc/passwd"


def test_symlinks_resolving_outside_the_dataset_folder_are_refused(tmp_path, tiny_images, write_csv):
    data = tmp_path / "data"
    tiny_images(data / "images", ["a.png"])
    (secret,) = tiny_images(tmp_path / "elsewhere", ["secret.png"])  # a real image, outside the folder
    (data / "images" / "link.png").symlink_to(secret)
    (data / "images" / "inside.png").symlink_to(data / "images" / "a.png")
    (data / "disk").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "deep").mkdir()
    (data / "deep" / "bare.png").symlink_to(secret)
    rows = [["image", "caption"], ["images/link.png", "x"], ["disk/secret.png", "y"], ["bare.png", "z"]]
    write_csv(data / "captions.csv", [*rows, ["images/inside.png", "ok"]])
    found, _ = read(data)
    assert [(r.image, r.rule, r.path) for r in found] == [
        ("images/link.png", "outside_dataset", None),
        ("disk/secret.png", "outside_dataset", None),
        ("bare.png", "outside_dataset", None),  # found by name under the folder, then refused
        ("images/inside.png", "", data / "images" / "inside.png"),  # a link that stays inside is fine
    ]
    assert found[0].reason == f"a symlink that resolves to {secret}, outside the dataset folder {data}"


def test_absolute_path_inside_the_folder_is_accepted(tmp_path, tiny_images, write_csv):
    (path,) = tiny_images(tmp_path / "images", ["a.png"])
    write_csv(tmp_path / "captions.csv", [["image", "caption"], [str(path), "ok"]])
    rows, _ = read(tmp_path)
    assert pairs(rows) == [("images/a.png", "ok")] and rows[0].path == path


def test_missing_image_keeps_the_path_tried(tmp_path, write_csv):
    write_csv(tmp_path / "captions.csv", [["image", "caption"], ["images/gone.png", "a ghost"]])
    rows, _ = read(tmp_path)
    assert rows[0].image == "images/gone.png" and rows[0].path == tmp_path / "images/gone.png"
    assert not rows[0].path.exists() and not rows[0].rule


def test_bare_name_in_two_subfolders_is_ambiguous(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path / "one", ["a.png"])
    tiny_images(tmp_path / "two", ["a.png"])
    write_csv(tmp_path / "captions.csv", [["image", "caption"], ["a.png", "which one"]])
    rows, _ = read(tmp_path)
    assert rows[0].rule == "ambiguous"


# --- Karpathy's dataset_*.json ------------------------------------------------------------------


def write_karpathy(path: Path, images: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_karpathy_json_in_a_folder_finds_images_by_name_and_gives_the_split(tmp_path, tiny_images):
    tiny_images(tmp_path / "Flicker8k_Dataset", ["1000_aa.jpg"])
    tiny_images(tmp_path / "images" / "val2014", ["c.jpg"])
    tiny_images(tmp_path / "images", ["d.jpg"])
    write_karpathy(
        tmp_path / "dataset_coco.json",
        [
            {"filename": "1000_aa.jpg", "split": "restval", "sentences": [{"raw": "A dog .", "tokens": ["a", "dog"]}]},
            {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": [{"tokens": ["a", "cat"]}]},
            {"filepath": "train2014", "filename": "d.jpg", "split": "test", "sentences": [{"raw": "A bird ."}]},
            {"split": "train", "sentences": [{"raw": "no file"}]},
        ],
    )
    src = open_source(tmp_path, tmp_path / "work")
    rows = list(src.rows)
    assert [(r.image, r.caption, r.written, r.where, r.rule) for r in rows] == [
        ("Flicker8k_Dataset/1000_aa.jpg", "A dog .", "1000_aa.jpg", "dataset_coco.json:images[0]", ""),
        ("images/val2014/c.jpg", "a cat", "val2014/c.jpg", "dataset_coco.json:images[1]", ""),
        ("images/d.jpg", "A bird .", "train2014/d.jpg", "dataset_coco.json:images[2]", ""),  # found by name
        ("", "", "", "dataset_coco.json:images[3]", "malformed"),
    ]
    assert src.description == f"{tmp_path}/dataset_coco.json (coco, with its split)"
    assert [(e.image, e.split, e.where) for e in src.split.entries] == [
        ("1000_aa.jpg", "train", "dataset_coco.json:images[0]"),
        ("val2014/c.jpg", "val", "dataset_coco.json:images[1]"),
        ("train2014/d.jpg", "test", "dataset_coco.json:images[2]"),
    ]


def test_a_caption_file_gives_no_split(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path, ["a.png"])
    write_csv(tmp_path / "captions.csv", [["image", "caption"], ["a.png", "a dog"]])
    assert open_source(tmp_path, tmp_path / "work").split is None


def test_karpathy_json_beside_another_caption_file_is_refused(tmp_path, tiny_images, write_csv):
    tiny_images(tmp_path, ["a.png"])
    write_csv(tmp_path / "captions.txt", [["image", "caption"], ["a.png", "a dog"]])
    write_karpathy(tmp_path / "dataset_flickr8k.json", [])
    with pytest.raises(UserError) as e:
        read(tmp_path)
    assert str(e.value) == (
        f"several caption files in {tmp_path} (captions.txt, dataset_flickr8k.json): pass the one to read as SOURCE"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"images": [', "not a readable JSON file"),
        ('{"annotations": []}', 'not a Karpathy dataset file (no "images" list of filename, split, sentences)'),
        ('[{"filename": "a.png"}]', 'not a Karpathy dataset file (no "images" list'),
        (
            '{"images": [{"filename": "a.png"}]}',
            "dataset_x.json:images[0]: no split for a.png (expected train, restval, val, dev, test",
        ),
    ],
)
def test_unusable_karpathy_json_is_one_user_error(tmp_path, content, message):
    (tmp_path / "dataset_x.json").write_text(content)
    with pytest.raises(UserError) as e:
        read(tmp_path / "dataset_x.json")
    assert message in str(e.value) and "\n" not in str(e.value)


# --- whole sources that cannot be used ---------------------------------------------------------


def test_no_such_source(tmp_path):
    with pytest.raises(UserError, match="no such file or folder: .*nope"):
        open_source(tmp_path / "nope", tmp_path / "w")


def test_no_source_and_no_hf(tmp_path):
    with pytest.raises(UserError, match="give a SOURCE"):
        open_source(None, tmp_path / "w")


def test_empty_file(tmp_path):
    (tmp_path / "captions.csv").write_bytes(b"")
    with pytest.raises(UserError, match="captions.csv is empty"):
        open_source(tmp_path, tmp_path / "w")


def test_blank_first_line_counts_as_empty(tmp_path):
    (tmp_path / "captions.csv").write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        read(tmp_path)


def test_folder_without_captions(tmp_path, tiny_images):
    tiny_images(tmp_path, ["a.png"])
    with pytest.raises(UserError, match="no caption file .* in "):
        open_source(tmp_path, tmp_path / "w")


def test_folder_with_several_csv_files(tmp_path, write_csv):
    write_csv(tmp_path / "a.csv", [["image", "caption"]])
    write_csv(tmp_path / "b.csv", [["image", "caption"]])
    with pytest.raises(UserError, match=r"several CSV files .*\(a.csv, b.csv\)"):
        open_source(tmp_path, tmp_path / "w")


def test_unrecognisable_columns_name_the_file_and_the_missing_column(tmp_path, write_csv):
    write_csv(tmp_path / "c.csv", [["foo", "bar"], ["1", "2"]])
    with pytest.raises(UserError, match=r"c.csv: no recognisable image column.*--image-column"):
        read(tmp_path / "c.csv")


def test_header_with_only_an_image_column(tmp_path, write_csv):
    write_csv(tmp_path / "c.csv", [["image", "label"], ["a.png", "x"]])
    with pytest.raises(UserError, match="no recognisable caption column"):
        read(tmp_path / "c.csv")


def test_named_column_that_does_not_exist(tmp_path, write_csv):
    write_csv(tmp_path / "c.csv", [["image", "caption"], ["a.png", "x"]])
    with pytest.raises(UserError, match=r"c.csv: no caption column 'alt' \(columns: image, caption\)"):
        read(tmp_path / "c.csv", caption_column="alt")


# --- parquet and Hugging Face ------------------------------------------------------------------


def write_pexel_parquet(path: Path, rows: list[tuple]) -> Path:
    """rows of (image bytes or None, image path, text, generated_caption), as HF writes them."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": p} for b, p, _, _ in rows], type=image_type),
            "text": pa.array([t for _, _, t, _ in rows], type=pa.string()),
            "generated_caption": pa.array([g for _, _, _, g in rows], type=pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_parquet_image_struct_is_extracted_and_text_preferred(tmp_path):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    shard = write_pexel_parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet",
        [
            (red, "0.png", "portrait of a woman", "kettle kettle kettle"),
            (blue, None, "a blue wall", "a wall"),
            (red, "0.png", "a red square", "red"),
        ],
    )
    work = tmp_path / "work"
    rows, _ = read(shard, work)
    assert [r.caption for r in rows] == ["portrait of a woman", "a blue wall", "a red square"]
    assert rows[0].path == rows[2].path  # the same bytes are the same image
    assert rows[0].path.parent == work / "images" and rows[0].path.read_bytes() == red
    assert rows[1].path.suffix == ".png" and rows[1].path.read_bytes() == blue
    assert rows[1].where == "train-00000-of-00001.parquet row 1"


def test_parquet_rerun_removes_images_a_killed_run_left_half_written(tmp_path):
    import subprocess
    import sys

    shard = write_pexel_parquet(tmp_path / "s.parquet", [(png_bytes((9, 9, 9)), "a.png", "a grey square", "")])
    images = tmp_path / "work" / "images"
    images.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = images / f"0123456789abcdef0123.png.tmp{dead.stdout.strip()}"  # its writer has exited
    live = images / f"0123456789abcdef0123.png.tmp{os.getpid()}"  # a writer still running
    stale.write_bytes(b"half an image")
    live.write_bytes(b"half an image")
    rows, _ = read(shard, tmp_path / "work")
    assert rows[0].path.read_bytes() == png_bytes((9, 9, 9))
    assert not stale.exists() and live.exists()


def test_parquet_folder_reads_every_shard_in_order(tmp_path):
    for i in range(2):
        write_pexel_parquet(
            tmp_path / "data" / f"train-0000{i}.parquet", [(png_bytes((i, 0, 0)), f"{i}.png", f"caption {i}", "")]
        )
    rows, _ = read(tmp_path, tmp_path / "work")
    assert [r.caption for r in rows] == ["caption 0", "caption 1"]


def test_parquet_missing_bytes_and_caption_become_row_problems(tmp_path):
    shard = write_pexel_parquet(
        tmp_path / "s.parquet", [(None, None, "no picture", ""), (png_bytes((1, 2, 3)), "x.png", None, "")]
    )
    rows, _ = read(shard, tmp_path / "work")
    assert rows[0].rule == "no_image"
    assert rows[1].caption == "" and not rows[1].rule


def test_parquet_binary_column_and_list_of_captions(tmp_path):
    table = pa.table(
        {
            "jpg": pa.array([png_bytes((9, 9, 9))], type=pa.binary()),
            "captions": pa.array([["one", "two"]], type=pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    rows, _ = read(tmp_path / "s.parquet", tmp_path / "work")
    assert [r.caption for r in rows] == ["one", "two"] and rows[0].path == rows[1].path


def test_parquet_without_a_caption_column(tmp_path):
    pq.write_table(pa.table({"image": pa.array([b"x"]), "label": pa.array([1])}), tmp_path / "s.parquet")
    with pytest.raises(UserError, match="s.parquet: no recognisable caption column"):
        read(tmp_path / "s.parquet", tmp_path / "work")


def test_corrupt_parquet_shard_is_noted_and_skipped(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"not parquet at all")
    write_pexel_parquet(tmp_path / "b.parquet", [(png_bytes((5, 5, 5)), "x.png", "fine", "")])
    rows, notes = read(tmp_path, tmp_path / "work")
    assert [r.caption for r in rows] == ["fine"]
    assert len(notes) == 1 and notes[0].startswith("a.parquet: skipped")


def test_hf_downloads_parquet_shards_then_reads_them(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    write_pexel_parquet(
        snapshot / "data" / "train-00000-of-00001.parquet", [(png_bytes((1, 1, 1)), "0.png", "a portrait", "")]
    )
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    src = open_source(None, tmp_path / "work", hf="someone/pexels", revision="abc123")
    assert [r.caption for r in src.rows] == ["a portrait"]
    assert src.description == "hf:someone/pexels@abc123"
    assert calls == [
        {"repo_id": "someone/pexels", "repo_type": "dataset", "revision": "abc123", "allow_patterns": "*.parquet"}
    ]


def test_hf_dataset_without_parquet_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "snapshot").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: str(tmp_path / "snapshot"))
    with pytest.raises(UserError, match="has no parquet files at revision main"):
        open_source(None, tmp_path / "work", hf="someone/empty")


def test_hf_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(**_):
        raise OSError("could not connect to huggingface.co\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as error:
        open_source(None, tmp_path / "work", hf="someone/pexels")
    assert str(error.value) == (
        "cannot fetch Hugging Face dataset someone/pexels: OSError could not connect to huggingface.co"
    )


def test_hf_and_source_together_is_refused(tmp_path):
    with pytest.raises(UserError, match="either SOURCE or --hf"):
        open_source(tmp_path, tmp_path / "work", hf="someone/pexels")

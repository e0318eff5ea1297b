"""`evaluate` and `caption`: metric files, output formats, bad images, mismatched stores."""

import csv
import hashlib
import json
import shutil

import pytest
from PIL import Image

from evaluation.metrics import score_captions
from store.rundir import RunDir
from tests.helpers import TINY, run_cli


def test_metrics_on_known_inputs():
    refs = {"a": ["a red circle above a blue square", "a red circle and a blue square"], "b": ["a green triangle"]}
    perfect, _ = score_captions(
        refs, {"a": "a red circle above a blue square", "b": "a green triangle"}, use_java=False
    )
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)
    wrong, notes = score_captions(refs, {"a": "two yellow stars", "b": "purple"}, use_java=False)
    assert wrong["BLEU-1"] < 0.01 and wrong["CIDEr-D"] == pytest.approx(0.0)
    assert "METEOR" not in wrong and "METEOR skipped" in notes[0]
    half, _ = score_captions({"a": ["red circle"]}, {"a": "red square"}, use_java=False)
    assert half["BLEU-1"] == pytest.approx(0.5)


def test_evaluate_writes_scores_and_captions(trained):
    out = run_cli("evaluate", trained, "--split", "val", "--beam", 2)
    assert "CIDEr-D" in out.stdout
    result = json.loads((RunDir(trained).eval_json("val")).read_text())
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(result["scores"])
    assert result["images"] > 0 and result["beam"] == 2
    with open(RunDir(trained).eval_captions("val")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["images"] and all(r["caption"] for r in rows)
    assert not any(marker in r["caption"] for r in rows for marker in ("<start>", "<end>", "<pad>"))


def test_caption_features_of_a_photo_equal_its_stored_features(trained, featurized):
    """`caption` encodes a new photo the way featurize did: its centre-crop feature is the stored one."""
    import numpy as np
    import torch

    from decoder.inference import encode_photos, inference_precision, load_captioner
    from store.features import FeatureStore, find_store
    from store.manifest import read_manifest

    loaded = load_captioner(RunDir(trained).best)
    assert inference_precision(loaded.state) == "fp32"  # the store's, recorded in the checkpoint
    records = read_manifest(featurized)[:6]
    features, errors = encode_photos(loaded, [featurized / r.path for r in records], workers=0)
    assert not errors and sorted(features) == list(range(6))
    with FeatureStore.open(find_store(featurized)) as store:
        stored = torch.from_numpy(store.read(np.arange(6))[:, 0].astype(np.float32))  # crop 0 is the centre
    computed = torch.stack([features[i] for i in range(6)])
    assert torch.allclose(computed, stored, rtol=2e-3, atol=1e-3)  # the store keeps float16


def test_caption_formats_and_bad_files(trained, featurized, tmp_path):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    images = sorted((featurized.parent / "synth" / "images").glob("*.png"))[:3]
    shutil.copy(images[0], photos / "one.png")
    Image.open(images[1]).convert("RGB").save(photos / "nested" / "two.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image, ignored")

    out = run_cli("caption", photos, "--run", trained, "--format", "json", "--workers", 0)
    rows = json.loads(out.stdout)
    by_name = {r["image"].split("/")[-1]: r for r in rows}
    assert set(by_name) == {"broken.jpg", "one.png", "two.jpg"}
    assert "error" in by_name["broken.jpg"] and by_name["one.png"]["caption"]
    assert "skipped" in out.stderr and "broken.jpg" in out.stderr

    out_csv = tmp_path / "c.csv"
    run_cli(
        "caption",
        photos / "one.png",
        "--run",
        trained,
        "--format",
        "csv",
        "--out",
        out_csv,
        "--beam",
        1,
        "--workers",
        0,
    )
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["caption"] and rows[0]["error"] == ""

    table = run_cli("caption", photos, "--checkpoint", RunDir(trained).last, "--workers", 0)
    assert "one.png" in table.stdout


def test_caption_fails_only_when_nothing_could_be_captioned(trained, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    out = run_cli("caption", tmp_path, "--run", trained, "--workers", 0, check=False)
    assert out.returncode == 1 and "none of the 1 images could be captioned" in out.stderr
    out = run_cli("caption", tmp_path / "missing", "--run", trained, check=False)
    assert out.returncode == 1 and out.stderr.strip().endswith("no such file or directory")


def test_a_run_refuses_a_store_from_another_dataset(trained, featurized, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(featurized, other)
    manifest = other / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # one image fewer: another dataset
    config = json.loads((trained / "config.json").read_text())
    assert config["decoder"]["workdir"] == str(featurized)
    out = run_cli("train", other, "--run", tmp_path / "r", *TINY, check=False)
    assert out.returncode == 1 and "built from other images" in out.stderr


def test_a_store_serves_another_split_of_the_same_images(featurized, tmp_path):
    """The split is not part of what the features depend on: a re-split manifest (as each fold of
    a cross-validation writes) trains on the same store without featurizing again."""
    other = tmp_path / "resplit"
    shutil.copytree(featurized, other)
    manifest = other / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    old_train = sum(len(row["captions"]) for row in rows if row["split"] == "train")
    for i, row in enumerate(rows):
        row["split"] = ("train", "train", "val", "test")[i % 4]
    manifest.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    [store] = (other / "features").glob("*.h5")
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    run = tmp_path / "r"
    out = run_cli("train", other, "--run", run, "--epochs", 1, *TINY)

    # one epoch over the new split's training captions (batches of 8), not the old split's
    new_train = sum(len(row["captions"]) for row in rows if row["split"] == "train")
    steps = -(-new_train // 8)
    assert steps != -(-old_train // 8)
    assert f"done: {run} after 1 epochs ({steps} steps)" in out.stderr
    with open(RunDir(run).batches_csv, newline="") as f:
        assert len(list(csv.DictReader(f))) == steps
    with open(RunDir(run).epochs_csv, newline="") as f:
        [epoch] = list(csv.DictReader(f))
    assert epoch["phase"] == "decoder" and float(epoch["val_loss"]) > 0
    assert json.loads((run / "config.json").read_text())["decoder"]["workdir"] == str(other)
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before  # the store is read, never rewritten


def test_checkpoint_store_identity_is_checked(featurized):
    from store.errors import UserError
    from store.features import FeatureStore, check_store_matches, find_store, store_identity

    with FeatureStore.open(find_store(featurized)) as store:
        identity = store_identity(store)
        check_store_matches(store, identity, "the run")  # its own identity passes
        with pytest.raises(UserError, match="images_sha256: the run has 'abc'"):
            check_store_matches(store, {**identity, "images_sha256": "abc"}, "the run")
        with pytest.raises(UserError, match="crop_size: the run has 42"):
            check_store_matches(store, {**identity, "crop_size": 42}, "the run")
        # a checkpoint from before images_sha256 recorded the manifest's hash: still checked
        old = {k: v for k, v in identity.items() if k != "images_sha256"}
        check_store_matches(store, old, "the run")
        with pytest.raises(UserError, match="manifest_sha256: the run has 'abc'"):
            check_store_matches(store, {**old, "manifest_sha256": "abc"}, "the run")

"""The Python API (legende): the CLI's captions from Python, one CNN per Captioner, ensembles,
training from Python, and the installed `legende` command."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import legende
from cli import main
from decoder.decoding_options import Decoding
from legende import Captioner
from store.errors import UserError
from store.rundir import RunDir
from tests.helpers import ROOT, run_cli


@pytest.fixture(scope="module")
def photos(featurized, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(sorted((featurized.parent / "synth" / "images").glob("*.png"))[:4]):
        shutil.copy(image, folder / f"p{i}.png")
    return folder


def test_api_and_cli_give_identical_captions(trained, photos):
    """`caption` on the command line and the API, with re-ranking: the same captions; and a path,
    a str, a PIL image or a mix of them caption as the folder does."""
    decoding = {"beam": 2, "rerank": 2, "candidates": 3}
    flags = [x for k, v in decoding.items() for x in (f"--{k}", v)]
    cli = json.loads(run_cli("caption", photos, "--run", trained, "--format", "json", *flags).stdout)
    cap = Captioner.load(trained)
    api = cap.caption_folder(photos, **decoding)
    assert [(r.image, r.caption, r.error) for r in api] == [(r["image"], r["caption"], None) for r in cli]
    captions = [r["caption"] for r in cli]
    paths = [Path(r["image"]) for r in cli]
    assert cap(str(paths[0]), **decoding) == captions[0]
    assert cap([Image.open(paths[1]), paths[2], paths[3]], **decoding) == captions[1:]


def test_api_and_cli_evaluate_alike(trained, monkeypatch):
    """`evaluate --report` is Captioner.evaluate: the same captions and scores, and the page. (Java
    is left out on both sides: it adds METEOR and ~8 s of JVM start-ups, and nothing to compare.)"""
    monkeypatch.setattr("evaluation.metrics.java_available", lambda: False)
    result = CliRunner().invoke(main, ["evaluate", str(trained), "--split", "val", "--beam", "2", "--report"])
    assert result.exit_code == 0, result.output
    written = json.loads(RunDir(trained).eval_json("val").read_text())
    api = Captioner.load(trained).evaluate("val", beam=2, write=False)
    assert api["scores"] == written["scores"] and api["images"] == written["images"]
    with open(RunDir(trained).eval_captions("val"), newline="") as f:
        assert [row["caption"] for row in csv.DictReader(f)] == [hyp for _, hyp in api["captions"]]
    assert (RunDir(trained).eval / "val.html").is_file() and "report" not in api


def test_the_cnn_is_built_once_and_defaults_are_decodings(trained, photos, monkeypatch):
    import decoder.inference

    built = []
    original = decoder.inference.inference_encoder
    monkeypatch.setattr(decoder.inference, "inference_encoder", lambda state: built.append(1) or original(state))
    cap = Captioner.load(trained)
    assert cap.decoding == Decoding()  # the CLI's defaults, read from one place
    image = sorted(photos.glob("*.png"))[0]
    first = cap(image)
    assert cap(image) == first and cap.caption_folder(photos)[0].caption == first
    assert len(built) == 1
    assert Captioner.load(trained, beam=1).decoding == Decoding(beam=1)
    with pytest.raises(TypeError):
        cap(image, bem=2)


def test_pil_images_caption_like_their_files(trained, tmp_path):
    """An RGBA image with transparency: the PIL image is composited on white as its file is."""
    path = tmp_path / "see-through.png"
    rgba = Image.new("RGBA", (90, 90), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (20, 20, 60, 60))
    rgba.save(path)
    cap = Captioner.load(trained)
    assert cap(Image.open(path)) == cap(path)
    assert cap([]) == []


def test_unreadable_images_and_missing_runs(trained, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cap = Captioner.load(trained)
    with pytest.raises(UserError, match="bad.png: cannot decode"):
        cap(tmp_path / "bad.png")
    [result] = cap.caption_folder(tmp_path)
    assert result.caption is None and result.error.startswith("cannot decode")
    with pytest.raises(UserError, match="no such run folder or checkpoint file"):
        Captioner.load(tmp_path / "missing")
    assert Captioner.load(RunDir(trained).last).describe() == str(RunDir(trained).last)


def test_an_ensemble_run_loads_as_one_captioner(trained, photos, tmp_path):
    """Two identical members average to the single model's distribution: the same captions."""
    ensemble = RunDir(tmp_path / "ensemble")
    for i in range(2):
        shutil.copytree(RunDir(trained).checkpoints, ensemble.member(i).checkpoints)
    cap = Captioner.load(ensemble.path)
    assert cap.members == 2 and "2 members" in cap.describe()
    images = sorted(photos.glob("*.png"))
    assert cap(images) == Captioner.load(trained)(images)


def test_training_from_python_is_quiet_and_checks_its_options(featurized, trained, photos, tmp_path, capfd):
    """legende.train is the CLI's `train`: 1 epoch, then a resume to 2, with the options of the
    `trained` fixture (`train --epochs 2 --lr 3e-3` + TINY) ends with its weights and captions."""
    import torch

    with pytest.raises(TypeError, match="did you mean epochs"):
        legende.train(featurized, tmp_path / "r", epoch=1)
    with pytest.raises(TypeError, match="hidden_size must be int"):
        legende.train(featurized, tmp_path / "r", hidden_size="16")
    tiny = {"embed_size": 16, "hidden_size": 16, "batch_size": 8}  # tests.helpers.TINY
    outcome = legende.train(featurized, tmp_path / "r", epochs=1, lr=3e-3, **tiny)
    assert outcome.status == "finished" and outcome.run_dir == tmp_path / "r" and outcome.position.epoch == 1
    resumed = legende.train(run_dir=tmp_path / "r", resume=True, epochs=2)
    assert resumed.status == "finished" and resumed.position.epoch == 2
    assert capfd.readouterr() == ("", "")  # quiet by default

    ours, cli = (torch.load(RunDir(r).last, weights_only=True) for r in (tmp_path / "r", trained))
    assert (ours["epoch"], ours["step"]) == (cli["epoch"], cli["step"]) == (2, resumed.position.step)
    assert ours["config"]["decoder"]["lr"] == 3e-3 and ours["model"].keys() == cli["model"].keys()
    for name, value in cli["model"].items():  # equal up to the order of threaded sums
        torch.testing.assert_close(ours["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    images = sorted(photos.glob("*.png"))
    captions = Captioner.load(tmp_path / "r")(images)
    assert captions == Captioner.load(trained)(images) and all(c.split() for c in captions)


def test_the_legende_command_is_installed(tmp_path):
    """`pip install -e .` (make install) puts the `legende` command next to the venv's Python; run
    outside the repository, it imports the installed packages."""
    command = Path(sys.executable).parent / "legende"
    if not command.exists():
        pytest.skip(f"{command} is not installed: run make install")
    out = subprocess.run([command, "caption", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "--report" in out.stdout, out.stderr
    find = "import importlib.util; print(importlib.util.find_spec('legende').origin)"
    out = subprocess.run([sys.executable, "-c", find], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == str(ROOT / "legende" / "__init__.py"), out.stderr

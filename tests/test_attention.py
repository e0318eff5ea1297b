"""Feature maps in the store, the attention decoder in every phase, heat maps, the full view.

The tests of what every decoder of maps guarantees (exact resume, refusals of a store without maps,
heat maps, every phase) run for the transformer too (test_transformer.py has its own)."""

from __future__ import annotations

import csv
import io
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from cli import main
from decoder.attention import AttentionCaptioner
from decoder.config import CaptionerConfig
from decoder.inference import load_run
from decoder.search import beam_search
from featurize.crops import CropPolicy
from featurize.encoder import build_inception, regions
from featurize.pipeline import encode, encode_full_view, encode_with_maps, prepare_for_inference
from store.features import FeatureStore, find_store
from store.rundir import RunDir
from tests.helpers import TINY, TINY_TRANSFORMER, one_line_error, run_cli
from training.phases.decoder import train_decoder

ATTENTION = [*TINY, "--decoder", "attention", "--attention-size", "8"]
MAPS_DECODERS = {"attention": ATTENTION, "transformer": TINY_TRANSFORMER}  # tiny options of each decoder of maps
PYTHON_OPTIONS = {  # the same, as legende.train's keywords
    "attention": {"embed_size": 16, "hidden_size": 16, "decoder": "attention"},
    "transformer": {"hidden_size": 16, "heads": 2, "decoder": "transformer"},
}
A_WEIGHT = {"attention": "cell.weight_ih", "transformer": "layers.0.self_attn.in_proj_weight"}


@pytest.fixture(scope="session")
def attention_run(mapped, tmp_path_factory):
    run = tmp_path_factory.mktemp("attention") / "run"
    run_cli("train", mapped, "--run", run, "--epochs", 8, "--lr", "3e-3", *ATTENTION)
    return run


@pytest.fixture(scope="session")
def transformer_run(mapped, tmp_path_factory):
    run = tmp_path_factory.mktemp("transformer") / "run"
    run_cli("train", mapped, "--run", run, "--epochs", 8, "--lr", "3e-3", "--warmup-steps", 10, *TINY_TRANSFORMER)
    return run


def params(run_dir, name="last.pt"):
    return torch.load(RunDir(run_dir).checkpoints / name, weights_only=True)["model"]


def test_the_store_keeps_each_crops_map_and_its_mean_is_the_pooled_vector(mapped):
    with FeatureStore.open(find_store(mapped)) as store:
        assert store.attrs["schema_version"] == 2 and store.maps_crops == 2 and store.regions == 9
        maps = store.read_maps(slice(0, 4)).astype(np.float32)  # (4, 2, 9, 2048)
        pooled = store.read(slice(0, 4)).astype(np.float32)  # (4, 2, 2048)
        assert maps.shape == (4, 2, 9, 2048)
        np.testing.assert_allclose(maps.mean(2), pooled, rtol=1e-2, atol=1e-3)  # float16 rounding
        one = store.read_maps(np.array([3, 0]), np.array([1, 0]))
        assert np.array_equal(one, store.read_maps(np.array([3, 0]))[[0, 1], [1, 0]])


def test_keeping_maps_does_not_change_the_pooled_bits():
    net = prepare_for_inference(build_inception("none"))
    crops = torch.randint(0, 256, (3, 3, 107, 107), dtype=torch.uint8)
    pooled, maps = encode_with_maps(net, crops, 2, "fp32", keep=torch.tensor([True, False, True]))
    assert torch.equal(pooled, encode(net, crops, 2, "fp32"))
    assert maps.shape == (2, 4, 2048)
    with torch.inference_mode():
        direct = regions(net.feature_maps(crops[2:].float() / 255))
    torch.testing.assert_close(maps[1], direct[0], rtol=1e-4, atol=1e-5)


def test_attention_weights_sum_to_one_over_any_number_of_regions():
    config = CaptionerConfig(vocab_size=12, feature_dim=32, embed_size=8, hidden_size=16, decoder="attention")
    model = AttentionCaptioner(config).eval()
    captions = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    for r in (64, 81, 3):
        logits, weights = model.teacher_forced(torch.randn(2, r, 32), captions)
        assert logits.shape == (2, 4, 12) and weights.shape == (2, 4, r)
        real = captions[:, 1:] != 0  # positions past <end> are not computed: zero weights and logits
        torch.testing.assert_close(weights.sum(-1), real.float())
        assert (weights >= 0).all() and (logits[~real] == 0).all() and (logits[real] != 0).any(-1).all()
    _, penalty = model(torch.randn(2, 9, 32), captions)
    assert penalty.item() > 0


def test_batched_beam_search_equals_one_photo_at_a_time():
    torch.manual_seed(0)
    config = CaptionerConfig(vocab_size=15, feature_dim=32, embed_size=8, hidden_size=16, decoder="attention")
    model = AttentionCaptioner(config).eval()
    photos = torch.randn(5, 9, 32)
    batched = beam_search(model, photos, start_id=1, end_id=2, beam=3, max_len=8)
    alone = [beam_search(model, photos[i : i + 1], start_id=1, end_id=2, beam=3, max_len=8)[0] for i in range(5)]
    assert batched == alone


@pytest.mark.parametrize("decoder", MAPS_DECODERS)
def test_a_decoder_of_maps_resumes_exactly(decoder, mapped, tmp_path):
    """The transformer's run resumes inside its learning-rate warm-up (400 steps by default)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", mapped, "--run", straight, "--epochs", 2, *MAPS_DECODERS[decoder])
    run_cli("train", mapped, "--run", resumed, "--epochs", 1, *MAPS_DECODERS[decoder])
    run_cli("train", "--run", resumed, "--resume", "--epochs", 2)
    a, b = params(straight), params(resumed)
    assert A_WEIGHT[decoder] in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if decoder == "transformer":  # its own defaults, and its last step's learning rate: inside the warm-up
        state = torch.load(RunDir(resumed).last, weights_only=True)
        model, training = state["config"]["model"], state["config"]["decoder"]
        assert (model["num_layers"], model["dropout"], model["heads"]) == (2, 0.3, 2)
        assert (training["label_smoothing"], training["warmup_steps"], training["select_by"]) == (0.1, 400, "cider")
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4 * state["step"] / 400)


@pytest.mark.parametrize("decoder", MAPS_DECODERS)
def test_a_decoder_of_maps_stops_mid_epoch_and_resumes_exactly(decoder, mapped, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    options = {"epochs": 1, "batch_size": 32, **PYTHON_OPTIONS[decoder]}
    quiet = Console(file=io.StringIO())
    train_decoder(mapped, straight, resume=False, max_minutes=None, options=options, console=quiet)
    outcome = train_decoder(mapped, stopped, resume=False, max_minutes=1e-9, options=options, console=quiet)
    assert outcome.position.batch == 1
    while outcome.status != "finished":
        outcome = train_decoder(None, stopped, resume=True, max_minutes=1e-9, options={}, console=quiet)
    a, b = params(straight), params(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("decoder", MAPS_DECODERS)
def test_a_checkpoint_of_a_decoder_of_maps_refuses_a_store_without_maps(decoder, mapped, tmp_path):
    work, run = tmp_path / "work", tmp_path / "run"
    shutil.copytree(mapped, work)
    run_cli("train", work, "--run", run, "--epochs", 1, *MAPS_DECODERS[decoder])
    run_cli(
        "featurize", work, "--weights", "none", "--crops", 2, "--workers", 0, "--resize", 150, "--crop-size", 139,
        "--maps", "none", "--overwrite",
    )  # the same images and crops, now without maps  # fmt: skip
    line = one_line_error(CliRunner().invoke(main, ["evaluate", str(run), "--split", "val"]))
    assert f"{decoder} decoder" in line and "--maps" in line
    resumed = CliRunner().invoke(main, ["train", "--run", str(run), "--resume", "--epochs", 2])
    last = resumed.output.strip().splitlines()[-1]  # after the "resuming ..." banner
    assert resumed.exit_code == 1 and "Traceback" not in resumed.output
    assert last.startswith("Error:") and f"{decoder} decoder" in last and "--maps" in last
    new = ["train", str(work), "--run", str(tmp_path / "new"), *MAPS_DECODERS[decoder]]
    line = one_line_error(CliRunner().invoke(main, new))
    assert f"{decoder} decoder" in line and "--maps" in line


@pytest.mark.parametrize("decoder", MAPS_DECODERS)
def test_a_decoder_of_maps_learns_evaluates_captions_and_draws_heat_maps(decoder, mapped, request, tmp_path):
    """The transformer's heat maps are its last layer's cross-attention, averaged over the heads."""
    maps_run = request.getfixturevalue(f"{decoder}_run")
    with open(RunDir(maps_run).epochs_csv) as f:
        val = [float(r["val_loss"]) for r in csv.DictReader(f)]
    assert len(val) == 8 and val[-1] < val[0]
    run_cli("evaluate", maps_run, "--split", "test")
    assert json.loads(RunDir(maps_run).eval_json("test").read_text())["images"] > 0
    photos = sorted((mapped.parent / "synth" / "images").glob("*.png"))[:3]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    out, heat = tmp_path / "c.json", tmp_path / "heat"
    run_cli("caption", folder, "--run", maps_run, "--format", "json", "--out", out, "--attention", heat)
    rows = json.loads(out.read_text())
    assert len(rows) == 3
    for row in rows:
        weights = np.asarray(row["attention"])
        assert weights.shape == (len(row["caption"].split()), 9)
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
        assert not np.allclose(weights, 1 / 9, atol=1e-4)  # not uniform
        assert not np.allclose(weights[0], weights[-1], atol=1e-5)  # it moves between words
        png = heat / (row["image"].rsplit("/", 1)[-1] + ".png")
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_a_pooled_run_refuses_attention_maps(trained, tmp_path, tiny_images):
    tiny_images(tmp_path / "p", ["a.png"])
    result = CliRunner().invoke(main, ["caption", str(tmp_path / "p"), "--run", str(trained), "--attention", "h"])
    assert "--decoder attention" in one_line_error(result)


@pytest.mark.parametrize("decoder", MAPS_DECODERS)
def test_scst_ensemble_and_joint_run_with_a_decoder_of_maps(decoder, mapped, tmp_path):
    run = tmp_path / "ens"
    run_cli("train", mapped, "--run", run, "--members", 2, "--epochs", 1, *MAPS_DECODERS[decoder])
    loaded = load_run(run)
    assert len(loaded.model.members) == 2
    run_cli("caption", mapped.parent / "synth" / "images" / "000001.png", "--run", run)
    solo = tmp_path / "solo"
    run_cli("train", mapped, "--run", solo, "--epochs", 1, *MAPS_DECODERS[decoder])
    run_cli("train", "--run", solo, "--phase", "scst", "--epochs", 1)
    assert torch.load(RunDir(solo).last, weights_only=True)["phase"] == "scst"
    run_cli("train", "--run", solo, "--phase", "joint", "--epochs", 1, "--workers", 0, "--batch-size", 32)
    state = torch.load(RunDir(solo).last, weights_only=True)
    assert state["phase"] == "joint" and "encoder" in state
    run_cli("caption", mapped.parent / "synth" / "images" / "000002.png", "--run", solo)


def test_full_view_pools_each_crop_box_from_one_map(tmp_path):
    net = prepare_for_inference(build_inception("none"))
    policy = CropPolicy(resize=160, crop=139, num_crops=3)
    image = torch.randint(0, 256, (1, 3, 160, 160), dtype=torch.uint8)
    boxes = torch.tensor([policy.boxes(0)])
    pooled, maps = encode_full_view(net, image, boxes, batch_size=2, precision="fp32")
    assert pooled.shape == (1, 3, 2048) and maps.shape == (1, 9, 2048)  # 160 px: a 3x3 map
    assert not torch.allclose(pooled[0, 0], pooled[0, 2])  # different boxes, different vectors
    whole = encode_full_view(net, image, torch.tensor([[[0, 0, 160, 160]]]), 2, "fp32")[0]
    torch.testing.assert_close(whole[0, 0], maps[0].mean(0), rtol=0.05, atol=1e-3)  # the whole box ~ the mean


def test_full_view_store_trains_and_captions_new_photos(tmp_path):
    root = tmp_path
    run_cli("synth", root / "synth", "--n", 30, "--seed", 2, "--size", 120)
    run_cli("prepare", root / "synth", "--out", root / "work", "--min-word-count", 1)
    run_cli(
        "featurize", root / "work", "--weights", "none", "--crops", 2, "--workers", 0, "--resize", 150,
        "--crop-size", 139, "--maps", "--view", "full",
    )  # fmt: skip
    with FeatureStore.open(find_store(root / "work")) as store:
        assert store.attrs["view"] == "full" and store.maps_crops == 1 and store.regions == 9  # 150 px: 3x3
    run_cli("train", root / "work", "--run", root / "run", "--epochs", 1, *ATTENTION)
    out = root / "c.json"
    run_cli("caption", root / "synth" / "images", "--run", root / "run", "--format", "json", "--out", out)
    assert all(row["caption"] for row in json.loads(out.read_text()))
    result = CliRunner().invoke(
        main, ["featurize", str(root / "work"), "--weights", "none", "--view", "full", "--flip", "--overwrite"]
    )
    assert "--flip needs --view crops" in one_line_error(result)


def test_a_schema_1_store_still_reads_as_one_without_maps(featurized, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(find_store(featurized), old)
    with h5py.File(old, "a") as f:
        f.attrs["schema_version"] = 1
        for key in ("view", "maps_crops", "map_size"):
            del f.attrs[key]
    with FeatureStore.open(old) as store:
        assert store.maps_crops == 0 and store.attrs["view"] == "crops" and store.read(slice(0, 2)).shape[0] == 2


def test_attention_options_are_checked_in_one_line(mapped, trained, tmp_path):
    args = ["train", str(mapped), "--run", str(tmp_path / "x"), *ATTENTION, "--num-layers", "2"]
    assert "one LSTM layer" in one_line_error(CliRunner().invoke(main, args))
    resumed = CliRunner().invoke(main, ["train", "--run", str(trained), "--resume", "--decoder", "attention"])
    assert resumed.exit_code == 1 and "cannot change --decoder" in resumed.output.strip().splitlines()[-1]


def test_train_picks_the_attention_decoder_for_a_store_with_maps(mapped, featurized, tmp_path):
    run_cli("train", mapped, "--run", tmp_path / "a", "--epochs", 1, *TINY)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model"]["decoder"] == "attention" and config["decoder"]["select_by"] == "cider"
    assert not config["decoder"]["group_by_photo"] and config["decoder"]["lr"] == 3e-4  # small data: batches of 32
    assert config["decoder"]["epochs"] == 1 and config["decoder"]["batch_size"] == 8  # what the user gave wins
    run_cli("train", featurized, "--run", tmp_path / "p", "--epochs", 1, *TINY)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model"]["decoder"] == "pooled" and config["decoder"]["select_by"] == "loss"


def test_maps_from_disk_give_the_batches_of_maps_in_memory(mapped):
    from store.manifest import read_manifest
    from store.text import Vocabulary
    from training import data as D
    from training.options import DecoderConfig
    from training.phases.decoder import FeatureData

    records, vocab = read_manifest(mapped), Vocabulary.load(mapped / "vocab.json")
    with FeatureStore.open(find_store(mapped)) as store:
        usable = np.asarray(store.done, dtype=bool)
        train, val = (D.build_pairs(records, vocab, split, usable) for split in ("train", "val"))
        cfg = DecoderConfig(workdir=str(mapped), store=str(store.path), batch_size=8)
        in_ram = FeatureData(store, train, val, cfg, maps=True)
        from_disk = FeatureData(store, train, val, DecoderConfig(**{**cfg.__dict__, "stream": True}), maps=True)
        assert isinstance(in_ram.source, D.InMemoryMaps) and isinstance(from_disk.source, D.StreamingMaps)
        for (fa, ca), (fb, cb) in zip(in_ram.train_batches(1, 0), from_disk.train_batches(1, 0), strict=True):
            assert fa.shape[1:] == (9, 2048) and torch.equal(fa, fb) and torch.equal(ca, cb)


def test_teacher_forcing_gives_what_stepping_one_word_at_a_time_gives():
    """The sorted, shrinking teacher-forced loop equals the interface search uses, caption by caption."""
    torch.manual_seed(0)
    config = CaptionerConfig(vocab_size=20, feature_dim=32, embed_size=8, hidden_size=16, decoder="attention")
    model = AttentionCaptioner(config).eval()
    captions = torch.tensor([[1, 5, 2, 0, 0, 0], [1, 7, 8, 9, 10, 2], [1, 4, 6, 2, 0, 0], [1, 3, 2, 0, 0, 0]])
    regions = torch.randn(4, 5, 32)
    with torch.no_grad():
        logits, weights = model.teacher_forced(regions, captions)
        for i, caption in enumerate(captions):
            state = model.init_state(regions[i : i + 1])
            for t in range(int((caption != 0).sum()) - 1):
                logprobs, state = model.step(caption[t : t + 1], state)
                torch.testing.assert_close(torch.log_softmax(logits[i, t], -1), logprobs[0], rtol=1e-5, atol=1e-5)


def test_grouped_batches_keep_a_photos_captions_together_and_compute_the_same_loss(mapped):
    from decoder.attention import Regions
    from decoder.model import caption_loss
    from store.manifest import read_manifest
    from store.text import Vocabulary
    from training import data as D
    from training.options import DecoderConfig
    from training.phases.decoder import FeatureData

    records, vocab = read_manifest(mapped), Vocabulary.load(mapped / "vocab.json")
    with FeatureStore.open(find_store(mapped)) as store:
        usable = np.asarray(store.done, dtype=bool)
        train, val = (D.build_pairs(records, vocab, split, usable) for split in ("train", "val"))
        order, _ = D.epoch_order(train, 3, 0, store.num_crops, store.chunk_rows, by_photo=True)
        assert sorted(order.tolist()) == list(range(len(train)))  # every pair once
        photos = train.rows[order]
        runs = [p for i, p in enumerate(photos) if i == 0 or photos[i - 1] != p]
        assert len(runs) == len(set(photos.tolist()))  # each photo's captions in one run
        assert not np.array_equal(order, D.epoch_order(train, 4, 0, store.num_crops, store.chunk_rows, True)[0])

        cfg = DecoderConfig(workdir=str(mapped), store=str(store.path), batch_size=8, group_by_photo=True)
        config = CaptionerConfig(len(vocab), embed_size=8, hidden_size=16, attention_size=8, decoder="attention")
        model = AttentionCaptioner(config).eval()
        in_ram = FeatureData(store, train, val, cfg, maps=True)
        from_disk = FeatureData(store, train, val, DecoderConfig(**{**cfg.__dict__, "stream": True}), maps=True)
        maps_read = 0
        for (ra, ca), (rb, cb) in zip(in_ram.train_batches(1, 0), from_disk.train_batches(1, 0), strict=True):
            assert isinstance(ra, Regions) and torch.equal(ra.maps, rb.maps) and torch.equal(ra.photo, rb.photo)
            assert torch.equal(ca, cb) and len(ra.maps) == len(set(ra.photo.tolist()))  # each (photo, crop) once
            maps_read += len(ra.maps)
            expanded = ra.maps[ra.photo]  # (B, R, D): what an ungrouped batch holds
            with torch.no_grad():
                grouped_loss = caption_loss(model(ra, ca)[0], ca)
                torch.testing.assert_close(grouped_loss, caption_loss(model(expanded, ca)[0], ca))
        # at most each photo's 2 crops, plus a photo that a batch boundary cuts: not one map per caption
        assert maps_read <= 2 * len(set(train.rows.tolist())) + in_ram.num_batches < len(train)


def test_the_attention_decoder_groups_batches_of_64_by_photo_and_trains_16_epochs_from_20000_training_captions():
    from training.options import LARGE_DATA_CAPTIONS, decoder_defaults

    small, large = decoder_defaults("attention", LARGE_DATA_CAPTIONS - 1), decoder_defaults("attention", 29_981)
    assert small == {"epochs": 12, "select_by": "cider"}  # DecoderConfig's batches of 32 at lr 3e-4, ungrouped
    assert large == {**small, "epochs": 16, "group_by_photo": True, "batch_size": 64, "lr": 4e-4}
    assert decoder_defaults("pooled", 10**6) == {}

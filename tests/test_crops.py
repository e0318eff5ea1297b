"""The crop policy: torchvision's pixels, centre first, random boxes fixed by (seed, row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from featurize.crops import CropPolicy, to_float


@pytest.fixture
def img() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))  # not square


def torchvision_pixels(transform, img: Image.Image) -> torch.Tensor:
    """What the original project's torchvision pipeline feeds the CNN, back in uint8."""
    return (transforms.ToTensor()(transform(img)) * 255).round().to(torch.uint8)


def test_box_zero_is_the_centre_and_all_boxes_fit():
    policy = CropPolicy()
    boxes = policy.boxes(7)
    assert len(boxes) == 5
    assert boxes[0] == (28, 28, 327, 327)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 == y1 - y0 == 299
        assert 0 <= x0 and 0 <= y0 and x1 <= 356 and y1 <= 356


def test_boxes_depend_only_on_seed_and_row():
    policy = CropPolicy(seed=3)
    forward = [policy.boxes(r) for r in range(20)]
    backward = [policy.boxes(r) for r in reversed(range(20))][::-1]
    assert forward == backward  # processing order does not matter
    assert len({tuple(b[1:]) for b in forward}) == 20  # rows get different crops
    assert CropPolicy(seed=4).boxes(0) != policy.boxes(0)


def test_crops_are_torchvision_resize_then_crop(img):
    policy = CropPolicy()
    crops = policy.crops(img, row=2)  # (K, 3, 299, 299)
    assert crops.dtype == torch.uint8 and crops.shape == (5, 3, 299, 299)
    resized = transforms.Resize((356, 356))(img)
    for crop, (x0, y0, x1, y1) in zip(crops, policy.boxes(2), strict=True):
        assert torch.equal(crop, torchvision_pixels(lambda im, b=(x0, y0, x1, y1): im.crop(b), resized))


def test_center_is_torchvision_center_crop(img):
    expected = torchvision_pixels(transforms.Compose([transforms.Resize((356, 356)), transforms.CenterCrop(299)]), img)
    assert torch.equal(CropPolicy().center(img), expected)
    assert torch.equal(CropPolicy().crops(img, row=0)[0], expected)


def test_random_crop_draws_like_torchvision_random_crop(img):
    ours = CropPolicy().random_crop(img, torch.Generator().manual_seed(11))
    torch.manual_seed(11)  # RandomCrop draws from the global generator
    theirs = torchvision_pixels(transforms.Compose([transforms.Resize((356, 356)), transforms.RandomCrop(299)]), img)
    assert torch.equal(ours, theirs)


def test_flip_mirrors_some_random_crops_and_keeps_the_boxes(img):
    plain, flipping = CropPolicy(num_crops=9), CropPolicy(num_crops=9, flip=True)
    assert flipping.boxes(5) == plain.boxes(5)
    flips = flipping.flips(5)
    assert flips[0] is False and 0 < sum(flips) < 8  # the centre never; some random crops
    assert plain.flips(5) == [False] * 9
    a, b = plain.crops(img, 5), flipping.crops(img, 5)
    for k, flipped in enumerate(flips):
        assert torch.equal(b[k], a[k].flip(-1) if flipped else a[k])


def test_to_float_scales_to_unit_range():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 128 / 255, 1.0]))


def test_bad_policies_are_refused():
    with pytest.raises(ValueError):
        CropPolicy(resize=200, crop=299)
    with pytest.raises(ValueError):
        CropPolicy(num_crops=0)

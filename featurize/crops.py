"""The crop policy: which square crops of an image the encoder sees, reproducibly.

As in the original project, an image is resized to 356x356 (aspect ratio not kept) and cropped
to 299x299. Crop 0 is the centre crop (what `caption` uses); crops 1..K-1 are drawn like
torchvision's `RandomCrop` from a generator seeded by (seed, row), so a row's crops do not depend
on the order rows are processed in, on workers, or on where an interrupted run resumed.

With `flip`, each random crop is mirrored with probability 1/2. The coins are drawn after all
the boxes, so turning flips on does not move the boxes. Flips are off by default because a
mirrored image no longer matches captions that say "left" or "right".

Pixels stay uint8 until the model's batch is assembled (a quarter of the memory of floats);
`to_float` scales them to [0, 1] as `ToTensor` does. `resized` and `cut` split the work so that
DataLoader workers ship one resized image per row, not K overlapping crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the resized image, x1 and y1 exclusive


@dataclass(frozen=True)
class CropPolicy:
    resize: int = 356
    crop: int = 299
    num_crops: int = 5
    seed: int = 0
    flip: bool = False

    @classmethod
    def from_attrs(cls, attrs: dict) -> CropPolicy:
        """The policy a store was made with, from its attributes (or the copy a checkpoint keeps).

        `flip` is left off: it only mirrors stored training crops, and at caption time or in the
        joint phase's random crops a mirror would contradict "left" and "right" in captions."""
        return cls(
            resize=int(attrs.get("resize", 356)),
            crop=int(attrs.get("crop_size", 299)),
            num_crops=int(attrs.get("num_crops", 5)),
            seed=int(attrs.get("seed", 0)),
        )

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop ({self.crop}) must be between 1 and resize ({self.resize})")
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, not {self.num_crops}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, not {self.seed}")

    def center_box(self) -> Box:
        # torchvision's CenterCrop rounding, so box 0 is exactly what `center` returns
        top = int(round((self.resize - self.crop) / 2.0))
        return (top, top, top + self.crop, top + self.crop)

    def generator(self, row: int) -> torch.Generator:
        """The generator of one row's crops: independent streams for every (seed, row)."""
        state = np.random.SeedSequence([self.seed, row]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def boxes(self, row: int) -> list[Box]:
        """The K boxes of manifest row `row`; box 0 is the centre."""
        g = self.generator(row)
        return [self.center_box()] + [self._random_box(g) for _ in range(self.num_crops - 1)]

    def flips(self, row: int) -> list[bool]:
        """Which of the K crops of `row` are mirrored (never the centre one)."""
        if not self.flip:
            return [False] * self.num_crops
        g = self.generator(row)
        for _ in range(self.num_crops - 1):
            self._random_box(g)  # consume the boxes' draws: flips come after them
        return [False] + [_coin(g) for _ in range(self.num_crops - 1)]

    def resized(self, img: Image.Image) -> torch.Tensor:
        """uint8 (3, resize, resize): the image squashed to a square, as torchvision's Resize does."""
        img = img.convert("RGB").resize((self.resize, self.resize), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, R, R)

    def crops(self, img: Image.Image, row: int) -> torch.Tensor:
        """uint8 (K, 3, crop, crop): the K crops of manifest row `row`."""
        return self.cut(self.resized(img), row)

    def cut(self, full: torch.Tensor, row: int) -> torch.Tensor:
        """uint8 (K, 3, crop, crop) from an already `resized` image (3, resize, resize)."""
        out = [_cut(full, box, flip) for box, flip in zip(self.boxes(row), self.flips(row), strict=True)]
        return torch.stack(out)  # (K, 3, C, C)

    def center(self, img: Image.Image) -> torch.Tensor:
        """uint8 (3, crop, crop): the centre crop, the one view used at caption time."""
        return _cut(self.resized(img), self.center_box(), flip=False)

    def random_crop(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """uint8 (3, crop, crop): a fresh random crop (and flip, if enabled), for joint training."""
        box = self._random_box(generator)
        return _cut(self.resized(img), box, flip=self.flip and _coin(generator))

    def _random_box(self, g: torch.Generator) -> Box:
        # the draws of torchvision's RandomCrop.get_params: top first, then left
        top = int(torch.randint(0, self.resize - self.crop + 1, (1,), generator=g).item())
        left = int(torch.randint(0, self.resize - self.crop + 1, (1,), generator=g).item())
        return (left, top, left + self.crop, top + self.crop)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 crops (..., 3, H, W) -> float32 in [0, 1], the encoder's input."""
    return x.float().div_(255)


def _coin(g: torch.Generator) -> bool:
    return bool(torch.rand((1,), generator=g).item() < 0.5)


def _cut(full: torch.Tensor, box: Box, flip: bool) -> torch.Tensor:
    x0, y0, x1, y1 = box
    crop = full[:, y0:y1, x0:x1]  # (3, C, C)
    return crop.flip(-1) if flip else crop.contiguous()

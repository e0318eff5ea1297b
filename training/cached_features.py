"""What the phases that train on cached features (decoder, scst) share: the feature store opened
and checked against the run, and the validation CIDEr-D that can pick best.pt.

It sits below the phases (training/phases/) so that no phase imports another.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from decoder.factory import reads_maps
from store.errors import UserError
from store.features import FeatureStore, check_store_matches, images_sha256
from store.manifest import Record, read_manifest
from store.text import Vocabulary


def open_training_store(
    stack: ExitStack, workdir: str, store_path: str, expected: dict | None
) -> tuple[FeatureStore, list[Record], np.ndarray]:
    """(store, manifest records, usable rows) for a run on cached features, checked against the
    run's checkpoint (`expected`: the identity it recorded) or, for a new run, the manifest."""
    store = stack.enter_context(FeatureStore.open(Path(store_path)))
    records = read_manifest(Path(workdir))
    if expected is not None:
        check_store_matches(store, expected, "the run's checkpoint")
    elif store.images_sha256 != images_sha256([r.path for r in records]):
        raise UserError(
            f"{store.path} was built from other images than {workdir}'s manifest: "
            f"run `python cli.py featurize {workdir} --resume --overwrite`"
        )
    if len(records) != store.num_rows:
        raise UserError(f"{store.path} has {store.num_rows} rows but the manifest has {len(records)} images")
    return store, records, np.asarray(store.done, dtype=bool)


def val_cider_score(model, vocab: Vocabulary, store: FeatureStore, records: list, usable: np.ndarray):
    """A function giving minus the validation CIDEr-D of greedy captions (lower is better, like a loss).

    Greedy decoding on the centre crop keeps it cheap enough to run every epoch, and it draws no
    random numbers, so selecting by CIDEr does not change the training trajectory.
    """
    from decoder.inference import centre_inputs
    from decoder.search import greedy
    from evaluation.metrics import score_captions

    rows = [i for i, r in enumerate(records) if r.split == "val" and usable[i]]
    features = centre_inputs(store, rows, reads_maps(model.config))  # (n, D) or (n, R, D)
    references = {records[i].id: records[i].captions for i in rows}

    def score(_val_loss: float) -> float:
        model.eval()
        ids = greedy(model, features, vocab.start_id, vocab.end_id)
        hypotheses = {records[i].id: " ".join(vocab.decode(seq)) for i, seq in zip(rows, ids, strict=True)}
        return -score_captions(references, hypotheses, use_java=False)[0]["CIDEr-D"]

    return score

"""How captions are decoded: one set of options and defaults for the CLI, the Python API and the benches.

Kept apart from decoder/inference.py so that reading the defaults imports no torch (the CLI builds
its options from them at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded; the defaults are the CLI's and the Python API's, chosen on the
    cross-validated measurement (docs/quality.md)."""

    beam: int = 3  # beam width; 1 is greedy
    alpha: float = 0.0  # length normalisation: score / length**alpha
    tta: bool = False  # average the features of the K crops instead of the centre crop
    # re-rank the beam's candidates by CIDEr-D consensus with the captions of this many nearest
    # training photos (0: off). Cross-validated on 850 Flickr8k photos: CIDEr-D 23.0 -> 26.2, BLEU-4,
    # METEOR and distinct captions up too; k = 10, 30, 100 and 10 candidates were within noise on
    # the validation photos (docs/quality.md)
    rerank: int = 30
    candidates: int = 5  # beam candidates that re-ranking chooses from
    # lower each word by this many times its log-probability for the average training photo: the
    # phrases a decoder says whatever the photo shows lose ground (decoder/prior.py; 0: off)
    prior_penalty: float = 0.0

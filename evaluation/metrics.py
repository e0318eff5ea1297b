"""The standard caption metrics, computed with pycocoevalcap's own scorers.

BLEU-1..4, ROUGE-L and CIDEr-D are pure Python. METEOR and the PTB tokenizer are Java programs
shipped inside pycocoevalcap; when `java` is not on PATH, METEOR is skipped (and said so) and
captions are tokenised with légende's own tokenizer, which lower-cases and strips punctuation
the same way for the n-gram metrics.
"""

from __future__ import annotations

import shutil

from store.text import normalize_caption

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def java_available() -> bool:
    return shutil.which("java") is not None


def score_captions(
    references: dict[str, list[str]], hypotheses: dict[str, str], use_java: bool | None = None
) -> tuple[dict[str, float], list[str]]:
    """(scores by metric name, notes on what was skipped); keys of both dicts must match."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must cover the same images")
    if not references:
        raise ValueError("nothing to score")
    use_java = java_available() if use_java is None else use_java
    notes = []
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        res = tok.tokenize({k: [{"caption": hypotheses[k]}] for k in references})
    else:
        notes.append("java not found: METEOR skipped, captions tokenised without the PTB tokenizer")
        gts = {k: [normalize_caption(c) for c in v] for k, v in references.items()}
        res = {k: [normalize_caption(hypotheses[k])] for k in references}
    # An empty hypothesis would break the scorers; it earns (near) zero as a lone unknown word.
    res = {k: [v[0] if v[0].strip() else "<unk>"] for k, v in res.items()}

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return scores, notes


def per_photo_cider(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """CIDEr-D of each photo's caption (x1, as pycocoevalcap gives it), with the document frequencies
    of these references held fixed: the unit that bootstrap and paired comparisons resample."""
    from pycocoevalcap.cider.cider import Cider

    gts = {k: [normalize_caption(c) for c in v] for k, v in references.items()}
    res = {k: [normalize_caption(hypotheses[k]) or "<unk>"] for k in references}
    _, scores = Cider().compute_score(gts, res)
    return {k: float(s) for k, s in zip(gts, scores, strict=True)}


def bootstrap_se(values, resamples: int = 1000, seed: int = 0) -> float:
    """Standard error of the mean of `values` (one per photo) by resampling photos; for a paired
    comparison pass the per-photo differences."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return float(values[idx].mean(1).std())


def diversity(hypotheses: dict[str, str]) -> dict[str, float | str]:
    """What CIDEr-D does not show: distinct captions per 100 photos, the words the captions use,
    and the share (%) of captions holding the most frequent 3-gram (a repeated phrase such as
    "in a red jacket" scores well on many photos while telling them apart by nothing)."""
    captions = [normalize_caption(h).split() for h in hypotheses.values()]
    holding: dict[tuple[str, ...], int] = {}
    for words in captions:
        for gram in {tuple(words[i : i + 3]) for i in range(len(words) - 2)}:
            holding[gram] = holding.get(gram, 0) + 1
    gram, count = max(holding.items(), key=lambda kv: (kv[1], kv[0])) if holding else ((), 0)
    n = max(len(captions), 1)
    return {
        "distinct": round(100 * len({" ".join(w) for w in captions}) / n, 1),
        "vocabulary": len({w for words in captions for w in words}),
        "top_3gram_share": round(100 * count / n, 1),
        "top_3gram": " ".join(gram),
    }

"""Which captioner a checkpoint's config builds, and what features it reads.

A pooled captioner (decoder/model.py) reads one vector per photo (B, D); the attention captioner
(decoder/attention.py) and the transformer (decoder/transformer.py) read the photo's feature map as
regions (B, R, D). Everything that feeds a captioner (training data, evaluation, new photos) asks
`reads_maps` which to give it.
"""

from __future__ import annotations

from torch import nn

from decoder.attention import AttentionCaptioner
from decoder.config import DECODERS, CaptionerConfig
from decoder.model import PooledCaptioner
from decoder.transformer import TransformerCaptioner
from store.errors import UserError


def build_captioner(config: CaptionerConfig) -> nn.Module:
    if config.decoder == "attention":
        return AttentionCaptioner(config)
    if config.decoder == "pooled":
        return PooledCaptioner(config)
    if config.decoder == "transformer":
        return TransformerCaptioner(config)
    raise UserError(f"unknown decoder {config.decoder!r}: expected {', '.join(DECODERS)}")


def decoder_of(config: CaptionerConfig | dict) -> str:
    """The decoder a config (or a checkpoint's config dict) names; "pooled" from before the field existed."""
    return config.get("decoder", "pooled") if isinstance(config, dict) else config.decoder


def reads_maps(config: CaptionerConfig | dict) -> bool:
    """Whether the captioner reads feature maps (attention, transformer) rather than pooled vectors."""
    return decoder_of(config) in ("attention", "transformer")


def check_store_serves(store, config: CaptionerConfig | dict, what: str, expected: dict | None = None) -> None:
    """One line when a captioner of maps meets a store without maps, or (`expected`: the store
    identity its checkpoint recorded) with other maps than it was trained on."""
    if not reads_maps(config):
        return
    if not store.maps_crops:
        raise UserError(
            f"{what} uses the {decoder_of(config)} decoder, which reads feature maps, and {store.path} has none: "
            "run featurize with --maps (and --overwrite)"
        )
    have = {"maps_crops": store.maps_crops, "map_size": int(store.attrs["map_size"])}
    diffs = [f"{k}: {expected[k]} vs {v}" for k, v in have.items() if k in (expected or {}) and expected[k] != v]
    if diffs:
        raise UserError(f"{store.path} has other feature maps than {what} was trained on ({'; '.join(diffs)})")

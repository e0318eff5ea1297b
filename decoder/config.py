"""`CaptionerConfig`: everything needed to rebuild a captioner, saved in every checkpoint.

It lives apart from the models and imports no torch, because it is also the model half of the
decoder phase's options: a field whose metadata has a "help" is a `train` option, with that help
and the field's default (training/options.py says what else the metadata may hold), and the
command line reads it at start-up. Adding a model option is adding a field here.

`When` lives here too, not in training/options.py, so that a model option can have a default
that depends on the decoder ("variants"): the decoder package sits below training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

Decoder = Literal["pooled", "attention", "transformer"]
DECODERS: tuple[str, ...] = get_args(Decoder)


@dataclass(frozen=True)
class When:
    """A condition under which a variant default replaces a field's plain one; the help names it by `label`."""

    label: str
    decoder: str
    min_train_captions: int = 0

    def holds(self, decoder: str, train_captions: int) -> bool:
        return decoder == self.decoder and train_captions >= self.min_train_captions


# The transformer's small-data settings (docs/transformer.md): two layers, strong dropout.
TRANSFORMER = When("the transformer decoder", "transformer")
LSTM_DECODERS = ("pooled", "attention")  # what reads --embed-size: the transformer's embedding is its width


@dataclass(frozen=True)
class CaptionerConfig:
    vocab_size: int
    feature_dim: int = 2048
    embed_size: int = field(
        default=256,
        metadata={"help": "Word and image embedding size (the transformer's is its width).", "decoders": LSTM_DECODERS},
    )
    hidden_size: int = field(
        default=512, metadata={"help": "LSTM hidden size; the transformer's width.", "variants": {TRANSFORMER: 256}}
    )
    num_layers: int = field(
        default=1, metadata={"help": "LSTM layers; transformer decoder layers.", "variants": {TRANSFORMER: 2}}
    )
    dropout: float = field(
        default=0.2,
        metadata={"help": "Dropout on projections and embeddings (and attention).", "variants": {TRANSFORMER: 0.3}},
    )
    # "input": the LSTM's first input (Show and Tell); "state": its initial (h, c)
    image_as: Literal["input", "state"] = field(
        default="input",
        metadata={
            "help": "Pooled decoder: the image as the LSTM's first input or its initial state.",
            "decoders": ("pooled",),
        },
    )
    # "pooled": decoder/model.py's captioner; "attention": decoder/attention.py's; "transformer":
    # decoder/transformer.py's. The default of a new run depends on its store (training/phases/decoder.py
    # default_decoder); "pooled" is what checkpoints from before the field existed hold.
    decoder: Decoder = field(
        default="pooled",
        metadata={
            "help": "pooled: Show and Tell on one vector per photo; attention: Show, Attend and Tell over the "
            "feature map's regions (needs featurize --maps); transformer: a small causal transformer whose words "
            "attend to each other and to the regions (needs maps too).",
            "default_text": "attention when the store has maps, else pooled",
        },
    )
    attention_size: int = field(
        default=256, metadata={"help": "Attention decoder: size of the query/key space.", "decoders": ("attention",)}
    )
    attention_penalty: float = field(
        default=1.0,
        metadata={"help": "Attention decoder: lambda of the doubly stochastic penalty.", "decoders": ("attention",)},
    )
    heads: int = field(
        default=4,
        metadata={
            "help": "Transformer decoder: attention heads per layer (a divisor of --hidden-size).",
            "decoders": ("transformer",),
        },
    )

    def to_dict(self) -> dict:
        return asdict(self)

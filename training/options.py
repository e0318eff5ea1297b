"""The options of `train`: each phase's dataclass is the one place that says what the phase can be
told, each option's default and its help; this module also checks options given by name.

    decoder phase   DecoderConfig (its training) and decoder.config.CaptionerConfig (its model)
    joint phase     JointConfig
    scst phase      ScstConfig

A field is an option when its metadata has a "help"; the phases fill in the other fields
(workdir, store, vocab_size, ...). The metadata may also hold:

    "variants"      {When: value}: defaults that depend on the decoder and the amount of data
                    (decoder_defaults), measured by cross-validation (docs/quality.md)
    "decoders"      the decoders that read it, where not all do: another decoder refuses it
                    (check_decoder_reads)
    "inherit"       True: the default is the value of the decoder phase the phase starts from
    "default_text"  the default is decided at run time, as this text says
    "on_resume"     True: a resumed session may change it; any other option must keep the run's value

The command line builds `train`'s options from these fields (cli.py), `legende.train` checks its
keywords against them (check_types), and training.recipe.train_run refuses an option that the phase
it runs does not take (check_phase_takes), or that its decoder does not read (check_decoder_reads).
Adding an option is adding a field. Nothing here imports torch, so the command line starts at once.
"""

from __future__ import annotations

import difflib
import functools
import os
import types
from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from decoder.config import DECODERS, TRANSFORMER, CaptionerConfig, When
from store.errors import UserError

# The attention decoder peaks earlier than the pooled one, and its best epoch is found by validation
# CIDEr-D. From LARGE_DATA_CAPTIONS training captions it takes batches of 64 captions grouped by photo,
# which cost about two thirds of an epoch of ungrouped batches of 32: measured at 29,981 captions
# (6,000 Flickr8k photos). On 3,060 captions the same batches lost CIDEr-D in cross-validation (an
# epoch is then only ~48 steps), so smaller data keeps the batches of 32. There it also trains 16 epochs
# rather than 12: equal CIDEr-D and more varied captions on a tuning split of 5,000 photos
# (docs/quality.md, "Where the repeated phrase comes from").
LARGE_DATA_CAPTIONS = 20_000
ATTENTION = When("the attention decoder", "attention")
LARGE_DATA = When(
    f"the attention decoder from {LARGE_DATA_CAPTIONS:,} training captions", "attention", LARGE_DATA_CAPTIONS
)
# The transformer's variants (TRANSFORMER, here and in decoder/config.py) are the small configurations
# reported to work on Flickr8k-sized data, not tuned here: 2 layers 256 wide, dropout 0.3, label
# smoothing 0.1, 400 warm-up steps, 20 epochs with best.pt by CIDEr-D (docs/transformer.md); measured
# beside the attention decoder in docs/quality.md.

# Help shared by the phases that take the same option.
EPOCHS = "Epochs in total for this phase."
LR = "Adam learning rate of the decoder."
GRAD_CLIP = "Gradient norm clip."
STREAM = "Read features from disk chunk by chunk even if they fit in RAM."
INIT = {"help": "Checkpoint to start from.", "default_text": "RUNDIR/checkpoints/best.pt"}


@dataclass(frozen=True)
class Data:
    """The dataset (WORKDIR) and the feature store a phase reads: not options, the phase fills them in."""

    workdir: str
    store: str


@dataclass(frozen=True)
class FromCheckpoint(Data):
    """A phase that starts from a checkpoint (training.skeleton.start_from_checkpoint)."""

    init: str = field(metadata=INIT)


@dataclass(frozen=True)
class DecoderConfig(Data):
    """The decoder phase's training options; fixed for the run's lifetime except those marked on_resume."""

    weights: str | None = field(
        default=None,
        metadata={
            "help": "Which feature store of WORKDIR to train on, by its weights name.",
            "default_text": "the only one",
        },
    )
    epochs: int = field(
        default=40,
        metadata={"help": EPOCHS, "variants": {ATTENTION: 12, LARGE_DATA: 16, TRANSFORMER: 20}, "on_resume": True},
    )
    batch_size: int = field(default=32, metadata={"help": "Captions per batch.", "variants": {LARGE_DATA: 64}})
    lr: float = field(default=3e-4, metadata={"help": LR, "variants": {LARGE_DATA: 4e-4}})
    grad_clip: float = field(default=5.0, metadata={"help": GRAD_CLIP})
    seed: int = field(
        default=0, metadata={"help": "Seed of initialisation and data order; member i of an ensemble adds i."}
    )
    stream: bool = field(default=False, metadata={"help": STREAM, "on_resume": True})
    select_by: Literal["loss", "cider"] = field(
        default="loss",
        metadata={
            "help": "Validation score that picks best.pt.",
            "variants": {ATTENTION: "cider", TRANSFORMER: "cider"},
        },
    )
    group_by_photo: bool = field(  # training/data.py
        default=False,
        metadata={
            "help": "Attention and transformer decoders: batches keep each photo's captions together, so its map "
            "is read and projected once, not once per caption.",
            "variants": {LARGE_DATA: True},
            "decoders": ("attention", "transformer"),
        },
    )
    # The transformer's: a small model on little data overfits its one-hot targets, and Adam's first
    # steps on freshly initialised attention layers are too large without a warm-up (docs/transformer.md).
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Share of each target word's probability spread over the vocabulary in the training loss "
            "(the logged loss stays the plain cross-entropy).",
            "variants": {TRANSFORMER: 0.1},
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Steps over which the learning rate rises linearly to --lr (0: none).",
            "variants": {TRANSFORMER: 400},
        },
    )


@dataclass(frozen=True)
class JointConfig(FromCheckpoint):
    """The joint phase's options."""

    batch_size: int = field(metadata={"help": "Captions per batch.", "inherit": True})
    lr: float = field(metadata={"help": LR, "inherit": True})
    seed: int = field(metadata={"help": "Seed of the data order and the random crops.", "inherit": True})
    epochs: int = field(default=1, metadata={"help": EPOCHS, "on_resume": True})
    cnn_lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the CNN."})
    unfreeze: str = field(
        default="Conv2d_1a_3x3",
        metadata={"help": "First CNN block to fine-tune, e.g. Mixed_6a; the first block fine-tunes the whole CNN."},
    )
    grad_clip: float = field(default=5.0, metadata={"help": GRAD_CLIP})
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto",
        metadata={"help": "bf16 autocast; auto uses it where it is faster than fp32.", "on_resume": True},
    )
    checkpoint_minutes: float = field(
        default=10.0, metadata={"help": "Also checkpoint mid-epoch this often.", "on_resume": True}
    )
    workers: int = field(default=2, metadata={"help": "DataLoader processes decoding images.", "on_resume": True})


@dataclass(frozen=True)
class ScstConfig(FromCheckpoint):
    """The self-critical phase's options."""

    seed: int = field(metadata={"help": "Seed of the data order and the samples.", "inherit": True})
    epochs: int = field(default=10, metadata={"help": EPOCHS, "on_resume": True})
    batch_size: int = field(default=16, metadata={"help": "Photos per batch, each with --samples captions."})
    samples: int = field(default=5, metadata={"help": "Captions sampled per photo."})
    # chosen on fold 0's validation split: 2e-5 plateaued (docs/quality.md)
    lr: float = field(default=5e-5, metadata={"help": LR})
    grad_clip: float = field(default=5.0, metadata={"help": GRAD_CLIP})
    max_len: int = field(default=16, metadata={"help": "Longest sampled caption, in words."})
    stream: bool = field(default=False, metadata={"help": STREAM, "on_resume": True})


# Each phase's dataclasses; a new run without --phase follows the recipe (training/recipe.py).
PHASES: dict[str, tuple[type, ...]] = {
    "decoder": (DecoderConfig, CaptionerConfig),
    "joint": (JointConfig,),
    "scst": (ScstConfig,),
}


@dataclass
class Option:
    """One option name across the phases: its type, and the field of each phase that takes it."""

    name: str
    type: Any
    fields: dict[str, Field]  # phase -> field

    @property
    def flag(self) -> str:
        return flag(self.name)

    def help(self) -> str:
        """The help of each phase that takes it, then each phase's default; each said once where phases agree."""
        texts: dict[str, list[str]] = {}
        for phase, f in self.fields.items():
            texts.setdefault(f.metadata["help"], []).append(phase)
        if len(texts) == 1:
            text = next(iter(texts))
        else:
            text = " ".join(f"{', '.join(phases)}: {help}" for help, phases in texts.items())
        if all(f.metadata.get("on_resume") for f in self.fields.values()):
            text += " --resume may change it."
        defaults: dict[str, list[str]] = {}
        for phase, f in self.fields.items():
            defaults.setdefault(describe_default(f), []).append(phase)
        said = "; ".join(f"{', '.join(phases)}: {default}" for default, phases in defaults.items())
        return f"{text} [{said}]"


def flag(name: str) -> str:
    """The command-line flag of an option: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def describe_default(f: Field) -> str:
    """A field's default as the help says it, with its variants."""
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    if f.metadata.get("inherit"):
        return "the decoder phase's"
    text = show(f.default)
    for when, value in f.metadata.get("variants", {}).items():
        text += f", {show(value)} for {when.label}"
    return text


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@functools.cache
def all_options() -> dict[str, Option]:
    """{name: Option} over every phase, in the order of PHASES and of each dataclass's fields."""
    found: dict[str, Option] = {}
    for phase, configs in PHASES.items():
        for config in configs:
            hints = get_type_hints(config)
            for f in fields(config):
                if "help" not in f.metadata:
                    continue
                option = found.setdefault(f.name, Option(f.name, hints[f.name], {}))
                if option.type != hints[f.name]:
                    raise TypeError(f"option {f.name} is {option.type} in one phase and {hints[f.name]} in {phase}")
                option.fields[phase] = f
    return found


def check_types(options: dict) -> dict:
    """The options with float fields as floats and paths as strings; TypeError naming the first
    unknown option or wrongly typed value."""
    known, checked = all_options(), {}
    for name, value in options.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TypeError(f"unknown training option {name!r}{hint}; the options are {', '.join(sorted(known))}")
        checked[name] = _typed(name, known[name].type, value)
    return checked


def _typed(name: str, expected: Any, value: Any) -> Any:
    if get_origin(expected) is Literal:
        if value in get_args(expected):
            return value
        raise TypeError(f"training option {name} must be one of {', '.join(get_args(expected))}, not {value!r}")
    if get_origin(expected) in (Union, types.UnionType):  # X | None: None means the default, never given
        expected = next(t for t in get_args(expected) if t is not type(None))
    if expected is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, str | os.PathLike):
        return os.fspath(value)  # --init FILE; the recipe keeps options as JSON
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise TypeError(f"training option {name} must be {getattr(expected, '__name__', expected)}, not {value!r}")


def takes(phase: str, name: str) -> bool:
    option = all_options().get(name)
    return option is not None and phase in option.fields


def check_phase_takes(phase: str, options: dict) -> None:
    """One line naming the phases that take an option that `phase` does not."""
    for name in options:
        option = all_options().get(name)
        if option is None:
            raise UserError(f"unknown training option {name!r}")
        if phase not in option.fields:
            which = list(option.fields)
            phases = f"{' and '.join(which)} phase{'s' if len(which) > 1 else ''}"
            raise UserError(f"{option.flag} is an option of the {phases}, not of the {phase} phase")


def given_fields(config: type, options: dict) -> dict:
    """The options that are fields of `config`."""
    names = {f.name for f in fields(config)}
    return {k: v for k, v in options.items() if k in names}


def decoder_defaults(decoder: str, train_captions: int) -> dict:
    """The decoder phase's options (training and model) whose default differs for this decoder on this
    many training captions."""
    defaults = {}
    for config in PHASES["decoder"]:
        for f in fields(config):
            for when, value in f.metadata.get("variants", {}).items():
                if when.holds(decoder, train_captions):
                    defaults[f.name] = value
    return defaults


def check_decoder_reads(decoder: str, options: dict) -> None:
    """One line naming the decoders that read an option that `decoder` does not read."""
    for name in options:
        option = all_options().get(name)
        f = option.fields.get("decoder") if option is not None else None
        readers = f.metadata.get("decoders", DECODERS) if f is not None else DECODERS
        if decoder not in readers:
            decoders = f"{' and '.join(readers)} decoder{'s' if len(readers) > 1 else ''}"
            raise UserError(f"{option.flag} is an option of the {decoders}, not of the {decoder} decoder")


def inherited(config: type, decoder_options: dict) -> dict:
    """The fields of `config` whose value is, by default, the decoder phase's it starts from."""
    return {f.name: decoder_options[f.name] for f in fields(config) if f.metadata.get("inherit")}


def changeable_on_resume(config: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(config) if f.metadata.get("on_resume"))

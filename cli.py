"""légende command line: one thin click command per step of the pipeline.

    python cli.py synth data/synth --n 600 --seed 0
    python cli.py prepare data/synth --out data/work
    python cli.py featurize data/work
    python cli.py train --epochs 40
    python cli.py caption photos/

Each command validates its options, calls one library function and turns `UserError` into a
one-line message with a non-zero exit. No logic lives here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console

from store.errors import UserError

DEFAULT_WORKDIR = Path("data/work")
console = Console(stderr=True)


def user_errors(fn):
    """Turn library UserErrors (and a Ctrl-C outside training) into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    return wrapper


workdir_argument = click.argument(
    "workdir", type=click.Path(path_type=Path), default=DEFAULT_WORKDIR, required=False
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """légende: CPU-first image captioning (Inception v3 features + LSTM decoder)."""


# --- prepare / synth (owned by the foundation work) -------------------------------------------


@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--out", "workdir", type=click.Path(path_type=Path), default=DEFAULT_WORKDIR, help="Where the manifest, vocab and report go.")
@click.option("--hf", "hf_name", default=None, help="A Hugging Face dataset id to fetch instead of SOURCE.")
@click.option("--revision", default=None, help="Revision (branch, tag, commit) of the --hf dataset.")
@click.option("--image-column", default=None, help="CSV/parquet column holding image paths.")
@click.option("--caption-column", default=None, help="CSV/parquet column holding captions.")
@click.option("--split", "split", default="70/15/15", help="train/val/test percentages, by image.")
@click.option("--seed", default=0, help="Seed of the split.")
@click.option("--min-word-count", default=5, help="Words seen fewer times in train become <unk>.")
@click.option("--max-length", default=50, help="Captions with more tokens are dropped.")
@user_errors
def prepare(source, workdir, hf_name, revision, image_column, caption_column, split, seed, min_word_count, max_length):
    """Clean, split and tokenise a captioned image dataset into WORKDIR.

    SOURCE is a folder or file: a CSV of (caption, image path), Flickr8k's captions.txt or
    Flickr8k.token.txt, or parquet files as Hugging Face writes them.

    Example: python cli.py prepare data/synth --out data/work
    """
    from store.prepare import prepare as run_prepare
    from store.prepare import print_summary

    report = run_prepare(
        source, workdir, hf=hf_name, revision=revision, image_column=image_column,
        caption_column=caption_column, split=split, seed=seed,
        min_word_count=min_word_count, max_length=max_length,
    )
    print_summary(report, console)


@main.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--n", "n", default=600, help="Number of images.")
@click.option("--seed", default=0, help="Seed; the same seed gives the same dataset.")
@click.option("--size", default=356, help="Image side in pixels.")
@user_errors
def synth(outdir, n, seed, size):
    """Write the built-in synthetic scenes dataset (shapes with captions) to OUTDIR.

    Example: python cli.py synth data/synth --n 600 --seed 0
    """
    from store.synth import make_synth

    path = make_synth(outdir, n=n, seed=seed, size=size)
    console.print(f"wrote {n} images and their captions to {path}")


# --- featurize (owned by the featurize work) --------------------------------------------------


@main.command()
@workdir_argument
@click.option("--weights", default="google2015", help="google2015 | torchvision | none | PATH to a state dict.")
@click.option("--crops", default=5, help="Crops per image (crop 0 is the centre).")
@click.option("--batch-size", default=32, help="Crops per forward pass.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto")
@click.option("--workers", default=2, help="DataLoader processes decoding and resizing images.")
@click.option("--flip/--no-flip", default=False, help="Mirror some crops (off: flips swap left and right).")
@click.option("--seed", default=0, help="Seed of the random crops.")
@click.option("--resume", is_flag=True, help="Continue a store, never recomputing done rows.")
@click.option("--overwrite", is_flag=True, help="Rebuild a store whose settings differ.")
@click.option("--encoder-from", type=click.Path(path_type=Path), default=None, help="Use the fine-tuned CNN of this joint-phase run.")
@user_errors
def featurize(workdir, weights, crops, batch_size, precision, workers, flip, seed, resume, overwrite, encoder_from):
    """Run the CNN over K crops of every image and store the vectors in HDF5.

    Example: python cli.py featurize data/work --weights google2015 --crops 5
    """
    from featurize.pipeline import featurize as run_featurize

    path = run_featurize(
        workdir, weights=weights, num_crops=crops, batch_size=batch_size, precision=precision,
        workers=workers, flip=flip, seed=seed, resume=resume, overwrite=overwrite,
        encoder_from=encoder_from, console=console,
    )
    console.print(f"features in {path}")

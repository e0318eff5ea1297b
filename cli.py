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
import io
import os
from pathlib import Path
from typing import Literal, get_args, get_origin

import click
from rich.console import Console

from store.errors import UserError
from training.options import PHASES, all_options

DEFAULT_WORKDIR = Path("data/work")
console = Console(stderr=True, soft_wrap=True)  # one message, one line, whatever the width


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


workdir_argument = click.argument("workdir", type=click.Path(path_type=Path), default=DEFAULT_WORKDIR, required=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="LEGENDE_THREADS",
    help="CPU threads for torch (default: torch's, one per core). Give each process 1 when "
    "several share a machine: oversubscribed cores slow training more than 10x.",
)
def main(threads: int | None) -> None:
    """légende: CPU-first image captioning (Inception v3 features + LSTM decoder)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # DataLoader workers and child processes inherit it
        import torch

        torch.set_num_threads(threads)


# --- prepare / synth -------------------------------------------


@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "workdir",
    type=click.Path(path_type=Path),
    default=DEFAULT_WORKDIR,
    help="Where the manifest, vocab and report go.",
)
@click.option("--hf", "hf_name", default=None, help="A Hugging Face dataset id to fetch instead of SOURCE.")
@click.option("--revision", default=None, help="Revision (branch, tag, commit) of the --hf dataset.")
@click.option("--image-column", default=None, help="CSV/parquet column holding image paths.")
@click.option("--caption-column", default=None, help="CSV/parquet column holding captions.")
@click.option("--split", "split", default=None, help="train/val/test percentages, by image [default: 70/15/15].")
@click.option(
    "--split-file",
    type=click.Path(path_type=Path),
    default=None,
    help="A CSV of image,split (train, val or dev, test) to follow instead of a random split; "
    "images it does not list are left out.",
)
@click.option("--seed", type=int, default=None, help="Seed of the random split [default: 0].")
@click.option("--min-word-count", default=5, help="Words seen fewer times in train become <unk>.")
@click.option("--max-length", default=50, help="Captions with more tokens are dropped.")
@user_errors
def prepare(
    source,
    workdir,
    hf_name,
    revision,
    image_column,
    caption_column,
    split,
    split_file,
    seed,
    min_word_count,
    max_length,
):
    """Clean, split and tokenise a captioned image dataset into WORKDIR.

    SOURCE is a folder or file: a CSV of (caption, image path), Flickr8k's captions.txt or
    Flickr8k.token.txt, Karpathy's dataset_*.json (captions and split), or parquet files as
    Hugging Face writes them.

    Example: python cli.py prepare data/synth --out data/work, or with a given split
    python cli.py prepare flickr8k/ --split-file flickr8k/split.csv --out data/f8k
    """
    from prepare.dataset import prepare as run_prepare
    from prepare.dataset import print_summary

    report = run_prepare(
        source,
        workdir,
        hf=hf_name,
        revision=revision,
        image_column=image_column,
        caption_column=caption_column,
        split=split,
        split_file=split_file,
        seed=seed,
        min_word_count=min_word_count,
        max_length=max_length,
        console=console,
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
    from prepare.synth import make_synth

    path = make_synth(outdir, n=n, seed=seed, size=size)
    console.print(f"wrote {n} images and their captions to {path}")


# --- featurize --------------------------------------------------


@main.command()
@workdir_argument
@click.option("--weights", default="google2015", help="google2015 | torchvision | none | PATH to a state dict.")
@click.option(
    "--crops",
    default=1,
    help="Crops per image, crop 0 the centre. The default recipe reads only the centre; 5 feed the pooled "
    "decoder's random-crop augmentation and --tta, at 5 CNN passes per image.",
)
@click.option("--batch-size", default=8, help="Crops per forward pass (small batches stay in CPU cache).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto")
@click.option("--workers", default=2, help="DataLoader processes decoding and resizing images.")
@click.option("--flip/--no-flip", default=False, help="Mirror some crops (off: flips swap left and right).")
@click.option("--seed", default=0, help="Seed of the random crops.")
@click.option("--resume", is_flag=True, help="Continue a store, never recomputing done rows.")
@click.option("--overwrite", is_flag=True, help="Rebuild a store whose settings differ.")
@click.option(
    "--encoder-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Use the fine-tuned CNN of this joint-phase run.",
)
@click.option(
    "--chunk-rows",
    type=int,
    default=None,
    help="Images per stored chunk, the work an interruption can lose [default: 160 crops' worth].",
)
@click.option("--resize", default=356, help="Side the image is resized to before cropping.")
@click.option("--crop-size", default=299, help="Side of each crop (Inception v3 needs at least 75).")
@click.option(
    "--maps",
    type=click.Choice(["none", "centre", "all"]),
    default="centre",
    is_flag=False,
    flag_value="all",
    show_default=True,
    help="Also keep the CNN's 8x8 feature maps, which the attention decoder reads: of the centre crop "
    "(0.26 MB an image), of every crop (--maps all, K times that), or none (pooled vectors only).",
)
@click.option(
    "--view",
    type=click.Choice(["crops", "full"]),
    default="crops",
    help="crops: one CNN pass per crop; full: one pass over the whole resized image, crops pooled from its map.",
)
@user_errors
def featurize(
    workdir,
    weights,
    crops,
    batch_size,
    precision,
    workers,
    flip,
    seed,
    resume,
    overwrite,
    encoder_from,
    chunk_rows,
    resize,
    crop_size,
    maps,
    view,
):
    """Run the CNN over K crops of every image and store the vectors in HDF5.

    An interrupted run (Ctrl-C, kill, power cut) keeps its finished chunks; --resume completes
    it without recomputing them.

    After a joint-phase run, --encoder-from RUNDIR re-caches the features with its fine-tuned CNN
    (store inception_v3-finetuned-<run>.h5; train on it with --weights finetuned-<run>).

    Example: python cli.py featurize data/work --weights google2015 --crops 5
    """
    from featurize.pipeline import featurize as run_featurize

    path = run_featurize(
        workdir,
        weights=weights,
        num_crops=crops,
        batch_size=batch_size,
        precision=precision,
        workers=workers,
        flip=flip,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        encoder_from=encoder_from,
        console=console,
        chunk_rows=chunk_rows,
        resize=resize,
        crop_size=crop_size,
        maps=maps,
        view=view,
    )
    console.print(f"features in {path}")


# --- training ---------------------------------------------------------------------------------


def train_options(fn):
    """train's options: one per option field of the phases' dataclasses (training/options.py), which
    give its type, help and defaults. Each defaults to None, "not given", so that the phase that
    runs can refuse what it does not take and fill in the rest."""
    for option in reversed(all_options().values()):
        if option.type is bool:
            fn = click.option(f"{option.flag}/--no-{option.flag[2:]}", option.name, default=None, help=option.help())(
                fn
            )
        else:
            fn = click.option(option.flag, type=click_type(option.type), default=None, help=option.help())(fn)
    return fn


def click_type(annotation):
    """click's type for an option's annotation: a choice for a Literal, X for X | None, else itself."""
    if get_origin(annotation) is Literal:
        return click.Choice(get_args(annotation))
    return next((t for t in get_args(annotation) if t is not type(None)), annotation)


@main.command()
@click.argument("workdir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--run",
    "--run-dir",
    "run_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (--run-dir under torchrun, whose own --run-path swallows --run) "
    "[default: new runs/<timestamp>; with --resume, the latest run].",
)
@click.option(
    "--phase",
    type=click.Choice(list(PHASES)),
    default=None,
    help="decoder: LSTM on cached features; joint: fine-tune CNN + LSTM on images; "
    "scst: self-critical training of the LSTM on cached features, rewarded by CIDEr-D "
    "[default: the recipe, which starts with the decoder phase (docs/quality.md); with --resume, where "
    "the run stopped].",
)
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option(
    "--members", type=int, default=None, help="Train an ensemble of this many decoders that differ only in seed."
)
@click.option("--max-minutes", type=float, default=None, help="Stop cleanly (with a checkpoint) after this long.")
@train_options
@user_errors
def train(workdir, run_dir, phase, resume, members, max_minutes, **options):
    """Train the captioner; interrupt it any time and continue with --resume.

    Each option below names the phases that take it and their defaults. The phase that runs is
    --phase; without it, a new run follows the recipe, whose options are its first phase's (decoder),
    and --resume continues the phase where the run stopped. An option that phase does not take is
    refused, and so is one that would change a resumed run, except those that say --resume may change
    them. A run of several members or steps resumes without options.

    Example: python cli.py train data/work --epochs 40, then python cli.py train --resume
    """
    import legende

    outcome = legende.train(
        workdir,
        run_dir,
        phase=phase,
        members=members,
        resume=resume,
        max_minutes=max_minutes,
        console=console,
        **options,
    )
    pos = outcome.position
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    if outcome.status == "finished":
        console.print(f"[green]done[/]: {outcome.run_dir} after {pos.epoch} epochs ({pos.step} steps)")
    else:
        console.print(
            f"[yellow]stopped ({outcome.status})[/] at epoch {pos.epoch + 1}, batch {pos.batch}; checkpoint saved. "
            f"Continue with: python cli.py train --run {outcome.run_dir}{f' --phase {phase}' if phase else ''} --resume"
        )


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@user_errors
def plot(run_dir):
    """Redraw RUNDIR/plots/*.png from the metrics CSVs.

    Example: python cli.py plot runs/20261128-101500
    """
    from store.runlog import plot_run

    for path in plot_run(run_dir):
        console.print(f"wrote {path}")


# --- evaluate / caption -----------------------------------------------------------------------


def decoding_options(fn):
    """The options that choose how captions are decoded, shared by evaluate and caption; their
    defaults are decoder.decoding_options.Decoding's."""
    from decoder.decoding_options import Decoding

    d = Decoding()
    options = [
        click.option("--beam", default=d.beam, help="Beam width; 1 is greedy decoding."),
        click.option("--alpha", default=d.alpha, help="Length normalisation: score / length**alpha."),
        click.option("--tta/--center", default=d.tta, help="Average the features of the K crops, or the centre crop."),
        click.option(
            "--rerank",
            default=d.rerank,
            help="Re-rank the beam's candidates by CIDEr-D consensus with the captions of the K nearest "
            "training photos; 0 keeps the beam's best.",
        ),
        click.option("--candidates", default=d.candidates, help="Beam candidates that --rerank chooses from."),
        click.option(
            "--prior-penalty",
            default=d.prior_penalty,
            help="Lower each word by this many times its log-probability for the average training photo, so "
            "phrases the decoder says whatever the photo shows give way (more varied captions; docs/quality.md).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def with_option(fn):
    """--with OTHER, shared by evaluate and caption: other runs decoded with the run as one ensemble."""
    return click.option(
        "--with",
        "others",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Another run folder (every member's best.pt) or checkpoint file, trained apart on the same "
        "prepared and featurized WORKDIR, whose decoders join the run's in one ensemble. Repeatable.",
    )(fn)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="test")
@decoding_options
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint file [default: RUNDIR/checkpoints/best.pt].",
)
@with_option
@click.option("--report", is_flag=True, help="Also write RUNDIR/eval/<split>.html: every photo, caption and score.")
@user_errors
def evaluate(run_dir, split, checkpoint, others, report, **decoding):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of a run on a split [default RUNDIR: latest run].

    With --with OTHER the files are RUNDIR/eval/<split>+<OTHER's name>.json, _captions.csv (and .html),
    leaving the run's own evaluation alone.

    Example: python cli.py evaluate runs/20261128-101500 --split test --beam 3 --report
    """
    from rich.table import Table

    from legende import Captioner

    if run_dir is not None and checkpoint is not None and checkpoint.resolve().parent.parent != run_dir.resolve():
        raise click.UsageError(f"--checkpoint {checkpoint} is not one of {run_dir}'s: give one or the other")
    cap = Captioner.load(checkpoint or run_dir, also=others)
    result = cap.evaluate(split, report=report, **decoding)
    what = f"{cap.members} members" if cap.members > 1 else cap.loaded.path.name
    title = f"{split} split, {result['images']} images, {what} (epoch {result['epoch']}), beam {decoding['beam']}"
    if decoding["rerank"]:
        title += f", re-ranked by {decoding['rerank']} neighbours"
    table = Table(title=title)
    for name in result["scores"]:
        table.add_column(name, justify="right")
    table.add_row(*(f"{100 * v:.1f}" for v in result["scores"].values()))
    Console().print(table)
    d = result["diversity"]
    console.print(
        f"{d['distinct']:.0f} distinct captions per 100 photos, {d['vocabulary']} words used; the most frequent "
        f'3-gram, "{d["top_3gram"]}", is in {d["top_3gram_share"]:.0f} % of the captions',
        markup=False,
    )
    for note in result["notes"]:
        console.print(f"note: {note}")
    scores_file, captions_file = cap.eval_files(split)
    console.print(f"wrote {scores_file} and {captions_file.name} (scores x100)")
    if report:
        console.print(f"report: {result['report']}")


@main.command()
@click.argument("target", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Run whose best.pt to use [default: latest run].",
)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="A checkpoint file instead of --run.")
@decoding_options
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the table, CSV or JSON to this file.")
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write an HTML page of the photos and their captions to this file.",
)
@click.option(
    "--attention",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Attention decoder: write a heat-map PNG per photo (a panel per word) under this folder; "
    "JSON output also gets each word's weights over the regions, and a --report page a heat map under each word.",
)
@with_option
@click.option("--batch-size", default=16, help="Images per forward pass.")
@click.option("--workers", default=2, help="Processes decoding images.")
@user_errors
def caption(target, run_dir, checkpoint, others, fmt, out, report, attention, batch_size, workers, **decoding):
    """Caption every image under DIR (recursive), or one image file.

    Unknown words are shown as <unk>. Exit code 1 only when no image could be captioned.

    Example: python cli.py caption photos/ --format csv --out captions.csv --report captions.html
    """
    from rich.table import Table
    from rich.text import Text

    from decoder.caption_photos import format_results
    from legende import Captioner
    from store.files import atomic_write_bytes

    if run_dir is not None and checkpoint is not None:
        raise click.UsageError("give --run or --checkpoint, not both")
    cap = Captioner.load(checkpoint or run_dir, also=others, batch_size=batch_size, workers=workers)
    results = cap.caption_folder(target, report=report, attention=attention, **decoding)
    if fmt == "table":
        table = Table("image", "caption")
        base = target if target.is_dir() else target.parent
        for r in results:
            cell = r.caption if r.error is None else f"error: {r.error}"
            table.add_row(Text(str(Path(r.image).relative_to(base))), Text(cell))  # Text: no markup
    if out is not None:
        if fmt == "table":  # plain text, as wide as it needs to be, no colour codes
            buf = io.StringIO()
            Console(file=buf, width=10_000, no_color=True, highlight=False).print(table, crop=False)
            text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
        else:
            text = format_results(results, fmt)
        atomic_write_bytes(out, text.encode())
        console.print(f"wrote {len(results)} rows to {out}")
    elif fmt == "table":
        Console().print(table)
    else:
        click.echo(format_results(results, fmt), nl=False)
    if report is not None:
        console.print(f"report: {report}")
    if attention is not None:
        console.print(f"attention heat maps: {attention}/")
    failed = [r for r in results if r.error is not None]
    for r in failed:
        console.print(f"[red]skipped[/] {r.image}: {r.error}", soft_wrap=True)
    if len(failed) == len(results):
        raise UserError(f"none of the {len(results)} images could be captioned")


if __name__ == "__main__":
    main()

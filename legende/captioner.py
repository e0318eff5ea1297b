"""A trained captioner loaded once, then asked for captions as often as needed.

    cap = Captioner.load("runs/my-run")      # a run folder (an ensemble's too) or a checkpoint file
    cap = Captioner.load("runs/att", also=["runs/tfm"])  # runs trained apart, decoded as one ensemble
    cap("photo.jpg")                         # -> "a dog runs through the grass"
    cap([pil_image, "b.png"], beam=5)        # PIL images, paths or a mix -> a list of captions
    cap.caption_folder("photos/")            # -> [CaptionResult(image, caption, error)], errors included
    cap.caption_folder("photos/", attention="heat/")  # attention or transformer: + weights per word, PNGs
    cap.caption_folder("photos/", report="p.html", attention="heat/")  # and the page shows them too
    cap.evaluate("test", report=True)        # scores; RUNDIR/eval/test.{json,html}, test_captions.csv
                                             # (test+tfm.json... with also=["runs/tfm"])

`caption` and `evaluate` on the command line are this class used once, so a photo gets the same
caption from Python as from the CLI. What is slow to build is built once and kept: the decoder
(or the ensemble's decoders) and vocabulary by `load`, the CNN on the first photo (Inception v3
with its batch norm folded takes longer to build than a photo takes to encode), the re-ranking
neighbours on the first re-ranking. The decoding options default to
decoder.decoding_options.Decoding's, for every call, unless `load` or the call says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path

from PIL import Image, ImageOps

from decoder.caption_photos import CaptionResult, caption_images, find_images
from decoder.decoding_options import Decoding
from decoder.ensemble import Ensemble
from decoder.inference import LoadedCaptioner, Photo, load_ensemble, run_checkpoints
from evaluation.evaluate import evaluate_run
from evaluation.heatmaps import write_heatmaps
from evaluation.report import caption_report, decoding_text, evaluation_report, write_report
from store.errors import UserError
from store.images import to_rgb
from store.rundir import RunDir

ImageInput = str | os.PathLike | Image.Image


class Captioner:
    """Use `Captioner.load`. `decoding` holds the defaults of every call (beam, alpha, tta, rerank,
    candidates); `batch_size` photos are decoded and encoded at a time, by `workers` processes."""

    def __init__(
        self,
        loaded: LoadedCaptioner,
        run: RunDir,
        decoding: Decoding,
        batch_size: int = 16,
        workers: int = 2,
        also: tuple[Path, ...] = (),
    ):
        self.loaded, self.run, self.decoding, self.also = loaded, run, decoding, tuple(also)
        self.batch_size, self.workers = batch_size, workers

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | None = None,
        *,
        also: Iterable[str | os.PathLike] = (),
        batch_size: int = 16,
        workers: int = 2,
        **decoding,
    ) -> Captioner:
        """`source`: a run folder (its best.pt, or last.pt before there is one; every member's for an
        ensemble), a checkpoint file, or None for the latest run under runs/. `also`: other run
        folders or checkpoint files (trained apart, on the same vocabulary and feature store) whose
        decoders join source's in one ensemble; the run is still source's, where evaluate writes
        (under its own names) and whose training photos re-ranking reads. `decoding` overrides
        Decoding's defaults for this captioner, e.g. beam=5."""
        if isinstance(also, str | os.PathLike):
            also = [also]
        if source is None:
            run = RunDir.latest()
            paths = run_checkpoints(run.path)
        else:
            run, paths = _checkpoints_of(Path(source))
        others = tuple(Path(other) for other in also)
        for other in others:
            paths += _checkpoints_of(other)[1]
        seen = set()
        for path in paths:
            if path.resolve() in seen:
                raise UserError(f"{path} is in the ensemble twice: give each run or checkpoint once")
            seen.add(path.resolve())
        loaded = load_ensemble(paths)
        return cls(loaded, run, replace(Decoding(), **decoding), batch_size=batch_size, workers=workers, also=others)

    @property
    def members(self) -> int:
        """How many decoders vote on each word: 1, or an ensemble's size."""
        model = self.loaded.model
        return len(model.members) if isinstance(model, Ensemble) else 1

    def describe(self) -> str:
        """What captions: the checkpoint file, or the run(s) and the number of members."""
        if self.members == 1:
            return str(self.loaded.path)
        return " + ".join(str(x) for x in (self.run, *self.also)) + f" ({self.members} members)"

    def __call__(self, images: ImageInput | Iterable[ImageInput], **decoding) -> str | list[str]:
        """The caption of one image (a path or a PIL image), or the list of captions of several.

        A file that cannot be read raises UserError naming it; caption_folder reports it instead."""
        single = isinstance(images, str | os.PathLike | Image.Image)
        items = [images] if single else list(images)
        if not items:
            return []
        results = self._caption([_photo(x) for x in items], self._settings(decoding))
        failed = [(x, r.error) for x, r in zip(items, results, strict=True) if r.error is not None]
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise UserError(f"{failed[0][0]}: {failed[0][1]}{more}")
        captions = [r.caption for r in results]
        return captions[0] if single else captions

    def caption_folder(
        self,
        folder: str | os.PathLike,
        *,
        report: str | os.PathLike | None = None,
        attention: str | os.PathLike | None = None,
        **decoding,
    ) -> list[CaptionResult]:
        """Every image under `folder` (recursive, sorted), or `folder` itself when it is a file;
        unreadable files come back with their error. With `report`, also writes the HTML page there.
        With `attention` (a run of the attention or transformer decoder), each result also holds the
        weights behind each word, a heat-map PNG per photo is written under that folder, and the page
        (with `report`) shows a small heat map under each word of each caption."""
        target = Path(folder)
        paths = find_images(target)
        if not paths:
            raise UserError(f"no images under {target} (looked for jpg, png, webp, bmp, gif, tiff)")
        settings = self._settings(decoding)
        results = self._caption(paths, settings, attention=attention is not None)
        base = target if target.is_dir() else target.parent
        strips = {} if report is not None else None  # each word's heat map on the page
        if attention is not None:
            write_heatmaps(self.loaded, paths, results, Path(attention), base, strips)
        if report is not None:
            details = {"model": self.describe(), "photos": str(target), "decoding": decoding_text(asdict(settings))}
            write_report(Path(report), caption_report(results, base, self.run, details, strips))
        return results

    def evaluate(self, split: str = "test", *, report: bool = False, write: bool = True, **decoding) -> dict:
        """evaluation.evaluate.evaluate_run on the run's split: scores, notes and the captions.
        `write` keeps RUNDIR/eval/<split>.json and _captions.csv (<split>+<other>... with `also`:
        self.eval_files(split)); `report` also writes RUNDIR/eval/<split>.html (the same name), whose
        path is then result["report"]."""
        settings = self._settings(decoding)
        result = evaluate_run(
            self.loaded, self.run.path, split=split, write=write, joined=self.also, **asdict(settings)
        )
        if report:
            result["report"] = write_report(
                self.run.eval_report(split, self.also), evaluation_report(result, self.run, self.describe())
            )
        return result

    def eval_files(self, split: str) -> tuple[Path, Path]:
        """Where evaluate writes the scores (JSON) and the captions (CSV) of `split`."""
        return self.run.eval_json(split, self.also), self.run.eval_captions(split, self.also)

    def _settings(self, overrides: dict) -> Decoding:
        return replace(self.decoding, **overrides)

    def _caption(self, photos: list[Photo], settings: Decoding, attention: bool = False) -> list[CaptionResult]:
        # One batch gains nothing from worker processes but their start-up time.
        workers = self.workers if len(photos) > self.batch_size else 0
        return caption_images(
            self.loaded, photos, batch_size=self.batch_size, workers=workers, attention=attention, **asdict(settings)
        )


def _checkpoints_of(source: Path) -> tuple[RunDir, list[Path]]:
    """(the run, the checkpoints it decodes) of a run folder or a checkpoint file."""
    if source.is_file():
        return RunDir(source.parent.parent), [source]  # RUNDIR/checkpoints/<name>.pt
    if source.is_dir():
        return RunDir(source), run_checkpoints(source)
    raise UserError(f"{source}: no such run folder or checkpoint file")


def _photo(image: ImageInput) -> Photo:
    """A path, or a PIL image made upright and RGB the way store.images.open_image makes a file's
    (transparency on white), so that an image gives the same caption as the file it came from."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    return Path(image)

"""Readers for the caption layouts people actually have, all yielding one stream of `Row`s.

Supported sources:
- a CSV/TSV of captions and image paths: the original project's headerless two-column layout
  (caption, image path), any header with recognisable column names, or columns named with
  `--image-column` / `--caption-column`; several rows (captions) per image;
- Flickr8k's `captions.txt` (`image,caption`) and `Flickr8k.token.txt` (`image#n<TAB>caption`);
- Karpathy's `dataset_*.json` (`{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`), the
  split every published Flickr8k/Flickr30k/COCO number uses: a caption source that also gives
  the split (`prepare.splits`);
- parquet files as Hugging Face writes them: an image struct {bytes, path} plus a text column
  (`yuvalkirstain/pexel_images_lots_with_generated_captions`: `image`, `text`,
  `generated_caption`); the image bytes are extracted into `WORKDIR/images/`;
- a Hugging Face dataset id, whose parquet shards are downloaded and then read as above.

Readers never judge captions or decode images: they only say which file a row points to, or
why it points nowhere usable (a path escaping the dataset folder, a malformed line), so that
`prepare.dataset` applies one set of cleaning rules to every format. Rows are streamed, so a
large CSV or a 2 GB parquet dataset is never held in memory at once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from prepare.splits import GivenSplit, SplitEntry, split_name
from store.errors import UserError
from store.files import remove_stale_temporaries_in
from store.images import IMAGE_EXTENSIONS

# Header names we recognise, normalised (lower case, runs of other characters -> "_"), in order
# of preference: `text` (the human caption of the pexel dataset) beats `generated_caption`.
IMAGE_COLUMNS = (
    "image",
    "image_path",
    "image_name",
    "image_file",
    "img",
    "filename",
    "file_name",
    "file",
    "path",
    "photo",
    "picture",
)
CAPTION_COLUMNS = ("caption", "captions", "text", "comment", "description", "sentence", "raw", "generated_caption")
# Caption files looked for by name (case-insensitive) when SOURCE is a folder.
CAPTION_FILES = ("captions.csv", "captions.txt", "captions.tsv", "flickr8k.token.txt", "results.csv")
KARPATHY_FILES = "dataset_*.json"  # dataset_flickr8k.json, dataset_coco.json, ...
IMAGES_DIR = "images"

_FLICKR_SUFFIX = re.compile(r"(\.[A-Za-z]+)#\d+$")  # "1000268201_693b08cb0e.jpg#0"


@dataclass(frozen=True)
class Row:
    """One caption of one image, as the source gives it.

    `image` is the image's id (its path relative to the dataset folder) and `path` the absolute
    path of the file, which may not exist: `prepare.dataset` checks that. `rule` and `reason` are
    set when the reader already knows the row is unusable; `image` is then empty if the line
    itself could not be parsed. `written` is the image's path as the source wrote it, which a
    given split may name it by.
    """

    image: str
    path: Path | None
    caption: str
    where: str
    rule: str = ""
    reason: str = ""
    written: str = ""


@dataclass
class Source:
    """A readable source: its rows (a one-shot iterator), notes the reader adds while reading, and
    the split it gives, if it gives one (Karpathy's json)."""

    description: str
    rows: Iterator[Row]
    notes: list[str] = field(default_factory=list)
    split: GivenSplit | None = None


def open_source(
    source: Path | None,
    workdir: Path,
    *,
    hf: str | None = None,
    revision: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> Source:
    """The rows of SOURCE (a folder, a caption file, a parquet file) or of the `hf` dataset.

    Raises UserError when the source as a whole cannot be read: no such file, no caption file
    in a folder, no parquet shards in a dataset. Problems of single rows are left in the rows.
    """
    workdir = Path(workdir)
    if hf:
        if source is not None:
            raise UserError("give either SOURCE or --hf NAME, not both")
        folder = fetch_hf(hf, revision)
        files = parquet_files(folder)
        if not files:
            raise UserError(
                f"Hugging Face dataset {hf} has no parquet files at revision "
                f"{revision or 'main'}; try --revision refs/convert/parquet"
            )
        return _parquet_source(files, workdir, f"hf:{hf}@{revision or 'main'}", image_column, caption_column)
    if source is None:
        raise UserError("give a SOURCE (a folder, a captions CSV/txt or parquet files) or --hf NAME")
    source = Path(source)
    if not source.exists():
        raise UserError(f"no such file or folder: {source}")
    if source.is_file():
        if source.suffix.lower() == ".parquet":
            return _parquet_source([source], workdir, str(source), image_column, caption_column)
        if source.suffix.lower() == ".json":
            return _karpathy_source(source, source.parent)
        return _text_source(source, source.parent, image_column, caption_column)
    karpathy = sorted(p for p in source.glob(KARPATHY_FILES) if p.is_file())
    if karpathy:
        captions = [p for p in source.iterdir() if p.is_file() and p.name.lower() in CAPTION_FILES]
        if len(karpathy) > 1 or captions:
            names = ", ".join(p.name for p in sorted(captions) + karpathy)
            raise UserError(f"several caption files in {source} ({names}): pass the one to read as SOURCE")
        return _karpathy_source(karpathy[0], source)
    captions_file = find_captions_file(source)
    if captions_file is not None:
        return _text_source(captions_file, source, image_column, caption_column)
    files = parquet_files(source)
    if files:
        return _parquet_source(files, workdir, str(source), image_column, caption_column)
    raise UserError(
        f"no caption file ({', '.join(CAPTION_FILES)}, {KARPATHY_FILES}, *.csv) or parquet files in {source}"
    )


def find_captions_file(folder: Path) -> Path | None:
    """The caption file of a dataset folder: a known name, else its only CSV/TSV.

    Known names are also looked for one and two levels down, as in the original Flickr8k
    download (`Flickr8k_text/Flickr8k.token.txt` beside the image folder).
    """
    top = sorted(p for p in Path(folder).iterdir() if p.is_file())
    by_name = {p.name.lower(): p for p in top}
    for name in CAPTION_FILES:
        if name in by_name:
            return by_name[name]
    tables = [p for p in top if p.suffix.lower() in (".csv", ".tsv")]
    if len(tables) > 1:
        raise UserError(
            f"several CSV files in {folder} ({', '.join(p.name for p in tables)}): "
            "pass the one with the captions as SOURCE"
        )
    if tables:
        return tables[0]
    for pattern in ("*/*", "*/*/*"):
        for path in sorted(Path(folder).glob(pattern)):
            if path.name.lower() in CAPTION_FILES and path.is_file():
                return path
    return None


def parquet_files(folder: Path) -> list[Path]:
    """Parquet files under `folder`, sorted, skipping hidden folders such as `.cache`."""
    folder = Path(folder)
    return sorted(
        p for p in folder.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def fetch_hf(name: str, revision: str | None) -> Path:
    """Download (or find in the Hugging Face cache) the parquet shards of dataset `name`."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("--hf needs huggingface_hub: pip install 'legende[hf]'") from None
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=name, repo_type="dataset", revision=revision, allow_patterns="*.parquet"
        )
    except (OSError, ValueError) as e:  # network, not found, gated, offline, bad id
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"cannot fetch Hugging Face dataset {name}"
            f"{'@' + revision if revision else ''}: {type(e).__name__} {first_line}"
        ) from None
    return Path(folder)


# --- finding the file a row names --------------------------------------------------------------


class PathResolver:
    """Maps the image path written in a row to a file inside the dataset folder `root`.

    Relative paths are tried against the caption file's folder and then `root`; a bare file
    name not found there is looked up among the images anywhere under `root` (Flickr8k keeps
    its captions beside an `Images/` folder). Paths that escape `root` (`../../etc/passwd`, an
    absolute path elsewhere) are refused: a caption file from the internet must not make us
    read arbitrary files. So is a symlink inside `root` whose target resolves outside it (a link
    to `/etc/passwd`, or an `images` link to another disk: pass the real folder as SOURCE).
    """

    def __init__(self, root: Path, base: Path):
        self.root = Path(os.path.abspath(root))
        self.real_root = Path(os.path.realpath(self.root))
        base = Path(os.path.abspath(base))
        self.bases = [base] if base == self.root else [base, self.root]
        self._by_name: dict[str, list[Path]] | None = None
        # written path -> answer: datasets name each image in several rows (5 in Flickr8k), and
        # the path arithmetic and stat calls dominate reading a large caption file
        self._cache: dict[str, Row] = {}

    def resolve(self, written: str) -> Row:
        """A Row (caption and where left empty) with the image id and path, or the refusal."""
        found = self._cache.get(written)
        if found is None:
            text = _FLICKR_SUFFIX.sub(r"\1", str(written).strip().replace("\\", "/"))
            found = self._cache[written] = dataclasses.replace(self._resolve(text), written=text)
        return found

    def _resolve(self, text: str) -> Row:
        if not text:
            return Row("", None, "", "", "no_image", "no image path")
        written_path = PurePosixPath(text)
        candidates = [Path(os.path.normpath(base / written_path)) for base in self.bases]
        inside = [c for c in candidates if self._inside(c)]
        if not inside:
            return Row(text, None, "", "", "outside_dataset", f"path outside the dataset folder {self.root}")
        for path in inside:
            try:
                if path.exists():
                    return self._row(path, text)
            except OSError as e:  # a name longer than the file system allows
                return Row(text, None, "", "", "bad_path", f"unusable path: {e.strerror or e}")
        if len(written_path.parts) == 1:
            hits = self._index().get(text, [])
            if len(hits) == 1:
                return self._row(hits[0], text)
            if len(hits) > 1:
                return Row(text, None, "", "", "ambiguous", f"{len(hits)} files named {text} under {self.root}")
        return self._row(inside[0], text)  # missing: prepare reports it with the path tried

    def _row(self, path: Path, text: str) -> Row:
        real = Path(os.path.realpath(path))
        if real != self.real_root and self.real_root not in real.parents:
            reason = f"a symlink that resolves to {real}, outside the dataset folder {self.root}"
            return Row(text, None, "", "", "outside_dataset", reason)
        return Row(path.relative_to(self.root).as_posix(), path, "", "")

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        self._by_name.setdefault(name, []).append(Path(dirpath) / name)
        return self._by_name


# --- CSV, TSV, captions.txt, Flickr8k.token.txt ------------------------------------------------


def _text_source(path: Path, root: Path, image_column: str | None, caption_column: str | None) -> Source:
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    source = Source(str(path), iter(()))
    source.rows = _text_rows(path, PathResolver(root, path.parent), image_column, caption_column, source.notes)
    return source


def _text_rows(
    path: Path, resolver: PathResolver, image_column: str | None, caption_column: str | None, notes: list[str]
) -> Iterator[Row]:
    with open(path, "rb") as f:
        lines = _decoded_lines(f, path, notes)
        first_line = next(lines, "")
        if not first_line.strip():
            raise UserError(f"{path} is empty (its first line is blank)")
        delimiter = _delimiter(first_line)
        reader = csv.reader(itertools.chain([first_line], lines), delimiter=delimiter)
        try:
            first = next(reader)
        except csv.Error as e:
            raise UserError(f"{path}: not a caption table ({e})") from None
        img_idx, cap_idx, has_header = _layout([c.strip() for c in first], path, image_column, caption_column)
        ncols = len(first)
        if not has_header:
            yield _text_row(first, img_idx, cap_idx, ncols, delimiter, f"{path.name}:1", resolver)
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a field over csv.field_size_limit(); skip that line
                yield Row("", None, "", f"{path.name}:{reader.line_num}", "malformed", str(e))
                continue
            if not any(cell.strip() for cell in cells):
                continue
            if swallowed := _swallowed_lines(cells, delimiter):
                start = reader.line_num - swallowed
                yield Row(
                    "",
                    None,
                    "",
                    f"{path.name}:{start}",
                    "malformed",
                    f"a quote opened on line {start} is not closed, so lines {start}-{reader.line_num} "
                    "were read as one row; close the quote",
                )
                continue
            yield _text_row(cells, img_idx, cap_idx, ncols, delimiter, f"{path.name}:{reader.line_num}", resolver)


def _swallowed_lines(cells: list[str], delimiter: str) -> int:
    """How many line breaks a row's cells hold, if they hold whole rows (a line with the
    delimiter): the sign of an unclosed quote, which makes csv read on to the next quote or the
    end of the file. A quoted caption broken over lines without a delimiter is left as text."""
    # a quote left open at the end of the file also holds that last line's own line break
    lines = [cell.rstrip("\r\n").splitlines() for cell in cells]
    if not any(delimiter in line for cell_lines in lines for line in cell_lines[1:]):
        return 0
    return sum(max(len(cell_lines) - 1, 0) for cell_lines in lines)


def _text_row(
    cells: list[str], img_idx: int, cap_idx: int, ncols: int, delimiter: str, where: str, resolver: PathResolver
) -> Row:
    if len(cells) > ncols and cap_idx == ncols - 1 and img_idx < cap_idx:
        # an unquoted delimiter inside the last column, the caption: keep it as text
        cells = cells[:cap_idx] + [delimiter.join(cells[cap_idx:])]
    if len(cells) != ncols:
        return Row(
            "", None, delimiter.join(cells), where, "malformed", f"{len(cells)} fields where the file has {ncols}"
        )
    found = resolver.resolve(cells[img_idx])
    return Row(found.image, found.path, cells[cap_idx].strip(), where, found.rule, found.reason, found.written)


def _decoded_lines(f, path: Path, notes: list[str]) -> Iterator[str]:
    """Text lines of a binary file: UTF-8 (BOM or not), UTF-16 with BOM, and Latin-1 per line
    for lines that are not valid UTF-8, counted in `notes` rather than crashing the run."""
    head = f.read(2)
    f.seek(0)
    if head in (b"\xff\xfe", b"\xfe\xff"):
        import io

        yield from io.TextIOWrapper(f, encoding="utf-16", errors="replace", newline="")
        return
    latin1 = 0
    # bytes.splitlines also ends lines at a lone CR (old Mac spreadsheets), which iterating the
    # file does not; a CR the csv module finds mid-line is an error
    pieces = (piece for raw in f for piece in raw.splitlines(keepends=True))
    for number, raw in enumerate(pieces):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("latin-1")
            latin1 += 1
        yield line.lstrip("\ufeff") if number == 0 else line
    if latin1:
        notes.append(f"{path.name}: {latin1} line(s) were not valid UTF-8 and were read as Latin-1")


def _delimiter(first_line: str) -> str:
    """Tab if the first line has one (Flickr8k.token.txt, TSV), else `|` or `;` when the line
    has no comma (Flickr30k's results.csv, European spreadsheets), else a comma."""
    if "\t" in first_line:
        return "\t"
    for candidate in ("|", ";"):
        if candidate in first_line and "," not in first_line:
            return candidate
    return ","


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def _pick_column(names: list[str], wanted: str | None, known: tuple[str, ...]) -> int | None:
    """Index of the column the user named (exactly or once normalised), else of the first
    known name, in order of preference."""
    normalised = [_normalise_name(n) for n in names]
    if wanted is not None:
        for candidates in (names, normalised):
            for target in (wanted.strip(), _normalise_name(wanted)):
                if target in candidates:
                    return candidates.index(target)
        return None
    for name in known:
        if name in normalised:
            return normalised.index(name)
    return None


def _looks_like_image(cell: str) -> bool:
    text = _FLICKR_SUFFIX.sub(r"\1", cell.strip())
    return PurePosixPath(text.replace("\\", "/")).suffix.lower() in IMAGE_EXTENSIONS


def _layout(
    first: list[str], path: Path, image_column: str | None, caption_column: str | None
) -> tuple[int, int, bool]:
    """(image column, caption column, whether the first line is a header)."""
    img_idx = _pick_column(first, image_column, IMAGE_COLUMNS)
    cap_idx = _pick_column(first, caption_column, CAPTION_COLUMNS)
    for given, idx, kind in ((image_column, img_idx, "image"), (caption_column, cap_idx, "caption")):
        if given is not None and idx is None:
            raise UserError(f"{path}: no {kind} column {given!r} (columns: {', '.join(first)})")
    if img_idx is not None and cap_idx is not None and img_idx != cap_idx:
        return img_idx, cap_idx, True
    # No header: the original (caption, image path) layout or Flickr8k.token.txt, told apart by
    # which of the two cells names an image file.
    looks = [i for i, cell in enumerate(first) if _looks_like_image(cell)]
    if len(first) == 2 and len(looks) == 1 and image_column is None and caption_column is None:
        return looks[0], 1 - looks[0], False
    missing = "image" if img_idx is None else "caption"
    shown = " ".join(", ".join(first).split())[:120]  # one line, even for a binary file
    raise UserError(f"{path}: no recognisable {missing} column (first line: {shown}); name it with --{missing}-column")


# --- Karpathy's dataset_*.json -----------------------------------------------------------------


def _karpathy_source(path: Path, root: Path) -> Source:
    """Captions and split of a Karpathy json; images are found like Flickr8k's (beside the json,
    or by file name anywhere under `root`: `Flicker8k_Dataset/`, `images/`)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f'{path}: not a Karpathy dataset file (no "images" list of filename, split, sentences)')
    entries = []
    for i, item in enumerate(images):
        written = _karpathy_path(item)
        if written:  # an entry without a file name is a malformed row, reported by the reader
            where = f"{path.name}:images[{i}]"
            entries.append(SplitEntry(written, split_name(item.get("split"), written, where), where))
    name = data.get("dataset") if isinstance(data.get("dataset"), str) else "Karpathy"
    source = Source(f"{path} ({name}, with its split)", iter(()), split=GivenSplit(str(path), entries))
    source.rows = _karpathy_rows(images, path.name, PathResolver(root, path.parent))
    return source


def _karpathy_path(item) -> str:
    """`filepath/filename` (COCO's `val2014/...`), or `filename`; "" when there is none."""
    if not isinstance(item, dict) or not isinstance(item.get("filename"), str) or not item["filename"].strip():
        return ""
    folder = item.get("filepath")
    name = item["filename"].strip()
    return f"{folder.strip().strip('/')}/{name}" if isinstance(folder, str) and folder.strip() else name


def _karpathy_rows(images: list, name: str, resolver: PathResolver) -> Iterator[Row]:
    for i, item in enumerate(images):
        where = f"{name}:images[{i}]"
        written = _karpathy_path(item)
        if not written:
            yield Row("", None, "", where, "malformed", "an image entry without a filename")
            continue
        found = resolver.resolve(written)
        if not found.rule and not found.path.exists() and "/" in written:
            # COCO's `val2014/` may not be the folder the images sit in here: look the name up
            by_name = resolver.resolve(PurePosixPath(written).name)
            if by_name.rule or by_name.path.exists():
                found = dataclasses.replace(by_name, written=written)
        sentences = item.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            yield Row(found.image, found.path, "", where, found.rule, found.reason, found.written)
            continue
        for sentence in sentences:
            yield Row(found.image, found.path, _sentence(sentence), where, found.rule, found.reason, found.written)


def _sentence(sentence) -> str:
    """A sentence's `raw` text, else its `tokens` joined; "" (an empty caption) otherwise."""
    if isinstance(sentence, str):
        return sentence
    if not isinstance(sentence, dict):
        return ""
    if isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    tokens = sentence.get("tokens")
    return " ".join(str(t) for t in tokens) if isinstance(tokens, list) else ""


# --- parquet ------------------------------------------------------------------------------------


def _parquet_source(
    files: list[Path], workdir: Path, description: str, image_column: str | None, caption_column: str | None
) -> Source:
    source = Source(description, iter(()))
    source.rows = _parquet_rows(files, workdir, image_column, caption_column, source.notes)
    return source


def _parquet_rows(
    files: list[Path], workdir: Path, image_column: str | None, caption_column: str | None, notes: list[str]
) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(os.path.abspath(workdir)) / IMAGES_DIR
    if out.is_dir():  # images half-written by a killed run are written again below
        remove_stale_temporaries_in(out)
    for path in files:
        try:
            table = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            notes.append(f"{path.name}: skipped, not a readable parquet file ({e})")
            continue
        img_col, cap_col = _parquet_columns(table.schema_arrow, path, image_column, caption_column)
        resolver = PathResolver(path.parent, path.parent)
        index = 0
        for batch in table.iter_batches(batch_size=64, columns=[img_col, cap_col]):
            for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                where = f"{path.name} row {index}"
                index += 1
                found = _parquet_image(image, out, resolver)
                captions = caption if isinstance(caption, list) else [caption]
                for text in captions:
                    caption = "" if text is None else str(text)
                    yield Row(found.image, found.path, caption, where, found.rule, found.reason, found.written)


def _parquet_columns(schema, path: Path, image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    """Image and caption columns by the given or a known name; else the image column is the
    first holding bytes (a struct with a `bytes` field, or a binary column)."""
    import pyarrow as pa

    names = list(schema.names)
    img_idx = _pick_column(names, image_column, IMAGE_COLUMNS)
    cap_idx = _pick_column(names, caption_column, CAPTION_COLUMNS)
    for given, idx, kind in ((image_column, img_idx, "image"), (caption_column, cap_idx, "caption")):
        if given is not None and idx is None:
            raise UserError(f"{path}: no {kind} column {given!r} (columns: {', '.join(names)})")
    if img_idx is None:
        for i, f in enumerate(schema):
            struct_bytes = pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0
            if struct_bytes or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
                img_idx = i
                break
    if img_idx is None or cap_idx is None or img_idx == cap_idx:
        missing = "image" if img_idx is None else "caption"
        raise UserError(
            f"{path}: no recognisable {missing} column (columns: {', '.join(names)}); name it with --{missing}-column"
        )
    return names[img_idx], names[cap_idx]


def _parquet_image(value, out: Path, resolver: PathResolver) -> Row:
    """Where the image of one parquet cell is: its bytes written to `out`, or the file its path
    names (Hugging Face stores only a path when the bytes live beside the parquet file)."""
    data, written = None, None
    if isinstance(value, dict):
        data, written = value.get("bytes"), value.get("path")
    elif isinstance(value, bytes | bytearray):
        data = value
    elif isinstance(value, str):
        written = value
    if data:
        path = extract_image(bytes(data), out, written)
        return Row(path.name, path, "", "", written=str(written or ""))
    if written:
        return resolver.resolve(written)
    return Row("", None, "", "", "no_image", "no image bytes or path")


def extract_image(data: bytes, out: Path, written: str | None = None) -> Path:
    """Write image bytes to `out/<sha256 prefix><ext>` and return the path.

    Naming by content makes identical images one image (several captions) and reruns
    idempotent: an existing file of the right size is not rewritten.
    """
    suffix = PurePosixPath(str(written or "")).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        suffix = _sniff_suffix(data)
    path = out / (hashlib.sha256(data).hexdigest()[:20] + suffix)
    if not (path.is_file() and path.stat().st_size == len(data)):
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


_MAGIC = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG", ".png"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def _sniff_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return ".img"  # unknown: Pillow decides when prepare checks it

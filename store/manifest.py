"""The dataset manifest: one JSON line per image (id, path, split, cleaned captions).

JSON lines rather than CSV because an image has a variable number of captions, and sorted keys
with a fixed separator so that the same input and seed give a byte-identical file, whose
hash then identifies the dataset in every feature store and checkpoint built from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store.errors import UserError
from store.files import atomic_write_bytes

MANIFEST_NAME = "manifest.jsonl"
VOCAB_NAME = "vocab.json"
REPORT_NAME = "prepare_report.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image of the dataset; `captions` are cleaned, space-separated tokens."""

    id: str
    path: str
    split: str
    captions: list[str] = field(default_factory=list)


def write_manifest(workdir: Path, records: list[Record]) -> Path:
    lines = [json.dumps(asdict(r), sort_keys=True, ensure_ascii=False) for r in records]
    path = Path(workdir) / MANIFEST_NAME
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def read_manifest(workdir: Path) -> list[Record]:
    path = Path(workdir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no manifest at {path}: run `python cli.py prepare SOURCE --out {workdir}` first")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{path}:{lineno}: not a manifest row ({e})") from None
    return records


def manifest_sha256(workdir: Path) -> str:
    path = Path(workdir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"no manifest at {path}: run `python cli.py prepare` first")
    return hashlib.sha256(path.read_bytes()).hexdigest()

"""Caption text to token ids and back: normalisation, a model-free tokeniser and the vocabulary.

The tokeniser is a regular expression rather than spaCy so that nothing is downloaded; the same
function cleans training captions, evaluation references and generated output, so all three
are compared on equal terms.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from store.errors import UserError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Words are runs of letters or digits of any script ("café" must not become "caf"), keeping inner
# apostrophes and hyphens ("man's", "t-shirt"); every other punctuation mark is dropped, as the
# caption metrics' PTB tokenizer would strip it anyway.
_TOKEN = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case, Unicode-normalised word tokens of `text`."""
    text = unicodedata.normalize("NFKC", str(text)).lower().replace("\u2019", "'")
    return _TOKEN.findall(text)


def normalize_caption(text: str) -> str:
    """The cleaned caption as stored in the manifest: tokens joined by single spaces."""
    return " ".join(tokenize(text))


class Vocabulary:
    """Maps tokens to ids; ids 0..3 are always <pad> <start> <end> <unk>."""

    def __init__(self, itos: list[str]):
        if list(itos[: len(SPECIALS)]) != list(SPECIALS):
            raise UserError(f"vocabulary must start with {' '.join(SPECIALS)}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for tokens in token_lists for t in tokens)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + [w for w in words if w not in SPECIALS])

    def encode(self, tokens: list[str]) -> list[int]:
        """Token ids without any special marker; unknown words become <unk>."""
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, without <start>/<pad>; <unk> is kept as the word "<unk>"."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return words

    def save(self, path: Path) -> None:
        from store.files import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps(self.itos, ensure_ascii=False, indent=0).encode())

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no vocabulary at {path}: run `python cli.py prepare` first")
        try:
            return cls(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not a vocabulary file ({e})") from None
